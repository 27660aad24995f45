"""Compile the Triton kernels offline for real GPUs and read facts off the code.

Run as a script (never under ``TRITON_INTERPRET``: the interpreter replaces
``@triton.jit``), with no GPU needed: ``triton.compile`` lowers each
specialization the launchers in ``kernels/triton/<name>.py`` can produce
to PTX for a ``GPUTarget``, and the bundled ``ptxas -v`` reports registers,
stack and spills. One JSON object per (kernel, specialization, arch) on
stdout. tests/test_triton_compile.py runs a covering subset in
``make test``; ``make compile-check`` runs the whole matrix.

    python tests/_compile_matrix.py [--full] [--archs 80,90] [--dtypes float64] [--jobs 2]
        [--also '[["adam", "float32", true, {...}, 80]]']
    python tests/_compile_matrix.py [--full] --count    # specializations per arch
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

if __name__ == "__main__":  # (imported by the tests, it must leave their env alone)
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_optim.kernels.triton import _launch  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Pointer arguments and their element types; None-able ones become
#: constexpr None when the launcher passes None (its switch is off).
_SGD_PTRS = {"table_ptr": "*i64", "map_ptr": "*i32", "hyper_ptr": "*fp64",
             "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32"}
_ADAM_PTRS = {"table_ptr": "*i64", "map_ptr": "*i32", "hyper_ptr": "*fp64",
              "scal_ptr": "*fp64", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32"}
_STEPS_ARGS = {"table_ptr": "*i64", "hyper_ptr": "*fp64", "scal_ptr": "*fp64",
               "found_inf_ptr": "*fp32", "rows": "i32"}

#: The constexpr switches each launcher passes besides the storage type's and
#: ALIGNED (KAHAN and SR, off here, are checked in test_precision_kernels.py).
#: MAXIMIZE, NESTEROV, weight decay, DECOUPLED and lerp's side are runtime
#: values in the hyperparameter buffer: not specializations.
_SGD_SWITCHES = ("TAIL_ALIGNED", "USE_MOMENTUM", "HAS_GRAD_SCALE", "HAS_FOUND_INF")
_ADAM_SWITCHES = ("TAIL_ALIGNED", "AMSGRAD", "HAS_GRAD_SCALE", "HAS_FOUND_INF")
_RMSPROP_SWITCHES = ("TAIL_ALIGNED", "CENTERED", "USE_MOMENTUM", "HAS_GRAD_SCALE",
                     "HAS_FOUND_INF")
#: an update kernel whose only switches are the tail hint and AMP's
_PLAIN_SWITCHES = ("TAIL_ALIGNED", "HAS_GRAD_SCALE", "HAS_FOUND_INF")


@dataclasses.dataclass(frozen=True)
class UpdateKernel:
    """One optimizer's update kernel in the matrix: what it is and what its
    code must show.

    ``module``/``fn``: ``kernels/triton/<module>.py``'s ``@triton.jit``
    kernel; ``ptrs``: its pointer arguments; ``switches``: the constexpr
    switches its launcher passes (TAIL_ALIGNED first); ``reads``/``writes``:
    the tensor streams it loads and stores per element, given the switches
    (each a 128-bit access where ALIGNED); ``sqrt``: its float math has a
    square root (sqrt.rn); ``divides``: given the switches, it divides
    (div.rn).
    """

    module: str
    fn: str
    ptrs: dict
    switches: tuple
    reads: object
    writes: object
    sqrt: bool = True
    divides: object = lambda sw: True
    #: ``make test`` compiles it in the thin subset (:data:`THIN`), not all
    #: on and all off per dtype and ALIGNED (CI's compile budget)
    thin: bool = False

    @property
    def kernel(self):
        return getattr(importlib.import_module(f"fused_optim.kernels.triton.{self.module}"),
                       self.fn)


@dataclasses.dataclass(frozen=True)
class StepsKernel:
    """An optimizer's step kernel (device-side counters and per-row scalars):
    compiled once per found_inf switch, as float64 (it reads no tensor of
    the batch's dtype). ``sqrt``/``div``: its math has a square root / a
    division; ``thin``:
    ``make test`` compiles it with found_inf only; ``log2``: it takes a
    float64 ``tl.log2`` (see :data:`_LOG2_SEED`)."""

    module: str
    fn: str
    ptrs: dict
    sqrt: bool = True
    div: bool = True
    thin: bool = False
    log2: bool = False

    @property
    def kernel(self):
        return getattr(importlib.import_module(f"fused_optim.kernels.triton.{self.module}"),
                       self.fn)


#: The update kernels the matrix compiles: adding an optimizer's kernel to
#: it (and to ``make test``'s covering subset) is one entry here.
UPDATE_KERNELS = {
    "sgd": UpdateKernel("sgd", "_sgd_kernel", _SGD_PTRS, _SGD_SWITCHES,
                        reads=lambda sw: 2 + sw["USE_MOMENTUM"],
                        writes=lambda sw: 1 + sw["USE_MOMENTUM"], sqrt=False,
                        divides=lambda sw: sw["HAS_GRAD_SCALE"]),
    "adam": UpdateKernel("adam", "_adam_kernel", _ADAM_PTRS, _ADAM_SWITCHES,
                         reads=lambda sw: 4 + sw["AMSGRAD"],
                         writes=lambda sw: 3 + sw["AMSGRAD"]),
    "adagrad": UpdateKernel("adagrad", "_adagrad_kernel", _ADAM_PTRS, _PLAIN_SWITCHES,
                            reads=lambda sw: 3, writes=lambda sw: 2),
    "rmsprop": UpdateKernel("rmsprop", "_rmsprop_kernel", _SGD_PTRS, _RMSPROP_SWITCHES,
                            reads=lambda sw: 3 + sw["USE_MOMENTUM"] + sw["CENTERED"],
                            writes=lambda sw: 2 + sw["USE_MOMENTUM"] + sw["CENTERED"]),
    "nadam": UpdateKernel("nadam", "_nadam_kernel", _ADAM_PTRS, _PLAIN_SWITCHES,
                          reads=lambda sw: 4, writes=lambda sw: 3, thin=True),
    "radam": UpdateKernel("radam", "_radam_kernel", _ADAM_PTRS, _PLAIN_SWITCHES,
                          reads=lambda sw: 4, writes=lambda sw: 3, thin=True),
    "adamax": UpdateKernel("adamax", "_adamax_kernel", _ADAM_PTRS, _PLAIN_SWITCHES,
                           reads=lambda sw: 4, writes=lambda sw: 3, sqrt=False, thin=True),
    # param, grad and ax (loaded where it averages), param and ax stored
    "asgd": UpdateKernel("asgd", "_asgd_kernel", _ADAM_PTRS, _PLAIN_SWITCHES,
                         reads=lambda sw: 3, writes=lambda sw: 2, sqrt=False,
                         divides=lambda sw: sw["HAS_GRAD_SCALE"], thin=True),
    # (not thin: their own tests compiled all on and all off per dtype and
    # ALIGNED before they joined the matrix)
    "adadelta": UpdateKernel("adadelta", "_adadelta_kernel", _SGD_PTRS, _PLAIN_SWITCHES,
                             reads=lambda sw: 4, writes=lambda sw: 3),
    # sign-based: no division but GradScaler's 1 / scale
    "rprop": UpdateKernel("rprop", "_rprop_kernel", _SGD_PTRS, _PLAIN_SWITCHES,
                          reads=lambda sw: 4, writes=lambda sw: 3, sqrt=False,
                          divides=lambda sw: sw["HAS_GRAD_SCALE"]),
}

#: The thin covering subset of a ``thin`` update kernel: each dtype once,
#: ALIGNED (with the tail hint) and not, each with every switch on and off:
#: (dtype, ALIGNED, switches on)
THIN = (("float64", True, True), ("float32", False, True), ("bfloat16", True, False),
        ("float16", False, False))

#: The step kernels the matrix compiles (see :class:`StepsKernel`).
STEPS_KERNELS = {
    "adam_steps": StepsKernel("adam", "_adam_steps_kernel", _STEPS_ARGS),
    "adagrad_steps": StepsKernel("adagrad", "_adagrad_steps_kernel", _STEPS_ARGS, sqrt=False),
    # the counter alone (RMSprop, Adadelta, Rprop): no float math
    "count_steps": StepsKernel("_kernels", "count_steps_kernel",
                               {"table_ptr": "*i64", "found_inf_ptr": "*fp32", "rows": "i32"},
                               sqrt=False, div=False),
    "nadam_steps": StepsKernel("nadam", "_nadam_steps_kernel", _STEPS_ARGS, sqrt=False,
                               thin=True),
    "radam_steps": StepsKernel("radam", "_radam_steps_kernel", _STEPS_ARGS, thin=True),
    "adamax_steps": StepsKernel("adamax", "_adamax_steps_kernel", _STEPS_ARGS, sqrt=False,
                                thin=True),
    "asgd_steps": StepsKernel("asgd", "_asgd_steps_kernel", _STEPS_ARGS, sqrt=False,
                              thin=True, log2=True),
}


def _possible(kernel: str, aligned: bool, sw: dict) -> bool:
    """Whether the launcher can pass these switches together."""
    return aligned or not sw["TAIL_ALIGNED"]  # the tail class is a subset of the aligned one


def specializations(full: bool):
    """(kernel, dtype name, ALIGNED, switches) the launchers can produce.

    ``full``: every one. Else a covering subset for CI: per update kernel,
    dtype and ALIGNED, every switch on (TAIL_ALIGNED where aligned), and
    every switch off; a ``thin`` kernel's :data:`THIN` only. Each step
    kernel reads no tensor of the batch's dtype: listed once per found_inf
    switch, as float64 (its own math); a ``thin`` one with found_inf only.
    """
    for kernel, entry in UPDATE_KERNELS.items():
        names = entry.switches
        if entry.thin and not full:
            for dname, aligned, on in THIN:
                sw = {n: on for n in names}
                sw["TAIL_ALIGNED"] = on and aligned
                yield kernel, dname, aligned, sw
            continue
        for dname, aligned in itertools.product(DTYPES, (True, False)):
            if full:
                combos = itertools.product((False, True), repeat=len(names))
            else:  # every switch on (with the tail hint where aligned), every one off
                combos = [(aligned,) + (True,) * (len(names) - 1), (False,) * len(names)]
            for combo in combos:
                sw = dict(zip(names, combo))
                if _possible(kernel, aligned, sw):
                    yield kernel, dname, aligned, sw
    for kernel, entry in STEPS_KERNELS.items():
        for found_inf in (False, True):
            if found_inf or full or not entry.thin:
                yield kernel, "float64", False, {"HAS_FOUND_INF": found_inf}


def counts(full: bool) -> dict:
    """Specializations per arch and kernel, derived from the entries alone
    (what :func:`specializations` must yield): per dtype, ALIGNED with or
    without the tail hint or neither, times every other switch on or off
    (``full``), or all on and all off per dtype and ALIGNED (a ``thin``
    kernel: :data:`THIN`); two per step kernel (a ``thin`` one: one)."""
    out = {}
    for kernel, entry in UPDATE_KERNELS.items():
        per_dtype = 3 * 2 ** (len(entry.switches) - 1) if full else 2 * 2
        out[kernel] = len(THIN) if entry.thin and not full else len(DTYPES) * per_dtype
    for kernel, entry in STEPS_KERNELS.items():
        out[kernel] = 1 if entry.thin and not full else 2
    return out


def launcher_consts(dtype, aligned: bool, sw: dict) -> dict:
    """The constexprs an update kernel's launcher passes (see ``_launch``), besides
    its switches ``sw``."""
    out = dict(ELEM=_launch._ELEM[dtype], IS_BF16=dtype == torch.bfloat16,
               S_ELEM=_launch._ELEM[dtype], S_IS_BF16=dtype == torch.bfloat16,
               COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
               IS_F64=dtype == torch.float64, BLOCK=_launch.BLOCK, ALIGNED=aligned,
               VEC=16 // torch.empty((), dtype=dtype).element_size())
    out.update(sw)  # (the state_dtype option's S_ELEM/S_IS_BF16 among them)
    return out


def ast_source(fn, const: dict, ptrs: dict, absent: dict) -> ASTSource:
    """``fn`` as a launch specializes it: the pointer arguments of ``ptrs``
    typed (16-byte aligned, as torch's allocations are), those ``absent``
    names and every other argument constexpr (absent pointers None)."""
    signature = {}
    for name in fn.arg_names:
        if name in ptrs and not absent.get(name, False):
            signature[name] = ptrs[name]
        else:
            signature[name] = "constexpr"
            if name in ptrs:
                const[name] = None
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in signature if signature[n].startswith("*")}
    return ASTSource(fn, signature, const, attrs)


def _source(kernel: str, dname: str, aligned: bool, sw: dict) -> ASTSource:
    if kernel in STEPS_KERNELS:
        entry = STEPS_KERNELS[kernel]
        return ast_source(entry.kernel, dict(BLOCK_R=_launch._STEP_ROWS, **sw),
                          entry.ptrs, {"found_inf_ptr": not sw["HAS_FOUND_INF"]})
    entry = UPDATE_KERNELS[kernel]
    return ast_source(entry.kernel, launcher_consts(DTYPES[dname], aligned, sw), entry.ptrs,
                      {"grad_scale_ptr": not sw["HAS_GRAD_SCALE"],
                       "found_inf_ptr": not sw["HAS_FOUND_INF"]})


def _ptxas_facts(ptx: str, cap: int) -> dict:
    # the ptxas triton itself uses for this arch (3.9 ships two)
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(cap).path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
        out = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", path, "-o",
                              os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, out)) else None  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"),
            "stack_bytes": num(r"(\d+) bytes stack frame"),
            "spill_store_bytes": num(r"(\d+) bytes spill stores"),
            "spill_load_bytes": num(r"(\d+) bytes spill loads")}


#: float math the kernels must not use: Triton's default division and
#: square root are approximate, and flushing subnormals to zero is not IEEE
_INEXACT = {"div.full": r"\bdiv\.full\b", "div.approx": r"\bdiv\.approx\b",
            "sqrt.approx": r"\bsqrt\.approx\b", ".ftz": r"\.ftz\b"}


def ptx_facts(ptx: str, dname: str, cap: int) -> dict:
    """What the checks read off one kernel's PTX, and ptxas's registers,
    stack and spills."""
    width = 64 if dname == "float64" else 32
    lanes = 2 if dname == "float64" else 4
    out = {  # 128-bit accesses: v4 of 32-bit words, or v2 of 64-bit ones
        "vector_loads": len(re.findall(rf"ld\.global[.\w]*\.v{lanes}\.b{width}", ptx)),
        "vector_stores": len(re.findall(rf"st\.global[.\w]*\.v{lanes}\.b{width}", ptx)),
        "inexact": sorted(k for k, pat in _INEXACT.items() if re.search(pat, ptx)),
        "ftz_lines": len(re.findall(r"\.ftz\b", ptx)),
        "exp2_range_checks": ptx.count(_EXP2_RANGE_CHECK),
        "log2_seeds": ptx.count(_LOG2_SEED),
        "local": len(re.findall(r"\.local\b", ptx)),
        "ieee_div": len(re.findall(r"\bdiv\.rn\.f(32|64)\b", ptx)),
        "ieee_sqrt": len(re.findall(r"\bsqrt\.rn\.f(32|64)\b", ptx))}
    out.update(_ptxas_facts(ptx, cap))
    return out


def compile_ptx(src: ASTSource, cap: int, warps: int) -> str:
    """``src`` compiled for ``sm_<cap>`` as the launchers compile it."""
    return triton.compile(src, target=GPUTarget("cuda", cap, 32),
                          options={"num_warps": warps, "enable_fp_fusion": False}).asm["ptx"]


def facts(kernel: str, dname: str, aligned: bool, sw: dict, cap: int) -> dict:
    # as the launchers pass it
    warps = (_launch.NUM_WARPS if kernel in STEPS_KERNELS
             else _launch.num_warps(DTYPES[dname], aligned, sw["TAIL_ALIGNED"]))
    ptx = compile_ptx(_source(kernel, dname, aligned, sw), cap, warps)
    return {"kernel": kernel, "dtype": dname, "aligned": aligned, "switches": sw, "arch": cap,
            **ptx_facts(ptx, dname, cap)}


#: the one ``.ftz`` instruction allowed, in the step kernel only: libdevice's
#: float64 exp2 (the bias corrections of device-side steps) tests its
#: argument's range with ``abs.ftz.f32`` on the high word's bits; a bare
#: ``tl.exp2`` of a float64 compiles to the same. No float32 math is there.
_EXP2_RANGE_CHECK = "abs.ftz.f32"
#: and in a ``log2`` step kernel (ASGD's ``(1 + lambd * lr * step) ** alpha``
#: as exp2 of a log2): libdevice's float64 log2 seeds its Newton iteration,
#: refined to full precision, with an approximate reciprocal
_LOG2_SEED = "rcp.approx.ftz.f64"


def violations(r: dict) -> list:
    """What is wrong with one specialization's code (empty: nothing)."""
    sw = r["switches"]
    bad = []
    if r["stack_bytes"] or r["spill_store_bytes"] or r["spill_load_bytes"] or r["local"]:
        bad.append(f"local memory: stack {r['stack_bytes']} B, spill stores "
                   f"{r['spill_store_bytes']} B, loads {r['spill_load_bytes']} B, "
                   f"{r['local']} .local in PTX")
    steps = STEPS_KERNELS.get(r["kernel"])
    seeds = r.get("log2_seeds", 0) if steps is not None and steps.log2 else 0
    inexact = [k for k in r["inexact"]
               if not (k == ".ftz" and r["ftz_lines"] == r["exp2_range_checks"] + seeds
                       and steps is not None)]
    if inexact:
        bad.append(f"non-IEEE float math: {inexact}")
    if steps is not None:
        if (steps.div and not r["ieee_div"]) or (steps.sqrt and not r["ieee_sqrt"]):
            bad.append("no div.rn or sqrt.rn")
        return bad
    entry = UPDATE_KERNELS[r["kernel"]]
    reads, writes, divides = entry.reads(sw), entry.writes(sw), entry.divides(sw)
    if entry.sqrt and not r["ieee_sqrt"]:
        bad.append("no sqrt.rn")
    if divides and not r["ieee_div"]:
        bad.append("no div.rn")
    # the whole-block path, and with TAIL_ALIGNED the masked one too
    paths = 2 if sw["TAIL_ALIGNED"] else 1
    if r["aligned"] and (r["vector_loads"] < paths * reads
                         or r["vector_stores"] < paths * writes):
        bad.append(f"ALIGNED but {r['vector_loads']} 128-bit loads (of {reads} streams) "
                   f"and {r['vector_stores']} stores (of {writes}) in {paths} paths")
    return bad


def _run(job):
    return facts(*job)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="every specialization")
    ap.add_argument("--archs", default="80,90", help="compute capabilities (default: 80,90)")
    ap.add_argument("--dtypes", default=",".join(DTYPES),
                    help="storage dtypes of the update kernels (default: all)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--check", action="store_true",
                    help="print only violations; exit 1 if there are any")
    ap.add_argument("--also", default="[]",
                    help="JSON list of further [kernel, dtype, aligned, switches, arch] "
                         "jobs to compile after the matrix")
    ap.add_argument("--count", action="store_true",
                    help="print the number of specializations per arch and kernel; "
                         "compile nothing")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    dtypes = args.dtypes.split(",")
    specs = [spec for spec in specializations(args.full)
             if spec[0] in STEPS_KERNELS or spec[1] in dtypes]
    if args.count:
        kernels = {}
        for spec in specs:
            kernels[spec[0]] = kernels.get(spec[0], 0) + 1
        print(f"{len(specs)} per arch ({', '.join(f'{k} {n}' for k, n in kernels.items())})")
        return 0
    jobs = [(*spec, cap) for spec in specs for cap in archs]
    jobs += [tuple(job) for job in json.loads(args.also)]
    failed = 0

    def report(r):
        nonlocal failed
        bad = violations(r)
        failed += bool(bad)
        if not args.check:
            print(json.dumps(r), flush=True)
        elif bad:
            print(f"{r['kernel']} {r['dtype']} aligned={r['aligned']} sm_{r['arch']} "
                  f"{r['switches']}: {'; '.join(bad)}", flush=True)

    if args.jobs > 1:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap(_run, jobs):
                report(r)
    else:
        for job in jobs:
            report(_run(job))
    print(f"# triton {triton.__version__}: {len(jobs)} specializations compiled, "
          f"{failed} with violations", file=sys.stderr)
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
