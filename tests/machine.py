"""A model-based test of fused_optim against torch.optim, step by step.

A hypothesis ``RuleBasedStateMachine`` keeps two worlds, torch.optim's
for-loop (``foreach=False``) and fused_optim on one backend, built from the
same draws. Its rules are the things users and libraries do between steps:
new, reused, None, transposed, broadcast, bucket-sliced and neg-bit grads;
``zero_grad``; ``p.data`` swaps and reshapes; storages shrunk and re-grown;
state entries replaced, viewed, deleted, promoted, given extra keys;
``load_state_dict`` (both ways); ``add_param_group``; hyperparameter edits;
aliased and duplicated params; steps under ``inference_mode``. Each mutation
happens to both worlds alike, and a stable mode (a grad layout, say) stays
until a rule changes it, so cached plans meet it step after step.

After every step the worlds must agree: every param and state tensor within
torch's tolerances (SGD bit for bit), or the same exception type and
message, with nothing written on fused_optim's side. Params, grads and
replaced state live inside arenas: larger buffers whose never-used elements
hold a sentinel NaN pattern no arithmetic produces. After every step every
arena element outside a live param or state tensor must be bit for bit what
it was before the step (grads included: they are read-only).

With ``precision=True`` (``run(..., precision=True)``) the machine checks the
opt-in ``kahan_sum``/``stochastic_round`` stores, ``state_dtype=torch.bfloat16``
and, where the class takes it, ``state_bits=8`` with one param large enough
for it (each alone: their combinations with the others are
test_state_dtype.py's and test_state_bits.py's, and each is one more
compile) instead: params are also
bfloat16 (float16 shares its code paths; test_precision*.py cover it), each
machine draws its options (and rules toggle them
per group), and the first world is fused_optim's pure-torch reference
backend with the same options and stream seed (the options have no torch.optim
counterpart; the reference backend is their specification).

Run through tests/test_stateful.py, which runs it in a subprocess (a crash
is a failure there, not the end of pytest) with a budget:
``FUSED_OPTIM_FUZZ_EXAMPLES`` and ``FUSED_OPTIM_FUZZ_STEPS``.
"""

from __future__ import annotations

import collections
import copy
import functools
import inspect
import os
import sys
import warnings

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import fused_optim
import matrix
import optim_db
from fused_optim.kernels.reference import _blockwise
from sides import torchs_fresh_state

# ---------------------------------------------------------------- arenas

_SENTINEL = {torch.float32: (torch.int32, 0x7FA5A5A5),
             torch.float64: (torch.int64, 0x7FF4A5A5A5A5A5A5),
             # a NaN in both 16-bit formats
             torch.bfloat16: (torch.int16, 0x7FA5), torch.float16: (torch.int16, 0x7FA5)}


class Arena:
    """A buffer handing out views with unused guard elements around and inside them."""

    def __init__(self, dtype, n=1 << 14):
        self.dtype = dtype
        idt, bits = _SENTINEL[dtype]
        self.buf = torch.full((n,), bits, dtype=idt).view(dtype)
        self.claimed = torch.zeros(n, dtype=torch.bool)  # ever handed out
        self.used = 0

    def alloc(self, shape, layout, values, gap):
        """A view of ``shape`` laid out as ``layout``, holding ``values``, or None if full."""
        numel = 1
        for s in shape:
            numel *= s
        span = 2 * numel if layout == "gappy" else numel
        start = self.used + gap
        if start + span + 8 > self.buf.numel():
            return None
        self.used = start + span
        flat = self.buf[start:start + span]
        if layout == "gappy":
            t = flat[::2].view(shape) if shape else flat[:1].view(())
        elif layout == "transposed" and len(shape) >= 2:
            t = flat.view(shape[1], shape[0], *shape[2:]).transpose(0, 1)
        elif layout == "channels_last" and len(shape) == 4:
            n, c, h, w = shape
            t = flat.view(n, h, w, c).permute(0, 3, 1, 2)
        else:
            t = flat.view(shape)
        t.copy_(values)
        self.claimed |= self.mask([t])
        return t

    def owns(self, t) -> bool:
        return (torch.is_tensor(t) and t.dtype == self.dtype and t.numel() > 0
                and t.untyped_storage().data_ptr() == self.buf.untyped_storage().data_ptr()
                and t.untyped_storage().nbytes() == self.buf.untyped_storage().nbytes())

    def mask(self, tensors):
        """Elements of the buffer that belong to ``tensors`` (those it owns)."""
        m = torch.zeros(self.buf.numel(), dtype=torch.bool)
        idx = torch.arange(self.buf.numel())
        for t in tensors:
            if self.owns(t):
                m[idx.as_strided(t.shape, t.stride(), t.storage_offset()).reshape(-1)] = True
        return m


