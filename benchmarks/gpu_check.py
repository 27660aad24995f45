#!/usr/bin/env python3
"""One-command device check (``make gpu-check``) for a bare GPU machine.

Runs under the interpreter that starts it (the machine's own ``python3``:
no venv, nothing from the network), in phases with their own time limits
inside one overall budget (8 minutes by default):

* probe: torch with CUDA, triton, numba, pytest, hypothesis and
  pytest-benchmark importable; versions and the GPU's name.
* install: ``pip install -e . --no-deps --no-build-isolation``, or, where
  pip cannot, a ``sitecustomize`` shim that maps ``fused_optim.kernels`` to
  ``kernels/`` as setup.py's ``package_dir`` does.
* tests: the test files that run the Triton backend on the device.
* bench: ``python -m fused_optim bench --devices cuda ...``.
* sanitizer: part of ``tests/test_cuda.py`` under ``compute-sanitizer``.

Without CUDA it is a dry run: the probe, the install, the offline Triton
compile test, collection of the GPU tests and a one-case CPU run of the
bench command line; it exits 0 if those pass. With CUDA, any failure,
timeout or sanitizer error exits 1.

Results: ``<out>/<gpu-slug>.json`` (the bench JSON plus a ``gpu_check``
section) and ``<out>/<gpu-slug>-summary.txt``; logs and junit XML in
``<out>/<gpu-slug>-logs/`` when ``GPU_CHECK_OUT`` is set, else under
``build/gpu-check/``. Stdlib only: torch is imported in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 480.0
PY = sys.executable

PYTEST = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
          "-W", "ignore::numba.core.errors.NumbaIRAssumptionWarning"]
# On a GPU conftest.py leaves TRITON_INTERPRET off, so these run compiled.
# The rest of tests/ uses CPU tensors only (triton cases skip there).
GPU_TEST_FILES = ["tests/test_cuda.py", "tests/test_triton_kernels.py",
                  "tests/test_capturable.py", "tests/test_bench.py"]
GPU_TEST_K = "cuda or triton or capturable"
# Graph capture needs torch's caching allocator, whose pooled blocks would
# hide out-of-bounds accesses from memcheck; these tests run without it.
SANITIZER_K = "parity or mixing"
SANITIZER_ENV = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
BENCH = ["bench", "--devices", "cuda", "--lists", "gpt2-small", "resnet50", "many-small",
         "--optimizers", "sgd", "adamw", "--dtypes", "fp32", "bf16", "--baselines", "fused",
         "--precision", "kahan", "sr", "--no-progress"]
# argparse keeps the last value: the dry run parses the GPU command line
# whole, then runs one small CPU case of it.
BENCH_SMOKE = ["--devices", "cpu", "--lists", "many-small", "--optimizers", "sgd",
               "--dtypes", "fp32", "--rounds", "1", "--warmup", "1"]

# (cap, reserve): a phase may use at most cap seconds, and leaves reserve
# seconds of the budget to the phases after it.
LIMITS = {
    "probe": (60, 0), "install": (90, 0),
    "tests": (180, 0), "bench": (180, 60), "sanitizer": (150, 0),
    "compile": (300, 0), "collect": (120, 0), "sanitizer-select": (90, 0),
    "bench-smoke": (180, 0),
}
GPU_PHASES = ("tests", "bench", "sanitizer")
DRY_PHASES = ("compile", "collect", "sanitizer-select", "bench-smoke")
FAILING = ("fail", "timeout")
MODULES = ("torch", "triton", "numba", "numpy", "pytest", "hypothesis", "pytest_benchmark")
REQUIRED = ("torch", "triton", "numba", "pytest", "hypothesis", "pytest_benchmark")


@dataclass
class Phase:
    name: str
    status: str  # pass | fail | timeout | skipped (not meant to run here) | n/a
    detail: str = ""
    seconds: float = 0.0
    limit_s: float | None = None
    returncode: int | None = None
    command: str | None = None
    log: str | None = None
    tests: dict | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Outcome:
    returncode: int | None
    timed_out: bool
    seconds: float
    output: str


class Budget:
    """One deadline for the whole check; phases get what is left of it."""

    def __init__(self, total_s: float, clock=time.monotonic):
        self.clock = clock
        self.total_s = total_s
        self.deadline = clock() + total_s

    def left(self) -> float:
        return self.deadline - self.clock()

    def timeout_for(self, cap: float, reserve: float = 0.0) -> float:
        return max(0.0, min(cap, self.left() - reserve))


# ----------------------------------------------------------------- running


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_command(cmd, timeout: float, log_path: Path | None = None, env=None,
                cwd=REPO, echo: bool = True, grace: float = 15.0) -> Outcome:
    """Run ``cmd`` in its own process group, output teed to ``log_path``.

    On timeout the group gets SIGINT first, so pytest still writes its junit
    XML and durations for what ran, then SIGKILL after ``grace`` seconds.
    """
    start = time.monotonic()
    chunks: list[str] = []
    log = open(log_path, "w", encoding="utf-8") if log_path else None
    if log:
        log.write("$ " + shlex.join(map(str, cmd)) + "\n")
        log.flush()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, text=True, errors="replace")

    def pump():
        for line in proc.stdout:
            chunks.append(line)
            if log:
                log.write(line)
                log.flush()
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(timeout, 0.001))
    except subprocess.TimeoutExpired:
        timed_out = True
        _signal_group(proc, signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    except BaseException:
        # start_new_session keeps Ctrl-C from reaching the group
        _signal_group(proc, signal.SIGKILL)
        raise
    # a grandchild that kept the pipe open must not hang the check
    reader.join(timeout=10)
    if log:
        if timed_out:
            log.write(f"\n[gpu_check: timed out after {timeout:.0f} s]\n")
        log.close()
    return Outcome(proc.returncode, timed_out, time.monotonic() - start, "".join(chunks))


# ----------------------------------------------------------------- parsing


_SANITIZER_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+errors?\s*$", re.MULTILINE)


def sanitizer_errors(text: str) -> int | None:
    """Errors over every ``ERROR SUMMARY`` line (one per process), or None
    when there is none (the run did not finish)."""
    found = [int(n) for n in _SANITIZER_SUMMARY.findall(text)]
    return sum(found) if found else None


def junit_counts(path: Path) -> dict | None:
    """passed/failed/errors/skipped from pytest's junit XML, the names of up
    to 10 failing tests; None if the file is missing or unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0) or 0) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    bad = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            bad.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    counts["failing"] = bad[:10]
    return counts


