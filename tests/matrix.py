"""Test data as tables: optimizer configurations, dtypes, layouts, backends,
tolerances and bad inputs. Tests are driven from these (after
torch/testing/_internal/common_optimizers.py)."""

from __future__ import annotations

import pytest
import torch

import fused_optim
import optim_db

# --------------------------------------------------------------------------
# Configurations: (optimizer name, kwargs), from tests/optim_db.py. Tensor
# hyperparameters are built lazily so that each test gets its own.

CONFIGS = {info.name: list(info.configs_for("cpu")) for info in optim_db.OPTIM_DB}


def build_kwargs(kwargs):
    out = {}
    for k, v in kwargs.items():
        out[k] = v() if callable(v) else v
    return out


def config_id(name, kwargs):
    body = ",".join(f"{k}={'T' if callable(v) else v}" for k, v in kwargs.items())
    return f"{name}({body})"


CONFIG_PARAMS = [
    pytest.param(name, kw, id=config_id(name, kw))
    for name, kws in CONFIGS.items() for kw in kws
]


#: One configuration per optimizer, its ``full_state_example`` (every state
#: key present): for interpreted Triton's large cases, where every program
#: costs about 1 ms.
REPRESENTATIVE_PARAMS = [
    pytest.param(info.name, info.full_state_example,
                 id=config_id(info.name, info.full_state_example))
    for info in optim_db.OPTIM_DB
]


def info_params(infos=None):
    """One pytest.param(OptimInfo) per entry, id'd by name."""
    return [pytest.param(info, id=info.name) for info in (optim_db.OPTIM_DB if infos is None else infos)]

# --------------------------------------------------------------------------
# Backends and the single skip predicate.

BACKENDS = ["numba", "triton", "torch"]


def backend_skip_reason(backend: str, device: str = "cpu", dtype=None):
    """Why ``backend`` cannot run here, or None: the error select would raise."""
    from fused_optim import _backend
    return _backend.why_not(backend, device, dtype)


def skip_unless_runnable(backend: str, device: str = "cpu"):
    reason = backend_skip_reason(backend, device)
    if reason:
        pytest.skip(reason)


# --------------------------------------------------------------------------
# dtypes and the per-dtype tolerance table (torch's own assert_close
# defaults for fp32/fp64; low precision is judged against a float64 shadow).

FULL_PRECISION = [torch.float64, torch.float32]
LOW_PRECISION = [torch.bfloat16, torch.float16]
TOLERANCE = {
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
}
#: Low precision: our error against the float64 shadow may exceed torch's
#: for-loop error by at most this factor (plus LOW_PRECISION_FLOOR).
LOW_PRECISION_SLACK = 1.02
LOW_PRECISION_FLOOR = 1e-6

# --------------------------------------------------------------------------
# Parameter layouts. Each returns a list of leaf params of ``dtype``.


def _leaf(t):
    return t.detach().requires_grad_()


def _strided(dtype):
    base = torch.randn(9, 14, dtype=dtype)
    return [
        _leaf(base[:, ::2]),                       # gaps: staged
        _leaf(torch.randn(7, 5, dtype=dtype).t()),  # dense, transposed
        _leaf(torch.randn(4, 6, dtype=dtype)[1:3]),  # offset into storage
    ]


LAYOUTS = {
    "odd": lambda dt: [_leaf(torch.randn(s, dtype=dt)) for s in
                       [(), (0,), (1,), (7,), (1023,), (1025,), (3, 5, 7), (2, 0, 3)]],
    "channels_last": lambda dt: [_leaf(torch.randn(2, 3, 5, 4, dtype=dt).to(
        memory_format=torch.channels_last)), _leaf(torch.randn(3, dtype=dt))],
    "strided": _strided,
    "many_tiny": lambda dt: [_leaf(torch.randn(1 + i % 5, dtype=dt)) for i in range(300)],
    # over the Numba backend's serial threshold (2**15): the parallel path
    "large": lambda dt: [_leaf(torch.randn(40_000, dtype=dt)), _leaf(torch.randn(31, 7, dtype=dt))],
}


def grad_like(p, gen=None, layout="same"):
    """A random gradient for ``p``; ``layout="contiguous"`` forces other strides."""
    g = torch.randn(p.shape, dtype=p.dtype, generator=gen)
    if layout == "same" and p.dim() > 0:
        g = torch.empty_like(p).copy_(g)
    return g


def clone_params(params):
    out = []
    for p in params:
        c = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype)
        c.copy_(p.detach())
        out.append(c.requires_grad_())
    return out


def make(name, params, kwargs, *, fused_backend=None):
    """The oracle (torch's class, for-loop) or fused_optim's class on ``params``."""
    kw = build_kwargs(kwargs)
    if fused_backend is None:
        return optim_db.get(name).oracle(params, **kw)
    return optim_db.get(name).cls(params, backend=fused_backend, **kw)


def assert_state_close(ref_opt, opt, ref_params, params, steps_on_param_device=False, **tol):
    """Params and every state tensor of ``opt`` match ``ref_opt``'s.

    ``steps_on_param_device``: ``opt``'s step counters must be on their
    param's device (where GradScaler moves them), whatever ``ref_opt`` does.
    """
    for rp, p in zip(ref_params, params):
        torch.testing.assert_close(p, rp, equal_nan=True, **tol)
        rs, s = ref_opt.state.get(rp, {}), opt.state.get(p, {})
        assert set(rs) == set(s), (set(rs), set(s))
        for key in rs:
            if torch.is_tensor(rs[key]):
                assert s[key].dtype == rs[key].dtype, key
                if key == "step" and steps_on_param_device:
                    assert s[key].device == p.device, key
                    torch.testing.assert_close(s[key].cpu(), rs[key].cpu(), **tol)
                    continue
                assert s[key].device == rs[key].device, key
                torch.testing.assert_close(s[key], rs[key], equal_nan=True, **tol)
            else:
                assert s[key] == rs[key]
