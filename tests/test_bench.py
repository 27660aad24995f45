"""Fast tests of the benchmark tool (``python -m fused_optim bench``) and the
``run`` delegation of ``python -m fused_optim``.

Everything runs at a tiny size; the first Numba call of a fresh checkout
compiles (a few seconds), later runs load the cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import fused_optim
from fused_optim import bench
from fused_optim.__main__ import main
from fused_optim.kernels.numba import _ceiling

TINY = [[64, 32], [64], [1000], [3, 5, 7]]
TINY_NUMEL = 64 * 32 + 64 + 1000 + 105


@pytest.fixture
def tiny_json(tmp_path):
    path = tmp_path / "tiny_shapes.json"
    path.write_text(json.dumps(TINY))
    return path


def _fast(*extra):
    """Options for a run of a couple of seconds that saves nothing unless told."""
    return ["--dtypes", "fp32", "--rounds", "3", "--warmup", "1", "--no-progress",
            "--no-save", *extra]


# ------------------------------------------------------------------- lists


def test_resnet50_list_is_torchvision_resnet50():
    sl = bench.shape_list("resnet50")
    assert len(sl) == 161
    assert sl.numel == 25_557_032
    assert sl.shapes[0] == (64, 3, 7, 7)
    assert sl.shapes[-2:] == ((1000, 2048), (1000,))
    assert sum(len(s) == 4 for s in sl.shapes) == 53  # 49 convs in blocks + stem + 4 shortcuts - 1
    assert sl.describe() == "161 tensors, 25.6M params"


def test_gpt2_small_list():
    sl = bench.shape_list("gpt2-small")
    assert len(sl) == 148
    assert sl.numel == 124_439_808
    assert sl.shapes[:2] == ((50257, 768), (1024, 768))


def test_many_small_list_is_seeded():
    sl = bench.shape_list("many-small")
    assert len(sl) == 1000
    sizes = [math.prod(s) for s in sl.shapes]
    assert min(sizes) >= 1024 and max(sizes) <= 4096
    assert len(set(sizes)) > 500
    assert bench.shape_list("many-small") == sl


def test_shapes_json_forms(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"name": "mine", "shapes": [[2, 3], 5]}))
    sl = bench.shapes_from_json(a)
    assert sl.name == "mine" and sl.shapes == ((2, 3), (5,)) and sl.numel == 11


@pytest.mark.parametrize("content", ["{not json", "[]", '[[2, -1]]', '[["a"]]', '{"x": 1}'])
def test_bad_shapes_file_exits_2(tmp_path, capsys, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert main(["bench", "--shapes", str(bad), *_fast()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fused-optim bench: error:") and "\n" not in err


def test_model_factory(tmp_path, monkeypatch):
    (tmp_path / "bench_test_model.py").write_text(
        "import torch\n"
        "def make():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))\n"
        "    m[1].bias.requires_grad_(False)\n"
        "    return m\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sl = bench.shapes_from_model("bench_test_model:make")
    assert sl.shapes == ((4, 3), (4,), (4,))
    assert sl.name == "model:bench_test_model:make"


# ------------------------------------------------------- optimizer settings


def test_optimizer_settings_and_their_byte_counts():
    """The settings are the bench's own (cases.SETTINGS); the byte counts
    come from the state torch's class keeps for each setting's options."""
    from fused_optim import _registry
    assert {"sgd", "sgd-nesterov", "adam", "adamw", "adagrad", "rmsprop"} <= set(bench.OPTIMIZERS)
    assert {spec.cls for spec in bench.OPTIMIZERS.values()} == set(_registry.names())
    assert bench.OPTIMIZERS["sgd-nesterov"].kwargs == dict(
        lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True)
    assert bench.OPTIMIZERS["adamw"].kwargs == dict(lr=1e-3, weight_decay=0.01)
    for name, spec in bench.OPTIMIZERS.items():
        record = _registry.get(spec.cls)
        assert spec.record is record and spec.kind == record.kernel
    # the counts the byte columns always used
    assert [(bench.OPTIMIZERS[n].reads, bench.OPTIMIZERS[n].writes)
            for n in ("sgd", "sgd-nesterov", "adam", "adamw", "adagrad", "rmsprop")] == [
        (3, 2), (3, 2), (4, 3), (4, 3), (3, 2), (3, 2)]
    # options that create state add an array, read and written
    for cls, kwargs, counts in [("SGD", dict(lr=0.1), (2, 1)),
                                ("Adam", dict(amsgrad=True), (5, 4)),
                                ("RMSprop", dict(momentum=0.9), (4, 3)),
                                ("RMSprop", dict(momentum=0.9, centered=True), (5, 4))]:
        assert bench.OptimizerSpec("x", cls, kwargs).reads == counts[0]
        assert bench.OptimizerSpec("x", cls, kwargs).writes == counts[1]


@pytest.fixture
def nadam_record(monkeypatch):
    """A record for a class torch has without a fused path, and no kernel
    here (NAdam's, with a kernel name no backend has), in place of the real
    one for one test."""
    from fused_optim import _registry
    rec = _registry.Record("NAdam", "nadam", "nadam", "torch.optim.nadam",
                           kernel="nadam_unported", state=("exp_avg", "exp_avg_sq"),
                           has_step=True)
    real = tuple(r for r in _registry.records() if r.name != "NAdam")
    monkeypatch.setattr(_registry, "records", lambda: (*real, rec))
    return rec


def test_a_new_record_is_timed_with_its_defaults(nadam_record):
    """bench needs no edit for a new optimizer: a setting of the class's
    defaults, torch's paths and the byte counts (torch's NAdam keeps two
    per-element moments) follow the record; fused only where torch has it,
    and the backends report the kernel they lack."""
    specs = bench.cases._optimizers()
    spec = specs["nadam"]
    assert spec.record is nadam_record and spec.kind == "nadam_unported" and spec.kwargs == {}
    assert spec.bytes_per_step(10, 4) == 7 * 4 * 10
    ok, skipped = bench.available_impls(spec, torch.float32, "cpu",
                                        ["numba", "for-loop", "foreach", "fused"])
    assert ok == ["for-loop", "foreach"]
    assert skipped["fused"] == "torch's NAdam has no fused path"
    assert "no nadam_unported kernel" in skipped["numba"]
    params, grads = bench.make_data(bench.shape_list("tiny"), torch.float32, "cpu")
    runner = bench.make_runner("foreach", spec, params, grads)
    assert type(runner.keep[0]) is torch.optim.NAdam and runner.keep[0].defaults["foreach"]
    runner.step()


def test_registered_optimizers_have_their_kernels_in_bench():
    """Adagrad and RMSprop's kernels are found (in their own files), so numba runs them."""
    for name in ("adagrad", "rmsprop"):
        ok, skipped = bench.available_impls(bench.OPTIMIZERS[name], torch.float32, "cpu",
                                            ["numba"])
        assert ok == ["numba"], skipped


def test_fused_is_offered_where_torch_steps_it():
    """The fused baseline is probed with the setting's own options: an option
    torch's fused path refuses skips it with torch's reason."""
    spec = bench.OptimizerSpec("adam-differentiable", "Adam", dict(lr=1e-3, differentiable=True))
    ok, skipped = bench.available_impls(spec, torch.float32, "cpu", ["for-loop", "fused"])
    assert ok == ["for-loop"]
    assert skipped["fused"].startswith("torch's fused Adam:")
    assert "differentiable" in skipped["fused"]
    spec = bench.OptimizerSpec("adam-list-betas", "Adam", dict(lr=1e-3, betas=[0.9, 0.99]))
    assert bench.available_impls(spec, torch.float32, "cpu", ["fused"]) == (["fused"], {})


# ------------------------------------------------------------------- progress


def test_progress_without_a_terminal_is_a_line_per_case(capsys):
    p = bench.cli._Progress([2.0, 2.0], enabled=True)
    assert p.bar is None
    p.start(1, "tiny sgd fp32")
    p.update("round 1/3")
    p.finish()
    p.start(2, "tiny adamw fp32")
    p.finish()
    p.stop()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith("[1/2] tiny sgd fp32: ") and "elapsed 0:00" in err[0]
    assert err[1].startswith("[2/2] tiny adamw fp32: ") and err[1].endswith("about 0:00 left)")


