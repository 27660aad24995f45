"""Two runs' JSON side by side: ``fused-optim bench --compare OLD.json [NEW.json]``.

Cases are matched by list, optimizer, dtype and device, implementations by
id. Per implementation it prints the two medians and their change, and the
change of the two figures each run paired per round: the ratio to torch's
fastest path and the % of the ceiling. Two runs' times are not paired (they
ran minutes or days apart, and the machine may have drifted in between);
the paired ratios are, within each run, so their change is the one to
believe when the two disagree.

Why not pytest-benchmark's ``--benchmark-compare``: it reads only its own
saved files (the ``benchmarks/`` suite, which times implementations one
after another), and compares each benchmark's statistics alone, so it has
no per-round pairing to compare.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cases import BenchError
from .impls import _LABELS, CEILING, _ordered


def load(path) -> dict:
    """A run's JSON (``--json``), checked to be one.

    Raises:
        BenchError: unreadable, not JSON, or not a ``bench`` run's file.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as err:
        raise BenchError(f"cannot read --compare file {str(path)!r}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise BenchError(f"--compare file {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list):
        raise BenchError(f"--compare file {str(path)!r} is not the JSON of a "
                         "fused-optim bench run (no \"cases\")")
    doc.setdefault("_path", str(path))
    return doc


def _key(case: dict) -> tuple:
    return (case["list"], case["optimizer"], case["dtype"], case["device"])


def _change(old, new) -> str:
    if old is None or new is None or old <= 0:
        return "-"
    return f"{100 * (new / old - 1):+.0f}%"


def _flagged(case: dict, result: dict) -> bool:
    return bool(result.get("unstable")) or bool(case.get("competed"))


def _describe(doc: dict, name: str | None) -> str:
    m = doc.get("machine", {})
    commit = (m.get("git_commit") or "")[:10]
    return (f"{name or doc.get('_path', '?')}: {doc.get('created', '?')}"
            + (f", commit {commit}" if commit else "")
            + (f", {m['cpu_model']}" if m.get("cpu_model") else ""))


def format_compare(old: dict, new: dict, new_name: str | None = None) -> str:
    """The change from ``old`` to ``new``, one row per implementation of
    every case both ran."""
    olds = {_key(c): c for c in old["cases"]}
    head = ["list", "opt", "dtype", "impl", "old ms", "new ms", "time",
            "old vs best", "new vs best", "ratio", "old % ceil", "new % ceil", ""]
    rows, keys = [], []
    for case in new["cases"]:
        prev = olds.get(_key(case))
        if prev is None:
            continue
        before = {r["impl"]: r for r in prev["results"]}
        after = {r["impl"]: r for r in case["results"]}
        for impl in _ordered(set(before) & set(after)):
            a, b = before[impl], after[impl]
            ra, rb = a.get("ratio_vs_best"), b.get("ratio_vs_best")
            ca, cb = a.get("pct_ceiling"), b.get("pct_ceiling")
            paired = a.get("best_torch") == b.get("best_torch") and ra is not None
            rows.append([
                case["list"] + (f" {case['device']}" if case["device"] != "cpu" else ""),
                case["optimizer"], case["dtype"], _LABELS.get(impl, impl),
                f"{a['median_s'] * 1e3:.3f}", f"{b['median_s'] * 1e3:.3f}",
                _change(a["median_s"], b["median_s"]),
                f"{ra:.2f}x" if ra is not None else "-",
                f"{rb:.2f}x" if rb is not None else "-",
                _change(ra, rb) if paired and impl != a.get("best_torch") else "-",
                f"{ca:.0f}" if ca is not None and impl != CEILING else "-",
                f"{cb:.0f}" if cb is not None and impl != CEILING else "-",
                "!" if _flagged(prev, a) or _flagged(case, b) else ""])
            keys.append(_key(case))
    lines = [f"change per case, {_describe(old, None)} -> {_describe(new, new_name)}"]
    if not rows:
        return "\n".join(lines + ["no case in common"])
    from .report import _layout
    lines += _layout(head, rows, set(range(4, len(head) - 1)), keys)
    only_old = sorted(set(olds) - {_key(c) for c in new["cases"]})
    lines += ["",
              "time: the change of the median step time between the runs (not paired: "
              "machine drift between them shows here); vs best: the median of per-round "
              "ratios to torch's fastest path in that run, and ratio its change; % ceil: "
              "paired per round with the ceiling in each run. Paired figures cancel drift: "
              "prefer them when the two disagree",
              "!: a figure of this row was flagged in either run (spread at least 10%, "
              "too few rounds, or other processes busy)"]
    if only_old:
        lines.append("only in the old run: " + "; ".join(" ".join(k[:3]) for k in only_old))
    return "\n".join(lines)
