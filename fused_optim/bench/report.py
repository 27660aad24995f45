"""Results out: the end-of-run table, JSON and the plot."""

from __future__ import annotations

import os
import statistics
import time
from typing import TYPE_CHECKING, Sequence

import torch

from .cases import OPTIMIZERS, BenchError
from .impls import (_LABELS, BACKEND_IMPLS, CEILING, COPY, IMPLS, _ordered,
                    precision_variant, torch_default_path)
from .machine import _fmt_bytes, machine_info

from .measure import COMPETING_CORES, SPREAD_LIMIT

if TYPE_CHECKING:
    from .measure import CaseResult


def format_table(results: Sequence[CaseResult]) -> str:
    """The end-of-run tables: one row per (case, implementation), then the
    answer, one row per case and fused_optim backend.

    "host ms" (CUDA) and "% copy" (where a copy was timed) appear only when
    some case has them. Where precision variants ran (``--precision``), a
    table follows: each variant's time per step against its plain backend's,
    paired per round. Figures that cannot be trusted say why in "flags".
    """
    show_device = len({r.device for r in results}) > 1
    show_host = any(r.host_times for r in results)
    show_copy = any(COPY in r.times for r in results)
    numbers = (["median ms"] + (["host ms"] if show_host else [])
               + ["Mparam/s", "GB/s", "% ceil"] + (["% copy"] if show_copy else [])
               + ["vs fused"])
    head = (["list", "opt", "dtype"] + (["device"] if show_device else []) + ["impl"]
            + numbers + ["flags"])
    rows = []
    for res in results:
        for impl in _ordered(res.times):
            s = res.stats(impl)
            cells = [f"{s['median_s'] * 1e3:.3f}"]
            if show_host:
                h = s["host_median_s"]
                cells.append(f"{h * 1e3:.3f}" if h is not None else "-")
            cells += [
                f"{s['params_per_s'] / 1e6:.0f}" if s["params_per_s"] else "-",
                f"{s['gb_per_s']:.1f}" if s["gb_per_s"] else "-",
                f"{s['pct_ceiling']:.0f}" if s["pct_ceiling"] is not None else "-",
            ]
            if show_copy:
                cells.append(f"{s['pct_copy']:.0f}" if s["pct_copy"] is not None else "-")
            cells.append(f"{s['ratio_vs_fused']:.2f}x" if s["ratio_vs_fused"] is not None
                         else "-")
            rows.append([res.list, res.optimizer, res.dtype]
                        + ([res.device] if show_device else [])
                        + [_LABELS.get(impl, impl)] + cells
                        + [", ".join(res.unstable(impl) + (["busy"] if res.competed else []))])
    numeric = set(range(len(head) - 1 - len(numbers), len(head) - 1))
    out = _layout(head, rows, numeric, list(_row_cases(results)))
    precision = _precision_table(results, show_device)
    answer = _answer_table(results, show_device)
    notes = _notes(results)
    return "\n".join(out + ([""] + precision if precision else [])
                     + ([""] + answer if answer else [])
                     + ([""] + notes if notes else []))


def _answer_table(results, show_device: bool) -> list:
    """Per case and fused_optim backend: its time against torch's fastest
    path timed, and its default one where timed (paired per round), and
    both against the ceiling."""
    defaults = {r.device: torch_default_path(r.device) for r in results}
    show_default = any(defaults[r.device] in r.times for r in results)
    head = (["list", "opt", "dtype"] + (["device"] if show_device else [])
            + ["fused_optim", "ms"] + (["vs torch default"] if show_default else [])
            + ["vs torch fastest", "% ceil", "torch % ceil", "flags"])
    rows, keys = [], []
    for res in results:
        best = res.best_torch
        for impl in _ordered(res.times):
            if impl not in BACKEND_IMPLS:
                continue
            s = res.stats(impl)
            cells = [impl, f"{s['median_s'] * 1e3:.3f}"]
            for path in ([defaults[res.device]] if show_default else []) + [best]:
                r = res.paired(impl, path) if path in res.times else []
                cells.append(f"{statistics.median(r):.2f}x {path}" if r else "-")
            fast = res.stats(best) if best else None
            cells.append(f"{s['pct_ceiling']:.0f}" if s["pct_ceiling"] is not None else "-")
            cells.append(f"{fast['pct_ceiling']:.0f} {best}"
                         if fast and fast["pct_ceiling"] is not None else "-")
            flags = []
            if res.unstable(impl) or (best and res.unstable(best)):
                flags.append("unstable")
            if res.competed:
                flags.append(f"busy {res.other_cores:.1f} cores")
            rows.append([res.list, res.optimizer, res.dtype]
                        + ([res.device] if show_device else []) + cells + [", ".join(flags)])
            keys.append((res.list, res.optimizer, res.dtype, res.device))
    if not rows or not any(res.best_torch for res in results):
        return []
    return (["the answer: fused_optim's step against torch.optim's fastest path timed"
             + (" and its default one" if show_default else "")
             + ", median of per-round time ratios (below 1x: fused_optim is faster)"]
            + _layout(head, rows, {head.index("ms"), head.index("% ceil")}, keys))