_COLLECTED = re.compile(r"(\d+)(?:/\d+)? tests? collected")
_DURATION = re.compile(r"^\s*([\d.]+)s\s+(call|setup|teardown)\s+(\S.*?)\s*$", re.MULTILINE)


def collected_count(text: str) -> int | None:
    m = _COLLECTED.search(text)
    return int(m.group(1)) if m else None


def slowest(text: str, n: int = 10) -> list:
    """pytest --durations lines as [seconds, when, test], slowest first."""
    rows = [[float(s), when, test] for s, when, test in _DURATION.findall(text)]
    return sorted(rows, key=lambda r: -r[0])[:n]


def tests_detail(counts: dict | None) -> str:
    if not counts:
        return "no junit XML"
    text = (f"{counts['passed']} passed, {counts['failures']} failed, "
            f"{counts['errors']} errors, {counts['skipped']} skipped")
    if counts.get("failing"):
        text += "; failing: " + ", ".join(counts["failing"][:3])
    return text


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


# ------------------------------------------------------------------- probe

_PROBE = r"""
import importlib, json, sys
out = {"python": sys.version.split()[0], "executable": sys.executable,
       "versions": {}, "missing": {}}
for name in %r:
    try:
        mod = importlib.import_module(name)
        out["versions"][name] = str(getattr(mod, "__version__", "?"))
    except Exception as err:
        out["missing"][name] = "%%s: %%s" %% (type(err).__name__, err)
torch = sys.modules.get("torch")
if torch is not None:
    out["torch_cuda"] = torch.version.cuda
    try:
        out["cuda"] = bool(torch.cuda.is_available())
    except Exception as err:
        out["cuda"], out["cuda_error"] = False, repr(err)
    if out["cuda"]:
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                      "capability": "%%d.%%d" %% torch.cuda.get_device_capability(0),
                      "memory_bytes": props.total_memory,
                      "multiprocessors": props.multi_processor_count}
print("GPU_CHECK_PROBE " + json.dumps(out))
""" % (MODULES,)


