"""One rank of tests/test_distributed.py: ``python _dist_worker.py SCENARIO OUTDIR``.

The launcher sets MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE. Each scenario
(ddp, zero, fsdp2, dcp) runs its cases one after the other; every case that
passes is appended to ``OUTDIR/rank<R>.jsonl``. The first failure is written
there with its traceback and the rank exits 1 at once (no destroy, no further
collective): the launcher then kills the other rank, so nothing waits on a
collective that will never come. All ranks run the same cases in the same
order, so a case's collectives always pair up.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fused_optim
import optim_db  # tests/, this script's directory

OPTIMIZERS = optim_db.names()

# every optimizer of tests/optim_db.py with all its state in play; then
# momentum SGD; Adam with AMSGrad (a third state tensor); AdamW with decay
KWARGS = {info.name: info.full_state_example for info in optim_db.OPTIM_DB}
KWARGS |= {
    "SGD": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    "Adam": dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.01, amsgrad=True),
    "AdamW": dict(lr=0.01, weight_decay=0.1),
}

STEPS = 4          # training steps of the ddp, zero and fsdp2 cases
N_SAVE, M_MORE = 3, 2   # dcp: steps before the checkpoint, steps after loading

EXACT = dict(rtol=0, atol=0)

RANK = WORLD = -1


# --------------------------------------------------------------------------
# helpers


def make_optim(kind, name, params, **extra):
    """``kind`` "fused": fused_optim.<name>(backend numba); "torch": torch.optim's for-loop."""
    kw = dict(KWARGS[name], foreach=False, **extra)
    if kind == "fused":
        return getattr(fused_optim, name)(params, backend="numba", **kw)
    return getattr(torch.optim, name)(params, **kw)


def make_model(seed=0):
    """A tiny MLP, identical on every rank (FSDP2 does not broadcast).

    Sizes chosen so that under FSDP2 on 2 ranks the first layer shards
    unevenly (15 rows: 8 + 7) and the last layer's weight (1, 15) and bias (1,)
    leave rank 1 an empty local shard.
    """
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 15), nn.Tanh(), nn.Linear(15, 1))


def batch(step):
    """This rank's data for ``step``: different on each rank, same for every run."""
    gen = torch.Generator().manual_seed(1000 * RANK + step)
    return torch.randn(6, 8, generator=gen), torch.randn(6, 1, generator=gen)


def train_step(model, opt, step):
    x, y = batch(step)
    opt.zero_grad(set_to_none=True)
    F.mse_loss(model(x), y).backward()
    opt.step()


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def assert_weights_close(model_a, model_b, **tol):
    a = dict(model_a.named_parameters())
    b = dict(model_b.named_parameters())
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    for key in a:
        torch.testing.assert_close(full(a[key]).detach(), full(b[key]).detach(),
                                   msg=lambda m, key=key: f"param {key}: {m}", **tol)


def assert_same_on_all_ranks(model):
    for name, p in model.named_parameters():
        mine = full(p).detach().clone()
        gathered = [torch.empty_like(mine) for _ in range(WORLD)]
        dist.all_gather(gathered, mine)
        for r, t in enumerate(gathered):
            torch.testing.assert_close(t, mine, **EXACT,
                                       msg=lambda m, name=name, r=r: f"{name} rank {r}: {m}")


def assert_state_dicts_close(sd_a, sd_b, ignore_group_keys=(), **tol):
    """Same param_groups, same state keys per param, close state values."""
    groups_a = [{k: v for k, v in g.items() if k not in ignore_group_keys}
                for g in sd_a["param_groups"]]
    groups_b = [{k: v for k, v in g.items() if k not in ignore_group_keys}
                for g in sd_b["param_groups"]]
    assert groups_a == groups_b, f"param_groups differ:\n{groups_a}\n{groups_b}"
    assert sd_a["state"].keys() == sd_b["state"].keys(), (
        sd_a["state"].keys(), sd_b["state"].keys())
    for k, st in sd_a["state"].items():
        other = sd_b["state"][k]
        assert st.keys() == other.keys(), (k, st.keys(), other.keys())
        for key, v in st.items():
            w = other[key]
            assert type(v) is type(w), (k, key, type(v), type(w))
            if torch.is_tensor(v):
                assert v.dtype == w.dtype and v.shape == w.shape, (k, key, v, w)
                if hasattr(v, "placements"):
                    assert v.placements == w.placements, (k, key, v.placements, w.placements)
                torch.testing.assert_close(full(v), full(w), **tol,
                                           msg=lambda m, k=k, key=key: f"state[{k}][{key}]: {m}")
            else:
                assert v == w, (k, key, v, w)


