"""Compact human-readable tables of the inspect views (the JSON documents hold the same data)."""

from __future__ import annotations

from typing import Any

NAME_WIDTH = 20


def _num(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _name(name: str) -> str:
    return name[:NAME_WIDTH]


def _topk(row: dict[str, Any], shown: int = 3) -> str:
    pairs = zip(row["topk_name"][:shown], row["topk_prob"][:shown], strict=True)
    return " ".join(f"{n}:{p:.3f}" for n, p in pairs)


def format_summary(s: dict[str, Any]) -> str:
    """Header lines, then one line per class: top-1 count, share, confidence, entropy."""
    errors = s["errors"]
    reasons = ", ".join(f"{r}: {n}" for r, n in errors["by_reason"].items())
    lines = [
        f"labels {s['directory']}: {s['files']} files ({s['empty_files']} empty), "
        f"{s['rows']:,} images, {s['shards']} shards",
        f"{s['num_classes']} classes, k={s['k']}, T={s['temperature']}, teacher "
        f"{s['teacher_arch']} sha256:{s['teacher_sha256'][:12]}, "
        f"{_num(s['bytes_per_image'], '.1f')} bytes/image"
        + (f", embeddings d={s['embedding_dim']}" if s["embedding_dim"] else ""),
        f"errors recorded: {errors['total']} in {errors['shards']} shards"
        + (f" ({reasons})" if reasons else ""),
        f"confidence (top-1 prob) mean {_num(s['confidence']['mean'])}, entropy of top-{s['k']} "
        f"mean {_num(s['entropy']['mean'])} nats (max {s['entropy']['max']:.3f})",
        "",
        f"{'class':<{NAME_WIDTH}} {'top-1':>10} {'share':>7} {'conf':>6} {'entropy':>7}",
    ]
    for p in s["per_class"]:
        lines.append(
            f"{_name(p['name']):<{NAME_WIDTH}} {p['top1']:>10,} {100 * p['share']:>6.1f}% "
            f"{_num(p['confidence']):>6} {_num(p['entropy']):>7}"
        )
    return "\n".join(lines)


def format_class(v: dict[str, Any]) -> str:
    """The best images of one class: rank, score, shard, key (and top-3 for label views)."""
    count = f"{v['images']:,} images" if v["images"] is not None else "images"
    rows = v["top"]
    shard_w = max([len("shard")] + [len(r["shard"]) for r in rows])
    key_w = max([len("key")] + [len(r["key"]) for r in rows])
    last = "top-3" if rows and "topk_name" in rows[0] else "repeat"
    lines = [
        f"class {v['class']} {v['name']!r} in {v['directory']}: {count}, top {len(rows)}",
        f"{'rank':>4} {'score':>6}  {'shard':<{shard_w}}  {'key':<{key_w}}  {last}",
    ]
    for r in rows:
        extra = _topk(r) if "topk_name" in r else f"x{r['repeat']}"
        lines.append(
            f"{r['rank']:>4} {r['score']:>6.3f}  {r['shard']:<{shard_w}}  {r['key']:<{key_w}}  "
            + extra
        )
    return "\n".join(lines)


def format_key(v: dict[str, Any]) -> str:
    """Every match of a key: shard, then its top-k classes and probabilities."""
    lines = [f"key {v['key']!r} in {v['directory']}: {len(v['matches'])} match(es)"]
    for m in v["matches"]:
        lines.append(f"  shard {m['shard']}  entropy {m['entropy']:.3f}")
        for c, n, p in zip(m["topk_class"], m["topk_name"], m["topk_prob"], strict=True):
            lines.append(f"    {c:>5} {_name(n):<{NAME_WIDTH}} {p:.4f}")
    return "\n".join(lines)


def format_compare(v: dict[str, Any]) -> str:
    """Overall top-1 agreement, per class of the first set, and the commonest disagreements."""
    a, b = v["a"], v["b"]
    rate = None if v["agreement"] is None else 100 * v["agreement"]
    lines = [
        f"a: {a['directory']} ({a['teacher_arch']} sha256:{a['teacher_sha256'][:12]})",
        f"b: {b['directory']} ({b['teacher_arch']} sha256:{b['teacher_sha256'][:12]})",
        f"matched {v['matched']:,} images on (shard, key); only in a: {v['only_a']:,}, only in "
        f"b: {v['only_b']:,}; top-1 agreement {_num(rate, '.2f')}%",
        "",
        f"{'class (top-1 of a)':<{NAME_WIDTH}} {'n(a)':>9} {'n(b)':>9} {'agree':>9} {'rate':>7}",
    ]
    for p in v["per_class"]:
        rate = "-" if p["agreement"] is None else f"{100 * p['agreement']:.1f}%"
        lines.append(
            f"{_name(p['name']):<{NAME_WIDTH}} {p['n_a']:>9,} {p['n_b']:>9,} "
            f"{p['agree']:>9,} {rate:>7}"
        )
    if v["confusions"]:
        lines += ["", "most frequent disagreements (a -> b):"]
        lines += [f"  {c['name_a']} -> {c['name_b']}: {c['images']:,}" for c in v["confusions"]]
    return "\n".join(lines)


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def format_selection(v: dict[str, Any]) -> str:
    """Totals, then per class: candidates, selected, repeats, score min/mean, removals."""
    removed = (
        "unknown (no report.json)"
        if v["duplicates_removed"] is None
        else f"{v['duplicates_removed']:,} duplicates, {v['leaked_removed']:,} leaked"
    )
    lines = [
        f"selection {v['directory']}: {v['selected']:,} images ({v['with_repeats']:,} with "
        f"repeats), K={_count(v['per_class_k'])}, P={_count(v['top_p'])}",
        f"{v['short_classes']} classes short of K, {v['upsampled_classes']} upsampled; "
        f"removed: {removed}",
        "",
        f"{'class':<{NAME_WIDTH}} {'candidates':>10} {'selected':>9} {'repeats':>8} "
        f"{'min':>6} {'mean':>6} {'dup':>7} {'leak':>7}",
    ]
    for p in v["per_class"]:
        lines.append(
            f"{_name(p['name']):<{NAME_WIDTH}} {_count(p['candidates']):>10} "
            f"{p['selected']:>9,} {p['upsampled']:>8,} {_num(p['min_score']):>6} "
            f"{_num(p['mean_score']):>6} {_count(p['duplicates_removed']):>7} "
            f"{_count(p['leaked_removed']):>7}" + (" short" if p["short"] else "")
        )
    if v["report_mismatch"]:
        lines.append(f"warning: report.json disagrees on {len(v['report_mismatch'])} classes")
    return "\n".join(lines)
