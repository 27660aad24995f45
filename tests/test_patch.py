"""fused_optim.patch_torch(): what it replaces, what it must leave alone, and
that torch's optimizer ecosystem keeps working on the patched classes."""

import importlib
import io
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.optim.adam
import torch.optim.adamw
import torch.optim.sgd
from torch.optim import lr_scheduler

import fused_optim
import optim_db
from fused_optim import _patch

TORCH = {info.name: info.record.torch_cls for info in optim_db.OPTIM_DB}
FUSED = {info.name: info.cls for info in optim_db.OPTIM_DB}
SUBMODULE = {info.name: info.record.torch_module for info in optim_db.OPTIM_DB}
FUNCTIONALS = {info.record.torch_module: info.record.functional for info in optim_db.OPTIM_DB}
TORCH_FUNCTIONALS = {m: getattr(sys.modules[m], f) for m, f in FUNCTIONALS.items()}

#: one case per OptimInfo (every state key in play), then hand-picked variants
#: (which replace an entry of the same id)
OPTIMIZERS = {info.name: (info.name, info.full_state_example) for info in optim_db.OPTIM_DB}
OPTIMIZERS |= {
    "SGD": ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=4e-5)),
    "SGD-nesterov": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    "Adam": ("Adam", dict(lr=1e-2)),
    "Adam-amsgrad": ("Adam", dict(lr=1e-2, weight_decay=1e-3, amsgrad=True)),
    "AdamW": ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
}


def assert_unpatched():
    assert not _patch.is_patched()
    for name, cls in TORCH.items():
        assert getattr(torch.optim, name) is cls
        assert getattr(sys.modules[SUBMODULE[name]], name) is cls
    for mod, fn in TORCH_FUNCTIONALS.items():
        assert getattr(sys.modules[mod], FUNCTIONALS[mod]) is fn


def assert_patched():
    assert _patch.is_patched()
    for name, cls in FUSED.items():
        assert getattr(torch.optim, name) is cls
        assert getattr(sys.modules[SUBMODULE[name]], name) is cls
    # the functionals are what fused_optim falls back on: never replaced
    for mod, fn in TORCH_FUNCTIONALS.items():
        assert getattr(sys.modules[mod], FUNCTIONALS[mod]) is fn


@pytest.fixture(autouse=True)
def no_leaked_patch():
    assert_unpatched()
    yield
    leaked = _patch.is_patched()
    while _patch.is_patched():  # leave torch clean for the other test files
        _patch._depth = 1
        _patch.PatchHandle().undo()
    assert not leaked, "a test left torch.optim patched"


# ------------------------------------------------------------------ mechanics

def test_every_import_style_sees_fused_classes():
    with fused_optim.patch_torch():
        import torch.optim as optim
        from torch.optim import SGD, Adam, AdamW
        from torch.optim.adam import Adam as Adam2
        from torch.optim.adamw import AdamW as AdamW2
        from torch.optim.sgd import SGD as SGD2

        assert (SGD, Adam, AdamW) == (fused_optim.SGD, fused_optim.Adam, fused_optim.AdamW)
        assert (SGD2, Adam2, AdamW2) == (SGD, Adam, AdamW)
        assert optim.SGD is torch.optim.SGD is fused_optim.SGD
        assert importlib.import_module("torch.optim.adamw").AdamW is fused_optim.AdamW
        ns = {}
        exec("from torch.optim import *", ns)
        assert ns["Adam"] is fused_optim.Adam
        assert_patched()
    assert_unpatched()


def test_plain_call_returns_undoable_handle():
    handle = fused_optim.patch_torch()
    try:
        assert handle.active
        assert_patched()
    finally:
        handle.undo()
    assert not handle.active
    assert_unpatched()
    handle.undo()  # a second undo is a no-op
    handle.restore()
    assert_unpatched()


def test_restore_is_an_alias_of_undo():
    handle = fused_optim.patch_torch()
    handle.restore()
    assert_unpatched()


def test_nested_and_repeated_patches():
    with fused_optim.patch_torch() as outer:
        with fused_optim.patch_torch() as inner:
            assert_patched()
        assert not inner.active
        assert_patched()  # the outer activation still holds
        again = fused_optim.patch_torch()
        assert_patched()
        again.undo()
        assert_patched()
    assert not outer.active
    assert_unpatched()


def test_handles_undone_out_of_order():
    first, second = fused_optim.patch_torch(), fused_optim.patch_torch()
    first.undo()
    assert_patched()
    second.undo()
    assert_unpatched()


def test_exception_inside_with_restores_and_propagates():
    with pytest.raises(KeyError, match="boom"):
        with fused_optim.patch_torch():
            raise KeyError("boom")
    assert_unpatched()


