"""fused_optim under torch.distributed: DDP, ZeRO, FSDP2 and distributed checkpoints.

Two CPU ranks on 127.0.0.1 with the gloo backend, each a subprocess running
``tests/_dist_worker.py SCENARIO OUTDIR`` (see there for the cases). One launch
per scenario runs SGD (momentum), Adam (AMSGrad) and AdamW one after the other;
the tests below read each case's outcome from the ranks' logs, so a failure is
reported against its own optimizer with the failing rank's traceback.

Nothing can hang: the ranks' process group has a 60 s timeout, the launch as a
whole a deadline, and as soon as one rank exits non-zero the other is killed
(it would otherwise wait for a collective that never comes).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

import optim_db

WORKER = Path(__file__).with_name("_dist_worker.py")
WORLD_SIZE = 2
DEADLINE_S = 240  # per launch; a healthy one takes ~10 s

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo")

OPTIMIZERS = optim_db.names()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return ""


def _launch_once(scenario: str, outdir: Path):
    """Run all ranks; return ({case: record, any rank failing wins}, failure text or None)."""
    port = _free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               WORLD_SIZE=str(WORLD_SIZE),
               # 2 ranks on a small machine: one thread each
               OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    # the ranks import the very fused_optim this test session imports
    import fused_optim
    pkg_root = str(Path(fused_optim.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if os.path.isdir("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs, logs = [], []
    try:
        for rank in range(WORLD_SIZE):
            log = outdir / f"rank{rank}.out"
            logs.append(log)
            with open(log, "wb") as fh:
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), scenario, str(outdir)],
                    env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                    stdout=fh, stderr=subprocess.STDOUT, cwd=str(WORKER.parent)))
        deadline = time.monotonic() + DEADLINE_S
        failure = None
        while failure is None:
            codes = [p.poll() for p in procs]
            bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                r = bad[0]
                failure = f"rank {r} exited with {codes[r]}:\n{_tail(logs[r])}"
            elif all(c == 0 for c in codes):
                break
            elif time.monotonic() > deadline:
                failure = f"timed out after {DEADLINE_S} s:\n" + "\n".join(
                    f"--- rank {r}:\n{_tail(log)}" for r, log in enumerate(logs))
            else:
                time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(timeout=30)

    results = {}
    for rank in range(WORLD_SIZE):
        path = outdir / f"rank{rank}.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                prev = results.get(rec["case"])
                if prev is None or prev["ok"]:  # a failure on any rank wins
                    results[rec["case"]] = rec
    return results, failure


def _launch(scenario: str, outdir: Path):
    for attempt in range(3):
        run_dir = outdir / f"{scenario}-{attempt}"
        run_dir.mkdir(parents=True)
        results, failure = _launch_once(scenario, run_dir)
        # the free port can be taken between picking and binding: try another
        if failure is None or "address already in use" not in failure.lower() or results:
            return results, failure
    return results, failure


_cache: dict = {}


def _outcome(scenario, case, tmp_path_factory):
    if scenario not in _cache:
        _cache[scenario] = _launch(scenario, tmp_path_factory.mktemp("dist"))
    results, failure = _cache[scenario]
    rec = results.get(case)
    if rec is None:
        pytest.fail(f"case {case} did not run; the {scenario} launch "
                    f"{'failed: ' + failure if failure else 'ended without it'}",
                    pytrace=False)
    if not rec["ok"]:
        pytest.fail(f"{case} failed on {rec['error']}", pytrace=False)
    if failure is not None and all(r["ok"] for r in results.values()):
        # every case that ran passed, yet the launch failed (teardown): say so
        pytest.fail(f"{scenario} launch failed after its cases: {failure}", pytrace=False)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_ddp_matches_torch_optim(name, tmp_path_factory):
    """DDP: fused_optim.X (grads as bucket views) ends at torch.optim.X's weights
    on every rank, with the same state_dict."""
    _outcome("ddp", f"ddp-{name}", tmp_path_factory)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_redundancy_optimizer(name, tmp_path_factory):
    """ZeroRedundancyOptimizer(optimizer_class=fused_optim.X): torch's weights;
    consolidate_state_dict(to=0) gives torch's state dict (plus the ``backend``
    group key ZeRO forwards; none with functools.partial(X, backend=...)); each
    kind's dict loads into the other and training goes on alike."""
    _outcome("zero", f"zero-{name}", tmp_path_factory)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_fully_shard(name, tmp_path_factory):
    """FSDP2: local shards (uneven and empty ones included) updated in place,
    DTensor state with torch's placements and shapes, torch's weights."""
    _outcome("fsdp2", f"fsdp2-{name}", tmp_path_factory)


@pytest.mark.parametrize("direction", ["fused-to-fused", "torch-to-fused", "fused-to-torch"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_distributed_checkpoint(name, direction, tmp_path_factory):
    """dcp.save / dcp.load with get/set_{model,optimizer}_state_dict under FSDP2:
    N steps, save, fresh model + optimizer, load, M steps == N+M uninterrupted."""
    _outcome("dcp", f"dcp-{name}-{direction}", tmp_path_factory)