def _layout(head, rows, numeric, keys) -> list:
    """Aligned lines: ``numeric`` columns right-aligned, a blank line
    wherever ``keys`` (one per row) changes."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if j in numeric else str(c).ljust(w)
                         for j, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(head), line(["-" * w for w in widths])]
    prev = None
    for row, key in zip(rows, keys):
        if prev is not None and key != prev:
            out.append("")
        prev = key
        out.append(line(row))
    return out


def _precision_table(results, show_device: bool) -> list:
    """The precision variants against their plain backends (empty without any)."""
    head = (["list", "opt", "dtype"] + (["device"] if show_device else [])
            + ["backend", "option", "plain ms", "option ms", "vs plain", "p25-p75"])
    rows, keys = [], []
    for res in results:
        for impl in _ordered(res.times):
            variant = precision_variant(impl)
            if variant is None:
                continue
            s = res.stats(impl)
            plain = res.median(variant[0]) if variant[0] in res.times else None
            ratio = s["ratio_vs_plain"]
            rows.append([res.list, res.optimizer, res.dtype]
                        + ([res.device] if show_device else [])
                        + [variant[0], variant[1],
                           f"{plain * 1e3:.3f}" if plain is not None else "-",
                           f"{s['median_s'] * 1e3:.3f}",
                           f"{ratio:.2f}x" if ratio is not None else "-",
                           f"{s['ratio_vs_plain_p25']:.2f}-{s['ratio_vs_plain_p75']:.2f}"
                           if ratio is not None else "-"])
            keys.append((res.list, res.optimizer, res.dtype, res.device))
    if not rows:
        return []
    numeric = set(range(len(head) - 4, len(head)))
    return (["precision options: time per step vs the plain backend, median of "
             "per-round ratios (target: at most 1.15x on resnet50 and gpt2-small)"]
            + _layout(head, rows, numeric, keys))


def _row_cases(results):
    for res in results:
        for _ in res.times:
            yield (res.list, res.optimizer, res.dtype, res.device)


def _notes(results) -> list:
    notes = []
    sizes = {}
    for r in results:
        sizes[r.list] = (r.tensors, r.params)
    for name, (t, p) in sizes.items():
        notes.append(f"{name}: {t} tensors, {p:,} params")
    rounds = sorted({r.rounds for r in results})
    notes.append("median of " + "/".join(map(str, rounds)) + " interleaved rounds; "
                 "% ceil" + (", % copy" if any(COPY in r.times for r in results) else "")
                 + " and vs fused are medians of per-round ratios "
                 "(vs fused < 1 is faster than torch fused)")
    notes.append(f"flags: ±N%: the interquartile range over the median of a figure's "
                 f"rounds, shown from {100 * SPREAD_LIMIT:.0f}% (time: the step times; "
                 "vs best, % ceil: the per-round ratios to torch's fastest path and to the "
                 "ceiling, i.e. the rounds disagree); fewer than 4 rounds cannot be judged; "
                 "busy: other processes used at least "
                 f"{COMPETING_CORES:g} cores while the case ran; unstable (in the answer): "
                 "fused_optim's or torch's fastest row is flagged. Flagged figures say more "
                 "about the machine than about the code: rerun on a quiet machine")
    busy = [r for r in results if r.competed]
    if busy:
        notes.append("busy cases: " + "; ".join(
            f"{r.list} {r.optimizer} {r.dtype} ({r.other_cores:.1f} cores)" for r in busy))
    if any(precision_variant(i) for r in results for i in r.times):
        notes.append("+kahan: kahan_sum=True, +sr: stochastic_round=True (bf16/fp16 "
                     "cases only); vs plain pairs each with its backend's plain step in "
                     "the same round")
    ks = [k for r in results if r.timing == "cuda-events" for k in r.steps_per_sample.values()]
    if ks:
        notes.append(f"cuda: each sample is {min(ks)}-{max(ks)} back-to-back steps between "
                     "two CUDA events (synchronized only between samples); ms is per step; "
                     "host ms is the host's wall time enqueueing them, per step "
                     "(where ms is close to host ms, the host bounds the step)")
    for r in results:
        gbps = r.copy_gbps()
        if gbps is not None:
            notes.append(f"copy reference, {r.list} {r.optimizer} {r.dtype}"
                         + (f" {r.device}" if r.device != "cpu" else "")
                         + f": {gbps:.1f} GB/s ({_fmt_bytes(r.copy_bytes // 2)} copied, "
                         "read + write counted)")
    firsts = [(r, i, t) for r in results for i, t in r.first_call_s.items()
              if t > 0.5 and i in r.times]
    if firsts:
        notes.append("first calls over 0.5 s (Numba compiling a kernel, or state "
                     "allocated; not timed): " + "; ".join(
                         f"{r.list} {r.optimizer} {r.dtype} {i} {t:.1f} s" for r, i, t in firsts))
    for r in results:
        if r.compile_s:
            notes.append(f"first call (compile + one step), {r.list} {r.optimizer} {r.dtype}: "
                         + ", ".join(f"{_LABELS.get(i, i)} {s:.1f} s"
                                     for i, s in sorted(r.compile_s.items(),
                                                        key=lambda kv: IMPLS.index(kv[0]))))
    seen = set()
    for r in results:
        for impl, why in r.skipped.items():
            if (impl, why) not in seen:
                seen.add((impl, why))
                notes.append(f"skipped {impl}: {why}")
    for r in results:
        for impl, err in r.failed.items():
            notes.append(f"FAILED {impl} on {r.list} {r.optimizer} {r.dtype}: {err}")
    return notes


def to_json(results: Sequence[CaseResult], config: dict) -> dict:
    """Everything measured, plus the machine and the run's settings.

    Schema 2 (1 had no host or copy fields). Per case: ``timing``
    (``perf_counter``: one step per sample; ``cuda-events``: K steps per
    sample, times per step), ``steps_per_sample`` ({impl: K}),
    ``copy_bytes`` and ``copy_gbps`` (the copy reference: bytes one call
    reads and writes, and that over its median time; null where no copy
    ran). Per result, besides the times: ``host_median_s`` and
    ``host_times_s`` (CUDA: host wall time enqueueing a sample's steps, per
    step; null on CPU), ``pct_copy`` (counted GB/s as a percentage of the
    copy's, median of per-round ratios) and ``steps_per_sample``. Precision
    variants (``--precision``; ``config["precision"]`` lists the names): a
    result's ``precision`` (``kahan``, ``sr``, ``kahan+sr``) and ``plain``
    (its backend's id), and ``ratio_vs_plain`` with ``ratio_vs_plain_p25``/
    ``_p75`` (its time over the plain backend's, median and quartiles of the
    per-round ratios); all null on other results.
    """
    devices = sorted({torch.device(r.device).type for r in results}) or ["cpu"]
    return {
        "schema": 2,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(devices),
        "config": config,
        "byte_counts": {n: {"reads": s.reads, "writes": s.writes}
                        for n, s in OPTIMIZERS.items()},
        "cases": [r.to_dict() for r in results],
    }


def _check_matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib, which is not installed "
                         "(pip install matplotlib)") from None
    return plt


#: Chart colours: fused_optim's backends strong, torch.optim's paths muted.
_COLOURS = {"numba": "#1f77b4", "triton": "#2ca02c", "torch": "#17becf",
            "for-loop": "#c7c7c7", "foreach": "#a0a0a0", "fused": "#ff7f0e",
            "compiled": "#8c564b", CEILING: "#000000"}


def write_plot(results: Sequence[CaseResult], path: str | os.PathLike,
               doc: dict | None = None) -> None:
    """Save :func:`make_figure`'s chart as ``path`` (PNG).

    Raises:
        BenchError: matplotlib is missing.
    """
    plt = _check_matplotlib()
    fig = make_figure(results, doc)
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def make_figure(results: Sequence[CaseResult], doc: dict | None = None):
    """The chart: one row of bars per case, one bar per implementation.

    Left, each implementation's median step time (log scale, whiskers from
    the 25th to the 75th percentile), fused_optim's bars labelled with their
    paired ratio to torch's fastest path; right, its % of the ceiling
    (paired per round). Hatched bars are flagged figures, and a case whose
    CPU other processes used is marked "busy". ``doc`` (``to_json``'s)
    names the machine in the title.

    Returns:
        the matplotlib Figure (the caller closes it).

    Raises:
        BenchError: matplotlib is missing.
    """
    plt = _check_matplotlib()
    impls = _ordered({i for r in results for i in r.times if i != COPY})
    bars = [i for i in impls if i != CEILING]
    n = len(bars)
    height = 0.8 / max(1, n)
    fig, (ax_t, ax_c) = plt.subplots(
        1, 2, sharey=True, figsize=(12, 1.2 + 0.32 * n * len(results) + 0.25 * len(results)),
        gridspec_kw={"width_ratios": [3, 2]})
    hatched = False
    for j, impl in enumerate(bars):
        colour = _COLOURS.get(impl, f"C{j}")
        for i, r in enumerate(results):
            if impl not in r.times:
                continue
            s = r.stats(impl)
            y = i + (j - (n - 1) / 2) * height
            flagged = bool(r.unstable(impl))
            hatched |= flagged
            style = dict(color=colour, edgecolor="#d62728" if flagged else colour,
                         hatch="///" if flagged else None, linewidth=1.0)
            label = _LABELS.get(impl, impl) if i == _first_with(results, impl) else None
            ms = s["median_s"] * 1e3
            ax_t.barh(y, ms, height, label=label,
                      xerr=[[ms - s["p25_s"] * 1e3], [s["p75_s"] * 1e3 - ms]],
                      error_kw=dict(ecolor="#444444", lw=0.8, capsize=1.5), **style)
            text = f" {_ms(ms)} ms"
            if impl in BACKEND_IMPLS and s["ratio_vs_best"] is not None:
                text += f" = {s['ratio_vs_best']:.2f} x torch {s['best_torch']}"
            ax_t.text(s["p75_s"] * 1e3, y, text, va="center", fontsize=7)
            if s["pct_ceiling"] is not None:
                pct = min(s["pct_ceiling"], _MAX_PCT)  # beyond: the ceiling misfired
                ax_c.barh(y, pct, height, **style)
                ax_c.text(pct, y, f" {s['pct_ceiling']:.0f}%", va="center", fontsize=7)
    ax_t.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    # 1-2-5 steps in plain numbers: a step time reads as "20 ms", not 10^1.3
    ax_t.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax_t.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_t.xaxis.set_minor_formatter(NullFormatter())
    lo = min(r.stats(i)["p25_s"] * 1e3 for r in results for i in bars if i in r.times)
    hi = max(r.stats(i)["p75_s"] * 1e3 for r in results for i in bars if i in r.times)
    ax_t.set_xlim(lo / 1.5, hi * 6)  # room for the labels right of the bars
    ax_t.set_xlabel("median time per step, ms (log scale; whiskers: 25th-75th percentile)")
    ax_c.set_xlabel("% of the ceiling (same bytes, no arithmetic; paired per round)")
    ax_c.axvline(100, color="black", linestyle="--", linewidth=0.8)
    ax_c.set_xlim(0, 1.3 * max([100.0] + [min(_MAX_PCT, r.stats(i)["pct_ceiling"])
                                          for r in results for i in bars if i in r.times
                                          and r.stats(i)["pct_ceiling"] is not None]))
    labels = []
    for r in results:
        label = (f"{r.list}\n{r.optimizer} {r.dtype}"
                 + (f" {r.device}" if r.device != "cpu" else ""))
        if r.competed:
            label += f"\nbusy ({r.other_cores:.1f} cores)"
        labels.append(label)
    ax_t.set_yticks(range(len(results)))
    ax_t.set_yticklabels(labels, fontsize=8)
    for tick, r in zip(ax_t.get_yticklabels(), results):
        if r.competed:
            tick.set_color("#d62728")
    ax_t.invert_yaxis()
    for ax in (ax_t, ax_c):
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        for i in range(1, len(results)):
            ax.axhline(i - 0.5, color="#bbbbbb", linewidth=0.6)
    machine = (doc or {}).get("machine", {})
    sub = ", ".join(x for x in (
        machine.get("cpu_model"),
        f"{machine['torch_threads']} threads" if machine.get("torch_threads") else None,
        f"torch {machine['torch']}" if machine.get("torch") else None,
        f"numba {machine['numba']}" if machine.get("numba") else None,
        (doc or {}).get("created", "")[:10] or None) if x)
    fig.suptitle("optimizer.step(): fused_optim against torch.optim"
                 + (f"\n{sub}" if sub else ""), fontsize=10)
    handles, names = ax_t.get_legend_handles_labels()
    notes = []
    if hatched:
        notes.append("hatched: spread of at least 10% over the rounds, or too few rounds")
    if any(r.competed for r in results):
        notes.append("busy: other processes used the CPU while the case ran")
    fig.legend(handles, names, loc="lower center", ncol=min(6, len(names)), fontsize=8,
               frameon=False, title="; ".join(notes) or None, title_fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * bool(notes), 1, 1))
    return fig


#: The chart's % of ceiling axis stops here; a longer bar is cut, its label
#: keeps the figure (a stalled ceiling run, e.g. on a busy machine).
_MAX_PCT = 250.0


def _ms(ms: float) -> str:
    """Three significant digits, without an exponent."""
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _first_with(results, impl) -> int:
    return next(i for i, r in enumerate(results) if impl in r.times)
