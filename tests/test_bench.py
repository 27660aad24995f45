"""Fast tests of the benchmark tool (``python -m fused_optim bench``) and the
``run`` delegation of ``python -m fused_optim``.

Everything runs at a tiny size; the first Numba call of a fresh checkout
compiles (a few seconds), later runs load the cache.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import fused_optim
from fused_optim import bench
from fused_optim.__main__ import main
from fused_optim.kernels.numba import _pattern

TINY = [[64, 32], [64], [1000], [3, 5, 7]]
TINY_NUMEL = 64 * 32 + 64 + 1000 + 105


@pytest.fixture
def tiny_json(tmp_path):
    path = tmp_path / "tiny_shapes.json"
    path.write_text(json.dumps(TINY))
    return path


def _fast(*extra):
    """Options for a run of a couple of seconds."""
    return ["--dtypes", "fp32", "--rounds", "3", "--warmup", "1", "--no-progress", *extra]


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


# ------------------------------------------------------------------ the CLI


def test_cli_tiny_run_table_and_json(tiny_json, tmp_path, capsys):
    out = tmp_path / "out.json"
    rc = main(["bench", "--shapes", str(tiny_json), "--optimizers", "sgd,adamw",
               "--json", str(out), *_fast()])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    table = captured.out
    for word in ("median ms", "GB/s", "% ceil", "vs fused", "fused_optim numba",
                 "torch for-loop", "torch foreach", "torch fused", "ceiling", "tiny_shapes"):
        assert word in table

    doc = json.loads(out.read_text())
    machine = doc["machine"]
    for key in ("cpu_model", "cores", "torch", "numba", "numpy", "python",
                "torch_threads", "numba_threads"):
        assert key in machine
    assert machine["torch"] == torch.__version__
    assert doc["config"]["dtypes"] == ["fp32"]
    cases = doc["cases"]
    assert [(c["optimizer"], c["dtype"]) for c in cases] == [("sgd", "fp32"), ("adamw", "fp32")]
    for c in cases:
        assert c["list"] == "tiny_shapes"
        assert c["tensors"] == 4 and c["params"] == TINY_NUMEL
        assert c["rounds"] == 3
        per_param = 5 if c["optimizer"] == "sgd" else 7
        assert c["bytes_per_step"] == per_param * 4 * TINY_NUMEL
        impls = {r["impl"]: r for r in c["results"]}
        assert set(impls) == {"numba", "for-loop", "foreach", "fused", "ceiling"}
        for r in impls.values():
            for key in ("median_s", "params_per_s", "gb_per_s", "pct_ceiling",
                        "ratio_vs_fused", "times_s"):
                assert key in r
            assert len(r["times_s"]) == 3 and r["median_s"] > 0
            assert r["gb_per_s"] == pytest.approx(c["bytes_per_step"] / r["median_s"] / 1e9)
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
               "--baselines", "fused,compiled", "--no-ceiling", "--json", str(out), *_fast()])
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
    assert "unknown list 'resnet51'" in err and "resnet50" in err and "\n" not in err


def test_cli_unknown_model_exits_2(capsys):
    assert main(["bench", "--model", "no_such_module_for_fused_optim:make", *_fast()]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot import 'no_such_module_for_fused_optim'" in err and "\n" not in err


@pytest.mark.parametrize("argv, words", [
    (["--backends", "cuda-magic"], ["unknown backend 'cuda-magic'"]),
    (["--optimizers", "lamb"], ["unknown optimizer 'lamb'"]),
    (["--dtypes", "fp8"], ["unknown dtype 'fp8'"]),
    (["--model", "nocolon"], ["module:factory"]),
])
def test_cli_bad_names_exit_2(capsys, argv, words):
    assert main(["bench", "--lists", "tiny", *_fast(), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert all(w in err for w in words) and "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="triton can run here")
def test_cli_unavailable_backend_exits_2(capsys):
    assert main(["bench", "--lists", "tiny", "--backends", "triton", *_fast()]) == 2
    err = capsys.readouterr().err.strip()
    assert "backend 'triton' cannot run here" in err and "CUDA" in err and "\n" not in err


def test_cli_plot(tiny_json, tmp_path, capsys):
    png = tmp_path / "out.png"
    argv = ["bench", "--shapes", str(tiny_json), "--optimizers", "sgd", "--plot", str(png),
            *_fast()]
    if importlib.util.find_spec("matplotlib") is None:
        assert main(argv) == 2
        assert "matplotlib" in capsys.readouterr().err
    else:
        assert main(argv) == 0
        assert png.stat().st_size > 0


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
    times = bench.interleaved(runners, rounds=20, warmup=2, seed=1)
    assert set(times) == set("abcd") and all(len(t) == 20 for t in times.values())
    assert len(calls) == 22 * 4
    rounds = [tuple(calls[i:i + 4]) for i in range(0, len(calls), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)  # each once per round
    assert len(set(rounds)) > 1  # order changes between rounds


def test_interleaved_drops_a_failing_implementation(capsys):
    def boom():
        raise RuntimeError("kernel exploded")

    runners = [bench.Runner("ok", lambda: None), bench.Runner("bad", boom)]
    failed = {}
    times = bench.interleaved(runners, rounds=3, warmup=1, failed=failed)
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

    monkeypatch.setattr(bench, "make_runner", make_runner)
    rc = main(["bench", "--lists", "tiny", "--optimizers", "sgd", "--baselines", "fused",
               "--no-ceiling", *_fast()])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "torch fused" in out and "fused_optim numba" not in out
    assert "FAILED numba on tiny sgd fp32: RuntimeError: numba kernel exploded" in out
    assert "some implementations failed" in err


def test_interleaved_auto_rounds_are_clamped():
    runners = [bench.Runner("a", lambda: None)]
    times = bench.interleaved(runners, None, 1, min_rounds=4, max_rounds=7, target_s=1e9)
    assert len(times["a"]) == 7
    times = bench.interleaved(runners, None, 1, min_rounds=4, max_rounds=7, target_s=0.0)
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
    table = _pattern.make_table([[a.data_ptr() for a in row] for row in rows], sizes)
    itemsize = rows[0][0].element_size()
    word = {2: torch.int16, 4: torch.int32}[itemsize]
    for chunks in (1, 3, 7):  # chunk edges inside rows and across them
        _pattern.pattern(table, _pattern.split(sum(sizes), chunks), itemsize, k, k - 1)
        for row, old in zip(rows, before):
            x = old[-1].view(word)
            for a, b in zip(row[:-1], old[:-1]):
                assert torch.equal(a.view(word), b.view(word) ^ x)
            assert torch.equal(row[-1].view(word), x)
            old[:] = [a.clone() for a in row]


def test_pattern_rejects_other_patterns():
    with pytest.raises(ValueError, match="unsupported pattern"):
        _pattern.pattern(np.zeros((1, _pattern.NCOLS), np.int64), _pattern.split(0), 4, 3, 1)


def test_split_is_even():
    edges = _pattern.split(10, 3)
    assert list(edges) == [0, 3, 6, 10]


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
    facts = {n for n in dir(mod._facts) if n[:1] == "f" and n[1:2].isdigit()} - {"f6_flags"}
    assert len(facts) == len([n for n in mod._RULE if n.startswith("F")])