def parse_probe(text: str) -> dict | None:
    for line in text.splitlines():
        if line.startswith("GPU_CHECK_PROBE "):
            return json.loads(line[len("GPU_CHECK_PROBE "):])
    return None


def decide(info: dict | None) -> tuple[str, list]:
    """("gpu" | "dry-run" | "broken", problems): what the check can run."""
    if not info:
        return "broken", ["the interpreter probe printed nothing"]
    if "torch" in info.get("missing", {}):
        return "broken", [f"torch: {info['missing']['torch']}"]
    problems = [f"{m}: {info['missing'][m]}" for m in REQUIRED if m in info.get("missing", {})]
    return ("gpu" if info.get("cuda") else "dry-run"), problems


def _nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def find_sanitizer() -> str | None:
    exe = shutil.which("compute-sanitizer")
    if exe:
        return exe
    for pattern in ("/usr/local/cuda*/bin/compute-sanitizer",
                    "/usr/local/cuda*/compute-sanitizer/compute-sanitizer",
                    "/opt/nvidia/*/compute-sanitizer"):
        hits = sorted(Path("/").glob(pattern.lstrip("/")), reverse=True)
        hits = [h for h in hits if os.access(h, os.X_OK)]
        if hits:
            return str(hits[0])
    return None


def _git() -> dict:
    def git(*args):
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"),
            "modified_files": None if status is None else len(status.splitlines())}


def probe(budget: Budget) -> tuple[Phase, dict | None]:
    limit = budget.timeout_for(*LIMITS["probe"])
    out = run_command([PY, "-c", _PROBE], limit, echo=False)
    info = parse_probe(out.output)
    mode, problems = decide(info)
    ph = Phase("probe", "pass", seconds=out.seconds, limit_s=limit, returncode=out.returncode)
    if out.timed_out:
        ph.status, ph.detail = "timeout", "the interpreter probe hung (CUDA init?)"
    elif mode == "broken" or problems:
        ph.status = "fail"
        ph.detail = "; ".join(problems) or out.output[-500:]
        ph.detail += " (PYTHON=... picks another interpreter)"
    if info:
        v = info["versions"]
        ph.detail = ph.detail or ", ".join(
            [f"torch {v.get('torch')} (CUDA {info.get('torch_cuda')})"]
            + [f"{m} {v[m]}" for m in MODULES[1:] if m in v])
        info["mode"] = mode
    return ph, info


# ----------------------------------------------------------------- install

_IMPORT_CHECK = ("import json, fused_optim, fused_optim.kernels; "
                 "print('GPU_CHECK_FILES ' + json.dumps([fused_optim.__file__, "
                 "fused_optim.kernels.__file__]))")

_SHIM = '''\
# Written by benchmarks/gpu_check.py where pip could not install the
# checkout: maps fused_optim.kernels to kernels/ as setup.py's package_dir
# does (a plain PYTHONPATH gives only fused_optim). It shadows any other
# sitecustomize for the check's subprocesses only.
import sys
from importlib.util import spec_from_file_location

KERNELS = {kernels!r}


class _KernelsFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "fused_optim.kernels":
            return None
        return spec_from_file_location(name, KERNELS + "/__init__.py",
                                       submodule_search_locations=[KERNELS])


sys.meta_path.append(_KernelsFinder)
'''