def bits(t):
    t = t.detach().resolve_conj().resolve_neg()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16,
                                1: torch.int8}[t.element_size()])


# ---------------------------------------------------------------- worlds

#: tests/matrix.py's configurations (every OptimInfo's), so that the two share compiled kernels
CONFIGS = [(name, kw) for name, kws in matrix.CONFIGS.items() for kw in kws
           if not any(callable(v) for v in kw.values())]
SHAPES = [(), (0,), (1,), (7,), (33,), (5, 3), (4, 6), (2, 3, 2, 2), (3, 0, 2)]
LAYOUTS = ["contiguous", "transposed", "gappy", "channels_last"]
GRAD_MODES = ["same", "contiguous", "transposed", "broadcast", "bucket", "none", "neg", "reuse",
              "sparse"]


class World:
    """One implementation's params, grads, optimizer and arenas."""

    def __init__(self, backend):
        self.backend = backend
        self.arenas = {dt: Arena(dt) for dt in _SENTINEL}
        self.grad_arenas = {dt: Arena(dt) for dt in _SENTINEL}
        self.params = []
        self.opt = None

    def make(self, name, groups, kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about a duplicated param
            if self.backend is None:  # torch's for-loop, the spec (not its fused path)
                self.opt = optim_db.get(name).oracle(groups, **kw)
            else:
                self.opt = optim_db.get(name).cls(groups, backend=self.backend, **kw)

    def all_params(self):
        return [p for g in self.opt.param_groups for p in g["params"]]

    def tensors(self):
        """Every live tensor the step may write (params, state)."""
        out = list(self.all_params())
        for p in out[:]:
            for v in self.opt.state.get(p, {}).values():
                if torch.is_tensor(v):
                    out.append(v)
        return out

    def arena_list(self):
        return list(self.arenas.values()) + list(self.grad_arenas.values())


# ---------------------------------------------------------------- the machine

def _clone(t):
    """A copy that is an inference tensor exactly where ``t`` is one."""
    with torch.inference_mode(t.is_inference()):
        return t.clone()


def _values(gen, shape, dtype):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


#: rule name -> applications in this process (printed by run())
COUNTS = collections.Counter()
#: steps compared with torch, and those that raised alike
STEPS = collections.Counter()


_TRACE = os.environ.get("FUSED_OPTIM_FUZZ_TRACE", "0") not in ("", "0")


def _draw(data, strategy):
    value = data.draw(strategy)
    if _TRACE:
        sys.stderr.write(f"  drew {value!r}\n")
        sys.stderr.flush()
    return value


def counted(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        COUNTS[fn.__name__] += 1
        if _TRACE:
            # a crash takes hypothesis's report with it: this trail is left
            sys.stderr.write(f"{fn.__name__} {args} {kwargs}\n")
            sys.stderr.flush()
        return fn(self, *args, **kwargs)
    return wrapper


def then_step(fn):
    """Step both worlds right after the mutation (the step's grads: fixed seeds)."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        out = fn(self, *args, **kwargs)
        self.seed_counter += 1
        self._grads(self.seed_counter)
        self._step()
        return out
    return wrapper


#: the opt-in options the precision machine draws from, one set per machine
PRECISION_OPTIONS = (dict(kahan_sum=True), dict(stochastic_round=True),
                     dict(kahan_sum=True, stochastic_round=True),
                     dict(state_dtype=torch.bfloat16))
#: params from this many elements up get 8-bit state (``state_bits=8``)
QUANTIZE_AT = _blockwise.MIN_NUMEL


def precision_options(name):
    """PRECISION_OPTIONS, and ``state_bits=8`` where the class takes it."""
    takes = "state_bits" in inspect.signature(optim_db.get(name).cls).parameters
    return PRECISION_OPTIONS + ((dict(state_bits=8),) if takes else ())


class Machine(RuleBasedStateMachine):
    """Two worlds and the rules that mutate both (see the module docstring)."""

    backend = "numba"
    big = False  # add one param over numba's serial threshold (parallel path)
    configs = CONFIGS  # what build draws from (run: one optimizer's at a time)
    precision = False  # check kahan_sum/stochastic_round against the reference backend
    options = PRECISION_OPTIONS  # what build draws when precision (run: per optimizer)
    dtypes = (torch.float32, torch.float64)

    def __init__(self):
        super().__init__()
        self.worlds = []
        self.grad_mode = []
        self.seed_counter = 1 << 20

    # ------------------------------------------------------------ building

    @initialize(config=st.runner().flatmap(lambda m: st.sampled_from(m.configs)),
                specs=st.lists(st.tuples(st.sampled_from(SHAPES), st.sampled_from(LAYOUTS),
                                         st.runner().flatmap(
                                             lambda m: st.sampled_from(m.dtypes)),
                                         st.integers(0, 8)),
                               min_size=1, max_size=5),
                alias=st.sampled_from(["none", "none", "duplicate", "overlap"]),
                seed=st.integers(0, 2 ** 16),
                options=st.runner().flatmap(lambda m: st.sampled_from(m.options)))
    @counted
    def build(self, config, specs, alias, seed, options):
        self.name, kw = config
        self.info = optim_db.get(self.name)
        self.kw = dict(kw, **options) if self.precision else dict(kw)
        self.worlds = [World("torch" if self.precision else None), World(self.backend)]
        if self.big:
            specs = specs + [((40_000,), "contiguous", torch.float32, 3)]
        if self.precision and "state_bits" in options:
            # one param 8-bit state applies to (QUANTIZE_AT elements and up),
            # its last block partial, in the first param's dtype
            specs = specs + [((QUANTIZE_AT + 4,), "contiguous", specs[0][2], 3)]
        for w in self.worlds:
            gen = torch.Generator().manual_seed(seed)
            for shape, layout, dtype, gap in specs:
                t = w.arenas[dtype].alloc(shape, layout, _values(gen, shape, dtype), gap)
                if t is None:
                    t = _values(gen, shape, dtype)
                w.params.append(t.requires_grad_())
            if alias == "overlap":
                big = w.arenas[torch.float32].alloc((24,), "contiguous",
                                                    _values(gen, (24,), torch.float32), 2)
                if big is not None:
                    w.params += [big[:16].requires_grad_(), big[8:].requires_grad_()]
            params = list(w.params)
            if alias == "duplicate":
                params.append(params[0])
            w.make(self.name, params, self.kw)
            if self.precision:
                # one stream for both worlds, also where a rule switches
                # stochastic rounding on later (the seed is drawn lazily)
                w.opt._sr_seed = seed * 7919 + 1
        self.grad_mode = ["same"] * len(self.worlds[0].all_params())
        self.last_grads = [[None] * len(self.grad_mode) for _ in self.worlds]

    # ------------------------------------------------------------ stepping

    def _grads(self, seed):
        gen_vals = []
        gen = torch.Generator().manual_seed(seed)
        for p in self.worlds[0].all_params():
            gen_vals.append(_values(gen, p.shape, p.dtype))
        for k, w in enumerate(self.worlds):
            for i, p in enumerate(w.all_params()):
                mode, v = self.grad_mode[i], gen_vals[i]
                if mode == "none":
                    g = None
                elif mode == "reuse" and self.last_grads[k][i] is not None:
                    g = self.last_grads[k][i]
                elif mode == "same":
                    g = torch.empty_like(p).copy_(v)
                elif mode == "transposed" and p.dim() >= 2:
                    g = v.transpose(0, 1).contiguous().transpose(0, 1)
                elif mode == "broadcast" and p.numel() > 0:
                    g = v.reshape(-1)[:1].reshape([1] * p.dim()).expand(p.shape)
                elif mode == "bucket":
                    g = w.grad_arenas[p.dtype].alloc(tuple(p.shape), "contiguous", v, 3)
                    if g is None:
                        w.grad_arenas[p.dtype] = Arena(p.dtype)
                        g = w.grad_arenas[p.dtype].alloc(tuple(p.shape), "contiguous", v, 3)
                elif mode == "neg":
                    g = torch._neg_view(-v)
                elif mode == "sparse" and p.dim() >= 1 and p.storage_offset() == 0:
                    # (torch's own dense.add_(sparse) writes at twice a view's
                    # storage offset: see test_plan_cache.py)
                    g = v.to_sparse()
                else:
                    g = v.contiguous()
                if g is not None and g.dtype != p.dtype:
                    g = g.to(p.dtype)
                p.grad = g
                self.last_grads[k][i] = g

    def _step(self, undo=None):
        """Step both worlds; compare; keep fused_optim's arenas honest.

        After an exception, ``undo()`` (if given) takes back the mutation
        that caused it, and then torch's world is resynced to fused_optim's.
        Returns whether the step went through.
        """
        # torch's CPU add(alpha=) rounds a broadcast operand without its FMA:
        # bit-exactness holds for the grads it reads like any other
        self.exact = (self.info.is_bit_exact(*{p.dtype for p in self.worlds[0].all_params()})
                      and "broadcast" not in self.grad_mode)
        STEPS["steps"] += 1
        outcomes = []
        for w in self.worlds:
            before = _Snapshot(w)
            try:
                w.opt.step()
                outcomes.append(None)
            except Exception as err:  # noqa: BLE001 - compared with torch's
                outcomes.append((type(err), str(err)))
                if w.backend is not None:
                    before.assert_unwritten(w)
            if w.backend is not None:
                before.assert_guards(w)
        theirs, ours = outcomes
        assert ours == theirs, f"torch: {theirs}\nfused_optim: {ours}"
        if theirs is not None:
            STEPS["raised alike"] += 1
            if undo is not None:
                undo()
            self._resync()
        else:
            self._compare()
            if self.info.bit_exact and not self.exact:
                # within tolerance but maybe an ulp apart: later exact
                # comparisons must start from equal worlds
                self._resync()
        return theirs is None

    def _compare(self):
        ref, ours = self.worlds
        exact = self.exact
        for i, (a, b) in enumerate(zip(ref.all_params(), ours.all_params())):
            _close(b, a, exact, f"param {i}")
            sa, sb = ref.opt.state.get(a, {}), ours.opt.state.get(b, {})
            assert set(sa) == set(sb), (i, set(sa), set(sb))
            for key in sa:
                _close(sb[key], sa[key], exact, f"param {i} state {key!r}")

    def _resync(self):
        """torch's world takes fused_optim's values (after an exception, unwritten ones).

        torch's for-loop raised after writing the rows before the bad one;
        fused_optim wrote nothing but the lazily made state torch makes too.
        """
        ref, ours = self.worlds
        with torch.no_grad():
            for a, b in zip(ref.all_params(), ours.all_params()):
                a.copy_(b)
                sb = ours.opt.state.get(b)
                if sb is not None:
                    sa = ref.opt.state[a]  # in place: rules hold on to these dicts
                    sa.clear()
                    sa.update({k: (_clone(v) if torch.is_tensor(v) else v)
                               for k, v in sb.items()})
                else:
                    ref.opt.state.pop(a, None)

    @rule(seed=st.integers(0, 2 ** 16))
    @counted
    def step(self, seed):
        self._grads(seed)
        self._step()

    @rule(seed=st.integers(0, 2 ** 16))
    @counted
    def step_in_inference_mode(self, seed):
        self._grads(seed)
        with torch.inference_mode():
            self._step()

    # ------------------------------------------------------------ grads

    @rule(data=st.data(), mode=st.sampled_from(GRAD_MODES))
    @counted
    @then_step
    def grad_mode_changes(self, data, mode):
        i = _draw(data, st.integers(0, len(self.grad_mode) - 1))
        self.grad_mode[i] = mode

    @rule(set_to_none=st.booleans())
    @counted
    @then_step
    def zero_grad(self, set_to_none):
        failed = False
        for w in self.worlds:
            try:
                w.opt.zero_grad(set_to_none=set_to_none)
            except RuntimeError:
                # torch's own zero_grad: with fused=True (kept on fused_optim's
                # side only) its foreach path refuses neg-bit grads
                failed = True
        if failed:
            for w in self.worlds:
                w.opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------ params

    @rule(data=st.data(), layout=st.sampled_from(LAYOUTS), gap=st.integers(0, 5))
    @counted
    @then_step
    def param_data_swapped(self, data, layout, gap):
        i = _draw(data, st.integers(0, len(self.grad_mode) - 1))
        for w in self.worlds:
            p = w.all_params()[i]
            if p.dtype not in w.arenas:
                return
            t = w.arenas[p.dtype].alloc(tuple(p.shape), layout, p.detach(), gap)
            if t is not None:
                p.data = t

    @rule(data=st.data(), seed=st.integers(0, 2 ** 16))
    @counted
    def param_data_reshaped(self, data, seed):
        """``p.data`` viewed as another shape: torch's step raises; then put back."""
        i = _draw(data, st.integers(0, len(self.grad_mode) - 1))
        if self.worlds[0].all_params()[i].dim() < 2:
            return
        self._grads(seed)
        old = []
        for w in self.worlds:
            p = w.all_params()[i]
            old.append(p.data)
            if not p.data.is_contiguous():
                return
            p.data = p.data.reshape(-1)
        def put_back():
            for w, o in zip(self.worlds, old):
                w.all_params()[i].data = o

        if self._step(undo=put_back):
            put_back()

    @rule(seed=st.integers(0, 2 ** 16),
          dtype=st.runner().flatmap(lambda m: st.sampled_from(m.dtypes)))
    @counted
    def arena_shrunk_and_regrown(self, seed, dtype):
        """An arena's storage freed and re-grown, too small for its last live
        view: fused_optim refuses (torch's own step would leave the
        allocation, so it is not run); then the arena is restored."""
        ref, ours = self.worlds
        arena = ours.arenas[dtype]
        self._grads(seed)
        # what the step reads: SGD without momentum leaves momentum buffers alone
        live = [t for g in ours.opt.param_groups for p in g["params"] if p.grad is not None
                for t in [p, *(ours.opt.state.get(p, {}).values()
                               if g.get("momentum", 1) != 0 else ())]
                if arena.owns(t)]
        if not live:
            return
        end = max((t.storage_offset() + 1 + sum((n - 1) * s for n, s in
                                                 zip(t.shape, t.stride()))) * t.element_size()
                  for t in live)
        saved = []
        for w in self.worlds:
            buf = w.arenas[dtype].buf
            saved.append(buf.clone())
            buf.untyped_storage().resize_(0)
            buf.untyped_storage().resize_((end - 1) // 64 * 64)
        try:
            ours.opt.step()
        except Exception as err:  # noqa: BLE001
            # the clear error, or an earlier one torch raises too (a bad state
            # entry in an earlier group, beta1 edited to 1)
            assert "outside its storage" in str(err) or not isinstance(
                err, fused_optim._plan.OutsideStorageError), err
        else:
            raise AssertionError(
                "a step over a shrunk storage was not refused: storage now "
                f"{arena.buf.untyped_storage().nbytes()} bytes, live views (offset, "
                "shape, stride) " + ", ".join(
                    str((t.storage_offset(), tuple(t.shape), t.stride())) for t in live)
                + f"; groups {[{k: v for k, v in g.items() if k != 'params'} for g in ours.opt.param_groups]}")
        for w, keep in zip(self.worlds, saved):
            buf = w.arenas[dtype].buf
            buf.untyped_storage().resize_(keep.numel() * keep.element_size())
            buf.copy_(keep)
        # torch's world did not step: drop the state fused_optim's lazily made
        for a, b in zip(ref.all_params(), ours.all_params()):
            if not ref.opt.state.get(a):
                ours.opt.state.pop(b, None)

    # ------------------------------------------------------------ state

    @rule(data=st.data(), how=st.sampled_from(
        ["arena copy", "transposed copy", "smaller view", "int view", "other shape",
         "deleted", "promoted", "extra entry"]), seed=st.integers(0, 2 ** 16))
    @counted
    def state_edited(self, data, how, seed):
        i = _draw(data, st.integers(0, len(self.grad_mode) - 1))
        p0 = self.worlds[0].all_params()[i]
        keys = sorted(k for k, v in self.worlds[0].opt.state.get(p0, {}).items()
                      if torch.is_tensor(v) and k != "step")
        if not keys:
            return
        key = _draw(data, st.sampled_from(keys))
        undo = []
        for w in self.worlds:
            p = w.all_params()[i]
            st_ = w.opt.state[p]
            t = st_[key]
            undo.append((st_, dict(st_)))
            if how == "arena copy" and t.dtype in w.arenas:
                new = w.arenas[t.dtype].alloc(tuple(t.shape), "contiguous", t, 1)
                if new is not None:
                    st_[key] = new
            elif how == "transposed copy" and t.dim() >= 2:
                st_[key] = t.transpose(0, 1).contiguous().transpose(0, 1)
            elif how == "smaller view" and t.numel() > 2:
                st_[key] = t.reshape(-1)[:2]
            elif how == "int view" and t.dtype == torch.float32:
                st_[key] = t.view(torch.int32)
            elif how == "other shape" and t.dim() >= 2 and t.is_contiguous():
                st_[key] = t.view(-1)
            elif how == "deleted":
                del st_[key]
            elif how == "promoted" and t.dtype == torch.float32:
                st_[key] = t.double()
            elif how == "extra entry":
                st_["unused"] = torch.zeros(3)
        self._grads(seed)

        def put_back():
            for st_, old in undo:
                st_.clear()
                st_.update(old)

        self._step(undo=put_back)

    @rule(data=st.data())
    @counted
    @then_step
    def step_count_changed(self, data):
        """A checkpoint's step of another dtype (torch's for-loop takes any)."""
        i = _draw(data, st.integers(0, len(self.grad_mode) - 1))
        dtype = _draw(data, st.sampled_from([torch.float32, torch.float64, torch.int64,
                                           torch.float16]))
        for w in self.worlds:
            s = w.opt.state.get(w.all_params()[i], {})
            if torch.is_tensor(s.get("step")):
                s["step"] = s["step"].to(dtype)

    # ------------------------------------------------------------ optimizer

    @rule(direction=st.sampled_from(["own", "torch to fused_optim", "fused_optim to torch"]))
    @counted
    @then_step
    def state_dict_loaded(self, direction):
        ref, ours = self.worlds
        if direction == "own":
            ours.opt.load_state_dict(ours.opt.state_dict())
            # torch's loader casts a fused or capturable group's step to
            # float32: the for-loop world loads as torch.optim would with
            # fused_optim's flags, then stays the for-loop (below)
            src = ref.opt.state_dict()
            keep = [{k: g[k] for k in ("fused", "capturable") if k in g}
                    for g in src["param_groups"]]
            for g, flags in zip(src["param_groups"], ours.opt.param_groups):
                g.update({k: flags[k] for k in ("fused", "capturable") if k in flags})
            ref.opt.load_state_dict(src)
            for g, flags in zip(ref.opt.param_groups, keep):
                g.update(flags)
        else:
            # through copies, as a checkpoint file is (torch's loader keeps the
            # very tensors it is given where their dtype and device fit), and
            # into both worlds, so that they hold alike-made tensors
            src = (ref if direction == "torch to fused_optim" else ours).opt.state_dict()
            for w in self.worlds:
                w.opt.load_state_dict(copy.deepcopy(src))
            for group in ref.opt.param_groups:
                group["fused"] = None  # torch's world stays the for-loop

    @rule(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2 ** 16))
    @counted
    @then_step
    def param_group_added(self, shape, seed):
        if len(self.grad_mode) > 10:
            return
        for w in self.worlds:
            gen = torch.Generator().manual_seed(seed)
            t = w.arenas[torch.float32].alloc(shape, "contiguous",
                                              _values(gen, shape, torch.float32), 1)
            if t is None:
                t = _values(gen, shape, torch.float32)
            w.opt.add_param_group({"params": [t.requires_grad_()], "lr": 0.003})
        self.grad_mode.append("same")
        for lg in self.last_grads:
            lg.append(None)

    @rule(data=st.data())
    @counted
    @then_step
    def hyperparameter_edited(self, data):
        group = _draw(data, st.integers(0, len(self.worlds[0].opt.param_groups) - 1))
        edits = self.info.hyperparameter_edits
        if self.precision:
            edits = edits + tuple((k, v) for k in ("kahan_sum", "stochastic_round")
                                  for v in (False, True))
        key, value = _draw(data, st.sampled_from(edits))
        for w in self.worlds:
            w.opt.param_groups[group][key] = value

    # ------------------------------------------------------------ always

    @invariant()
    def never_used_arena_elements_hold_the_sentinel(self):
        for w in self.worlds[1:]:
            for arena in w.arena_list():
                if arena.buf.untyped_storage().nbytes():
                    idt, pattern = _SENTINEL[arena.dtype]
                    unused = arena.buf.view(idt)[~arena.claimed]
                    assert bool((unused == pattern).all()), "a never-used arena element was written"


class _Snapshot:
    """A world's params, state and arenas before a step."""

    def __init__(self, w, arenas=True):
        self.params = [bits(p).clone() for p in w.all_params()]
        self.state = []
        for p in w.all_params():
            s = w.opt.state.get(p, {})
            self.state.append({k: (bits(v).clone() if torch.is_tensor(v) else v)
                               for k, v in s.items()})
        self.arenas = [(a, bits(a.buf).clone()) for a in w.arena_list()
                       if arenas and a.buf.untyped_storage().nbytes()]
        self.live = w.tensors()

    def assert_unwritten(self, w):
        for i, p in enumerate(w.all_params()):
            assert torch.equal(bits(p), self.params[i]), f"param {i} written by a step that raised"
            s = w.opt.state.get(p, {})
            before = self.state[i]
            if not before:
                # torch's _init_group makes a new param's state before it raises:
                # torch's fresh state (zeros, Rprop's lr-filled step sizes, NAdam's
                # mu_product 1), zeros for our own keys
                fresh = torchs_fresh_state(w.opt, p)
                assert all(not torch.is_tensor(v) or (torch.equal(bits(v), bits(fresh[k]))
                                                      if k in fresh else not v.any())
                           for k, v in s.items())
                continue
            assert set(s) == set(before)
            for k, v in before.items():
                if torch.is_tensor(v):
                    assert torch.equal(bits(s[k]), v), f"state {k!r} of param {i} written"

    def assert_guards(self, w):
        """Only live params and state changed inside the arenas."""
        for arena, before in self.arenas:
            if arena.buf.untyped_storage().nbytes() != before.numel() * before.element_size():
                continue
            writable = arena.mask(self.live)
            after = bits(arena.buf)
            changed = after != before
            stray = changed & ~writable
            assert not bool(stray.any()), (
                f"{int(stray.sum())} arena elements outside every live param and state "
                f"tensor were written (first at {int(stray.nonzero()[0])})")


def _close(actual, expected, exact, where):
    if not torch.is_tensor(expected):
        assert actual == expected, where
        return
    assert torch.is_tensor(actual), where
    assert actual.dtype == expected.dtype, (where, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, where
    assert actual.layout == expected.layout, (where, actual.layout, expected.layout)
    a = actual.detach().resolve_conj().resolve_neg()
    e = expected.detach().resolve_conj().resolve_neg()
    if a.is_sparse:  # SGD's momentum buffer starts as a clone of a sparse grad
        a, e = a.to_dense(), e.to_dense()
    if exact and a.is_floating_point():
        assert torch.equal(bits(a), bits(e)) or bool(
            ((a == e) | (a.isnan() & e.isnan())).all()), where
    else:
        torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m: f"{where}: {m}")


def budget():
    """(examples, steps per example, random?) from the environment.

    CI's run is derandomized (the same examples every time, reproducible);
    ``FUSED_OPTIM_FUZZ_RANDOM=1`` (``make fuzz``) draws new ones each run.
    The examples are shared among the optimizers (at least 2 each).
    """
    return (int(os.environ.get("FUSED_OPTIM_FUZZ_EXAMPLES", "25")),
            int(os.environ.get("FUSED_OPTIM_FUZZ_STEPS", "30")),
            os.environ.get("FUSED_OPTIM_FUZZ_RANDOM", "0") not in ("", "0"))


def optimizer_names():
    """The optimizers to run: every OptimInfo, or ``FUSED_OPTIM_FUZZ_OPTIMIZERS``
    (comma-separated names, e.g. ``Adagrad,RMSprop``)."""
    chosen = os.environ.get("FUSED_OPTIM_FUZZ_OPTIMIZERS", "")
    names = [n.strip() for n in chosen.split(",") if n.strip()] or list(optim_db.names())
    for n in names:
        optim_db.get(n)  # KeyError for a name without an OptimInfo
    return names


def run(backend, big=False, precision=False):
    """Run the machine on ``backend``, one optimizer after another, so that
    every OptimInfo is covered whatever the draws; raises hypothesis's
    falsifying example. ``precision``: the options' machine (module docstring)."""
    examples, steps, random = budget()
    names = optimizer_names()
    if os.environ.get("FUSED_OPTIM_COMPILE_LOG"):
        import compile_log

        os.environ["FUSED_OPTIM_COMPILE_LOG_SUB"] = f"machine-{backend}-{int(big)}{int(precision)}"
        compile_log.install()
    problems = []
    for name in names:
        configs = [c for c in CONFIGS if c[0] == name]
        if not configs:
            continue
        COUNTS.clear()
        STEPS.clear()
        extra = ({"precision": True, "dtypes": (torch.bfloat16, torch.float32),
                  "options": precision_options(name)} if precision else {})
        cls = type(f"Machine_{backend}_{name}", (Machine,),
                   {"backend": backend, "big": big, "configs": configs, **extra})
        cls.TestCase.settings = settings(
            max_examples=max(2, examples // len(names)), stateful_step_count=steps,
            deadline=None, derandomize=not random, database=None,
            report_multiple_bugs=False, suppress_health_check=list(HealthCheck))
        test = cls.TestCase("runTest")
        result = test.defaultTestResult()
        test.run(result)
        print(f"{backend}{' (parallel)' if big else ''}{' (precision)' if precision else ''} "
              f"{name}: {COUNTS['build']} machines, "
              f"{sum(COUNTS.values()) - COUNTS['build']} rules applied, "
              f"{STEPS['steps']} steps compared with torch "
              f"({STEPS['raised alike']} raised alike); "
              + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())), flush=True)
        problems += [f"{name}:\n{text}" for _, text in result.failures + result.errors]
        if problems:
            break
    if problems:
        raise AssertionError("\n".join(problems))
