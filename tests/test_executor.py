"""One failure policy for stage jobs, in-process and on Ray: UserError stops, listed errors are
retried a bounded number of times, dead actors are replaced, a final failure is one record."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from ssl_kd.errors import UserError
from ssl_kd.executor import Failure, map_actors, map_tasks


def _attempt(root: str, name: str) -> int:
    """Count one more attempt at ``name`` (a file survives the process that made it)."""
    marker = Path(root) / f"{name}.attempts"
    with marker.open("a") as fh:
        fh.write("x")
    return len(marker.read_text())


def square_after(root: str, i: int, fails: int) -> int:
    """i², after ``fails`` I/O errors."""
    if _attempt(root, f"task-{i}") <= fails:
        raise OSError(f"flaky disk at job {i}")
    return i * i


def refuse(root: str, i: int) -> int:
    _attempt(root, f"task-{i}")
    if i == 1:
        raise UserError(f"job {i} got bad input")
    return i


def broken(root: str, i: int) -> int:
    _attempt(root, f"task-{i}")
    raise ValueError(f"bug in job {i}")


class Worker:
    """Loads once (counted), then squares items; the first call of the first worker fails."""

    def __init__(self, root: str, fails: int = 0, die: bool = False) -> None:
        self.root, self.fails, self.die = root, fails, die
        _attempt(root, "loads")

    def square(self, i: int) -> int:
        if _attempt(self.root, f"item-{i}") <= self.fails:
            raise OSError(f"flaky disk at item {i}")
        if self.die and _attempt(self.root, "deaths") == 1:
            os._exit(1)  # a crashed worker process
        if i < 0:
            raise UserError("negative items are bad input")
        return i * i


def _collect() -> tuple[dict[int, Any], Any]:
    results: dict[int, Any] = {}

    def on_done(i: int, result: Any, attempts: int) -> None:
        results[i] = (result, attempts)

    return results, on_done


def _attempts(root: Path, name: str) -> int:
    return len((root / f"{name}.attempts").read_text())


def test_tasks_are_retried_then_succeed(tmp_path: Path) -> None:
    results, on_done = _collect()
    map_tasks(
        square_after,
        4,
        lambda i: (str(tmp_path), i, i % 3),
        executor="local",
        on_done=on_done,
        max_retries=2,
        retry_on=(OSError,),
    )
    assert results == {0: (0, 1), 1: (1, 2), 2: (4, 3), 3: (9, 1)}


def test_bounded_retries_then_stop_or_record(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(OSError, match="flaky disk at job 0"):
        map_tasks(
            square_after,
            3,
            lambda i: (str(tmp_path / "a"), i, 5),
            executor="local",
            on_done=lambda *a: None,
            max_retries=1,
            retry_on=(OSError,),
        )
    assert _attempts(tmp_path / "a", "task-0") == 2
    results, on_done = _collect()
    map_tasks(
        square_after,
        2,
        lambda i: (str(tmp_path / "b"), i, 5 * i),
        executor="local",
        on_done=on_done,
        max_retries=1,
        retry_on=(OSError,),
        keep_going=True,
    )
    failure = Failure("OSError('flaky disk at job 1')", 2)
    assert results == {0: (0, 1), 1: (failure, 2)}
    assert failure.record() == {"failed": True, "error": failure.error, "attempts": 2}


def test_user_error_stops_at_once_and_unlisted_errors_are_not_retried(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match="job 1 got bad input"):
        map_tasks(
            refuse,
            3,
            lambda i: (str(tmp_path), i),
            executor="local",
            on_done=lambda *a: None,
            max_retries=3,
            retry_on=(Exception,),
        )
    assert _attempts(tmp_path, "task-1") == 1 and not (tmp_path / "task-2.attempts").exists()
    with pytest.raises(ValueError, match="bug in job 0"):
        map_tasks(
            broken,
            1,
            lambda i: (str(tmp_path / "b"), i),
            executor="local",
            on_done=lambda *a: None,
            max_retries=3,
            retry_on=(OSError,),
        )
    assert _attempts(tmp_path / "b", "task-0") == 1


def test_actors_load_once_and_follow_the_policy(tmp_path: Path) -> None:
    results, on_done = _collect()
    map_actors(
        Worker,
        (str(tmp_path), 1),
        "square",
        [2, 3],
        executor="local",
        on_done=on_done,
        max_retries=1,
    )
    assert results == {0: (4, 2), 1: (9, 2)} and _attempts(tmp_path, "loads") == 1
    (tmp_path / "x").mkdir()
    results, on_done = _collect()
    map_actors(
        Worker,
        (str(tmp_path / "x"), 9),
        "square",
        [5],
        executor="local",
        on_done=on_done,
        max_retries=2,
    )
    assert results == {0: (Failure("OSError('flaky disk at item 5')", 3), 3)}
    with pytest.raises(UserError, match="bad input"):
        map_actors(
            Worker,
            (str(tmp_path),),
            "square",
            [-1],
            executor="local",
            on_done=on_done,
            max_retries=2,
        )


@pytest.fixture
def ray_by_value() -> None:
    import ray.cloudpickle

    # Ray workers cannot import this test module: ship its functions and classes by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
@pytest.mark.usefixtures("ray_by_value")
def test_ray_tasks_follow_the_same_policy(tmp_path: Path) -> None:
    results, on_done = _collect()
    map_tasks(
        square_after,
        4,
        lambda i: (str(tmp_path), i, i % 3),
        executor="ray",
        on_done=on_done,
        max_retries=2,
        retry_on=(OSError,),
        window=2,
    )
    assert results == {0: (0, 1), 1: (1, 2), 2: (4, 3), 3: (9, 1)}

    (tmp_path / "b").mkdir()
    results, on_done = _collect()
    map_tasks(
        square_after,
        2,
        lambda i: (str(tmp_path / "b"), i, 5 * i),
        executor="ray",
        on_done=on_done,
        max_retries=1,
        retry_on=(OSError,),
        keep_going=True,
    )
    assert results == {0: (0, 1), 1: (Failure("OSError('flaky disk at job 1')", 2), 2)}

    (tmp_path / "c").mkdir()
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="job 1 got bad input"):
        map_tasks(
            refuse,
            2,
            lambda i: (str(tmp_path / "c"), i),
            executor="ray",
            on_done=lambda *a: None,
            max_retries=3,
            retry_on=(Exception,),
        )
    assert _attempts(tmp_path / "c", "task-1") == 1
    with pytest.raises(OSError, match="flaky disk at job 0"):
        map_tasks(
            square_after,
            1,
            lambda i: (str(tmp_path / "d"), i, 9),
            executor="ray",
            on_done=lambda *a: None,
            max_retries=1,
            retry_on=(OSError,),
        )
    assert _attempts(tmp_path / "d", "task-0") == 2


@pytest.mark.slow
@pytest.mark.usefixtures("ray_by_value")
def test_ray_actors_replace_the_dead_and_retry(tmp_path: Path) -> None:
    results, on_done = _collect()
    map_actors(
        Worker,
        (str(tmp_path), 0, True),
        "square",
        [1, 2, 3],
        executor="ray",
        on_done=on_done,
        max_retries=1,
        actors=1,
        actor_options={"num_cpus": 1},
    )
    assert {i: r for i, (r, _) in results.items()} == {0: 1, 1: 4, 2: 9}
    assert sorted(a for _, a in results.values()) in ([1, 1, 2], [1, 2, 2])
    assert _attempts(tmp_path, "loads") == 2  # the first worker and its replacement

    (tmp_path / "b").mkdir()
    results, on_done = _collect()
    map_actors(
        Worker,
        (str(tmp_path / "b"), 9),
        "square",
        [5],
        executor="ray",
        on_done=on_done,
        max_retries=1,
    )
    assert results == {0: (Failure("OSError('flaky disk at item 5')", 2), 2)}
    with pytest.raises(UserError, match="bad input"):
        map_actors(
            Worker,
            (str(tmp_path / "b"),),
            "square",
            [-1],
            executor="ray",
            on_done=on_done,
            max_retries=2,
        )


class _RefusingRay:
    """Stands in for ``ray``: ``init`` fails as Ray 2.60 does when the cluster refuses a token."""

    def __init__(self, error: BaseException) -> None:
        import ray

        self.exceptions = ray.exceptions
        self.error = error

    def init(self, **kwargs: Any) -> None:
        raise self.error


def _refused_after_retries() -> ConnectionError:
    """What ``ray.init(address)`` raises after its retries: the cause holds the last error's
    traceback as text."""
    try:
        raise RuntimeError(
            "Failed to connect to GCS. Last connection error: Traceback (most recent call last):"
            "\nray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication "
            "token is missing or incorrect"
        )
    except RuntimeError as cause:
        try:
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379") from cause
        except ConnectionError as exc:
            return exc


@pytest.mark.parametrize("mode", ["token", None])
def test_a_refused_token_is_one_line_that_says_how_to_set_it(
    monkeypatch: pytest.MonkeyPatch, mode: str | None
) -> None:
    from ray.exceptions import AuthenticationError

    from ssl_kd.ray_cluster import _join

    if mode is None:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", mode)
    for error in (_refused_after_retries(), AuthenticationError("no token found")):
        with pytest.raises(UserError) as err:
            _join(_RefusingRay(error), "127.0.0.1:6379")
        message = str(err.value)
        assert "\n" not in message and "127.0.0.1:6379" in message
        assert "token is missing or wrong" in message
        assert "RAY_AUTH_TOKEN" in message and "~/.ray/auth_token" in message
        assert ("not 'token'" in message) == (mode is None)


def test_other_connection_errors_pass_through() -> None:
    from ssl_kd.ray_cluster import _join

    unreachable = ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")
    with pytest.raises(ConnectionError, match=r"10\.0\.0\.1"):
        _join(_RefusingRay(unreachable), "10.0.0.1:6379")
