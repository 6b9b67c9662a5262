"""In this process or on Ray: how a stage runs its jobs, with one failure policy.

Two shapes of work, one signature style:

- :func:`map_tasks` runs stateless jobs ``fn(*job_args(i))``: in order in this process, or as Ray
  tasks (one CPU each), at most ``window`` in flight, their arguments built only when they start.
- :func:`map_actors` runs jobs on workers that load something once (a model): one
  ``worker_cls(*worker_args)`` in this process, or ``actors`` Ray actors with two calls queued
  on each, so the next job is ready when one finishes.

The policy is the same for both, in-process and on Ray:

- a :class:`~ssl_kd.errors.UserError` (bad input) or a full disk stops the run at once;
- an exception listed in ``retry_on``, or a worker process that died, is retried until the job
  has had ``max_retries + 1`` attempts; a dead Ray actor is replaced (once per death, so a
  replacement that dies is replaced too) and its jobs retried on whichever actor is free;
- a job whose last attempt fails becomes a :class:`Failure`: with ``keep_going`` it is handed to
  ``on_done`` like a result, else the run stops with its exception (and Ray tasks still in
  flight are cancelled).

``on_done(i, result, attempts)`` runs in the driver as each job ``i`` finishes.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ssl_kd.errors import UserError, environment_error
from ssl_kd.ray_cluster import connect_ray

log = logging.getLogger(__name__)

Executor = Literal["ray", "local"]
OnDone = Callable[[int, Any, int], None]  # (job index, result or Failure, attempts)
_AGAIN = object()  # the policy's answer "run the job again" (a job may return None)


@dataclass(frozen=True)
class Failure:
    """A job whose last allowed attempt failed: the one failure record of every stage."""

    error: str
    attempts: int

    def record(self) -> dict[str, Any]:
        """JSON-able: ``failed``, ``error``, ``attempts``."""
        return {"failed": True, "error": self.error, "attempts": self.attempts}


def _cause(exc: BaseException) -> BaseException:
    """The job's own exception inside a Ray task error, else ``exc``."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@dataclass
class _Policy:
    """Counts attempts per job and decides, for each failed one, retry, record or stop."""

    max_retries: int
    retry_on: tuple[type[BaseException], ...]
    keep_going: bool
    attempts: dict[int, int] = field(default_factory=dict)

    def start(self, i: int) -> None:
        self.attempts[i] = self.attempts.get(i, 0) + 1

    def failed(self, i: int, exc: BaseException, what: Any, died: bool = False) -> Any:
        """``_AGAIN`` to run job ``i`` again, or its Failure; raises when the run must stop."""
        cause = _cause(exc)
        if isinstance(cause, UserError):
            raise cause
        if (error := environment_error(cause)) is not None:
            raise error from None  # a full disk: every retry would fail the same way
        n = self.attempts[i]
        if (died or isinstance(cause, self.retry_on)) and n <= self.max_retries:
            log.warning("%s failed (attempt %d), retrying: %s", what, n, _first_line(cause))
            return _AGAIN
        if not self.keep_going:
            raise cause
        log.warning("%s failed on its last attempt (%d): %s", what, n, _first_line(cause))
        # A dead process has no exception of its own; Ray's message says what happened.
        return Failure(_first_line(exc) if died else repr(cause), n)


def _call_local(call: Callable[[], Any], policy: _Policy, i: int, what: Any) -> Any:
    """``call()`` in this process under the policy: its result or a Failure."""
    while True:
        policy.start(i)
        try:
            return call()
        except Exception as exc:
            outcome = policy.failed(i, exc, what)
            if outcome is not _AGAIN:
                return outcome


def map_tasks(
    fn: Callable[..., Any],
    n_jobs: int,
    job_args: Callable[[int], tuple],
    *,
    executor: Executor,
    on_done: OnDone,
    max_retries: int = 0,
    retry_on: tuple[type[BaseException], ...] = (),
    keep_going: bool = False,
    window: int = 0,
) -> None:
    """Run ``fn(*job_args(i))`` for every ``i < n_jobs``; the first argument names a job in
    logs. ``window``: Ray tasks in flight at most (0: twice the cluster's CPUs)."""
    policy = _Policy(max_retries, tuple(retry_on), keep_going)
    if executor == "local":
        for i in range(n_jobs):
            args = job_args(i)
            on_done(i, _call_local(lambda a=args: fn(*a), policy, i, args[0]), policy.attempts[i])
    else:
        _ray_tasks(fn, n_jobs, job_args, on_done, policy, window)


def _ray_tasks(
    fn: Callable[..., Any],
    n_jobs: int,
    job_args: Callable[[int], tuple],
    on_done: OnDone,
    policy: _Policy,
    window: int,
) -> None:
    ray = connect_ray()
    # Retries are ours (the same policy in-process and on Ray), so Ray's own are off.
    task = ray.remote(fn).options(num_cpus=1, max_retries=0)
    # A bounded window keeps the arguments of only a few tasks per CPU in the object store.
    window = window or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    queue = deque(range(n_jobs))
    inflight: dict[Any, tuple[int, Any]] = {}
    try:
        while queue or inflight:
            while queue and len(inflight) < window:
                i = queue.popleft()
                args = job_args(i)
                policy.start(i)
                inflight[task.remote(*args)] = (i, args[0])
            done, _ = ray.wait(list(inflight), num_returns=1)
            i, what = inflight.pop(done[0])
            result = _get(ray, done[0], policy, i, what)
            if result is _AGAIN:
                queue.append(i)
            else:
                on_done(i, result, policy.attempts[i])
    except BaseException:
        for ref in inflight:  # so that none goes on writing after the run stopped
            ray.cancel(ref)
        raise


