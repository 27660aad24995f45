"""benchmarks/gpu_check.py (``make gpu-check``) without a GPU: its parsing,
time limits, results files and exit code, with every phase's command faked
except two tiny subprocesses that check the timeout handling."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", PATH)
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc
_spec.loader.exec_module(gc)


def _errors_line(n):
    return f"========= ERROR SUMMARY: {n} error{'' if n == 1 else 's'}\n"


def test_sanitizer_errors_add_up_over_processes():
    rng = random.Random()
    counts = [rng.randrange(0, 40) for _ in range(rng.randrange(1, 4))]
    text = "".join("========= Invalid __global__ write\n" + _errors_line(n) for n in counts)
    # a summary line that goes on after the count is not a count of errors
    text += f"========= ERROR SUMMARY: {rng.randrange(1, 9)} errors were not printed\n"
    assert gc.sanitizer_errors(text) == sum(counts)
    assert gc.sanitizer_errors(_errors_line(1)) == 1
    assert gc.sanitizer_errors("1 passed in 3.0s\n") is None


@pytest.mark.parametrize("missing", [(), ("hypothesis",), ("triton", "pytest_benchmark"),
                                     ("torch",)])
@pytest.mark.parametrize("cuda", [True, False])
def test_the_probe_decides_between_gpu_dry_run_and_broken(cuda, missing):
    info = {"cuda": cuda, "missing": {m: f"ModuleNotFoundError: {m}" for m in missing}}
    mode, problems = gc.decide(info)
    if "torch" in missing:
        assert mode == "broken"
    else:
        assert mode == ("gpu" if cuda else "dry-run")
        assert sorted(p.split(":")[0] for p in problems) == sorted(missing)
    assert gc.decide(None)[0] == "broken"


def test_junit_counts_and_failing_names(tmp_path):
    rng = random.Random()
    n = {k: rng.randrange(0, 6) for k in ("passed", "failures", "errors", "skipped")}
    cases = []
    for kind, child in (("passed", ""), ("failures", "<failure message='x'/>"),
                        ("errors", "<error message='x'/>"), ("skipped", "<skipped/>")):
        cases += [f"<testcase classname='tests.test_x' name='{kind}{i}'>{child}</testcase>"
                  for i in range(n[kind])]
    total = sum(n.values())
    (tmp_path / "j.xml").write_text(
        f"<testsuites><testsuite name='pytest' tests='{total}' failures='{n['failures']}' "
        f"errors='{n['errors']}' skipped='{n['skipped']}'>{''.join(cases)}</testsuite>"
        "</testsuites>")
    got = gc.junit_counts(tmp_path / "j.xml")
    assert {k: got[k] for k in n} == n and got["tests"] == total
    bad = n["failures"] + n["errors"]
    assert len(got["failing"]) == min(bad, 10)
    assert all(name.split("::")[1].startswith(("failures", "errors")) for name in got["failing"])
    assert gc.junit_counts(tmp_path / "missing.xml") is None


def test_budget_caps_each_phase_and_keeps_a_reserve():
    now = [100.0]
    budget = gc.Budget(300, clock=lambda: now[0])
    assert budget.timeout_for(180) == 180
    assert budget.timeout_for(180, reserve=200) == 100
    now[0] += 250
    assert budget.timeout_for(180) == 50
    now[0] += 100
    assert budget.timeout_for(180) == 0


def test_a_command_past_its_limit_is_interrupted_first(tmp_path):
    # The child takes SIGINT whatever it inherited. In cold CI runs (4 of 4
    # on 2026-12-07; never alone, under load or in a warm full run) it
    # inherited SIGINT and SIGQUIT ignored (its SigIgn 0x81001006), so it
    # ignored the interrupt and was killed. That pair is what C's system()
    # sets in its whole process while it runs (libtorch_cpu links it); which
    # call in the xdist worker did it was not pinned down. What is tested
    # is run_command: SIGINT first, SIGKILL only after the grace.
    code = ("import signal, time\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "print('ready', flush=True)\n"
            "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
            "    print('interrupted', flush=True)\n    raise SystemExit(3)\n")
    out = gc.run_command([sys.executable, "-c", code], 2.0, tmp_path / "log", echo=False,
                         grace=10)
    assert out.timed_out and out.returncode == 3 and "interrupted" in out.output, out
    assert out.seconds < 12
    assert "timed out after 2 s" in (tmp_path / "log").read_text()


def test_a_command_that_ignores_the_interrupt_is_killed():
    code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)\n"
    out = gc.run_command([sys.executable, "-c", code], 1.0, echo=False, grace=1.0)
    assert out.timed_out and out.returncode == -9 and out.seconds < 10


def _bench_doc(rng, cases):
    doc = {"schema": rng.randrange(2, 9), "cases": []}
    for lst, failed, with_triton in cases:
        results = [{"impl": impl, "median_s": rng.uniform(1e-4, 1e-2), "gb_per_s": 1.0,
                    "host_median_s": rng.uniform(1e-5, 1e-3), "field_from_the_future": 1}
                   for impl in (["triton"] if with_triton else []) + ["fused"]]
        doc["cases"].append({"list": lst, "optimizer": "adamw", "dtype": "bf16",
                             "device": "cuda", "results": results, "failed": failed,
                             "skipped": {} if with_triton else {"triton": "why-" + lst}})
    return doc


def test_bench_summary_reads_what_is_there_and_finds_failures():
    rng = random.Random()
    doc = _bench_doc(rng, [("a", {}, True), ("b", {"triton": "boom"}, True),
                           ("c", {}, False)])
    rows, problems, fields = gc.summarise_bench(doc, require_triton=True)
    assert [r["case"] for r in rows] == ["a adamw bf16 cuda", "b adamw bf16 cuda",
                                         "c adamw bf16 cuda"]
    first = doc["cases"][0]["results"]
    assert rows[0]["ms"] == pytest.approx(first[0]["median_s"] * 1e3)
    assert rows[0]["fused_ms"] == pytest.approx(first[1]["median_s"] * 1e3)
    assert rows[0]["host_ms"] == pytest.approx(first[0]["host_median_s"] * 1e3)
    assert rows[0]["pct_copy"] is None and rows[2]["impl"] is None
    assert "field_from_the_future" in fields
    assert len(problems) == 2
    assert "boom" in problems[0] and "why-c" in problems[1]
    assert gc.summarise_bench(doc, require_triton=False)[1] == problems[:1]
    for junk in (None, [], {"cases": "x"}, {"cases": [3, {"results": [7]}]}):
        rows, problems, _ = gc.summarise_bench(junk, require_triton=True)
        assert problems or rows  # no exception, and something is said


# ------------------------------------------------------- main(), faked world


class FakeWorld:
    """Answers the check's commands; ``fail`` names phases whose tests or
    bench fail, ``san_errors`` is what memcheck reports."""

    def __init__(self, cuda, fail=(), san_errors=0, slow=False, all_skipped=()):
        self.cuda, self.fail, self.san_errors = cuda, set(fail), san_errors
        self.all_skipped = set(all_skipped)
        self.slow, self.now = slow, 0.0  # slow: every command takes its whole limit
        self.calls = []
        self.marker = f"marker-{random.randrange(10**9)}"

    def run(self, cmd, timeout, log_path=None, env=None, cwd=None, echo=True, grace=15.0):
        cmd = [str(c) for c in cmd]
        name = Path(log_path).stem if log_path else "probe"
        self.calls.append((name, cmd, timeout, env))
        self.now += timeout if self.slow else 0.1
        if cmd[1:3] == ["-c", gc._PROBE]:
            info = {"python": "3.12", "executable": "python3", "torch_cuda": "13.0",
                    "versions": {m: "1.0" for m in gc.MODULES}, "missing": {},
                    "cuda": self.cuda}
            if self.cuda:
                info["gpu"] = {"name": "Fake GPU 9000", "count": 1, "capability": "9.0",
                               "memory_bytes": 2**30, "multiprocessors": 1}
            return gc.Outcome(0, False, 0.1, "GPU_CHECK_PROBE " + json.dumps(info) + "\n")
        rc, text = (1 if name in self.fail else 0), ""
        if "pytest" in cmd and "--collect-only" in cmd:
            text = "tests/test_cuda.py::test_a\ntests/test_cuda.py::test_b\n2 tests collected\n"
        elif "pytest" in cmd:
            xml = next(c.split("=", 1)[1] for c in cmd if c.startswith("--junitxml="))
            bad = "<failure message='x'/>" if rc else ""
            skip = 2 if name in self.all_skipped else 0
            Path(xml).write_text(f"<testsuites><testsuite tests='2' failures='{rc}' errors='0' "
                                 f"skipped='{skip}'><testcase classname='t' name='a'>{bad}"
                                 "</testcase><testcase classname='t' name='b'/></testsuite>"
                                 "</testsuites>")
            text = "1.50s call     tests/test_cuda.py::test_a\n"
            if cmd[0].endswith("compute-sanitizer"):
                text += _errors_line(self.san_errors)
        elif "fused_optim" in cmd:
            doc = _bench_doc(random.Random(), [("gpt2-small", {}, True)])
            doc[self.marker] = True
            Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps(doc))
        return gc.Outcome(rc, False, 0.2, text)


@pytest.fixture
def world(monkeypatch):
    def make(**kw):
        w = FakeWorld(**kw)
        monkeypatch.setattr(gc, "run_command", w.run)
        def imports(env, timeout):
            w.now += timeout if w.slow else 0.1
            return True, ""

        budget = gc.Budget
        monkeypatch.setattr(gc, "Budget", lambda total: budget(total, clock=lambda: w.now))
        monkeypatch.setattr(gc, "imports_from_checkout", imports)
        monkeypatch.setattr(gc, "find_sanitizer", lambda: "/fake/bin/compute-sanitizer")
        monkeypatch.setattr(gc, "_nvidia_smi", lambda: None)
        monkeypatch.setattr(gc, "_git", lambda: {})
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        return w
    return make


def _results(out, name):
    return (json.loads((out / f"{name}.json").read_text()),
            (out / f"{name}-summary.txt").read_text())


def test_gpu_run_that_passes(world, tmp_path, capsys):
    w = world(cuda=True)
    assert gc.main(["--out", str(tmp_path), "--budget", "400"]) == 0
    doc, text = _results(tmp_path, "fake-gpu-9000")
    assert doc[w.marker] is True  # the bench JSON passes through
    check = doc["gpu_check"]
    assert check["ok"] and not check["dry_run"] and check["sanitizer"]["errors"] == 0
    assert [p["name"] for p in check["phases"]] == ["probe", "install", *gc.GPU_PHASES]
    assert check["tests"]["tests"]["passed"] == 2
    assert "result: passed" in text and text in capsys.readouterr().out
    by_name = {name: (cmd, timeout, env) for name, cmd, timeout, env in w.calls}
    cmd, _, env = by_name["sanitizer"]
    assert cmd[:3] == ["/fake/bin/compute-sanitizer", "--tool", "memcheck"]
    assert env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
    assert "--devices" in by_name["bench"][0] and "cuda" in by_name["bench"][0]
    for name in gc.GPU_PHASES:
        assert "TRITON_INTERPRET" not in by_name[name][2]


def test_slow_phases_fit_the_budget_and_leave_the_sanitizer_time(world, tmp_path):
    w = world(cuda=True, slow=True)
    gc.main(["--out", str(tmp_path), "--budget", str(gc.BUDGET_S)])
    limits = {name: timeout for name, _, timeout, _ in w.calls}
    assert w.now <= gc.BUDGET_S
    assert limits["sanitizer"] >= 60 and limits["bench"] >= 60


@pytest.mark.parametrize("phase", gc.GPU_PHASES)
def test_gpu_run_fails_loudly_on_any_failing_phase(world, tmp_path, phase):
    world(cuda=True, fail=[phase])
    assert gc.main(["--out", str(tmp_path)]) == 1
    doc, text = _results(tmp_path, "fake-gpu-9000")
    assert not doc["gpu_check"]["ok"] and f"FAILED: {phase}" in text


def test_tests_that_all_skip_fail_the_check(world, tmp_path):
    world(cuda=True, all_skipped=["tests"])
    assert gc.main(["--out", str(tmp_path)]) == 1
    assert "FAILED: tests" in _results(tmp_path, "fake-gpu-9000")[1]


def test_sanitizer_errors_fail_the_check(world, tmp_path):
    n = random.randrange(1, 100)
    world(cuda=True, san_errors=n)
    assert gc.main(["--out", str(tmp_path)]) == 1
    doc, text = _results(tmp_path, "fake-gpu-9000")
    assert doc["gpu_check"]["sanitizer"]["errors"] == n and "FAILED: sanitizer" in text


def test_a_spent_budget_fails_the_check(world, tmp_path):
    world(cuda=True)
    assert gc.main(["--out", str(tmp_path), "--budget", "3"]) == 1
    doc, _ = _results(tmp_path, "fake-gpu-9000")
    phases = {p["name"]: p for p in doc["gpu_check"]["phases"]}
    assert all(phases[n]["status"] == "timeout" for n in gc.GPU_PHASES)


def test_dry_run_without_cuda(world, tmp_path):
    w = world(cuda=False)
    assert gc.main(["--out", str(tmp_path)]) == 0
    doc, text = _results(tmp_path, "no-gpu")
    assert doc["gpu_check"]["dry_run"] and "DRY RUN, no GPU present" in text
    assert [p["name"] for p in doc["gpu_check"]["phases"]] == ["probe", "install",
                                                              *gc.DRY_PHASES]
    cmds = {name: cmd for name, cmd, _, _ in w.calls}
    assert not any(c[0].endswith("compute-sanitizer") for c in cmds.values())
    for name, cmd in cmds.items():
        if "pytest" in cmd and name != "compile":
            assert "--collect-only" in cmd, name
    bench = cmds["bench-smoke"]
    devices = [bench[i + 1] for i, c in enumerate(bench) if c == "--devices"]
    assert devices[-1] == "cpu" and "cuda" in devices  # the GPU line, then the override


def test_dry_run_fails_when_what_it_can_run_fails(world, tmp_path):
    world(cuda=False, fail=["compile"])
    assert gc.main(["--out", str(tmp_path)]) == 1
    assert "FAILED: compile" in _results(tmp_path, "no-gpu")[1]
