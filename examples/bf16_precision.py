"""bfloat16 params: plain rounding stalls AdamW; kahan_sum / stochastic_round don't.

A teacher-student regression (a random 32-64-8 Tanh MLP is the teacher, a
32-256-8 student learns its outputs plus Gaussian label noise of std 0.1, so
the best reachable MSE is 0.01), trained four ways from the same float32 init
and the same batches, all with ``fused_optim.AdamW(lr=1e-3, betas=(0.9,
0.99))``:

* ``fp32``: float32 params (the reference);
* ``bf16``: bfloat16 params, stores rounded to nearest (what torch does);
* ``bf16+kahan``: bfloat16 params with ``kahan_sum=True``;
* ``bf16+sr``: bfloat16 params with ``stochastic_round=True``;

and, as a fifth line, ``torch.optim.AdamW`` on the same bfloat16 params
(``--no-torch-baseline`` leaves it out). It prints each variant's final loss
(the mean training loss over the last 500 steps, and the loss on a fixed
held-out batch of 4096, computed in float32) and its gap to fp32's;
``--plot FILE.png`` draws the loss curves (needs matplotlib).

Why plain bfloat16 stalls. bfloat16 keeps 8 significant bits: a weight ``w``
with ``2**e <= |w| < 2**(e+1)`` sits on a grid of spacing (ulp) ``2**(e-7)``,
and a store rounds ``w + dw`` back to ``w`` whenever ``|dw|`` is under half
an ulp, ``2**(e-8)``: 0.2-0.4% of ``|w|``. An AdamW step moves each weight
by about ``lr * m/sqrt(v)``: at most ``lr`` = 1e-3 early on, and once the
gradients are mostly batch noise ``|m/sqrt(v)|`` falls to ~0.2-0.3, so steps
of ~2-3e-4: under half an ulp of any weight above 1/8, and of many above
1/16. The student's first-layer weights start ~N(0, 0.18**2), so a large
share of them stop moving (as does AdamW's decoupled weight decay, a 1e-5
relative shrink) and the loss flattens out well above the float32 run's.
``kahan_sum`` keeps each store's rounding error in a bfloat16 compensation
buffer and adds it to the next step's change, so the small steps add up as
in float32; ``stochastic_round`` rounds up or down at random with the
probabilities that make the stored value right on average, so the small
steps add up in expectation, plus a little noise of about an ulp (which is
why it ends a little above Kahan).

The configuration: ``lr=1e-3`` is small enough that the late steps round
away (at 2e-3 they mostly land and plain bfloat16 ends only ~1% behind),
and 4000 steps of 256 samples bring the float32 run to within ~6% of the
noise floor, where the comparison is of converged losses rather than of
speeds. The batch of 256 (not 64) halves the gradient noise, and with it
both AdamW's own jitter and stochastic rounding's, which is the same size
(at batch 64 stochastic rounding ends 0.5-1% above float32, not ~0.3%).
Two more choices make the comparison about the param stores alone:

* ``betas=(0.9, 0.99)``, not 0.999: the optimizer's state (``exp_avg``,
  ``exp_avg_sq``) has the param's dtype, and with beta2 = 0.999 each step's
  decay of ``exp_avg_sq`` (0.1% of it) is itself under half a bfloat16 ulp,
  so it can only grow and every step shrinks (Kahan then ends ~10% above
  float32); neither option acts on the state. With 0.99 the decay (1%) is
  stored.
* The forward and backward compute in float32 from the stored weights (each
  weight is upcast where it is used, so its gradient arrives in bfloat16): the
  params, grads and optimizer state are bfloat16, the matmuls are not
  (bfloat16 matmuls on CPU are slow, and their rounding is another effect).

With the defaults (``--steps 4000 --lr 1e-3 --seed 0``) plain bfloat16 ends
55-70% above fp32's loss, Kahan within 0.1% and stochastic rounding within
0.25-0.35% of it (seeds 0-2); about a minute on one CPU core.

    python examples/bf16_precision.py [--steps N] [--lr LR] [--seed S]
        [--device cpu|cuda] [--plot loss.png]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fused_optim

#: the fused_optim variants, in table order: name -> (param dtype, AdamW keywords)
VARIANTS = {
    "fp32": (torch.float32, {}),
    "bf16": (torch.bfloat16, {}),
    "bf16+kahan": (torch.bfloat16, {"kahan_sum": True}),
    "bf16+sr": (torch.bfloat16, {"stochastic_round": True}),
}
#: the optional fifth line: torch.optim.AdamW on the same bfloat16 params
TORCH_BASELINE = "bf16 torch.optim"

D_IN, HIDDEN, D_OUT = 32, 256, 8
TEACHER_HIDDEN = 64
BATCH = 256
NOISE = 0.1        # label noise std: a perfect student's loss is NOISE**2
HELD_OUT = 4096
BETAS = (0.9, 0.99)
STEPS, LR, TAIL = 4000, 1e-3, 500


class MLP(nn.Module):
    """``D_IN -> hidden -> D_OUT`` with Tanh, weights ~ N(0, 1/fan_in).

    Computes in float32 whatever the params' dtype: each weight is upcast
    where it is used, so its gradient comes back in the param's own dtype.
    """

    def __init__(self, seed, hidden=HIDDEN):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name, shape, fan_in in (("w1", (hidden, D_IN), D_IN), ("b1", (hidden,), D_IN),
                                    ("w2", (D_OUT, hidden), hidden), ("b2", (D_OUT,), hidden)):
            setattr(self, name,
                    nn.Parameter(torch.randn(shape, generator=g) / math.sqrt(fan_in)))

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.w1.float(), self.b1.float()))
        return F.linear(h, self.w2.float(), self.b2.float())


def make_batch(teacher, g, n, device):
    """``n`` inputs ~ N(0, 1) and the teacher's outputs plus label noise."""
    x = torch.randn(n, D_IN, generator=g)
    with torch.no_grad():
        y = teacher(x) + NOISE * torch.randn(n, D_OUT, generator=g)
    return x.to(device), y.to(device)


