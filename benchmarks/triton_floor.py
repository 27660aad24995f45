"""Which Triton versions compile the kernels cleanly: the floor for ``triton>=``.

For each ``--triton`` version this makes a throwaway virtualenv with the
pinned torch, numpy, numba and that triton, installs a snapshot of the
working tree into it (``pip install --no-deps``), and runs the covering subset
of ``tests/_compile_matrix.py --check`` for sm_80 and sm_90: every
specialization must compile, with IEEE division and square root, no ``.ftz``
float32 math, no local memory and 128-bit accesses where ALIGNED. No GPU is
needed. One verdict line per version; the exit status is 1 if any failed.

The floor was established with (107 to 346 s a version on the 2-core VM, two
runs at a time, most of it installing torch):

    python benchmarks/triton_floor.py --torch-spec torch==2.13.0 \\
        --triton 3.0.0 --triton 3.1.0 --triton 3.2.0 --triton 3.3.1 \\
        --triton 3.4.0 --triton 3.5.1 --triton 3.6.0 --triton 3.7.1 \\
        --triton 3.8.0 --triton 3.9.0

At 5254595: 3.6.0 and later pass; 3.2 to 3.5 compile, but their div_rn and
sqrt_rn go through libdevice with FTZ on (div.rn.ftz.f32); 3.0 and 3.1 do
not compile (``tl.pointer_type`` of a constexpr).

The harness is written for current Triton; a shim run inside the venv
(``_SHIM`` below) adapts what older releases changed: ``ASTSource``'s
arguments before 3.3, and how ``get_ptxas`` is found and called.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_SHIM = r'''
import collections, inspect, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
import triton
import triton.backends.nvidia.compiler as nv
import triton.compiler as tc
import _compile_matrix as cm

# The harness calls get_ptxas(arch).path. Before 3.3 there is no get_ptxas;
# 3.3's returns a (path, version) tuple; 3.4's takes no arch. Triton calls
# it too, so the replacement must also answer as the original did.
_Ptxas = collections.namedtuple("_Ptxas", "path version")
_orig = getattr(nv, "get_ptxas", None)
_takes_arch = _orig is not None and bool(inspect.signature(_orig).parameters)
if not _takes_arch or not hasattr(_orig(80), "path"):
    def _get_ptxas(arch=None):
        if _orig is None:
            found = nv._path_to_binary("ptxas")
        else:
            found = _orig(arch) if _takes_arch else _orig()
        return found if hasattr(found, "path") else _Ptxas(*found)
    nv.get_ptxas = _get_ptxas

# Before 3.3 the signature lists only runtime arguments, and divisibility
# goes in an AttrsDescriptor (a backend-built one from 3.2) by argument index.
_ver = tuple(int(x) for x in triton.__version__.split(".")[:2])
if _ver < (3, 3):
    if _ver < (3, 2):
        from triton.compiler.compiler import AttrsDescriptor
        _attrs = lambda idx: AttrsDescriptor(divisible_by_16=set(idx))
    else:
        from triton.backends.compiler import AttrsDescriptor
        _attrs = lambda idx: AttrsDescriptor.from_hints({i: 16 for i in idx})

    def _ast(fn, signature, const, attrs):
        sig = {n: t for n, t in signature.items() if t != "constexpr"}
        return tc.ASTSource(fn, sig, const, _attrs(k[0] for k in attrs))
    cm.ASTSource = _ast

# the patches above sit at module level: the harness's spawned workers
# re-run this file, and get them too
if __name__ == "__main__":
    sys.exit(cm.main(sys.argv[2:]))
'''


def _snapshot(repo: Path, dest: Path) -> None:
    """Copy the working tree's tracked and unignored files.

    A copy, not ``pip install -e``: an editable install writes egg-info into
    the tree, and the run would see edits made to the tree while it lasts.
    """
    names = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], capture_output=True, check=True).stdout
    for name in filter(None, names.decode().split("\0")):
        src = repo / name
        if src.is_file():  # deleted but still tracked: skip
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args],
                          capture_output=True, text=True)


def _reason(err: str) -> str:
    """The last line of a traceback, with the kernel source line it points at."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        return "no output"
    last = lines[-1].strip()
    if len(lines) >= 3 and set(lines[-2].strip()) == {"^"}:
        last += f" at `{lines[-3].strip()}`"
    return last


def check(version: str, args, src: Path, work: Path) -> tuple[bool, str]:
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # one resolver pass, so that nothing can swap the pinned torch for another
    out = _pip(python, args.torch_spec, "numpy", "numba", f"triton=={version}")
    if out.returncode == 0:
        out = _pip(python, "--no-deps", str(src))
    if out.returncode:
        return False, f"install: {_reason(out.stderr)}"
    shim = work / "floor_shim.py"
    shim.write_text(_SHIM)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(work / "triton-cache")  # compiled now, not recalled
    run = subprocess.run([str(python), str(shim), str(src), "--check", "--archs", args.archs,
                          "--jobs", str(args.jobs)],
                         cwd=src, env=env, capture_output=True, text=True)
    (work / "compile_matrix.log").write_text(run.stdout + run.stderr)
    summary = next((ln[2:] for ln in run.stderr.splitlines() if ln.startswith("# triton")), "")
    if run.returncode == 0 and summary:
        return True, summary
    first = next((ln for ln in run.stdout.splitlines() if ln.strip()), None)
    if summary and first:
        return False, f"{summary}; first: {first}"
    return False, _reason(run.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triton", action="append", required=True, metavar="X.Y.Z",
                    help="a triton version to test (repeatable)")
    ap.add_argument("--torch-spec", default="torch==2.13.0",
                    help="pip requirement for torch; pin it, or pip may pull a CUDA build")
    ap.add_argument("--archs", default="80,90", help="compute capabilities (default: 80,90)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repo", type=Path, default=REPO, help="working tree to test")
    ap.add_argument("--keep", action="store_true",
                    help="keep each version's venv and compile_matrix.log")
    args = ap.parse_args(argv)

    failed = 0
    with tempfile.TemporaryDirectory(prefix="triton-floor-") as tmp:
        src = Path(tmp) / "src"
        _snapshot(args.repo.resolve(), src)
        for version in args.triton:
            work = Path(tempfile.mkdtemp(prefix=f"triton-{version}-"))
            start = time.monotonic()
            try:
                ok, what = check(version, args, src, work)
            except (subprocess.CalledProcessError, OSError) as e:
                ok, what = False, f"{type(e).__name__}: {e}"
            failed += not ok
            kept = f" [kept: {work}]" if args.keep else ""
            print(f"triton {version}: {'PASS' if ok else 'FAIL'} ({time.monotonic() - start:.0f} s)"
                  f" {what}{kept}", flush=True)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