def imports_from_checkout(env, timeout: float) -> tuple[bool, str]:
    """Whether fused_optim and fused_optim.kernels import from this checkout,
    run from the repository root as pytest and the bench are."""
    try:
        out = subprocess.run([PY, "-c", _IMPORT_CHECK], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return False, "import check timed out"
    for line in out.stdout.splitlines():
        if line.startswith("GPU_CHECK_FILES "):
            pkg, kernels = (Path(p).resolve() for p in json.loads(line[16:]))
            ok = (pkg.is_relative_to(REPO / "fused_optim")
                  and kernels.is_relative_to(REPO / "kernels"))
            return ok, "" if ok else f"imports from elsewhere: {pkg}, {kernels}"
    return False, (out.stderr.strip().splitlines() or ["import failed"])[-1]


def install(budget: Budget, how: str, env: dict, logs: Path, shim_dir: Path) -> tuple[Phase, dict]:
    """Make ``import fused_optim.kernels`` work from this checkout; returns the
    phase and the environment every later phase runs with."""
    start = time.monotonic()
    limit = budget.timeout_for(*LIMITS["install"])
    ph = Phase("install", "fail", limit_s=limit, log=str(logs / "install.log"))
    notes = []

    def done(status, detail):
        ph.status, ph.detail = status, "; ".join(notes + [detail])
        ph.seconds = time.monotonic() - start
        return ph, env

    if how == "none":
        ok, why = imports_from_checkout(env, limit)
        return done("pass" if ok else "fail", "no install asked" + ("" if ok else f": {why}"))
    if how == "auto":
        ok, why = imports_from_checkout(env, limit)
        if ok:
            return done("pass", "already importable from this checkout (no install)")
    if how in ("auto", "pip"):
        pip_env = dict(env, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore")
        cmd = [PY, "-m", "pip", "install", "-e", ".", "--no-deps", "--no-build-isolation",
               "--no-index"]
        out = run_command(cmd, budget.timeout_for(limit - (time.monotonic() - start)),
                          logs / "install.log", env=pip_env, echo=False)
        ph.command = shlex.join(cmd)
        ok, why = imports_from_checkout(env, budget.timeout_for(30))
        if ok and out.returncode == 0:
            return done("pass", "pip install -e . --no-deps --no-build-isolation")
        lines = out.output.strip().splitlines() or ["no output"]
        why_pip = [ln.strip() for ln in lines if "error" in ln.lower()] or lines
        notes.append(f"pip install failed ({'timeout' if out.timed_out else why_pip[-1][:120]})")
        if how == "pip":
            return done("fail", why)
    shim_dir.mkdir(parents=True, exist_ok=True)
    (shim_dir / "sitecustomize.py").write_text(_SHIM.format(kernels=str(REPO / "kernels")))
    path = [str(shim_dir), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env = dict(env, PYTHONPATH=os.pathsep.join(path))
    ok, why = imports_from_checkout(env, budget.timeout_for(30))
    return done("pass" if ok else "fail",
                f"PYTHONPATH={shim_dir} (sitecustomize shim) + repository root"
                + ("" if ok else f": {why}"))


# ------------------------------------------------------------------ phases


def _limited(name: str, budget: Budget) -> tuple[float, Phase | None]:
    limit = budget.timeout_for(*LIMITS[name])
    if limit < 5:
        return limit, Phase(name, "timeout", f"not run: {budget.total_s:.0f} s budget spent",
                            limit_s=limit)
    return limit, None


def pytest_phase(name: str, args: list, budget: Budget, env: dict, logs: Path,
                 wrap: list = (), collect_only: bool = False) -> Phase:
    limit, late = _limited(name, budget)
    if late:
        return late
    xml = logs / f"{name}.xml"
    cmd = [*wrap, *PYTEST, *args]
    if collect_only:
        cmd.append("--collect-only")
    else:
        cmd += ["--durations=25", "-rfE", f"--junitxml={xml}"]
    if xml.exists():
        xml.unlink()
    out = run_command(cmd, limit, logs / f"{name}.log", env=env, echo=not collect_only)
    ph = Phase(name, "pass", seconds=out.seconds, limit_s=limit, returncode=out.returncode,
               command=shlex.join(map(str, cmd)), log=str(logs / f"{name}.log"))
    if collect_only:
        n = collected_count(out.output)
        cuda = len(re.findall(r"^tests/test_cuda\.py::", out.output, re.MULTILINE))
        ph.extra = {"collected": n, "from_test_cuda": cuda}
        ph.detail = f"{n} tests collected ({cuda} from test_cuda.py)"
        if out.returncode != 0 or not n:
            ph.status = "fail"
            ph.detail += f"; pytest exit {out.returncode}"
    else:
        ph.tests = junit_counts(xml)
        ph.extra = {"slowest": slowest(out.output), "junit": str(xml)}
        ph.detail = tests_detail(ph.tests)
        if out.returncode != 0:
            ph.status = "fail"
            if out.returncode == 5:
                ph.detail = "no tests selected"
        elif ph.tests and not ph.tests["passed"]:
            # e.g. a module-level importorskip: green, and nothing checked
            ph.status, ph.detail = "fail", "no test passed; " + ph.detail
    if out.timed_out:
        ph.status = "timeout"
        ph.detail = f"stopped after {limit:.0f} s; " + ph.detail
    ph.extra["output"] = out.output
    return ph


def sanitizer_phase(budget: Budget, env: dict, logs: Path, exe: str | None,
                    dry: bool) -> Phase:
    args = ["tests/test_cuda.py", "-k", SANITIZER_K]
    where = exe or "not available"
    if dry:
        ph = pytest_phase("sanitizer-select", args, budget, env, logs, collect_only=True)
        if ph.status == "pass":
            ph.status = "skipped"
        ph.detail = f"no GPU; compute-sanitizer: {where}; would run: " + ph.detail
        return ph
    if not exe:
        return Phase("sanitizer", "n/a", "compute-sanitizer not available (PATH, "
                     "/usr/local/cuda*/bin): not run")
    ph = pytest_phase("sanitizer", args, budget, dict(env, **SANITIZER_ENV), logs,
                      wrap=[exe, "--tool", "memcheck"])
    if "output" not in ph.extra:  # never started: the budget was spent
        return ph
    errors = sanitizer_errors(ph.extra["output"])
    ph.extra.update(sanitizer=exe, errors=errors, selection=f"-k {SANITIZER_K!r}",
                    caching_allocator="off")
    if errors:
        ph.status = "fail"
        ph.detail = f"memcheck: {errors} errors; " + ph.detail
    elif errors is None:
        if ph.status == "pass":
            ph.status = "fail"
        ph.detail = "memcheck: no ERROR SUMMARY; " + ph.detail
    else:
        ph.detail = "memcheck: 0 errors; " + ph.detail
    return ph


def bench_phase(name: str, args: list, budget: Budget, env: dict, logs: Path,
                gpu: bool) -> tuple[Phase, dict | None]:
    limit, late = _limited(name, budget)
    if late:
        return late, None
    path = logs / f"{name}.json"
    if path.exists():
        path.unlink()
    cmd = [PY, "-m", "fused_optim", *args, "--json", str(path)]
    out = run_command(cmd, limit, logs / f"{name}.log", env=env)
    ph = Phase(name, "pass", seconds=out.seconds, limit_s=limit, returncode=out.returncode,
               command=shlex.join(map(str, cmd)), log=str(logs / f"{name}.log"))
    doc = None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        ph.status, ph.detail = "fail", f"no bench JSON ({type(err).__name__})"
    if doc is not None:
        rows, problems, fields = summarise_bench(doc, require_triton=gpu)
        ph.extra = {"rows": rows, "problems": problems, "result_fields": fields}
        ph.detail = f"{len(rows)} case{'s' * (len(rows) != 1)}"
        if problems:
            ph.status = "fail"
            ph.detail += f"; {len(problems)} problems, first: {problems[0]}"
    if out.returncode != 0:
        ph.status = "fail"
        last = (out.output.strip().splitlines() or [""])[-1]
        ph.detail = f"exit {out.returncode}: {last[:200]}; " + ph.detail
    if out.timed_out:
        ph.status, ph.detail = "timeout", f"stopped after {limit:.0f} s; " + ph.detail
    return ph, doc


# ------------------------------------------------------------- bench JSON

_OURS = ("triton", "numba", "torch")


def _items(x):
    if isinstance(x, dict):
        return list(x.items())
    if isinstance(x, list):
        return [(str(v), "") for v in x]
    return []


def _num(r: dict | None, key: str, scale: float = 1.0):
    v = (r or {}).get(key)
    return v * scale if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def summarise_bench(doc, require_triton: bool) -> tuple[list, list, list]:
    """Rows (one per case: fused_optim's backend against torch fused),
    problems (failed implementations; on a GPU a case without triton), and
    every per-result field the JSON has, whatever its schema."""
    cases = doc.get("cases") if isinstance(doc, dict) else None
    if not isinstance(cases, list):
        return [], ["bench JSON has no 'cases' list"], []
    rows, problems, fields = [], [], set()
    for c in cases:
        if not isinstance(c, dict):
            continue
        label = " ".join(str(c.get(k, "?")) for k in ("list", "optimizer", "dtype", "device"))
        results = {}
        for r in c.get("results") or []:
            if isinstance(r, dict):
                fields.update(r)
                results[r.get("impl")] = r
        for impl, why in _items(c.get("failed")):
            problems.append(f"{label}: {impl} failed {why}".strip())
        if require_triton and "triton" not in results:
            why = dict(_items(c.get("skipped"))).get("triton", "not in the results")
            problems.append(f"{label}: no triton result ({why})")
        impl = next((i for i in _OURS if i in results), None)
        ours, fused = results.get(impl), results.get("fused")
        rows.append({"case": label, "impl": impl,
                     "ms": _num(ours, "median_s", 1e3), "fused_ms": _num(fused, "median_s", 1e3),
                     "vs_fused": _num(ours, "ratio_vs_fused"), "gb_s": _num(ours, "gb_per_s"),
                     "pct_ceiling": _num(ours, "pct_ceiling"), "pct_copy": _num(ours, "pct_copy"),
                     "host_ms": _num(ours, "host_median_s", 1e3)})
    return rows, problems, sorted(fields)


def _fmt(v, spec="{:.3g}") -> str:
    return "-" if v is None else spec.format(v)


def bench_table(rows: list) -> list:
    head = ["case", "impl", "ms", "fused ms", "vs fused", "GB/s", "% ceil", "% copy", "host ms"]
    body = [[r["case"], r["impl"] or "-", _fmt(r["ms"]), _fmt(r["fused_ms"]),
             _fmt(r["vs_fused"], "{:.2f}x"), _fmt(r["gb_s"]), _fmt(r["pct_ceiling"], "{:.0f}"),
             _fmt(r["pct_copy"], "{:.0f}"), _fmt(r["host_ms"])] for r in rows]
    return _table(head, body)


def _table(head: list, body: list) -> list:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]


# ---------------------------------------------------------------- summary


def exit_code(phases: list) -> int:
    return 1 if any(p.status in FAILING for p in phases) else 0


def summary_lines(section: dict, phases: list, bench_rows: list) -> list:
    dry = section["dry_run"]
    title = {"gpu": f"gpu-check on {section['gpu_name']}",
             "dry-run": "gpu-check: DRY RUN, no GPU present"}.get(
                 section.get("mode"), "gpu-check: the interpreter cannot run the check")
    lines = [title, f"python {section.get('python')} ({section.get('executable')})"]
    body = [[p.name, p.status, f"{p.seconds:.0f}",
             "-" if p.limit_s is None else f"{p.limit_s:.0f}", p.detail] for p in phases]
    lines += _table(["phase", "status", "secs", "limit", "detail"], body)
    if bench_rows:
        lines += ["", "bench (fused_optim's backend; ms per step, medians):"]
        lines += bench_table(bench_rows)
    if section.get("bench_result_fields"):
        lines.append("bench result fields: " + ", ".join(section["bench_result_fields"]))
    failed = [p.name for p in phases if p.status in FAILING]
    if failed:
        verdict = f"FAILED: {', '.join(failed)}"
    elif dry and section.get("mode") == "dry-run":
        verdict = ("dry run passed: no GPU, so the CUDA tests, the sanitizer and the "
                   "CUDA benchmark did not run")
    else:
        verdict = "passed"
    lines += ["", f"result: {verdict} ({section['seconds']:.0f} s of {section['budget_s']:.0f} s)"]
    return lines


def write_results(out_dir: Path, name: str, bench_doc: dict | None, section: dict,
                  text: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = dict(bench_doc) if isinstance(bench_doc, dict) else {}
    doc["gpu_check"] = section
    json_path, txt_path = out_dir / f"{name}.json", out_dir / f"{name}-summary.txt"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    txt_path.write_text(text + "\n")
    return json_path, txt_path


def make_section(info: dict | None, phases: list, *, dry: bool, budget: Budget,
                 started: float, extra: dict) -> dict:
    info = info or {}
    by_name = {p.name: p for p in phases}
    san = by_name.get("sanitizer") or by_name.get("sanitizer-select")
    return {
        "schema": 1, "dry_run": dry, "ok": exit_code(phases) == 0,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": time.monotonic() - started, "budget_s": budget.total_s,
        "host": platform.node(), "python": info.get("python"),
        "executable": info.get("executable"), "versions": info.get("versions", {}),
        "missing": info.get("missing", {}), "torch_cuda": info.get("torch_cuda"),
        "gpu": info.get("gpu"), "gpu_name": (info.get("gpu") or {}).get("name"),
        "phases": [{k: v for k, v in asdict(p).items() if k != "extra"}
                   | {k: v for k, v in p.extra.items() if k not in ("output", "rows")}
                   for p in phases],
        "tests": {p.name: p.tests for p in phases if p.tests is not None},
        "sanitizer": None if san is None else {"status": san.status, "detail": san.detail,
                                               "errors": san.extra.get("errors")},
        **extra,
    }


# ------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT"),
                   help="results folder (env GPU_CHECK_OUT; default benchmarks/results, "
                   "build/gpu-check for a dry run)")
    p.add_argument("--budget", type=float,
                   default=float(os.environ.get("GPU_CHECK_BUDGET_S", BUDGET_S)),
                   help="seconds for the whole check (env GPU_CHECK_BUDGET_S; default 480)")
    p.add_argument("--install", choices=("auto", "pip", "shim", "none"),
                   default=os.environ.get("GPU_CHECK_INSTALL", "auto"),
                   help="auto: nothing if this checkout already imports, else pip, else shim")
    p.add_argument("--bench-args", default=os.environ.get("GPU_CHECK_BENCH_ARGS", ""),
                   help="extra arguments for the bench command (e.g. '--rounds 10')")
    p.add_argument("--only", help="comma-separated phases after probe and install "
                   f"(GPU: {','.join(GPU_PHASES)}; dry run: {','.join(DRY_PHASES)})")
    args = p.parse_args(argv)
    started = time.monotonic()
    budget = Budget(args.budget)

    print(f"gpu-check: probing {PY}", flush=True)
    probe_ph, info = probe(budget)
    mode = (info or {}).get("mode", "broken")
    dry = mode != "gpu"
    gpu = (info or {}).get("gpu") or {}
    name = slug(gpu["name"]) if gpu else "no-gpu"
    default_out = REPO / ("build/gpu-check" if dry else "benchmarks/results")
    out_dir = Path(args.out) if args.out else default_out
    logs = (out_dir if args.out else REPO / "build" / "gpu-check") / f"{name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "probe.log").write_text(json.dumps(info, indent=1) + "\n")
    probe_ph.log = str(logs / "probe.log")
    phases = [probe_ph]
    if info:
        print(f"python {info['python']}: " + probe_ph.detail)
    smi = _nvidia_smi() if mode == "gpu" else None
    if mode == "gpu":
        print(f"GPU: {gpu.get('name')} x{gpu.get('count')}, sm_{gpu.get('capability')}, "
              f"{gpu.get('memory_bytes', 0) / 2**30:.0f} GiB; nvidia-smi: {smi}")
    elif mode == "dry-run":
        print("no GPU present: dry run (torch.cuda.is_available() is False"
              + (f": {info['cuda_error']}" if info.get("cuda_error") else "") + ")")
    extra = {"mode": mode, "git": _git(), "nvidia_smi": smi,
             "sanitizer_path": find_sanitizer()}

    env = dict(os.environ)
    if not dry:
        # an inherited TRITON_INTERPRET=1 would run the GPU tests interpreted
        env.pop("TRITON_INTERPRET", None)
    bench_doc = None
    only = set(args.only.split(",")) if args.only else None
    wanted = lambda n: only is None or n in only
    if probe_ph.status == "pass":
        inst, env = install(budget, args.install, env, logs, REPO / "build/gpu-check/shim")
        phases.append(inst)
        print(f"install: {inst.status}: {inst.detail}", flush=True)
        extra["install"] = inst.detail
        if inst.status == "pass" and dry:
            if wanted("compile"):
                phases.append(pytest_phase("compile", ["tests/test_triton_compile.py"],
                                           budget, env, logs))
            if wanted("collect"):
                phases.append(pytest_phase("collect", [*GPU_TEST_FILES, "-k", GPU_TEST_K],
                                           budget, env, logs, collect_only=True))
            if wanted("sanitizer-select"):
                phases.append(sanitizer_phase(budget, env, logs, extra["sanitizer_path"], True))
            if wanted("bench-smoke"):
                ph, bench_doc = bench_phase("bench-smoke", BENCH + BENCH_SMOKE, budget, env,
                                            logs, gpu=False)
                phases.append(ph)
        elif inst.status == "pass":
            if wanted("tests"):
                phases.append(pytest_phase("tests", [*GPU_TEST_FILES, "-k", GPU_TEST_K],
                                           budget, env, logs))
            if wanted("bench"):
                ph, bench_doc = bench_phase("bench", BENCH + shlex.split(args.bench_args),
                                            budget, env, logs, gpu=True)
                phases.append(ph)
            if wanted("sanitizer"):
                phases.append(sanitizer_phase(budget, env, logs, extra["sanitizer_path"], False))

    bench_ph = next((p for p in phases if p.name.startswith("bench")), None)
    rows = bench_ph.extra.get("rows", []) if bench_ph else []
    extra["bench_result_fields"] = bench_ph.extra.get("result_fields") if bench_ph else None
    section = make_section(info, phases, dry=dry, budget=budget, started=started, extra=extra)
    text = "\n".join(summary_lines(section, phases, rows))
    json_path, txt_path = write_results(out_dir, name, bench_doc, section, text)
    print("\n" + text)
    print(f"written: {json_path}, {txt_path}; logs: {logs}")
    return exit_code(phases)


if __name__ == "__main__":
    sys.exit(main())