def make_optimizer(variant, params, lr, backend=None):
    if variant == TORCH_BASELINE:
        return torch.optim.AdamW(params, lr=lr, betas=BETAS)
    return fused_optim.AdamW(params, lr=lr, betas=BETAS, backend=backend, **VARIANTS[variant][1])


def train(variant, *, steps=STEPS, lr=LR, seed=0, device="cpu", backend=None, tail=TAIL):
    """Train one variant from the shared init on the shared batches.

    Returns ``{"losses": per-step training losses, "final": their mean over
    the last ``tail`` steps, "eval": the float32 loss on the held-out batch}``.
    """
    dtype = torch.bfloat16 if variant == TORCH_BASELINE else VARIANTS[variant][0]
    teacher = MLP(seed + 1, hidden=TEACHER_HIDDEN)
    model = MLP(seed + 2).to(device=device, dtype=dtype)  # float32 init, rounded
    torch.manual_seed(seed)  # stochastic_round's stream seed is drawn from it
    opt = make_optimizer(variant, model.parameters(), lr, backend)
    data = torch.Generator().manual_seed(seed + 3)
    x_eval, y_eval = make_batch(teacher, torch.Generator().manual_seed(seed + 4), HELD_OUT,
                                device)
    losses = []
    for _ in range(steps):
        x, y = make_batch(teacher, data, BATCH, device)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        eval_loss = F.mse_loss(model(x_eval), y_eval).item()
    tail_losses = losses[-tail:]
    return {"losses": losses, "final": sum(tail_losses) / len(tail_losses), "eval": eval_loss}


def compare(*, steps=STEPS, lr=LR, seed=0, device="cpu", backend=None, torch_baseline=True,
            tail=TAIL, log=print):
    """Train every variant; return ``{name: train(name, ...)}`` in table order."""
    names = list(VARIANTS) + ([TORCH_BASELINE] if torch_baseline else [])
    results = {}
    for name in names:
        start = time.perf_counter()
        results[name] = train(name, steps=steps, lr=lr, seed=seed, device=device,
                              backend=backend, tail=min(tail, steps))
        log(f"  {name:<17} {time.perf_counter() - start:5.1f} s")
    return results


def gap(value, reference):
    return value / reference - 1.0


def table(results, tail=TAIL):
    ref = results["fp32"]
    lines = [f"{'variant':<17} {f'train loss (last {tail})':>24} {'vs fp32':>9} "
             f"{'held-out loss':>14} {'vs fp32':>9}"]
    for name, r in results.items():
        lines.append(f"{name:<17} {r['final']:>24.6f} {gap(r['final'], ref['final']):>+9.2%} "
                     f"{r['eval']:>14.6f} {gap(r['eval'], ref['eval']):>+9.2%}")
    return "\n".join(lines)


def plot(results, path, window=50):
    """Loss vs step (running mean over ``window`` steps), log y, to ``path``."""
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
        ax.plot(steps.numpy(), smooth.numpy(), label=name,
                linestyle="--" if name == TORCH_BASELINE else "-", linewidth=1.2)
    ax.axhline(NOISE ** 2, color="gray", linewidth=0.8, linestyle=":", label="noise floor")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training MSE (running mean of {window})")
    ax.set_title("AdamW, bfloat16 params: round-to-nearest vs Kahan vs stochastic rounding",
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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", choices=("auto", "numba", "triton", "torch"),
                        default=None,
                        help="fused_optim backend (default: auto)")
    parser.add_argument("--torch-baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also train torch.optim.AdamW on bfloat16 params")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--plot", metavar="FILE.png", help="write the loss curves here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    backend = None if args.backend in (None, "auto") else args.backend
    tail = min(TAIL, args.steps)
    print(f"teacher-student MLP, AdamW(lr={args.lr:g}, betas={BETAS}), {args.steps} steps, "
          f"batch {BATCH}, seed {args.seed}, device {args.device}", flush=True)
    start = time.perf_counter()
    results = compare(steps=args.steps, lr=args.lr, seed=args.seed, device=args.device,
                      backend=backend, torch_baseline=args.torch_baseline, tail=tail,
                      log=lambda line: print(line, flush=True))
    print(f"\n{table(results, tail)}\n\n{time.perf_counter() - start:.1f} s in all")
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return results


if __name__ == "__main__":
    main()
