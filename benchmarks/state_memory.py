"""Optimizer state memory of AdamW: bytes per param and a one-model run's peak RSS.

For each state kind (``fp32``: torch's state, ``bf16``:
``state_dtype=torch.bfloat16``, ``8bit``: ``state_bits=8``), a fresh Python
process builds float32 params of one ``fused-optim bench`` shape list
(default gpt2-small, 124M params), gives each a gradient, constructs
``fused_optim.AdamW`` and takes two steps; it reports the bytes of every
state tensor but ``step`` per param element (measured from the state
tensors) and the process's peak resident memory (``ru_maxrss``). The
params and grads (8 bytes per param) are the same in every run, so the
peak's differences are the state's.

    python benchmarks/state_memory.py [--list gpt2-small] [--backend numba]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

KINDS = {"fp32": {}, "bf16": {"state_dtype": "bfloat16"}, "8bit": {"state_bits": 8}}

_CHILD = r"""
import json, resource, sys
import torch
import fused_optim
from fused_optim.bench.cases import shape_list
kind, name, backend = json.loads(sys.argv[1])
opts = {k: getattr(torch, v) if k == "state_dtype" else v for k, v in kind.items()}
params = [torch.zeros(s).requires_grad_() for s in shape_list(name).shapes]
for p in params:
    p.grad = torch.full_like(p, 1e-3)
opt = fused_optim.AdamW(params, lr=1e-3, backend=backend, **opts)
for _ in range(2):
    opt.step()
numel = sum(p.numel() for p in params)
state = sum(t.numel() * t.element_size() for st in opt.state.values()
            for k, t in st.items() if k != "step" and torch.is_tensor(t))
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(dict(params=numel, state_bytes_per_param=state / numel,
                      params_and_grads_mib=8 * numel / 2**20, peak_rss_mib=peak_mib)))
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", default="gpt2-small")
    parser.add_argument("--backend", default="numba")
    args = parser.parse_args(argv)
    print(f"AdamW on {args.list}, float32 params, backend {args.backend}")
    print(f"{'state':<6} {'params':>12} {'state B/param':>14} {'params+grads MiB':>17} "
          f"{'peak RSS MiB':>13}")
    for name, kind in KINDS.items():
        out = subprocess.run([sys.executable, "-c", _CHILD,
                              json.dumps([kind, args.list, args.backend])],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:<6} {r['params']:>12,} {r['state_bytes_per_param']:>14.3f} "
              f"{r['params_and_grads_mib']:>17.0f} {r['peak_rss_mib']:>13.0f}", flush=True)


if __name__ == "__main__":
    main()