def test_original_returns_torch_classes_while_patched():
    with fused_optim.patch_torch():
        for name, cls in TORCH.items():
            assert _patch.original(name) is cls
    assert _patch.original("SGD") is TORCH["SGD"]
    with pytest.raises(KeyError):
        _patch.original("LBFGS")  # a torch.optim class fused_optim does not have


def test_other_torch_optim_names_untouched():
    before = dict(vars(torch.optim))
    with fused_optim.patch_torch():
        after = dict(vars(torch.optim))
    changed = {k for k in before if before[k] is not after.get(k)}
    assert changed == set(optim_db.names())
    assert dict(vars(torch.optim)) == before


def test_isinstance_relations():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with fused_optim.patch_torch():
        sgd, adamw = torch.optim.SGD(p, lr=0.1), torch.optim.AdamW(p)
        assert isinstance(sgd, torch.optim.Optimizer)
        assert isinstance(sgd, torch.optim.SGD)
        # as in torch, AdamW is an Adam
        assert isinstance(adamw, torch.optim.Adam)
        assert isinstance(adamw, torch.optim.Optimizer)


# ------------------------------------------------------------- training parity

def _data(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(model, opt, batches, sched=None, per_batch_sched=False, scaler=None):
    lrs = []
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if sched is not None:
            if isinstance(sched, lr_scheduler.ReduceLROnPlateau):
                sched.step(loss.item())
            elif per_batch_sched:
                sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    if sched is not None and not per_batch_sched and not isinstance(
            sched, lr_scheduler.ReduceLROnPlateau):
        sched.step()
    return lrs


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


SCHEDULERS = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda e: 1 / (1 + e)),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=6),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=8),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=0.001, max_lr=0.05, step_size_up=3),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
    "warmup+cosine": lambda o: lr_scheduler.SequentialLR(
        o, [lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
            lr_scheduler.CosineAnnealingLR(o, T_max=5)], milestones=[3]),
}


@pytest.mark.parametrize("opt_name", optim_db.names())
@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
def test_lr_schedulers_drive_patched_optimizers(opt_name, sched_name):
    name, kwargs = OPTIMIZERS[opt_name]
    results = []
    for patched in (False, True):
        with fused_optim.patch_torch() if patched else _null():
            model = _model()
            opt = getattr(torch.optim, name)(model.parameters(), **kwargs)
            assert isinstance(opt, FUSED[name] if patched else TORCH[name])
            try:
                sched = SCHEDULERS[sched_name](opt)
            except ValueError as err:  # OneCycleLR on an optimizer without momentum
                results.append(repr(err))
                continue
            lrs = _train(model, opt, _data(), sched, per_batch_sched=True)
            results.append((_params(model), lrs, sched.state_dict()))
    if isinstance(results[0], str):  # torch refused this pair: so must the patched class
        assert results[1] == results[0]
        return
    (ref, ref_lrs, ref_sd), (got, got_lrs, got_sd) = results
    torch.testing.assert_close(got, ref)
    assert got_lrs == ref_lrs
    assert got_sd.keys() == ref_sd.keys()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("fused", [False, True], ids=["for-loop", "fused"])
@pytest.mark.parametrize("opt_name", [i.name for i in optim_db.with_capability("fused")])
def test_grad_scaler(opt_name, fused):
    # fused=True optimizers unscale and skip inf steps themselves, from the
    # grad_scale/found_inf GradScaler hands them; a large eps keeps Adam from
    # hiding a missing unscale
    name, kwargs = OPTIMIZERS[opt_name]
    if fused:
        kwargs = dict(kwargs, fused=True, **optim_db.get(name).scale_sensitive)
    results = []
    for patched in (False, True):
        with fused_optim.patch_torch() if patched else _null():
            model = _model()
            opt = getattr(torch.optim, name)(model.parameters(), **kwargs)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
            batches = _data()
            batches[3][0][0, 0] = float("inf")  # one step to skip
            _train(model, opt, batches, scaler=scaler)
            results.append((_params(model), scaler.get_scale()))
    torch.testing.assert_close(results[1][0], results[0][0])
    assert results[1][1] == results[0][1] == 2.0**9


def test_sparse_gradient_fallback_uses_torch_functional():
    # fused_optim steps sparse gradients with torch.optim.sgd.sgd: that must
    # still be torch's function, not something the patch swapped in.
    results = []
    for patched in (False, True):
        with fused_optim.patch_torch() if patched else _null():
            torch.manual_seed(0)
            emb = torch.nn.Embedding(10, 4, sparse=True)
            opt = torch.optim.SGD(emb.parameters(), lr=0.1)
            for i in range(3):
                opt.zero_grad()
                emb(torch.tensor([i, i + 1, 7])).pow(2).sum().backward()
                opt.step()
            results.append(emb.weight.detach().clone())
    torch.testing.assert_close(results[1], results[0])