# --------------------------------------------------------------------------
# DDP


def ddp_cases():
    from torch.nn.parallel import DistributedDataParallel as DDP

    for name in OPTIMIZERS:
        def case(name=name):
            base = make_model()
            # the fused replica's grads are views into DDP's buckets
            fused_model = DDP(copy.deepcopy(base), gradient_as_bucket_view=True)
            torch_model = DDP(copy.deepcopy(base))
            fused = make_optim("fused", name, fused_model.parameters())
            ref = make_optim("torch", name, torch_model.parameters())
            for step in range(STEPS):
                train_step(fused_model, fused, step)
                train_step(torch_model, ref, step)
            assert_weights_close(fused_model, torch_model)
            assert_same_on_all_ranks(fused_model)
            assert_state_dicts_close(fused.state_dict(), ref.state_dict())
            with torch.no_grad():  # it trained
                assert not torch.equal(fused_model.module[0].weight, base[0].weight)
        yield f"ddp-{name}", case


# --------------------------------------------------------------------------
# ZeroRedundancyOptimizer


def zero_cases():
    from torch.distributed.optim import ZeroRedundancyOptimizer as ZeRO
    from torch.nn.parallel import DistributedDataParallel as DDP

    def zero(kind, name, params):
        if kind == "fused":
            return ZeRO(params, optimizer_class=getattr(fused_optim, name),
                        backend="numba", foreach=False, **KWARGS[name])
        if kind == "fused-partial":  # backend bound to the class: not a group key
            cls = functools.partial(getattr(fused_optim, name), backend="numba")
            return ZeRO(params, optimizer_class=cls, foreach=False, **KWARGS[name])
        return ZeRO(params, optimizer_class=getattr(torch.optim, name),
                    foreach=False, **KWARGS[name])

    def consolidated(opt):
        opt.consolidate_state_dict(to=0)
        sd = opt.state_dict() if RANK == 0 else None
        box = [sd]
        dist.broadcast_object_list(box, src=0)  # every rank needs it to load
        return box[0]

    for name in OPTIMIZERS:
        def case(name=name):
            base = make_model()
            fused_model = DDP(copy.deepcopy(base))
            torch_model = DDP(copy.deepcopy(base))
            fused = zero("fused", name, fused_model.parameters())
            ref = zero("torch", name, torch_model.parameters())
            assert isinstance(fused.optim, getattr(fused_optim, name))
            assert fused.optim.backend == "numba"
            # each rank holds the state of its own partition only
            owned = {id(p) for g in fused.optim.param_groups for p in g["params"]}
            assert 0 < len(owned) < len(list(base.parameters()))
            for step in range(STEPS):
                train_step(fused_model, fused, step)
                train_step(torch_model, ref, step)
            assert_weights_close(fused_model, torch_model)
            assert_same_on_all_ranks(fused_model)
            assert {id(p) for p in fused.optim.state} == owned

            fused_sd, torch_sd = consolidated(fused), consolidated(ref)
            # ZeRO puts every constructor kwarg into its param_groups, so the
            # ``backend`` keyword shows up there (and only there)
            extra = {k for g in fused_sd["param_groups"] for k in g} - {
                k for g in torch_sd["param_groups"] for k in g}
            assert extra == {"backend"}, extra
            assert_state_dicts_close(fused_sd, torch_sd, ignore_group_keys=("backend",))
            assert len(fused_sd["state"]) == len(list(base.parameters()))

            # each consolidated dict loads into the other kind and training
            # continues as the run it came from does
            continued = []
            for src_sd, src_model, dst_kind in ((torch_sd, torch_model, "fused-partial"),
                                                (fused_sd, fused_model, "torch")):
                # a new model holding the trained weights, and a new optimizer
                cont = DDP(copy.deepcopy(src_model.module))
                opt = zero(dst_kind, name, cont.parameters())
                if dst_kind == "fused-partial":
                    assert isinstance(opt.optim, getattr(fused_optim, name))
                    assert opt.optim.backend == "numba"
                    assert opt.param_groups[0].keys() == ref.param_groups[0].keys()
                opt.load_state_dict(copy.deepcopy(src_sd))
                if dst_kind == "torch":
                    # (torch.optim carries the extra group key along untouched)
                    assert all(g["backend"] == "numba" for g in opt.param_groups)
                for step in range(STEPS, STEPS + 2):
                    train_step(cont, opt, step)
                continued.append(cont)
            for step in range(STEPS, STEPS + 2):
                train_step(fused_model, fused, step)
                train_step(torch_model, ref, step)
            assert_weights_close(fused_model, torch_model)
            for cont in continued:
                assert_weights_close(cont, torch_model)
        yield f"zero-{name}", case


