"""Run one scenario on torch.optim's for-loop and on fused_optim, and compare.

A scenario is a function of a :class:`Side`. It builds its tensors from the
side's seeded generator, makes its optimizer with ``side.make`` and steps it
with ``side.step``, mutating tensors in between exactly as user code would.
Both sides run the same scenario; :func:`assert_same` then demands the same
log: after every step, the same params and state (within torch's
tolerances), or the same exception type and message. On fused_optim's side a
step that raises must also have written nothing at all.
"""

from __future__ import annotations

import inspect

import torch

import optim_db


def outcome(fn):
    """What calling ``fn()`` came to: ``(type, message)`` of the exception it
    raised, or ``(None, None)``; for comparing torch's outcome with ours."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the type is what we compare
        return type(err), str(err)
    return None, None


class Stop(Exception):
    """A step raised; the scenario ends there on both sides."""


def same_bits(a, b) -> bool:
    """Equal values (NaN equal to NaN), shapes, dtypes and devices."""
    if not (torch.is_tensor(a) and torch.is_tensor(b)):
        return a == b
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    a, b = a.detach().resolve_conj().resolve_neg(), b.detach().resolve_conj().resolve_neg()
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def snapshot(opt, params):
    """Copies of params and of every state entry, in param order."""
    state = []
    for p in params:
        entry = opt.state.get(p, {})
        state.append({k: (v.detach().clone() if torch.is_tensor(v) else v)
                      for k, v in entry.items()})
    return [p.detach().clone() for p in params], state


class Side:
    """One implementation: torch's for-loop (``backend=None``) or fused_optim."""

    def __init__(self, backend: str | None, seed: int = 0):
        self.backend = backend
        self.fused = backend is not None
        self.gen = torch.Generator().manual_seed(seed)
        self.log = []
        self.tracked = []  # (optimizer, params) pairs snapshotted after each step

    def randn(self, *shape, dtype=torch.float32):
        return torch.randn(shape, generator=self.gen, dtype=torch.float64).to(dtype)

    def make(self, name, params, **kw):
        if self.fused:
            opt = optim_db.get(name).cls(params, backend=self.backend, **kw)
        else:
            opt = optim_db.get(name).oracle(params, **kw)
        self.tracked.append(opt)
        return opt

    def _params(self, opt):
        return [p for g in opt.param_groups for p in g["params"]]

    def step(self, opt):
        params = self._params(opt)
        before = snapshot(opt, params) if self.fused else None
        try:
            opt.step()
        except Exception as err:  # noqa: BLE001 - compared with torch's
            if self.fused:
                after = snapshot(opt, params)
                _assert_unwritten(before, after, opt, params)
            self.log.append(("raise", type(err), str(err)))
            raise Stop from err
        self.log.append(("ok", snapshot(opt, params)))


def torchs_fresh_state(opt, p) -> dict:
    """The state torch's own ``_init_group`` makes for a copy of ``p`` in its
    group, as ``opt`` keeps it: under ``state_dtype``, the record's state
    keys converted (rounded to nearest) to the dtype that stores them."""
    from fused_optim._precision import stored_dtype

    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    q = p.detach().clone().requires_grad_()
    q.grad = torch.zeros_like(q)
    record = optim_db.get(type(opt).__name__).record
    torchs = record.torch_cls([q])
    torchs.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
    lists = len(inspect.signature(torchs._init_group).parameters) - 1  # those after group
    torchs._init_group(torchs.param_groups[0], *[[] for _ in range(lists)])
    fresh = dict(torchs.state.get(q, {}))
    want = stored_dtype(p.dtype, group.get("state_dtype"))
    for k, v in fresh.items():
        if k in record.state and torch.is_tensor(v) and v.is_floating_point():
            fresh[k] = v.to(want)
    return fresh


def _assert_unwritten(before, after, opt=None, params=()):
    for a, b in zip(before[0], after[0]):
        assert same_bits(a, b), "a param was written by a step that raised"
    for p, sa, sb in zip(params or [None] * len(before[1]), before[1], after[1]):
        if not sa and sb:
            # torch's _init_group creates a new param's state before the loop
            # that raises; it must be the untouched initial state: torch's
            # (zeros, or Rprop's lr-filled step sizes), zeros for our own keys
            fresh = torchs_fresh_state(opt, p) if p is not None else {}
            assert all(not torch.is_tensor(v) or (same_bits(v, fresh[k]) if k in fresh
                                                  else not v.any())
                       for k, v in sb.items()), sb
            continue
        assert set(sa) == set(sb), "state entries changed by a step that raised"
        for k in sa:
            assert same_bits(sa[k], sb[k]), f"state {k!r} written by a step that raised"


def run(scenario, backend, seed=0):
    """Both logs of ``scenario``: (torch's, fused_optim's)."""
    logs = []
    for b in (None, backend):
        side = Side(b, seed)
        try:
            scenario(side)
        except Stop:
            pass
        logs.append(side.log)
    return logs


def assert_logs_match(theirs, ours, exact=False):
    assert len(ours) == len(theirs), (len(ours), len(theirs), ours[-1:], theirs[-1:])
    for k, (t, o) in enumerate(zip(theirs, ours)):
        assert o[0] == t[0], f"step {k}: torch {t[0]} {t[1:]}, fused_optim {o[0]} {o[1:]}"
        if t[0] == "raise":
            assert o[1:] == t[1:], f"step {k}: {o[1:]} != {t[1:]}"
            continue
        (tp, ts), (op, os_) = t[1], o[1]
        for i, (a, b) in enumerate(zip(tp, op)):
            _close(b, a, exact, f"step {k} param {i}")
        for i, (sa, sb) in enumerate(zip(ts, os_)):
            assert set(sa) == set(sb), f"step {k} param {i}: {set(sb)} != {set(sa)}"
            for key in sa:
                _close(sb[key], sa[key], exact, f"step {k} param {i} state {key!r}")


def _close(actual, expected, exact, where):
    if not torch.is_tensor(expected):
        assert actual == expected, where
        return
    assert actual.dtype == expected.dtype, (where, actual.dtype, expected.dtype)
    assert actual.device == expected.device, where
    if exact:
        assert same_bits(actual, expected), where
    else:
        torch.testing.assert_close(actual.resolve_conj().resolve_neg(),
                                   expected.resolve_conj().resolve_neg(), equal_nan=True,
                                   msg=lambda m: f"{where}: {m}")


def assert_same(scenario, backend, seed=0, exact=False):
    """Run ``scenario`` on both sides and demand the same log."""
    theirs, ours = run(scenario, backend, seed)
    assert theirs, "the scenario never stepped"
    assert_logs_match(theirs, ours, exact)
    return theirs