def test_progress_eta_scales_the_estimates_by_the_cases_done(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(bench.cli.time, "perf_counter", lambda: now[0])
    p = bench.cli._Progress([10.0, 10.0, 20.0], enabled=False)
    assert p.eta() == 40.0
    p.start(1, "a")
    now[0] = 4.0
    assert p.eta() == 6.0 + 30.0  # no case done yet: the estimates as they are
    now[0] = 20.0
    p.finish()  # took twice its estimate: so will the others
    assert p.eta() == 60.0
    p.start(2, "b")
    now[0] = 25.0
    assert p.eta() == 15.0 + 40.0 and p._eta_text() == "0:55"
    now[0] = 50.0  # past its 20 s: the rest is known to take longer
    assert p.eta() == 40.0 and p._eta_text() == "more than 0:40"


def test_progress_on_a_terminal_is_a_tqdm_bar_with_phase_and_eta(monkeypatch, capsys):
    tqdm = pytest.importorskip("tqdm")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    p = bench.cli._Progress([1.0, 1.0, 1.0], enabled=True)
    assert isinstance(p.bar, tqdm.tqdm)
    p.start(1, "tiny sgd fp32")
    p.finish()
    p.start(2, "tiny adamw fp32")
    p.update("first call, compiles if not cached: numba")
    assert p.bar.n == 1
    assert p.bar.desc.startswith("tiny adamw fp32: first call, compiles if not cached: "
                                 "numba | ETA ")
    p.stop()
    assert p.bar is None
    assert "[1/3]" not in capsys.readouterr().err


def test_progress_on_a_terminal_without_tqdm_is_plain(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import now fails
    p = bench.cli._Progress([1.0], enabled=True)
    assert p.bar is None
    p.start(1, "tiny sgd fp32")
    p.update("round 1")
    p.finish()
    err = capsys.readouterr().err
    assert err.startswith("[1/1] tiny sgd fp32: ") and "\r" not in err and "#" not in err


def test_no_progress_is_silent(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    p = bench.cli._Progress([1.0], enabled=False)
    assert p.bar is None
    p.start(1, "x")
    p.update("y")
    p.finish()
    p.stop()
    assert capsys.readouterr().err == ""


def test_estimate_counts_rounds_warmup_data_and_compiles():
    cases, settings = bench.cli._plan(_parse(["--lists", "tiny", "--optimizers", "sgd",
                                              "--dtypes", "fp32", "bf16", "--rounds", "4",
                                              "--warmup", "2"]))
    est, how = bench.cli._estimate(cases, settings)
    assert len(est) == 2 and "2 cases: 4 timed rounds each" in how
    # each case: the first to need its Numba kernel and ceiling pattern
    assert all(e > 2 * bench.cli._EST_COMPILE_S for e in est)
    settings["rounds"] = 40
    assert bench.cli._estimate(cases, settings)[0][0] > est[0]
    # the default run's cases, within the budget the issue sets
    cases, settings = bench.cli._plan(_parse([]))
    assert settings["size"] == "default" and len(cases) == 8
    assert sum(bench.cli._estimate(cases, settings)[0]) < settings["budget_s"]


# ------------------------------------------------------------------ the CLI


def test_cli_tiny_run_table_and_json(tiny_json, tmp_path, capsys):
    out = tmp_path / "out.json"
    rc = main(["bench", "--shapes", str(tiny_json), "--optimizers", "sgd", "adamw",
               "--json", str(out), *_fast()])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    table = captured.out
    for word in ("median ms", "GB/s", "% ceil", "vs fused", "fused_optim numba",
                 "torch for-loop", "torch foreach", "torch fused", "ceiling", "tiny_shapes"):
        assert word in table
    # CUDA-only columns and notes stay out of a CPU table
    for word in ("host ms", "% copy", "copy reference", "back-to-back"):
        assert word not in table
    # so do the precision variants' table and note without --precision
    for word in ("precision options", "vs plain", "+kahan", "+sr"):
        assert word not in table

    doc = json.loads(out.read_text())
    assert doc["schema"] == 2
    machine = doc["machine"]
    for key in ("cpu_model", "cores", "torch", "numba", "numpy", "python",
                "torch_threads", "numba_threads"):
        assert key in machine
    assert machine["torch"] == torch.__version__
    assert doc["config"]["dtypes"] == ["fp32"]
    assert doc["config"]["precision"] == []
    cases = doc["cases"]
    assert [(c["optimizer"], c["dtype"]) for c in cases] == [("sgd", "fp32"), ("adamw", "fp32")]
    for c in cases:
        assert c["list"] == "tiny_shapes"
        assert c["tensors"] == 4 and c["params"] == TINY_NUMEL
        assert c["rounds"] == 3
        assert c["timing"] == "perf_counter"
        assert c["copy_gbps"] is None and c["copy_bytes"] is None
        per_param = 5 if c["optimizer"] == "sgd" else 7
        assert c["bytes_per_step"] == per_param * 4 * TINY_NUMEL
        impls = {r["impl"]: r for r in c["results"]}
        assert set(impls) == {"numba", "for-loop", "foreach", "fused", "ceiling"}
        for r in impls.values():
            for key in ("median_s", "params_per_s", "gb_per_s", "pct_ceiling",
                        "ratio_vs_fused", "times_s"):
                assert key in r
            assert len(r["times_s"]) == 3 and r["median_s"] > 0
            assert r["steps_per_sample"] == 1
            assert r["host_median_s"] is None and r["pct_copy"] is None
            assert r["gb_per_s"] == pytest.approx(c["bytes_per_step"] / r["median_s"] / 1e9)
            assert r["precision"] is r["plain"] is r["ratio_vs_plain"] is None
        assert impls["fused"]["ratio_vs_fused"] == 1.0
        assert impls["ceiling"]["pct_ceiling"] == 100.0


def test_cli_hidden_tiny_list_and_selection(capsys):
    rc = main(["bench", "--lists", "tiny", "--optimizers", "adam", "--backends", "numba",
               "--baselines", "fused", "--no-ceiling", *_fast()])
    out = capsys.readouterr().out
    assert rc == 0
    assert "fused_optim numba" in out and "torch fused" in out
    assert "foreach" not in out and "ceiling" not in out.split("\n\n")[0]


def test_cli_compiled_baseline(tmp_path, capsys):
    """--baselines compiled: torch.optim's step and each backend's under
    torch.compile, beside the others, with the first call's time."""
    out = tmp_path / "out.json"
    rc = main(["bench", "--lists", "tiny", "--optimizers", "adamw", "--backends", "numba",
               "--baselines", "fused", "compiled", "--no-ceiling", "--json", str(out), *_fast()])
    table = capsys.readouterr().out
    assert rc == 0
    for word in ("fused_optim numba compiled", "torch compiled", "torch fused",
                 "first call (compile + one step)"):
        assert word in table
    (case,) = json.loads(out.read_text())["cases"]
    assert {r["impl"] for r in case["results"]} == {"numba", "numba-compiled", "fused",
                                                    "compiled"}
    assert set(case["compile_s"]) == {"numba-compiled", "compiled"}
    assert all(s > 0 for s in case["compile_s"].values())
    assert not case["failed"]


def test_cli_unknown_list_exits_2(capsys):
    assert main(["bench", "--lists", "resnet51", *_fast()]) == 2
    err = capsys.readouterr().err.strip()
    assert "argument --lists: invalid choice: 'resnet51'" in err and "resnet50" in err


def test_cli_unknown_model_exits_2(capsys):
    assert main(["bench", "--model", "no_such_module_for_fused_optim:make", *_fast()]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot import 'no_such_module_for_fused_optim'" in err and "\n" not in err


@pytest.mark.parametrize("argv, words", [
    (["--backends", "cuda-magic"], ["argument --backends: invalid choice: 'cuda-magic'"]),
    (["--optimizers", "lamb"], ["argument --optimizers: invalid choice: 'lamb'", "adamw"]),
    (["--dtypes", "fp8"], ["argument --dtypes: invalid choice: 'fp8'", "bf16"]),
    (["--baselines", "none"], ["argument --baselines: invalid choice: 'none'"]),
    (["--devices", "tpu"], ["argument --devices: invalid choice: 'tpu'"]),
    # the old comma-separated form is one (unknown) name now
    (["--optimizers", "sgd,adamw"], ["invalid choice: 'sgd,adamw'"]),
    (["--optimizers"], ["argument --optimizers: expected at least one argument"]),
    (["--baselines", "fused", "--no-baselines"], ["not allowed with argument"]),
    (["--precision", "kahan-sr"], ["argument --precision: invalid choice: 'kahan-sr'",
                                   "kahan+sr"]),
    (["--precision"], ["argument --precision: expected at least one argument"]),
])
def test_cli_bad_names_are_argparse_errors(capsys, argv, words):
    """Names are argparse choices: a bad one is a usage error (exit 2) that
    names the option, before anything runs."""
    assert main(["bench", "--lists", "tiny", *_fast(), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and all(w in err for w in words), err


def test_cli_bad_model_exits_2(capsys):
    assert main(["bench", "--lists", "tiny", *_fast(), "--model", "nocolon"]) == 2
    err = capsys.readouterr().err.strip()
    assert "module:factory" in err and "\n" not in err


def test_cli_names_take_several_values():
    """nargs="+": several names after one option, each once, in the order
    given; the last occurrence of an option wins (as gpu_check relies on)."""
    args = _parse(["--lists", "tiny", "many-small", "tiny", "--optimizers", "adamw", "sgd",
                   "--dtypes", "bf16", "fp32", "--backends", "numba", "--devices", "cpu",
                   "--baselines", "fused", "for-loop"])
    cases, settings = bench.cli._plan(args)
    assert settings["lists"] == ["tiny", "many-small"]
    assert settings["optimizers"] == ["adamw", "sgd"]
    assert settings["dtypes"] == ["bf16", "fp32"]
    assert settings["backends"] == ["numba"] and settings["baselines"] == ["fused", "for-loop"]
    assert [(c[0].name, c[1].name, c[2]) for c in cases][:3] == [
        ("tiny", "adamw", "bf16"), ("tiny", "adamw", "fp32"), ("tiny", "sgd", "bf16")]
    _, settings = bench.cli._plan(_parse(["--lists", "resnet50", "--lists", "tiny"]))
    assert settings["lists"] == ["tiny"]


def test_cli_no_baselines_and_defaults():
    _, settings = bench.cli._plan(_parse(["--lists", "tiny", "--no-baselines"]))
    assert settings["baselines"] == []
    # cases named: --full's rounds and every torch path
    _, settings = bench.cli._plan(_parse(["--lists", "tiny"]))
    assert settings["size"] == "full"
    assert settings["baselines"] == list(bench.DEFAULT_BASELINES)
    assert settings["dtypes"] == list(bench.DEFAULT_DTYPES)
    assert settings["optimizers"] == list(bench.SIZES["full"].optimizers)
    # the default run: SGD and AdamW on a big list and many-small, against
    # torch's fastest path and the ceiling
    cases, settings = bench.cli._plan(_parse([]))
    assert settings["size"] == "default"
    assert settings["lists"] == ["resnet50", "many-small"]
    assert settings["optimizers"] == ["sgd", "adamw"]
    assert settings["dtypes"] == ["fp32", "bf16"]
    assert settings["baselines"] == ["fused"]
    assert {tuple(c[4]) for c in cases} == {("numba", "fused", "ceiling")}
    assert settings["budget_s"] is not None
    _, settings = bench.cli._plan(_parse(["--quick"]))
    assert settings["lists"] == list(bench.SIZES["quick"].lists)
    assert settings["optimizers"] == list(bench.SIZES["quick"].optimizers)
    assert settings["budget_s"] < bench.SIZES["default"].budget_s
    cases, settings = bench.cli._plan(_parse(["--full"]))
    assert settings["size"] == "full" and settings["budget_s"] is None
    assert len(cases) == (len(bench.SIZES["full"].lists) * len(bench.OPTIMIZERS)
                          * len(bench.DEFAULT_DTYPES))
    with pytest.raises(SystemExit):
        _parse(["--full", "--quick"])


def test_help_lists_the_choices(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in (*bench.OPTIMIZERS, *bench.DTYPES, *bench.BASELINE_IMPLS, "--no-baselines"):
        assert name in out
    for word in ("--precision", "kahan_sum=True", "stochastic_round=True", "kahan+sr",
                 "bf16/fp16 cases only", "fp32/fp64"):
        assert word in " ".join(out.split()), word


@pytest.mark.skipif(torch.cuda.is_available(), reason="triton can run here")
def test_cli_unavailable_backend_exits_2(capsys):
    assert main(["bench", "--lists", "tiny", "--backends", "triton", *_fast()]) == 2
    err = capsys.readouterr().err.strip()
    assert "backend 'triton' cannot run here" in err and "CUDA" in err and "\n" not in err


def test_cli_saves_json_and_chart_by_default(tiny_json, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "--shapes", str(tiny_json), "--optimizers", "sgd",
               "--dtypes", "fp32", "--rounds", "4", "--warmup", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    saved = sorted((tmp_path / bench.cases.RESULTS_DIR).iterdir())
    last = out.strip().splitlines()[-1]
    assert last.startswith("wall time 0:")
    json_path = [p for p in saved if p.suffix == ".json"]
    assert len(json_path) == 1 and f"results: {bench.cases.RESULTS_DIR}/" in last
    doc = json.loads(json_path[0].read_text())
    assert doc["config"]["command_line"] == [
        "fused-optim", "bench", "--shapes", str(tiny_json), "--optimizers", "sgd",
        "--dtypes", "fp32", "--rounds", "4", "--warmup", "1", "--no-progress"]
    assert doc["config"]["wall_s"] > 0
    simd = doc["machine"]["simd"]
    assert set(simd) == {"isa", "vector_bits", "llvm_cpu"}
    assert "triton" in doc["machine"] and "numba_threads" in doc["machine"]
    if importlib.util.find_spec("matplotlib") is None:
        assert [p.suffix for p in saved] == [".json"]
        assert "no chart: matplotlib is not installed" in last and "[bench]" in last
    else:
        assert [p.suffix for p in saved] == [".json", ".png"]
        assert saved[0].stem == saved[1].stem and f"chart: {saved[1].relative_to(tmp_path)}" in last


def test_cli_plot_without_matplotlib_is_an_error(tiny_json, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now fails
    argv = ["bench", "--shapes", str(tiny_json), "--optimizers", "sgd",
            "--plot", str(tmp_path / "out.png"), *_fast()]
    assert main(argv) == 2
    assert "matplotlib" in capsys.readouterr().err


def _fake_case(name="tiny", optimizer="sgd", times=None, other_cores=0.0):
    """A CaseResult with given per-round times (seconds)."""
    times = times or {"numba": [1e-3, 1.01e-3, 0.99e-3, 1e-3],
                      "for-loop": [3e-3, 3.1e-3, 2.9e-3, 3e-3],
                      "fused": [2e-3, 2.02e-3, 1.98e-3, 2e-3],
                      "ceiling": [0.9e-3, 0.9e-3, 0.9e-3, 0.9e-3]}
    return bench.CaseResult(list=name, tensors=4, params=TINY_NUMEL, optimizer=optimizer,
                            dtype="fp32", device="cpu", bytes_per_step=5 * 4 * TINY_NUMEL,
                            rounds=len(times["numba"]), warmup=1, times=times,
                            other_cores=other_cores)


def test_answer_table_pairs_fused_optim_with_torchs_default_and_fastest_paths():
    table = bench.format_table([_fake_case()])
    answer = table[table.index("the answer"):].splitlines()
    assert "and its default one" in answer[0]
    head = answer[1].split()
    assert head[:6] == ["list", "opt", "dtype", "fused_optim", "ms", "vs"]
    row = answer[3].split()
    # numba 1 ms, for-loop (torch's default on CPU) 3 ms, fused 2 ms, ceiling 0.9 ms
    assert row[:5] == ["tiny", "sgd", "fp32", "numba", "1.000"]
    assert row[5:9] == ["0.33x", "for-loop", "0.50x", "fused"]
    assert row[9:12] == ["90", "45", "fused"]
    assert len(row) == 12  # no flags: 4 steady rounds, nothing else running
    # without torch's default path timed, no column for it
    case = _fake_case()
    del case.times["for-loop"]
    answer = bench.format_table([case]).split("the answer")[1]
    assert "vs torch default" not in answer and "vs torch fastest" in answer


def test_plot_has_axes_labels_and_marks_flagged_figures(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    from matplotlib.image import imread
    steady = _fake_case("steady")
    noisy = _fake_case("noisy", "adamw", {"numba": [1e-3, 3e-3, 1e-3, 2e-3],
                                          "fused": [2e-3, 2e-3, 2e-3, 2e-3],
                                          "ceiling": [1e-3, 1e-3, 1e-3, 1e-3]},
                       other_cores=1.5)
    assert not steady.unstable("numba") and not steady.competed
    assert noisy.unstable("numba") and noisy.competed
    doc = {"machine": {"cpu_model": "Test CPU", "torch_threads": 2, "torch": "2.13"},
           "created": "2026-12-07T17:00:00"}
    fig = bench.make_figure([steady, noisy], doc)
    try:
        ax_time, ax_ceil = fig.axes
        assert "ms" in ax_time.get_xlabel() and ax_time.get_xscale() == "log"
        assert "% of the ceiling" in ax_ceil.get_xlabel()
        ticks = [t.get_text() for t in ax_time.get_yticklabels()]
        assert ticks[0].startswith("steady\nsgd fp32") and "busy" not in ticks[0]
        assert ticks[1].startswith("noisy\nadamw fp32") and "busy (1.5 cores)" in ticks[1]
        assert "Test CPU" in fig._suptitle.get_text()
        legend = fig.legends[0]
        assert [t.get_text() for t in legend.get_texts()] == [
            "fused_optim numba", "torch for-loop", "torch fused"]
        assert "hatched" in legend.get_title().get_text()
        assert "busy" in legend.get_title().get_text()
        # one bar per implementation and case in each panel (the ceiling is
        # the yardstick of the right one, not a bar); only flagged ones hatched
        bars = [p for p in ax_time.patches]
        assert len(bars) == 5 and len(ax_ceil.patches) == 5
        assert sum(bool(b.get_hatch()) for b in bars) == 1  # noisy numba (time ±)
        texts = " ".join(t.get_text() for t in ax_time.texts)
        assert "1 ms = 0.50 x torch fused" in texts  # steady numba, paired per round
        pct = [t.get_text().strip() for t in ax_ceil.texts]
        assert "90%" in pct and "45%" in pct
    finally:
        plt.close(fig)
    png = tmp_path / "chart.png"
    bench.write_plot([steady, noisy], png, doc)
    image = imread(png)
    assert image.shape[1] == 12 * 110 and image.shape[0] > 300
    assert image[..., :3].std() > 0.05  # not blank


def test_main_without_command_and_help(capsys):
    assert main([]) == 2
    assert main(["bench", "--help"]) == 0
    assert "--quick" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    # --help only: the in-process tests above cover a real run, and a second
    # interpreter would pay the torch import and Numba start-up again.
    proc = subprocess.run([sys.executable, "-m", "fused_optim", "bench", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--shapes" in proc.stdout


# -------------------------------------------------------------- measuring


def test_interleaved_rounds_and_shuffled_order():
    calls = []
    runners = [bench.Runner(name, (lambda n=name: calls.append(n))) for name in "abcd"]
    timed = bench.interleaved(runners, rounds=20, warmup=2, seed=1)
    times = timed.times
    assert set(times) == set("abcd") and all(len(t) == 20 for t in times.values())
    # CPU: one step per sample, and no separate host time
    assert timed.steps == dict.fromkeys("abcd", 1) and timed.host == {}
    assert len(calls) == 22 * 4
    rounds = [tuple(calls[i:i + 4]) for i in range(0, len(calls), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)  # each once per round
    assert len(set(rounds)) > 1  # order changes between rounds


def test_interleaved_drops_a_failing_implementation(capsys):
    def boom():
        raise RuntimeError("kernel exploded")

    runners = [bench.Runner("ok", lambda: None), bench.Runner("bad", boom)]
    failed = {}
    times = bench.interleaved(runners, rounds=3, warmup=1, failed=failed).times
    assert list(times) == ["ok"] and len(times["ok"]) == 3
    assert failed == {"bad": "RuntimeError: kernel exploded"}
    assert "kernel exploded" in capsys.readouterr().err
    with pytest.raises(RuntimeError):
        bench.interleaved(runners, rounds=3, warmup=1)


def test_cli_reports_a_failing_backend_and_exits_1(monkeypatch, capsys):
    real = bench.make_runner

    def make_runner(impl, spec, params, grads):
        runner = real(impl, spec, params, grads)
        if impl == "numba":
            def boom():
                raise RuntimeError("numba kernel exploded")
            runner.step = boom
        return runner

    monkeypatch.setattr(bench.measure, "make_runner", make_runner)
    rc = main(["bench", "--lists", "tiny", "--optimizers", "sgd", "--baselines", "fused",
               "--no-ceiling", *_fast()])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "torch fused" in out and "fused_optim numba" not in out
    assert "FAILED numba on tiny sgd fp32: RuntimeError: numba kernel exploded" in out
    assert "some implementations failed" in err


def test_interleaved_auto_rounds_are_clamped():
    runners = [bench.Runner("a", lambda: None)]
    times = bench.interleaved(runners, None, 1, min_rounds=4, max_rounds=7, target_s=1e9).times
    assert len(times["a"]) == 7
    times = bench.interleaved(runners, None, 1, min_rounds=4, max_rounds=7, target_s=0.0).times
    assert len(times["a"]) == 4


def test_case_stats_are_paired_medians():
    res = bench.CaseResult(list="x", tensors=1, params=1000, optimizer="sgd", dtype="fp32",
                           device="cpu", bytes_per_step=20_000, rounds=3, warmup=0)
    res.times = {"numba": [1.0, 2.0, 9.0], "fused": [2.0, 2.0, 3.0], "ceiling": [0.5, 1.0, 3.0]}
    s = res.stats("numba")
    assert s["median_s"] == 2.0
    assert s["params_per_s"] == 500.0
    assert s["gb_per_s"] == pytest.approx(1e-5)
    assert s["ratio_vs_fused"] == 1.0  # median of 0.5, 1.0, 3.0
    assert s["pct_ceiling"] == pytest.approx(50.0)  # median of 50%, 50%, 33%
    text = bench.format_table([res])
    assert "fused_optim numba" in text.splitlines()[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_pattern_kernel_reads_k_writes_k_minus_1(dtype, k):
    gen = torch.Generator().manual_seed(k)
    sizes = [1, 700, 0, 1300, 33]
    rows = [[torch.randint(-1000, 1000, (n,), generator=gen).to(dtype) for _ in range(k)]
            for n in sizes]
    before = [[a.clone() for a in row] for row in rows]
    table = _ceiling.make_table([[a.data_ptr() for a in row] for row in rows], sizes)
    itemsize = rows[0][0].element_size()
    word = {2: torch.int16, 4: torch.int32}[itemsize]
    for chunks in (1, 3, 7):  # chunk edges inside rows and across them
        _ceiling.pattern(table, _ceiling.split(sum(sizes), chunks), itemsize, k, k - 1)
        for row, old in zip(rows, before):
            x = old[-1].view(word)
            for a, b in zip(row[:-1], old[:-1]):
                assert torch.equal(a.view(word), b.view(word) ^ x)
            assert torch.equal(row[-1].view(word), x)
            old[:] = [a.clone() for a in row]


def test_pattern_rejects_other_patterns():
    with pytest.raises(ValueError, match="unsupported pattern"):
        _ceiling.pattern(np.zeros((1, _ceiling.NCOLS), np.int64), _ceiling.split(0), 4, 3, 1)


def test_split_is_even():
    edges = _ceiling.split(10, 3)
    assert list(edges) == [0, 3, 6, 10]


# ------------------------------------------------------------ CUDA timing
#
# No GPU here: the CUDA timer runs against a simulated stream (FakeGPU), and
# run_case against events that read perf_counter, so the K-steps-per-sample
# logic and the fields it feeds are exercised on CPU.


class FakeGPU:
    """A host clock and one stream, in simulated seconds. A launch costs the
    host ``launch_s`` and queues ``kernel_s`` of device work behind what is
    already queued; an event completes when the work recorded before it
    does. ``log`` lists launches (by name) and synchronizations ("sync")."""

    def __init__(self):
        self.host = 0.0
        self.queue_end = 0.0
        self.log = []

    def launch(self, name, kernel_s, launch_s):
        self.host += launch_s
        self.queue_end = max(self.queue_end, self.host) + kernel_s
        self.log.append(name)

    def synchronize(self):
        self.host = max(self.host, self.queue_end)
        self.log.append("sync")

    def clock(self):
        return self.host

    def event(self):
        gpu = self

        class Event:
            def record(self):
                self.t = max(gpu.queue_end, gpu.host)

            def synchronize(self):
                gpu.host = max(gpu.host, self.t)
                gpu.log.append("sync")

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3

        return Event()

    def timer(self):
        return bench.CudaTimer(event=self.event, synchronize=self.synchronize, clock=self.clock)

    def runner(self, name, kernel_s, launch_s):
        return bench.Runner(name, lambda: self.launch(name, kernel_s, launch_s))


def _segments(log):
    """The runs of launches between synchronizations."""
    out, cur = [], []
    for x in log:
        if x == "sync":
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(x)
    return out + ([cur] if cur else [])


@pytest.mark.parametrize("kernel_s, launch_s", [(100e-6, 10e-6), (10e-6, 100e-6)])
def test_cuda_timer_times_steps_back_to_back(kernel_s, launch_s):
    """Device-bound steps cost their kernel time, host-bound ones their
    launch time, and the host time is the launches alone; a synchronize per
    step would have charged kernel + launch to both."""
    gpu = FakeGPU()
    timer = gpu.timer()
    steps = 50
    per_step, host = timer.sample(lambda: gpu.launch("s", kernel_s, launch_s), steps)
    assert per_step == pytest.approx(max(kernel_s, launch_s), rel=0.01)
    assert host == pytest.approx(launch_s)
    assert gpu.log == ["sync"] + ["s"] * steps + ["sync"]
    one, _ = timer.sample(lambda: gpu.launch("s", kernel_s, launch_s), 1)
    assert one == pytest.approx(kernel_s + launch_s)


@pytest.mark.parametrize("per_step", [1e-6, 2e-4, 1.7e-3, 4.9e-3, 5e-3, 8e-3, 0.0])
def test_calibrate_steps_for_a_constant_step(per_step):
    calls = []

    def sample(fn, steps):
        calls.append(steps)
        return per_step, None

    k = bench.calibrate_steps(sample, None, target_s=5e-3, max_steps=64)
    want = 64 if per_step == 0 else min(64, max(1, math.ceil(5e-3 / per_step)))
    assert k == want
    assert calls[0] == 1 and len(calls) <= 3


def test_calibrate_steps_refines_from_amortized_samples():
    """A first launch's idle GPU makes one step look slower than back-to-back
    ones: later samples, at the count the earlier one asked for, correct it."""
    def sample(fn, steps):
        return 0.5e-3 + 2e-3 / steps, None

    one = math.ceil(5e-3 / sample(None, 1)[0])
    k = bench.calibrate_steps(sample, None, target_s=5e-3, max_steps=1000, tries=10)
    assert k > one
    assert k == math.ceil(5e-3 / sample(None, k)[0])  # a fixed point
    assert bench.calibrate_steps(sample, None, target_s=5e-3, max_steps=3, tries=10) == 3


def test_interleaved_on_cuda_times_k_steps_per_sample():
    gpu = FakeGPU()
    runners = [gpu.runner("big", 1e-3, 20e-6),      # device-bound
               gpu.runner("small", 20e-6, 50e-6),   # host-bound
               gpu.runner("tiny", 1e-6, 2e-6)]      # hits the cap
    rounds, cap, target = 6, 64, 5e-3
    timed = bench.interleaved(runners, rounds, 1, timer=gpu.timer(), sample_s=target,
                              max_steps=cap, seed=3)
    med = {i: np.median(t) for i, t in timed.times.items()}
    for impl, k in timed.steps.items():
        assert len(timed.times[impl]) == len(timed.host[impl]) == rounds
        assert k == min(cap, math.ceil(target / med[impl]))
    assert timed.steps["tiny"] == cap
    assert med["big"] == pytest.approx(1e-3, rel=0.01)
    assert np.median(timed.host["big"]) == pytest.approx(20e-6)
    assert med["small"] == pytest.approx(np.median(timed.host["small"]), rel=0.01)
    assert med["small"] == pytest.approx(50e-6, rel=0.01)
    # the timed samples: K launches of one implementation between two
    # synchronizations, never a synchronize inside
    timed_segments = _segments(gpu.log)[-rounds * len(runners):]
    for seg in timed_segments:
        assert len(set(seg)) == 1 and len(seg) == timed.steps[seg[0]]
    # interleaved: every round has each implementation once, order varies
    per_round = [tuple(seg[0] for seg in timed_segments[i:i + 3])
                 for i in range(0, len(timed_segments), 3)]
    assert all(sorted(r) == ["big", "small", "tiny"] for r in per_round)
    assert len(set(per_round)) > 1


def test_interleaved_fixed_steps_per_sample():
    gpu = FakeGPU()
    runners = [gpu.runner("a", 1e-3, 1e-5), gpu.runner("b", 1e-6, 1e-6)]
    timed = bench.interleaved(runners, 2, 0, timer=gpu.timer(), steps=7)
    assert timed.steps == {"a": 7, "b": 7}
    assert all(len(seg) == 7 for seg in _segments(gpu.log))


def test_interleaved_on_cuda_drops_an_implementation_failing_in_calibration(capsys):
    gpu = FakeGPU()
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) > 1:  # the warm-up step passes, calibration's fails
            raise RuntimeError("launch failed")

    runners = [gpu.runner("ok", 1e-4, 1e-5), bench.Runner("flaky", flaky)]
    failed = {}
    timed = bench.interleaved(runners, 3, 1, timer=gpu.timer(), failed=failed)
    assert failed == {"flaky": "RuntimeError: launch failed"}
    assert set(timed.times) == set(timed.host) == set(timed.steps) == {"ok"}
    assert len(timed.times["ok"]) == 3
    assert "launch failed" in capsys.readouterr().err


def test_synced_every():
    log = []
    step = bench.synced_every(lambda: log.append("s"), 3, lambda: log.append("sync"))
    for _ in range(7):
        step()
    assert log == ["s", "s", "s", "sync", "s", "s", "s", "sync", "s"]


def test_copy_runner_moves_the_bytes_it_is_given():
    for nbytes in (20_000, 20_001, 2):
        r = bench.copy_runner(nbytes, "cpu")
        src, dst = r.keep
        assert src.numel() == dst.numel() == nbytes // 2
        assert not torch.equal(src, dst)
        r.step()
        assert torch.equal(src, dst)


def test_case_stats_host_times_and_copy():
    res = bench.CaseResult(list="x", tensors=1, params=1000, optimizer="adamw", dtype="bf16",
                           device="cuda:0", bytes_per_step=14_000, rounds=3, warmup=0,
                           timing="cuda-events")
    res.times = {"triton": [2.0, 4.0, 4.0], "fused": [4.0, 4.0, 2.0],
                 "ceiling": [1.0, 2.0, 2.0], "copy": [1.0, 1.5, 0.5]}
    res.host_times = {i: [t / 2 for t in ts] for i, ts in res.times.items()}
    res.steps_per_sample = {"triton": 5, "fused": 3, "ceiling": 9, "copy": 11}
    d = res.to_dict()
    assert d["copy_bytes"] == res.copy_bytes == 14_000
    assert d["copy_gbps"] == pytest.approx(14_000 / 1.0 / 1e9)
    rows = {r["impl"]: r for r in d["results"]}
    for impl, r in rows.items():
        gb_rounds = [res.bytes_per_step / t for t in res.times[impl]]
        copy_rounds = [res.copy_bytes / t for t in res.times["copy"]]
        assert r["pct_copy"] == pytest.approx(
            100 * np.median([a / b for a, b in zip(gb_rounds, copy_rounds)]))
        assert r["host_median_s"] == pytest.approx(np.median(res.times[impl]) / 2)
        assert r["host_times_s"] == res.host_times[impl]
        assert r["steps_per_sample"] == res.steps_per_sample[impl]
    assert rows["copy"]["pct_copy"] == 100.0 and rows["copy"]["params_per_s"] is None
    text = bench.format_table([res])
    head = text.splitlines()[0]
    assert "host ms" in head and "% copy" in head
    triton_row = next(line for line in text.splitlines() if "fused_optim triton" in line)
    assert f"{rows['triton']['host_median_s'] * 1e3:.3f}" in triton_row.split()
    assert f"{rows['triton']['pct_copy']:.0f}" in triton_row.split()
    assert "copy reference, x adamw bf16 cuda:0: 0.0 GB/s" in text
    assert "cuda: each sample is 3-11 back-to-back steps" in text
    # an odd byte count: the copy moves one byte less, and % copy says so
    res.bytes_per_step = 14_001
    assert res.copy_bytes == 14_000
    assert res.stats("triton")["pct_copy"] == pytest.approx(
        100 * 14_001 / 14_000 * np.median([1 / 2, 1.5 / 4, 0.5 / 4]))


class _PerfEvent:
    """A CUDA event stand-in on the host clock: with it, CudaTimer times
    CPU tensors the way it times a GPU stream (minus the queue)."""

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_run_case_with_a_cuda_timer_reports_host_times_and_copy(capsys):
    """The whole CUDA reporting path, on CPU tensors with a perf_counter
    "device": calibrated steps, host times, the copy reference in the JSON
    and the table."""
    timer = bench.CudaTimer(event=_PerfEvent, synchronize=lambda: None)
    impls = ["numba", "fused", "ceiling", "copy"]
    res = bench.run_case(bench.shape_list("tiny"), bench.OPTIMIZERS["adamw"], "fp32", "cpu",
                         impls, rounds=3, warmup=1, timer=timer, sample_s=2e-3, max_steps=4)
    assert not res.failed
    doc = bench.to_json([res], {})
    json.dumps(doc)
    assert doc["schema"] == 2
    (case,) = doc["cases"]
    assert case["timing"] == "cuda-events"
    assert set(case["steps_per_sample"]) == set(impls)
    assert all(1 <= k <= 4 for k in case["steps_per_sample"].values())
    assert case["copy_bytes"] == 2 * (case["bytes_per_step"] // 2)
    copy_times = res.times["copy"]
    assert case["copy_gbps"] == pytest.approx(case["copy_bytes"] / np.median(copy_times) / 1e9)
    for r in case["results"]:
        assert len(r["times_s"]) == len(r["host_times_s"]) == 3
        assert r["host_median_s"] > 0 and r["pct_copy"] > 0
        assert r["steps_per_sample"] == case["steps_per_sample"][r["impl"]]
    text = bench.format_table([res])
    assert "host ms" in text and "% copy" in text and "copy reference, tiny adamw fp32" in text


# ------------------------------------------------------- CUDA ceiling kernel


def _pattern_device():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    # tests/conftest.py switched Triton's interpreter on before triton was
    # imported: the kernel then runs on CPU tensors
    assert os.environ.get("TRITON_INTERPRET") == "1"
    return "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_cuda_ceiling_kernel_odd_sizes(dtype, k):
    """K-1 buffers get the K-th XORed in, the K-th is read only, and nothing
    beyond the buffers changes, for sizes below, at and past a block, and
    several blocks with a tail."""
    device = _pattern_device()
    from fused_optim.kernels.triton import _ceiling as triton_pattern
    itemsize = torch.empty((), dtype=dtype).element_size()
    word = {2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
    gen = torch.Generator().manual_seed(k)
    guard, block = 37, 64
    for n in (1, block - 1, block, block + 1, 3 * block + 17):
        wholes = [torch.randint(-2 ** 15, 2 ** 15, (n + 2 * guard,), generator=gen)
                  .to(word).to(device) for _ in range(k)]
        before = [w.clone() for w in wholes]
        bufs = [w[guard:guard + n].view(dtype) for w in wholes]
        triton_pattern.launcher(bufs, itemsize, block=block)()
        x = before[-1][guard:guard + n]
        for i, (w, old) in enumerate(zip(wholes, before)):
            want = old.clone()
            if i < k - 1:
                want[guard:guard + n] ^= x
            assert torch.equal(w, want), (n, i)


def test_cuda_ceiling_kernel_default_block_with_a_tail():
    device = _pattern_device()
    from fused_optim.kernels.triton import _ceiling as triton_pattern
    n = triton_pattern.BLOCK + 17
    gen = torch.Generator().manual_seed(0)
    bufs = [torch.randint(-2 ** 31, 2 ** 31, (n,), generator=gen, dtype=torch.int64)
            .to(torch.int32).to(device) for _ in range(4)]
    before = [b.clone() for b in bufs]
    triton_pattern.launcher([b.view(torch.float32) for b in bufs], 4)()
    for b, old in zip(bufs[:-1], before):
        assert torch.equal(b, old ^ before[-1])
    assert torch.equal(bufs[-1], before[-1])


_PTX_SCRIPT = r"""
import json, re, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_optim.kernels.triton import _ceiling

@triton.jit
def masked_everywhere(a, b, c, d, e, n, K: tl.constexpr, BLOCK: tl.constexpr):
    # the ceiling before it had an unmasked path (control)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(d + offs, mask=mask)
    tl.store(a + offs, tl.load(a + offs, mask=mask) ^ x, mask=mask)
    tl.store(b + offs, tl.load(b + offs, mask=mask) ^ x, mask=mask)
    tl.store(c + offs, tl.load(c + offs, mask=mask) ^ x, mask=mask)

out = []
for name, fn, word, k in [("ceiling", _ceiling.pattern, "i32", 4),
                          ("ceiling", _ceiling.pattern, "i16", 3),
                          ("control", masked_everywhere, "i32", 4)]:
    # pointers 16-byte aligned (as the launcher specializes fresh
    # allocations); n an i32 with no divisibility: a count not divisible by 16
    sig = {p: "*" + word for p in "abcde"}
    sig.update(n="i32", K="constexpr", BLOCK="constexpr")
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
    src = ASTSource(fn, sig, {"K": k, "BLOCK": _ceiling.BLOCK}, attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    out.append({"name": name, "word": word, "k": k,
                "v4_loads": len(re.findall(r"ld\.global[.\w]*\.v4\.", ptx)),
                "v4_stores": len(re.findall(r"st\.global[.\w]*\.v4\.", ptx)),
                "loads": len(re.findall(r"ld\.global", ptx))})
print(json.dumps(out))
"""


def test_cuda_ceiling_ptx_has_128_bit_accesses_for_any_count(tmp_path):
    """Compiled offline for sm_90 (no GPU needed) with an element count not
    known to be a multiple of 16: the unmasked path of every stream loads
    and stores 128 bits at a time. The control, the old masked-everywhere
    kernel, gets none, so the count can fail."""
    pytest.importorskip("triton")
    # a subprocess: triton was imported here with the interpreter on; a file:
    # @triton.jit reads its function's source
    script = tmp_path / "ptx_check.py"
    script.write_text(_PTX_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences 3.9's warning
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in results:
        k = r["k"]
        if r["name"] == "control":
            assert r["v4_loads"] == r["v4_stores"] == 0 and r["loads"] > 0
            continue
        # k streams read and k-1 written, each as many 128-bit accesses
        assert r["v4_loads"] >= k and r["v4_loads"] % k == 0, r
        assert r["v4_stores"] * k == r["v4_loads"] * (k - 1), r


# ------------------------------------------------- precision variants (#15)


def test_cli_precision_plans_variants_for_bf16_and_fp16_only():
    """--precision adds <backend>+<option> for every backend a bf16/fp16 case
    runs, right after the backends; fp32/fp64 cases neither time nor list
    them as skipped; names are taken once, in order."""
    args = _parse(["--lists", "tiny", "--optimizers", "adamw", "--devices", "cpu",
                   "--dtypes", "fp32", "bf16", "fp16", "fp64", "--backends", "numba", "torch",
                   "--precision", "sr", "kahan", "sr", "kahan+sr", "--baselines", "fused"])
    cases, settings = bench.cli._plan(args)
    assert settings["precision"] == ["sr", "kahan", "kahan+sr"]
    by_dtype = {c[2]: c for c in cases}
    assert set(by_dtype) == {"fp32", "bf16", "fp16", "fp64"}
    for dt in ("bf16", "fp16"):
        impls, skipped = by_dtype[dt][4], by_dtype[dt][5]
        assert impls == ["numba", "torch", "numba+sr", "numba+kahan", "numba+kahan+sr",
                         "torch+sr", "torch+kahan", "torch+kahan+sr", "fused", "ceiling"], dt
        assert not any("+" in i for i in skipped)
    for dt in ("fp32", "fp64"):
        impls, skipped = by_dtype[dt][4], by_dtype[dt][5]
        assert not any("+" in i for i in impls) and "numba" in impls and "torch" in impls
        assert not any("+" in i for i in skipped)
    # without the option: no variants anywhere
    cases, settings = bench.cli._plan(_parse(["--lists", "tiny", "--dtypes", "bf16",
                                              "--all-backends"]))
    assert settings["precision"] == []
    assert cases and all("+" not in i for c in cases for i in c[4])
    # the default backends (--all-backends: torch too) each get theirs
    cases, _ = bench.cli._plan(_parse(["--lists", "tiny", "--optimizers", "sgd", "--devices",
                                       "cpu", "--dtypes", "bf16", "--all-backends",
                                       "--precision", "kahan"]))
    ((_, _, _, _, impls, _),) = cases
    assert "torch+kahan" in impls and "torch" in impls
    assert all(f"{b}+kahan" in impls for b in ("numba", "triton", "torch") if b in impls)


def test_cli_state_plans_bf16_state_variants_for_fp32_and_bf16():
    """--state bf16 adds <backend>+state-bf16 for every backend of a float32 or
    bfloat16 case (state_dtype acts on those), none for fp16/fp64; --state
    fp32 is the plain backend; the runner's optimizer has the option."""
    args = _parse(["--lists", "tiny", "--optimizers", "adamw", "--devices", "cpu",
                   "--dtypes", "fp32", "bf16", "fp16", "fp64", "--backends", "numba", "torch",
                   "--state", "fp32", "bf16", "--baselines", "fused"])
    cases, settings = bench.cli._plan(args)
    assert settings["precision"] == ["state-bf16"]
    by_dtype = {c[2]: c for c in cases}
    for dt in ("fp32", "bf16"):
        assert by_dtype[dt][4][:4] == ["numba", "torch", "numba+state-bf16",
                                       "torch+state-bf16"], dt
    for dt in ("fp16", "fp64"):
        assert not any("+" in i for i in by_dtype[dt][4]), dt
    cases, settings = bench.cli._plan(_parse(["--lists", "tiny", "--dtypes", "fp32",
                                              "--state", "fp32"]))
    assert settings["precision"] == [] and all("+" not in i for c in cases for i in c[4])
    spec = bench.OPTIMIZERS["adamw"]
    params, grads = bench.make_data(bench.ShapeList("t", ((8, 4), (3,))), torch.float32, "cpu")
    runner = bench.make_runner("torch+state-bf16", spec, params, grads)
    opt, leaves = runner.keep
    runner.step()
    assert opt.state[leaves[0]]["exp_avg"].dtype == torch.bfloat16


def test_available_impls_and_runners_for_variants():
    """A variant runs where its backend does, in bf16/fp16 only, and its
    optimizer is built with the options (and no others)."""
    spec = bench.OPTIMIZERS["adamw"]
    ok, skipped = bench.available_impls(spec, torch.float32, "cpu", ["torch", "torch+kahan"])
    assert ok == ["torch"]
    assert "bfloat16/float16 params only, not float32" in skipped["torch+kahan"]
    ok, skipped = bench.available_impls(spec, torch.bfloat16, "cpu",
                                        ["torch+kahan", "torch+sr", "torch+kahan+sr"])
    assert ok == ["torch+kahan", "torch+sr", "torch+kahan+sr"] and not skipped
    assert bench.precision_variant("numba+kahan+sr") == ("numba", "kahan+sr")
    assert bench.precision_variant("numba-compiled") is None
    assert bench.precision_variant("fused") is None
    assert bench.precision_variant("numba+fp8") is None
    params, grads = bench.make_data(bench.ShapeList("t", ((8, 4), (3,))), torch.bfloat16, "cpu")
    want = {"torch": (False, False), "torch+kahan": (True, False),
            "torch+sr": (False, True), "torch+kahan+sr": (True, True)}
    for impl, (kahan, sr) in want.items():
        runner = bench.make_runner(impl, spec, params, grads)
        opt, leaves = runner.keep
        (group,) = opt.param_groups
        assert isinstance(opt, fused_optim.AdamW) and opt.backend == "torch"
        assert bool(group.get("kahan_sum")) is kahan and bool(group.get("stochastic_round")) is sr
        runner.step()
        assert ("kahan_comp" in opt.state[leaves[0]]) is kahan
        assert leaves[0].dtype == torch.bfloat16
    # a numba variant is built with the options too (its kernels take them
    # separately; building asks nothing of the kernel)
    runner = bench.make_runner("numba+kahan+sr", spec, params, grads)
    (group,) = runner.keep[0].param_groups
    assert runner.keep[0].backend == "numba"
    assert group["kahan_sum"] is True and group["stochastic_round"] is True


def test_case_stats_ratio_vs_plain_is_the_paired_median():
    res = bench.CaseResult(list="x", tensors=1, params=1000, optimizer="adamw", dtype="bf16",
                           device="cpu", bytes_per_step=20_000, rounds=3, warmup=0)
    # round drift 1x, 10x, 100x: the median of the per-round ratios (1.1) is
    # not the ratio of the medians (12 / 10)
    res.times = {"numba": [1.0, 10.0, 100.0], "numba+kahan": [1.1, 12.0, 100.0],
                 "torch+sr": [1.0, 1.0, 1.0]}
    s = res.stats("numba+kahan")
    assert (s["precision"], s["plain"]) == ("kahan", "numba")
    assert s["ratio_vs_plain"] == pytest.approx(1.1)
    assert s["ratio_vs_plain_p25"] == pytest.approx(1.05)
    assert s["ratio_vs_plain_p75"] == pytest.approx(1.15)
    assert s["median_s"] / res.median("numba") == pytest.approx(1.2)
    plain = res.stats("numba")
    assert plain["precision"] is plain["plain"] is plain["ratio_vs_plain"] is None
    # a variant whose plain backend was not timed (failed) has no ratio
    orphan = res.stats("torch+sr")
    assert (orphan["precision"], orphan["plain"]) == ("sr", "torch")
    assert orphan["ratio_vs_plain"] is None and orphan["ratio_vs_plain_p25"] is None
    # report order: each variant right after its plain backend
    assert bench.impls._ordered(["fused", "torch+sr", "numba+kahan", "torch", "numba"]) == [
        "numba", "numba+kahan", "torch", "torch+sr", "fused"]
    table = bench.format_table([res])
    assert "precision options" in table
    assert any(line.split()[3:] == ["numba", "kahan", "10000.000", "12000.000", "1.10x",
                                    "1.05-1.15"] for line in table.splitlines()), table
    assert any(line.split()[3:] == ["torch", "sr", "-", "1000.000", "-", "-"]
               for line in table.splitlines()), table


#: seconds per step of each fake implementation in timed round r (the
#: warm-up round is index -1 here): a drift common to the round times a
#: factor of its own
_DRIFT = {-1: 1.0, 0: 1.0, 1: 10.0, 2: 100.0}
_FACTOR = {"torch": (1.0, 1.0, 1.0), "torch+kahan": (1.1, 1.2, 1.0),
           "torch+sr": (2.0, 2.0, 2.0), "torch+kahan+sr": (3.0, 1.0, 2.0)}


def test_cli_precision_ratios_are_paired_per_round(monkeypatch, tmp_path, capsys):
    """A fake timing source whose rounds drift by 100x: vs plain comes from
    each round's pair, every implementation runs once per round (shuffled),
    and the JSON and both tables show it."""
    now = [0.0]
    made = []

    def make_runner(impl, spec, params, grads):
        assert params[0].dtype in (torch.bfloat16, torch.float16) or "+" not in impl
        calls = [0]
        made.append(impl)

        def step():
            r = calls[0] - 1  # one warm-up call first
            calls[0] += 1
            now[0] += 1e-3 * _DRIFT[r] * (_FACTOR[impl][r] if r >= 0 else 1.0)

        return bench.Runner(impl, step)

    monkeypatch.setattr(bench.measure, "make_runner", make_runner)
    monkeypatch.setattr(bench.measure, "make_timer", lambda device: bench.HostTimer(lambda: now[0]))
    out = tmp_path / "out.json"
    rc = main(["bench", "--lists", "tiny", "--optimizers", "sgd", "--dtypes", "fp32", "bf16",
               "fp16", "--devices", "cpu", "--backends", "torch", "--all-backends",
               "--precision", "kahan", "sr", "kahan+sr", "--no-baselines", "--no-ceiling",
               "--rounds", "3", "--warmup", "1", "--no-progress", "--no-save", "--json",
               str(out)])
    table = capsys.readouterr().out
    assert rc == 0
    assert made == ["torch"] + ["torch", "torch+kahan", "torch+sr", "torch+kahan+sr"] * 2
    doc = json.loads(out.read_text())
    assert doc["config"]["precision"] == ["kahan", "sr", "kahan+sr"]
    fp32, bf16, fp16 = doc["cases"]
    assert [r["impl"] for r in fp32["results"]] == ["torch"]
    for case in (bf16, fp16):
        results = {r["impl"]: r for r in case["results"]}
        assert list(results) == ["torch", "torch+kahan", "torch+sr", "torch+kahan+sr"]
        for impl, r in results.items():
            want = [1e-3 * _DRIFT[i] * _FACTOR[impl][i] for i in range(3)]
            assert r["times_s"] == pytest.approx(want)
        assert results["torch"]["ratio_vs_plain"] is None
        assert results["torch+kahan"]["ratio_vs_plain"] == pytest.approx(1.1)
        assert results["torch+kahan"]["ratio_vs_plain_p25"] == pytest.approx(1.05)
        assert results["torch+kahan"]["ratio_vs_plain_p75"] == pytest.approx(1.15)
        assert results["torch+sr"]["ratio_vs_plain"] == pytest.approx(2.0)
        assert results["torch+kahan+sr"]["ratio_vs_plain"] == pytest.approx(2.0)
        assert results["torch+kahan+sr"]["ratio_vs_plain_p25"] == pytest.approx(1.5)
        assert results["torch+kahan+sr"]["ratio_vs_plain_p75"] == pytest.approx(2.5)
        assert {r["plain"] for r in case["results"][1:]} == {"torch"}
        assert [r["precision"] for r in case["results"]] == [None, "kahan", "sr", "kahan+sr"]
    main_table, rest = table.split("precision options:")
    for label in ("fused_optim torch +kahan", "fused_optim torch +sr",
                  "fused_optim torch +kahan+sr"):
        assert label in main_table
    rows = [line.split() for line in rest.splitlines()]
    for dt in ("bf16", "fp16"):
        assert ["tiny", "sgd", dt, "torch", "kahan", "10.000", "12.000", "1.10x",
                "1.05-1.15"] in rows
        assert ["tiny", "sgd", dt, "torch", "sr", "10.000", "20.000", "2.00x",
                "2.00-2.00"] in rows
        assert ["tiny", "sgd", dt, "torch", "kahan+sr", "10.000", "10.000", "2.00x",
                "1.50-2.50"] in rows
    assert not any(r[:3] == ["tiny", "sgd", "fp32"] for r in rows)
    assert "+kahan: kahan_sum=True, +sr: stochastic_round=True" in rest


def test_cli_precision_real_run_on_the_torch_backend(tmp_path, capsys):
    """End to end with real optimizers (the pure-torch backend implements the
    options): every variant is timed each round and has its ratio."""
    out = tmp_path / "out.json"
    rc = main(["bench", "--lists", "tiny", "--optimizers", "sgd", "--dtypes", "bf16",
               "--devices", "cpu", "--backends", "torch", "--all-backends", "--precision",
               "kahan", "sr", "kahan+sr", "--no-baselines", "--no-ceiling", "--rounds", "2",
               "--warmup", "1", "--no-progress", "--no-save", "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    (case,) = json.loads(out.read_text())["cases"]
    assert not case["failed"] and case["rounds"] == 2
    results = {r["impl"]: r for r in case["results"]}
    assert list(results) == ["torch", "torch+kahan", "torch+sr", "torch+kahan+sr"]
    for impl in ("torch+kahan", "torch+sr", "torch+kahan+sr"):
        r = results[impl]
        ratios = [a / b for a, b in zip(r["times_s"], results["torch"]["times_s"])]
        assert r["ratio_vs_plain"] == pytest.approx(float(np.median(ratios)))
        assert "fused_optim torch +" + impl.split("+", 1)[1] in captured.out
    assert "precision options: time per step vs the plain backend" in captured.out


# ------------------------------------------------------------- CUDA plan


def _parse(argv):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(argv)


#: the project's GPU check (``BENCH`` in benchmarks/gpu_check.py)
GPU_CHECK = ["--devices", "cuda", "--lists", "gpt2-small", "resnet50", "many-small",
             "--optimizers", "sgd", "adamw", "--dtypes", "fp32", "bf16", "--baselines", "fused",
             "--no-progress"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here")
def test_gpu_check_without_a_gpu_exits_2(tmp_path, capsys):
    out = tmp_path / "o.json"
    assert main(["bench", *GPU_CHECK, "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--devices cuda: no CUDA device here" in err and "\n" not in err
    assert not out.exists()


def test_gpu_check_plan(monkeypatch):
    """What the GPU check runs, planned as if a GPU were here: per case
    fused_optim triton, torch fused, the ceiling and the copy."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cases, settings = bench.cli._plan(_parse(GPU_CHECK))
    assert len(cases) == 3 * 2 * 2
    for sl, spec, dt, dev, impls, skipped in cases:
        assert dev == "cuda"
        assert impls == ["triton", "fused", "ceiling", "copy"], (sl.name, spec.name, dt, skipped)
    assert settings["copy"] is True and settings["steps_per_sample"] is None
    cases, settings = bench.cli._plan(_parse(GPU_CHECK + ["--no-copy", "--steps-per-sample", "9"]))
    assert all("copy" not in c[4] for c in cases)
    assert settings["steps_per_sample"] == 9


def test_no_copy_on_cpu_and_bad_steps_per_sample(capsys):
    cases, _ = bench.cli._plan(_parse(["--lists", "tiny", "--devices", "cpu"]))
    assert cases and all("copy" not in c[4] for c in cases)
    assert main(["bench", "--lists", "tiny", *_fast(), "--steps-per-sample", "0"]) == 2
    assert "--steps-per-sample must be at least 1" in capsys.readouterr().err


# ------------------------------------------------------------------- run


def _fake_run(monkeypatch, target):
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 7

    monkeypatch.setattr(target, "main", fake_main, raising=False)
    return seen


def test_run_delegates_all_arguments(monkeypatch):
    fake = types.ModuleType("fused_optim._run")
    seen = _fake_run(monkeypatch, fake)
    monkeypatch.setitem(sys.modules, "fused_optim._run", fake)
    monkeypatch.setattr(fused_optim, "_run", fake, raising=False)
    assert main(["run", "script.py", "--foo", "--help", "bench"]) == 7
    assert seen["argv"] == ["script.py", "--foo", "--help", "bench"]


def test_run_exit_codes(monkeypatch):
    fake = types.ModuleType("fused_optim._run")
    monkeypatch.setitem(sys.modules, "fused_optim._run", fake)
    monkeypatch.setattr(fused_optim, "_run", fake, raising=False)
    fake.main = lambda argv: None
    assert main(["run"]) == 0

    def exits(argv):
        raise SystemExit(3)
    fake.main = exits
    assert main(["run", "x.py"]) == 3


@pytest.mark.skipif(importlib.util.find_spec("fused_optim._run") is None,
                    reason="fused_optim._run is not written yet")
def test_run_delegates_to_the_real_module(monkeypatch):
    import fused_optim._run as real
    seen = _fake_run(monkeypatch, real)
    assert main(["run", "script.py", "--foo"]) == 7
    assert seen["argv"] == ["script.py", "--foo"]


def test_run_without_module_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fused_optim._run", None)  # import now fails
    monkeypatch.delattr(fused_optim, "_run", raising=False)
    assert main(["run", "script.py"]) == 2
    assert "fused_optim._run" in capsys.readouterr().err


def test_step_overhead_script_counts_what_a_step_reads(capsys):
    """benchmarks/step_overhead.py runs, and every read it counts is timed."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "step_overhead.py"
    spec = importlib.util.spec_from_file_location("step_overhead", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--tensors", "4", "--numel", "8", "--rounds", "3"]) == 0
    out = capsys.readouterr().out
    assert "x torch fused's step" in out
    timed = mod.run(tensors=2, numel=4, rounds=1)
    for kind, names in mod.READS.items():
        keys = [f"{kind} {n}" if n in mod._RULE else n for n in names]
        assert set(keys) <= set(timed)
        assert timed[f"{kind} reads"] == pytest.approx(sum(timed[k] for k in keys))
    # every fact check the rule makes is timed
    facts = {n for n in dir(mod._reuse_rule) if n[:1] == "f" and n[1:2].isdigit()} - {"f6_flags"}
    assert len(facts) == len([n for n in mod._RULE if n.startswith("F")])


def test_launcher_overhead_script_runs():
    """benchmarks/launcher_overhead.py (host time with the Triton launches
    stubbed) on a tiny list: every case timed, and the kernels restored."""
    import importlib.util
    from pathlib import Path

    from fused_optim.kernels import triton as tk

    path = Path(__file__).parent.parent / "benchmarks" / "launcher_overhead.py"
    spec = importlib.util.spec_from_file_location("launcher_overhead", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kernels = mod.kernels()
    out = mod.run(["tiny"], rounds=2)
    assert set(out) == {("tiny", case, what) for case in mod.CASES
                        for what in ("step", "launcher")}
    assert all(us > 0 for us in out.values())
    assert mod.kernels() == kernels


# ----------------------------------------------------- comparing two runs


def _saved_run(tmp_path, name, times, other_cores=0.0):
    """A run's JSON as --json writes it, from one fake case."""
    case = _fake_case(times=times, other_cores=other_cores)
    doc = bench.to_json([case], {"command_line": ["fused-optim", "bench"]})
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def test_compare_two_saved_runs(tmp_path, capsys):
    old = _saved_run(tmp_path, "old", {"numba": [2e-3, 2e-3, 2e-3, 2e-3, 2e-3],
                                       "fused": [2e-3, 2e-3, 2e-3, 2e-3, 2e-3],
                                       "ceiling": [1e-3, 1e-3, 1e-3, 1e-3, 1e-3]})
    # the machine got slower between the runs (fused and the ceiling 1.5x),
    # and numba faster against fused in every round
    new = _saved_run(tmp_path, "new", {"numba": [1.5e-3, 1.5e-3, 1.5e-3, 1.5e-3, 3e-3],
                                       "fused": [3e-3, 3e-3, 3e-3, 3e-3, 6e-3],
                                       "ceiling": [1.5e-3] * 5}, other_cores=1.0)
    assert main(["bench", "--compare", str(old), str(new)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"change per case, {old}: ") and f"-> {new}: " in out

    def row(label):
        # after the label: old new time old-vs new-vs ratio old% new% flag
        line, = [x for x in out.splitlines() if x.startswith("tiny ") and f" {label} " in x]
        return line.split(f" {label} ")[1].split()

    assert row("fused_optim numba") == ["2.000", "1.500", "-25%", "1.00x", "0.50x", "-50%",
                                        "50", "100", "!"]
    fused = row("torch fused")
    assert fused[:5] == ["2.000", "3.000", "+50%", "1.00x", "1.00x"]
    assert fused[5] == "-"  # torch's fastest path has no ratio to itself
    assert fused[6:8] == ["50", "50"]
    assert "Paired figures cancel drift" in out and "!: a figure" in out
    # a file that is not a run
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert main(["bench", "--compare", str(old), str(bad)]) == 2
    assert "not the JSON of a fused-optim bench run" in capsys.readouterr().err
    assert main(["bench", "--compare", str(old), str(new), str(new)]) == 2


def test_compare_a_run_with_a_saved_one(tmp_path, capsys):
    old = tmp_path / "old.json"
    argv = ["bench", "--lists", "tiny", "--optimizers", "sgd", "--backends", "numba",
            "--baselines", "fused", *_fast()]
    assert main([*argv, "--json", str(old)]) == 0
    capsys.readouterr()
    assert main([*argv, "--compare", str(old)]) == 0
    out = capsys.readouterr().out
    part = out[out.index("change per case"):]
    assert "-> this run: " in part
    rows = [line for line in part.splitlines() if line.startswith("tiny ")]
    assert len(rows) == 3
    for row, label in zip(rows, ("fused_optim numba", "torch fused", "ceiling")):
        assert f" {label} " in row


# ------------------------------------------------ a competing process


BUSY_LOOP = "import sys; print('ready', flush=True)\nwhile True: pass\n"


def test_a_case_run_while_other_processes_load_the_cores_is_flagged(capsys):
    """Two busy loops, one per core of the 2-core machine (as many as there
    are usable cores), while a tiny case runs for about a second: even if
    this process's threads took their full share of the cores, the loops
    would get a core's worth, 4x the flagging threshold; the test asks for
    2x, whatever else the machine runs."""
    cores = len(os.sched_getaffinity(0))
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdout=subprocess.PIPE,
                              text=True) for _ in range(cores)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        spec = bench.OPTIMIZERS["sgd"]
        res = bench.run_case(bench.shape_list("tiny"), spec, "fp32", "cpu",
                             ["numba", "fused", "ceiling"], rounds=None, warmup=1,
                             min_rounds=5, max_rounds=100_000, target_s=1.0)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert res.other_cores is not None and res.other_cores >= 2 * bench.measure.COMPETING_CORES
    assert res.competed and res.to_dict()["competed"] is True
    table = bench.format_table([res])
    rows = [line for line in table.splitlines() if line.startswith("tiny ")]
    assert rows and all(line.rstrip().endswith("busy") for line in rows[:3])
    assert f"busy {res.other_cores:.1f} cores" in table
    assert f"busy cases: tiny sgd fp32 ({res.other_cores:.1f} cores)" in table
    bench.cli._warn_load({}, [res])
    assert "warning: other processes used" in capsys.readouterr().err