# --------------------------------------------------------------- checkpoints

def _checkpoint_roundtrip(opt_name, save_patched, load_patched, tmp_path):
    name, kwargs = OPTIMIZERS[opt_name]
    batches = _data(n=10)

    def build():
        model = _model()
        opt = getattr(torch.optim, name)(model.parameters(), **kwargs)
        return model, opt, lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)

    def train(model, opt, sched, part):
        for x, y in part:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()

    model, opt, sched = build()  # unpatched: the uninterrupted reference
    train(model, opt, sched, batches)
    reference = _params(model)

    path = tmp_path / "ckpt.pt"
    with fused_optim.patch_torch() if save_patched else _null():
        model, opt, sched = build()
        train(model, opt, sched, batches[:5])
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict()}, path)
        saved_sd = opt.state_dict()
    with fused_optim.patch_torch() if load_patched else _null():
        ckpt = torch.load(path)  # weights_only: the state must be plain data
        model, opt, sched = build()
        assert isinstance(opt, FUSED[name] if load_patched else TORCH[name])
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        train(model, opt, sched, batches[5:])
    torch.testing.assert_close(_params(model), reference)
    return saved_sd


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("direction", ["patched->torch", "torch->patched"])
def test_checkpoint_crosses_patch_boundary(opt_name, direction, tmp_path):
    save_patched = direction == "patched->torch"
    _checkpoint_roundtrip(opt_name, save_patched, not save_patched, tmp_path)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_patched_state_dict_has_torch_layout(opt_name, tmp_path):
    fused_sd = _checkpoint_roundtrip(opt_name, True, True, tmp_path)
    torch_sd = _checkpoint_roundtrip(opt_name, False, False, tmp_path)
    assert fused_sd["param_groups"] == torch_sd["param_groups"]
    assert fused_sd["state"].keys() == torch_sd["state"].keys()
    for k, st in torch_sd["state"].items():
        assert fused_sd["state"][k].keys() == st.keys()
        for key, value in st.items():
            assert fused_sd["state"][k][key].dtype == value.dtype
            assert fused_sd["state"][k][key].shape == value.shape


def test_pickled_torch_optimizer_loads_as_fused_while_patched():
    # torch.save(optimizer) pickles the class by its torch.optim.sgd.SGD
    # path, which the patch points at the fused class.
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, _data(n=2))
    buf = io.BytesIO()
    torch.save(opt, buf)
    with fused_optim.patch_torch():
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert type(loaded) is fused_optim.SGD
        assert loaded.backend == "auto"
        # a restored optimizer has its own copies of the params
        loaded_params = [p for g in loaded.param_groups for p in g["params"]]
        for p, q in zip(loaded_params, model.parameters()):
            p.grad = torch.ones_like(p)
            q.grad = torch.ones_like(q)
        loaded.step()
        opt.step()
        torch.testing.assert_close(loaded_params, list(model.parameters()))


# --------------------------------------------------------------- distributed

@pytest.fixture
def process_group():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    fd, store = tempfile.mkstemp()
    os.close(fd)
    excepthook = sys.excepthook  # init_process_group installs a "[rank0]:" one
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()
        sys.excepthook = excepthook
        os.unlink(store)


def test_zero_redundancy_optimizer(process_group):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.distributed.optim.utils import functional_optim_map

    results = []
    for patched in (False, True):
        with fused_optim.patch_torch() if patched else _null():
            model = _model()
            zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD,
                                           lr=0.05, momentum=0.9)
            assert type(zero.optim) is (fused_optim.SGD if patched else TORCH["SGD"])
            _train(model, zero, _data(n=4))
            zero.consolidate_state_dict(0)
            results.append((_params(model), zero.state_dict()))
            # overlap_with_ddp translates the class through torch's functional
            # optimizer map, which must know the patched classes too
            ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW,
                                    overlap_with_ddp=True, lr=0.01)
    torch.testing.assert_close(results[1][0], results[0][0])
    assert results[1][1]["param_groups"] == results[0][1]["param_groups"]
    assert fused_optim.SGD not in functional_optim_map
    assert TORCH["SGD"] in functional_optim_map


def test_functional_map_built_while_patched_is_repaired():
    # torch.distributed.optim.utils keys its map by the classes it sees at
    # import; import it for the first time while patched, in a fresh process.
    code = """
import sys, torch, fused_optim
orig = torch.optim.SGD
with fused_optim.patch_torch():
    from torch.distributed.optim.utils import functional_optim_map as m
    assert fused_optim.SGD in m and fused_optim.AdamW in m
assert orig in m and torch.optim.Adam in m and torch.optim.AdamW in m, m
assert fused_optim.SGD not in m and fused_optim.Adam not in m
print("ok")
"""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