def _get(ray: Any, ref: Any, policy: _Policy, i: int, what: Any) -> Any:
    """The result of a finished Ray call, or what the policy makes of its failure."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        died = not isinstance(exc, ray.exceptions.RayTaskError)
        return policy.failed(i, exc, what, died)


def map_actors(
    worker_cls: type,
    worker_args: tuple,
    method: str,
    items: Sequence[Any],
    *,
    executor: Executor,
    on_done: OnDone,
    max_retries: int = 0,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    keep_going: bool = True,
    actors: int = 1,
    actor_options: dict[str, Any] | None = None,
) -> None:
    """Run ``worker.<method>(items[i])`` for every item on workers built once each;
    ``actor_options`` are Ray's (``num_cpus``, ``num_gpus``, ...)."""
    policy = _Policy(max_retries, tuple(retry_on), keep_going)
    if executor == "local":
        call = getattr(worker_cls(*worker_args), method)
        for i, item in enumerate(items):
            on_done(i, _call_local(lambda x=item: call(x), policy, i, item), policy.attempts[i])
    else:
        _ray_actors(worker_cls, worker_args, method, items, on_done, policy, actors, actor_options)


def _ray_actors(
    worker_cls: type,
    worker_args: tuple,
    method: str,
    items: Sequence[Any],
    on_done: OnDone,
    policy: _Policy,
    actors: int,
    actor_options: dict[str, Any] | None,
) -> None:
    ray = connect_ray()
    actor_cls = ray.remote(worker_cls).options(**(actor_options or {}))
    pool = _ActorPool(ray, lambda: actor_cls.remote(*worker_args), method, items, policy)
    for _ in range(max(1, min(actors, len(items)))):
        pool.start()
    while pool.inflight or (pool.queue and pool.starting):
        if pool.dead and not pool.inflight:
            log.info("waiting for room on the cluster for %d worker(s)", len(pool.starting))
        done, _ = ray.wait([*pool.inflight, *pool.starting], num_returns=1)
        if done[0] in pool.starting:
            pool.started(done[0])
        else:
            pool.finished(done[0], on_done)
    if pool.queue:
        raise RuntimeError(
            f"every worker died and {pool.start_failures} replacements failed to start "
            f"({pool.start_error}): {len(pool.queue)} job(s) not run"
        )


def _start_error(exc: BaseException) -> BaseException | str:
    """Why an actor died starting: the UserError its ``__init__`` raised (Ray keeps only its
    text, ending ``ssl_kd.errors.UserError: MESSAGE``), else the last line of Ray's message."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    if getattr(exc, "actor_init_failed", False):
        name, _, message = last.partition(": ")
        if name.rsplit(".", 1)[-1] == UserError.__name__ and message:
            return UserError(message)
    return last


class _ActorPool:
    """The actors of :func:`_ray_actors` and their jobs.

    An actor gets jobs only once it is up: a replacement waits for room on the cluster (its node
    is gone and none has taken its place yet) while the other actors carry on with the queue,
    and starts working when a node joins. Every dead actor is replaced once, so a replacement
    that dies is replaced too; a death costs each job queued on that actor an attempt. Actors
    that die before they are up (a worker that cannot load its model) are replaced a bounded
    number of times.
    """

    def __init__(
        self, ray: Any, new: Callable[[], Any], method: str, items: Sequence[Any], policy: _Policy
    ) -> None:
        self.ray, self.new, self.method, self.items, self.policy = ray, new, method, items, policy
        self.queue = deque(range(len(items)))
        self.inflight: dict[Any, tuple[int, Any]] = {}  # a job's result -> (job, its actor)
        self.starting: dict[Any, Any] = {}  # an actor's ready signal -> the actor
        self.dead: set[Any] = set()
        self.start_failures = 0
        self.start_error: BaseException | str = ""  # the last start failure's cause
        self.size = 0

    def start(self) -> None:
        actor = self.new()
        self.starting[actor.__ray_ready__.remote()] = actor
        self.size = max(self.size, len(self.starting))

    def submit(self, actor: Any) -> None:
        if self.queue and actor not in self.dead:
            i = self.queue.popleft()
            self.policy.start(i)
            self.inflight[getattr(actor, self.method).remote(self.items[i])] = (i, actor)

    def started(self, ready: Any) -> None:
        """An actor is up (two calls queued: the next job is ready when one finishes), or died
        starting."""
        actor = self.starting.pop(ready)
        try:
            self.ray.get(ready)
        except self.ray.exceptions.RayError as exc:
            self.start_failures += 1
            self.start_error = _start_error(exc)
            if isinstance(self.start_error, UserError):
                raise self.start_error from None  # bad input: every worker would fail alike
            log.warning("a worker died while starting: %s", self.start_error)
            if self.start_failures <= self.size * (self.policy.max_retries + 1):
                self.start()
            return
        self.submit(actor)
        self.submit(actor)

    def finished(self, ref: Any, on_done: OnDone) -> None:
        """A job's call returned or failed: its result, a retry, or a Failure."""
        ray, policy = self.ray, self.policy
        i, actor = self.inflight.pop(ref)
        what = self.items[i]
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if actor not in self.dead:  # every call queued on it fails: replace it once
                log.warning("worker died on %s: %s; starting a new one", what, exc)
                self.dead.add(actor)
                self.start()
            result = policy.failed(i, exc, what, died=True)
        except ray.exceptions.RayError as exc:
            died = not isinstance(exc, ray.exceptions.RayTaskError)
            result = policy.failed(i, exc, what, died)
        if result is _AGAIN:
            self.queue.append(i)
        else:
            on_done(i, result, policy.attempts[i])
        self.submit(actor)