# --------------------------------------------------------------------------
# FSDP2


def mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


def fsdp_model(seed=0):
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed)
    m = mesh()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=m)
    fully_shard(model, mesh=m)
    return model


def local_ptrs(tensors):
    return [t.to_local().data_ptr() for t in tensors]


def torch_refuses_dtensor(name):
    """torch's own step on FSDP2 params raises (OptimInfo.torch_steps_dtensor):
    no checkpoint can cross to or from it. Fails once torch steps them."""
    model = fsdp_model()
    opt = make_optim("torch", name, model.parameters())
    try:
        run_steps(model, opt, range(1))
    except RuntimeError as err:
        assert "placement changes are not supported" in str(err), err
        return
    raise AssertionError(f"torch's {name} stepped DTensor params: restore its dcp cases")


def fsdp2_cases():
    from torch.distributed.tensor import DTensor

    for name in OPTIMIZERS:
        if not optim_db.get(name).torch_steps_dtensor:  # no oracle under FSDP2
            yield f"fsdp2-{name}", functools.partial(torch_refuses_dtensor, name)
            continue

        def case(name=name):
            fused_model, torch_model = fsdp_model(), fsdp_model()
            params = list(fused_model.parameters())
            assert all(isinstance(p, DTensor) for p in params)
            # the edge cases are really there: uneven and (rank 1) empty shards
            shapes = [tuple(p.to_local().shape) for p in params]
            if RANK == 1:
                assert (7, 8) in shapes and (0, 15) in shapes and (0,) in shapes, shapes
            fused = make_optim("fused", name, fused_model.parameters())
            ref = make_optim("torch", name, torch_model.parameters())
            state_ptrs = None
            for step in range(STEPS):
                train_step(torch_model, ref, step)
                before = [p.to_local().clone() for p in params]
                ptrs = local_ptrs(params)
                locals_before = [p._local_tensor for p in params]
                train_step(fused_model, fused, step)
                # updated in place: same local tensors, same storage, new values
                assert local_ptrs(params) == ptrs
                assert all(p._local_tensor is t for p, t in zip(params, locals_before))
                assert any(not torch.equal(p.to_local(), b)
                           for p, b in zip(params, before) if b.numel())
                # the state's local shards, once created, are updated in place too
                now = [local_ptrs(v for v in fused.state[p].values()
                                  if isinstance(v, DTensor)) for p in params]
                if state_ptrs is not None:
                    assert now == state_ptrs
                state_ptrs = now
            for p, rp in zip(params, torch_model.parameters()):
                st, rst = fused.state[p], ref.state[rp]
                assert st.keys() == rst.keys(), (st.keys(), rst.keys())
                for key in rst:
                    v, w = st[key], rst[key]
                    assert type(v) is type(w), (key, type(v), type(w))
                    if isinstance(w, DTensor):
                        assert v.placements == w.placements, (key, v.placements, w.placements)
                        assert v.device_mesh == w.device_mesh
                        assert v.shape == w.shape and v.to_local().shape == w.to_local().shape
                        assert v.placements == p.placements
            assert_weights_close(fused_model, torch_model)
            assert_state_dicts_close(fused.state_dict(), ref.state_dict())
        yield f"fsdp2-{name}", case


