"""Results out: the end-of-run table, JSON and the plot."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Sequence

import torch

from .cases import OPTIMIZERS, BenchError
from .impls import _LABELS, CEILING, COPY, IMPLS, _ordered, precision_variant
from .machine import _fmt_bytes, machine_info

if TYPE_CHECKING:
    from .measure import CaseResult


def format_table(results: Sequence[CaseResult]) -> str:
    """The end-of-run table: one row per (case, implementation).

    "host ms" (CUDA) and "% copy" (where a copy was timed) appear only when
    some case has them. Where precision variants ran (``--precision``), a
    second table follows: each variant's time per step against its plain
    backend's, paired per round.
    """
    show_device = len({r.device for r in results}) > 1
    show_host = any(r.host_times for r in results)
    show_copy = any(COPY in r.times for r in results)
    numbers = (["median ms"] + (["host ms"] if show_host else [])
               + ["Mparam/s", "GB/s", "% ceil"] + (["% copy"] if show_copy else [])
               + ["vs fused"])
    head = ["list", "opt", "dtype"] + (["device"] if show_device else []) + ["impl"] + numbers
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
                        + [_LABELS.get(impl, impl)] + cells)
    numeric = set(range(len(head) - len(numbers), len(head)))
    out = _layout(head, rows, numeric, list(_row_cases(results)))
    precision = _precision_table(results, show_device)
    notes = _notes(results)
    return "\n".join(out + ([""] + precision if precision else [])
                     + ([""] + notes if notes else []))


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


def write_plot(results: Sequence[CaseResult], path: str | os.PathLike) -> None:
    """Bar chart: GB/s per implementation and case, ceiling as a line.

    Raises:
        BenchError: matplotlib is missing.
    """
    plt = _check_matplotlib()
    impls = _ordered({i for r in results for i in r.times if i not in (CEILING, COPY)})
    labels = [f"{r.list}\n{r.optimizer} {r.dtype}" + (f"\n{r.device}" if r.device != "cpu" else "")
              for r in results]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(results) * max(1, len(impls)) / 3), 4.5))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, r in enumerate(results):
            if impl in r.times:
                xs.append(i + (j - (len(impls) - 1) / 2) * width)
                ys.append(r.stats(impl)["gb_per_s"] or 0.0)
        ax.bar(xs, ys, width, label=_LABELS.get(impl, impl))
    for i, r in enumerate(results):
        if CEILING in r.times:
            g = r.stats(CEILING)["gb_per_s"] or 0.0
            ax.hlines(g, i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                      label="ceiling" if i == 0 else None)
        if COPY in r.times:
            ax.hlines(r.copy_gbps() or 0.0, i - 0.45, i + 0.45, colors="gray",
                      linestyles="dotted", label="copy" if i == 0 else None)
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("GB/s (counted bytes / median step time)")
    ax.set_title("optimizer.step() throughput")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
