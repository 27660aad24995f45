"""AdamW with its state in bfloat16 or 8 bits: a half or a quarter of the state
memory, float32's loss.

The teacher-student regression of ``examples/bf16_precision.py`` (a random
32-64-8 Tanh MLP is the teacher, a 32-256-8 student learns its outputs plus
label noise of std 0.1: the best reachable MSE is 0.01), float32 params,
trained three ways from the same init and the same batches with
``fused_optim.AdamW(lr=1e-3)`` and torch's default betas (0.9, 0.999):

* ``fp32 state``: torch's state (the reference);
* ``bf16 state``: ``state_dtype=torch.bfloat16``: ``exp_avg`` and
  ``exp_avg_sq`` stored in bfloat16, each store rounded stochastically;
* ``bf16 state, nearest``: the same state rounded to nearest instead
  (emulated: float32 state rounded to bfloat16 values after every step),
  what the option would do without stochastic rounding;
* ``8-bit state``: ``state_bits=8``: the moments of every weight of 4096
  elements or more as blockwise 8-bit codes with a float32 scale per 256
  (with the default ``--hidden 256`` that is the 32x256 layer only: the
  256x8 output layer, 2048 elements, keeps float32 state; ``--hidden 512``
  makes both weight matrices 8-bit).

It prints each variant's bytes of optimizer state per parameter, its final
loss (the mean training loss over the last 500 steps, and the loss on a
held-out batch of 4096) and its gap to fp32's; ``--plot FILE.png`` draws the
loss curves (needs matplotlib).

Why stochastic rounding. With beta2 = 0.999 each step moves ``exp_avg_sq``
by 0.1% of itself plus 0.1% of ``g**2``; bfloat16 keeps 8 significant bits,
so a relative change under 2**-9 (0.2%) rounds back to the old value:
rounded to nearest, ``exp_avg_sq`` can never decay (only a gradient with
``g**2`` above about 3x it moves it up) and it stays at early, large values,
which shrinks the steps. Rounded stochastically, each store is right on
average and the decay goes through.

With the defaults (``--steps 4000 --seed 0``, student 32-256-8; 2-core VM
under load, about 20 s): state 8.0 bytes per param in float32, 4.0 in
bfloat16, 3.35 in 8 bits (the params under 4096 elements keep float32
state); final training loss 0.010921 (fp32 state), 0.010925 (bf16 state,
+0.04%), 0.012083 (nearest, +10.6%), 0.010920 (8-bit, -0.01%); held-out
0.010769, 0.010770 (+0.01%), 0.011843 (+10.0%), 0.010785 (+0.15%).

With ``--hidden 512 --backend numba`` (both weight matrices 8-bit): state
8.00, 4.00, 4.00 and 2.18 bytes per param; final training loss 0.011015
(fp32), 0.011015 (bf16, +0.00%), 0.011065 (nearest, +0.45%), 0.011028
(8-bit, +0.12%); held-out 0.010950, 0.010949 (-0.01%), 0.010942 (-0.07%),
0.010982 (+0.29%); with ``--seed 1`` +0.03%, -0.80%, +0.20% (held-out
+0.01%, -0.73%, +0.25%). Rounding the 8-bit second moments to nearest
instead ended +6.6% / +6.5% (before the one-round stream;
``examples/bf16_state_8bit.png`` is the seed-0 run above).

    python examples/bf16_state.py [--steps N] [--lr LR] [--seed S] [--hidden H]
        [--backend numba|torch] [--plot loss.png]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fused_optim

_spec = importlib.util.spec_from_file_location(
    "bf16_precision", Path(__file__).with_name("bf16_precision.py"))
task = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task)  # the MLP, the teacher and the batches

VARIANTS = ("fp32 state", "bf16 state", "bf16 state, nearest", "8-bit state")
#: each variant's optimizer keywords
OPTIONS = {"bf16 state": {"state_dtype": torch.bfloat16}, "8-bit state": {"state_bits": 8}}
STEPS, LR, TAIL = 4000, 1e-3, 500


def state_bytes_per_param(opt) -> float:
    """Bytes of per-element optimizer state (every state tensor but ``step``)
    per parameter element."""
    numel = sum(p.numel() for g in opt.param_groups for p in g["params"])
    size = sum(t.numel() * t.element_size() for st in opt.state.values()
               for k, t in st.items() if k != "step" and torch.is_tensor(t))
    return size / numel


def train(variant, *, steps=STEPS, lr=LR, seed=0, backend=None, tail=TAIL,
          hidden=task.HIDDEN):
    teacher = task.MLP(seed + 1, hidden=task.TEACHER_HIDDEN)
    model = task.MLP(seed + 2, hidden=hidden)
    torch.manual_seed(seed)  # the stochastic-rounding stream's seed
    opt = fused_optim.AdamW(model.parameters(), lr=lr, backend=backend,
                            **OPTIONS.get(variant, {}))
    data = torch.Generator().manual_seed(seed + 3)
    x_eval, y_eval = task.make_batch(teacher, torch.Generator().manual_seed(seed + 4),
                                     task.HELD_OUT, "cpu")
    losses = []
    for _ in range(steps):
        x, y = task.make_batch(teacher, data, task.BATCH, "cpu")
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if variant == "bf16 state, nearest":
            with torch.no_grad():
                for st in opt.state.values():
                    for k in ("exp_avg", "exp_avg_sq"):
                        st[k].copy_(st[k].to(torch.bfloat16))
        losses.append(loss.item())
    with torch.no_grad():
        eval_loss = F.mse_loss(model(x_eval), y_eval).item()
    nbytes = state_bytes_per_param(opt)
    if variant == "bf16 state, nearest":
        nbytes /= 2  # stored as float32 here; the values are bfloat16's
    tail_losses = losses[-tail:]
    return {"losses": losses, "final": sum(tail_losses) / len(tail_losses),
            "eval": eval_loss, "state_bytes": nbytes}


def compare(*, steps=STEPS, lr=LR, seed=0, backend=None, tail=TAIL, log=print,
            hidden=task.HIDDEN):
    results = {}
    for name in VARIANTS:
        start = time.perf_counter()
        results[name] = train(name, steps=steps, lr=lr, seed=seed, backend=backend,
                              tail=min(tail, steps), hidden=hidden)
        log(f"  {name:<21} {time.perf_counter() - start:5.1f} s")
    return results


def table(results, tail=TAIL):
    ref = results["fp32 state"]
    lines = [f"{'variant':<21} {'state B/param':>13} {f'train loss (last {tail})':>24} "
             f"{'vs fp32':>9} {'held-out loss':>14} {'vs fp32':>9}"]
    for name, r in results.items():
        lines.append(f"{name:<21} {r['state_bytes']:>13.2f} {r['final']:>24.6f} "
                     f"{r['final'] / ref['final'] - 1:>+9.2%} {r['eval']:>14.6f} "
                     f"{r['eval'] / ref['eval'] - 1:>+9.2%}")
    return "\n".join(lines)


def plot(results, path, window=50):
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in results.items():
        losses = torch.tensor(r["losses"], dtype=torch.float64)
        smooth = losses.unfold(0, window, 1).mean(1) if len(losses) >= window else losses
        steps = torch.arange(len(losses) - len(smooth) + 1, len(losses) + 1)
        ax.plot(steps.numpy(), smooth.numpy(), label=name, linewidth=1.2)
    ax.axhline(task.NOISE ** 2, color="gray", linewidth=0.8, linestyle=":", label="noise floor")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training MSE (running mean of {window})")
    ax.set_title("AdamW, float32 params: optimizer state in float32, bfloat16, 8 bits",
                 fontsize=9)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=task.HIDDEN, help="the student's width")
    parser.add_argument("--backend", choices=("auto", "numba", "torch"), default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--plot", metavar="FILE.png", help="write the loss curves here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backend = None if args.backend in (None, "auto") else args.backend
    tail = min(TAIL, args.steps)
    print(f"teacher-student MLP (student 32-{args.hidden}-8), AdamW(lr={args.lr:g}), "
          f"{args.steps} steps, batch {task.BATCH}, seed {args.seed}", flush=True)
    start = time.perf_counter()
    results = compare(steps=args.steps, lr=args.lr, seed=args.seed, backend=backend,
                      tail=tail, log=lambda line: print(line, flush=True), hidden=args.hidden)
    print(f"\n{table(results, tail)}\n\n{time.perf_counter() - start:.1f} s in all")
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return results


if __name__ == "__main__":
    main()