# --------------------------------------------------------------------------
# torch.distributed.checkpoint


def dcp_save(path, model, opt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)

    dcp.save({"model": get_model_state_dict(model),
              "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)


def dcp_load(path, model, opt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)

    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def run_steps(model, opt, steps):
    for step in steps:
        train_step(model, opt, step)


def dcp_cases(outdir):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    for name in OPTIMIZERS:
        # uninterrupted N+M-step runs, one per kind, shared by the cases below
        runs = {}

        def straight(kind, name=name):
            if kind not in runs:
                model = fsdp_model()
                opt = make_optim(kind, name, model.parameters())
                run_steps(model, opt, range(N_SAVE + M_MORE))
                runs[kind] = model
            return runs[kind]

        for src, dst in (("fused", "fused"), ("torch", "fused"), ("fused", "torch")):
            if src != dst and not optim_db.get(name).torch_steps_dtensor:
                yield f"dcp-{name}-{src}-to-{dst}", functools.partial(torch_refuses_dtensor,
                                                                      name)
                continue

            def case(src=src, dst=dst, name=name):
                path = os.path.join(outdir, f"ckpt-{name}-{src}-{dst}")
                model = fsdp_model()
                opt = make_optim(src, name, model.parameters())
                run_steps(model, opt, range(N_SAVE))
                dcp_save(path, model, opt)
                saved = get_optimizer_state_dict(model, opt)

                # a fresh model and optimizer (another init: the weights must
                # come from the checkpoint), then the M remaining steps
                model2 = fsdp_model(seed=1)
                opt2 = make_optim(dst, name, model2.parameters())
                dcp_load(path, model2, opt2)
                assert_weights_close(model2, model, **EXACT)
                # the loaded state is the saved one, DTensors and all
                assert_state_dicts_close(get_optimizer_state_dict(model2, opt2), saved,
                                         **EXACT)
                run_steps(model2, opt2, range(N_SAVE, N_SAVE + M_MORE))

                if src == dst:  # a resumed run is the uninterrupted run, bit for bit
                    assert_weights_close(model2, straight(src), **EXACT)
                else:           # across kinds: as close as fused is to torch
                    assert_weights_close(model2, straight("torch"))
                    assert_weights_close(model2, straight("fused"))
            yield f"dcp-{name}-{src}-to-{dst}", case


# --------------------------------------------------------------------------


def main():
    global RANK, WORLD
    scenario, outdir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    log = open(os.path.join(outdir, f"rank{RANK}.jsonl"), "a")

    cases = {"ddp": ddp_cases, "zero": zero_cases, "fsdp2": fsdp2_cases,
             "dcp": lambda: dcp_cases(outdir)}[scenario]()
    for case_id, fn in cases:
        try:
            fn()
        except BaseException:
            log.write(json.dumps({"case": case_id, "ok": False,
                                  "error": f"rank {RANK}: " + traceback.format_exc()}) + "\n")
            log.flush()
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)  # no further collective: the launcher stops the other rank
        log.write(json.dumps({"case": case_id, "ok": True}) + "\n")
        log.flush()

    dist.barrier()
    dist.destroy_process_group()
    log.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # Every case is reported. Skip interpreter teardown: once, under load, a
    # rank aborted there ("terminate called without an active exception",
    # exit -6) after all its cases had passed, a C++ thread torn down by a
    # static destructor, which is not what these tests are about.
    os._exit(0)


if __name__ == "__main__":
    main()
