"""Step counters: advancing them, and the per-row scalars torch derives from a step.

Written once for every backend. The Numba kernels inline these helpers in
their row pass (``kernels/numba/<name>.py``); the Triton launchers call the
host entry points (``*_host_steps``) for counters that live in host memory,
torch's default for CUDA params, where a GPU kernel cannot reach them.
(Device-side counters are advanced by each Triton optimizer's step kernel,
with the same float64 arithmetic.)

A counter is read and written through the address table: column ``STEP``,
float64 where ``FLAG_STEP_F64`` is set, else float32 (advanced in float32,
as torch's ``step += 1``). The scalars are float64 arithmetic on the
advanced step, as torch's for-loop does in Python. Rows with no elements
count their step too.

Compiled with Numba rather than written in NumPy: the NumPy version (commit
9a5c7bf, reverted in a431889) took ~20 us per call for 160 rows against
~5 us for these loops (both 4.7 us for Adam's, before and after the move
here). The host entry points are cached on disk: compiled in each process
they cost 1.5-2 s on the first host-side step, against 0.1 s to load.
"""

from __future__ import annotations

import math

import numpy as np
from numba import carray, njit

from . import columns as L
from ._jit import HELPER, address, light_loads

__all__ = ["advance", "adam_scalars", "adagrad_scalars", "adamax_scalars", "radam_scalars",
           "nadam_scalars", "advance_host_steps", "adam_host_steps", "adagrad_host_steps",
           "adamax_host_steps", "radam_host_steps", "nadam_host_steps", "asgd_scalars",
           "asgd_host_steps", "ETA_F64", "ETA_AS_F32", "ETA_TENSOR_F32", "LR_F64", "LR_F32",
           "LR_BF16", "LR_F16"]

#: ``lr_round``: the dtype torch's loop computes Adagrad's clr in (a Tensor
#: lr's dtype); LR_F64 also for a float lr
LR_F64, LR_F32, LR_BF16, LR_F16 = 0, 1, 2, 3
_BF16_MAX = 3.3895313892515355e38
_F16_MAX = 65504.0


@njit(**HELPER)
def _advance_row(table, row):
    """Advance row ``row``'s counter by one; returns the new step as float64."""
    if table[row, L.FLAGS] & L.FLAG_STEP_F64:
        s64 = carray(address(table[row, L.STEP]), (1,), np.float64)
        s64[0] += 1.0
        return s64[0]
    s32 = carray(address(table[row, L.STEP]), (1,), np.float32)
    s32[0] += np.float32(1.0)
    return np.float64(s32[0])


@njit(**HELPER)
def advance(table):
    """Advance every row's step counter by one (RMSprop: the step is only counted)."""
    for row in range(table.shape[0]):
        _advance_row(table, row)


@njit(**HELPER)
def adam_scalars(table, lr, beta1, beta2, out):
    """Advance every row's step; Adam's bias-corrected scalars per row.

    ``out[row]``: step size, sqrt of the second bias correction, stored in
    ``out``'s dtype (the Numba kernels' compute type; float64 on the host).
    A third column, where ``out`` has one, gets RN(1 / the second), for the
    Numba kernel's division by a row constant (``numba.adam``).
    """
    one = np.ones_like(out[0:1, 0])[0]
    for row in range(table.shape[0]):
        step = _advance_row(table, row)
        out[row, 0] = lr / (1.0 - beta1 ** step)
        out[row, 1] = (1.0 - beta2 ** step) ** 0.5
        if out.shape[1] > 2:
            out[row, 2] = one / out[row, 1]


@njit(**HELPER)
def _round_to(x, sig, emin, big):
    """``x`` rounded to nearest-even with ``sig`` significant bits.

    Exponents below ``emin`` (frexp's) keep that exponent's quantum (the
    format's subnormals); beyond ``big`` (the largest finite), infinity: an
    IEEE conversion to float16 (11, -13) or bfloat16 (8, -125).
    """
    if x != x or x == 0.0 or np.isinf(x):
        return x
    e = math.frexp(x)[1]
    if e < emin:
        e = emin
    r = math.ldexp(np.rint(math.ldexp(x, sig - e)), e - sig)
    if abs(r) > big:
        return math.copysign(np.inf, r)
    return r


@njit(**HELPER)
def _clr(lr, d, lr_round):
    """torch's ``lr / d`` for a float lr (float64) or a Tensor lr of dtype ``lr_round``."""
    if lr_round == LR_F64:
        return lr / d
    q = np.float64(np.float32(lr) / np.float32(d))  # float32 math (opmath for both)
    if lr_round == LR_BF16:
        return _round_to(q, 8, -125, _BF16_MAX)
    if lr_round == LR_F16:
        return _round_to(q, 11, -13, _F16_MAX)
    return q


@njit(**HELPER)
def adagrad_scalars(table, lr, lr_decay, lr_round, out):
    """Advance every row's step; ``out[row, 0]`` = Adagrad's clr for that step.

    ``clr = lr / (1 + (step - 1) * lr_decay)`` in the dtype ``lr_round``
    names, as torch's loop computes it (``_clr``).
    """
    for row in range(table.shape[0]):
        step = _advance_row(table, row)
        out[row, 0] = _clr(lr, 1.0 + (step - 1.0) * lr_decay, lr_round)


@njit(**HELPER)
def adamax_scalars(table, lr, beta1, lr_round, out):
    """Advance every row's step; ``out[row, 0]`` = Adamax's ``clr = lr / (1 - beta1**step)``.

    In the dtype ``lr_round`` names, as torch's loop computes it (``_clr``).
    """
    for row in range(table.shape[0]):
        step = _advance_row(table, row)
        out[row, 0] = _clr(lr, 1.0 - beta1 ** step, lr_round)


@njit(**HELPER)
def radam_scalars(table, beta1, beta2, out):
    """Advance every row's step; RAdam's per-row scalars, as torch's loop computes them.

    ``out[row]``: the first bias correction, the square root of the second,
    and the rectification term where torch's ``rho_t > 5`` holds for the
    row's step (positive), else -1.0: the per-step switch, per row.
    """
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    for row in range(table.shape[0]):
        step = _advance_row(table, row)
        b2_pow = beta2 ** step
        bc2 = 1.0 - b2_pow
        out[row, 0] = 1.0 - beta1 ** step
        out[row, 1] = bc2 ** 0.5
        rho_t = rho_inf - 2.0 * step * b2_pow / bc2
        if rho_t > 5.0:
            out[row, 2] = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                           / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)) ** 0.5
        else:
            out[row, 2] = -1.0


@njit(**HELPER)
def nadam_scalars(table, lr, beta1, beta2, momentum_decay, col, out):
    """Advance every row's step and ``mu_product``; NAdam's per-row scalars.

    ``mu_product`` is the row's 0-dim scalar state in column ``col``
    (float64 where ``FLAG_SCALAR_F64``, else float32): multiplied by ``mu``
    in its own dtype, as torch's ``mu_product *= mu``. ``out[row]``: the
    second bias correction and the two ``addcdiv`` values of torch's loop,
    ``-lr * (1 - mu) / (1 - mu_product)`` and ``-lr * mu_next / (1 -
    mu_product * mu_next)``, in float64 from the advanced step.
    """
    for row in range(table.shape[0]):
        step = _advance_row(table, row)
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1.0) * momentum_decay)))
        if table[row, L.FLAGS] & L.FLAG_SCALAR_F64:
            m64 = carray(address(table[row, col]), (1,), np.float64)
            m64[0] *= mu
            prod = m64[0]
        else:
            m32 = carray(address(table[row, col]), (1,), np.float32)
            m32[0] *= np.float32(mu)
            prod = np.float64(m32[0])
        out[row, 0] = 1.0 - beta2 ** step
        out[row, 1] = -lr * (1.0 - mu) / (1.0 - prod)
        out[row, 2] = (-lr * mu_next) / (1.0 - prod * mu_next)


@njit(**HELPER)
def _scalar_state(table, row, col):
    """Row ``row``'s per-row scalar state in column ``col``, as float64."""
    if table[row, L.FLAGS] & L.FLAG_SCALAR_F64:
        return carray(address(table[row, col]), (1,), np.float64)[0]
    return np.float64(carray(address(table[row, col]), (1,), np.float32)[0])


@njit(**HELPER)
def _set_scalar_state(table, row, col, value):
    """Store ``value`` into row ``row``'s scalar state in column ``col`` (its dtype)."""
    if table[row, L.FLAGS] & L.FLAG_SCALAR_F64:
        carray(address(table[row, col]), (1,), np.float64)[0] = value
    else:
        carray(address(table[row, col]), (1,), np.float32)[0] = np.float32(value)


#: ``eta_round``: how torch's loop computes ASGD's next eta: Python float
#: arithmetic kept in float64 (a float64 Tensor lr), the same rounded to
#: float32 (a float lr: ``torch.as_tensor`` in the default dtype float32), or
#: float32 tensor arithmetic (a float32 Tensor lr)
ETA_F64, ETA_AS_F32, ETA_TENSOR_F32 = 0, 1, 2


@njit(**HELPER)
def _pow_f32(x, alpha):
    """torch's ``x ** alpha`` of a float32 tensor (ATen's special exponents:
    sqrt, rsqrt, reciprocal, square, cube; else std::pow in float32)."""
    if alpha == 0.5:
        return np.sqrt(x)
    if alpha == -0.5:
        return np.float32(1.0) / np.sqrt(x)
    if alpha == -1.0:
        return np.float32(1.0) / x
    if alpha == 2.0:
        return x * x
    if alpha == 3.0:
        return x * x * x
    if alpha == -2.0:
        return np.float32(1.0) / (x * x)
    return x ** np.float32(alpha)


@njit(**HELPER)
def asgd_scalars(table, lr, lambd, alpha, t0, eta_round, mu_f32, mu_col, eta_col, out):
    """Advance every row's step, ``eta`` and ``mu``; ASGD's per-row scalars.

    ``out[row]``: ``-eta``, ``1 - lambd * eta`` and ``mu`` of this step (the
    values read), as torch's loop uses them. Then, from the advanced step,
    torch's ``lr / ((1 + lambd * lr * step) ** alpha)`` as ``eta_round``
    says (ETA_F64 ...), and ``torch.as_tensor(1 / max(1, step - t0))``
    (float64, rounded to float32 where ``mu_f32``: the default dtype), each
    stored in its state's own dtype (columns ``eta_col``, ``mu_col``).
    """
    for row in range(table.shape[0]):
        eta = _scalar_state(table, row, eta_col)
        out[row, 0] = -eta
        out[row, 1] = 1.0 - lambd * eta
        out[row, 2] = _scalar_state(table, row, mu_col)
        step = _advance_row(table, row)
        if eta_round == ETA_TENSOR_F32:
            lr32 = np.float32(lr)
            base = np.float32(1.0) + np.float32(lr32 * np.float32(lambd)) * np.float32(step)
            new_eta = np.float64(lr32 / _pow_f32(base, alpha))
        else:
            new_eta = lr / ((1.0 + lambd * lr * step) ** alpha)
            if eta_round == ETA_AS_F32:
                new_eta = np.float64(np.float32(new_eta))
        d = step - t0
        new_mu = 1.0 / d if d > 1.0 else 1.0  # 1 / max(1, step - t0)
        if mu_f32 != 0:
            new_mu = np.float64(np.float32(new_mu))
        _set_scalar_state(table, row, eta_col, new_eta)
        _set_scalar_state(table, row, mu_col, new_mu)


# Numba keys a cached kernel on its own file alone, and the host entry points
# bake in these table columns: a layout change must edit this line, which
# makes their cache stale. (The Numba backend's kernels, which inline the
# helpers above, are covered by its ``_disk_cache``.)
if (L.NCOLS, L.STEP, L.FLAGS, L.FLAG_STEP_F64) != (13, 5, 8, 2):
    raise ImportError("kernels/columns.py changed the step columns: update kernels/steps.py")


def _host_entry(fn):
    try:
        return njit(cache=True, error_model="numpy")(fn)
    except RuntimeError:
        # nowhere to cache (a read-only install without a writable home,
        # before the Numba backend's _disk_cache chose a directory): compiled per process
        return njit(error_model="numpy")(fn)


@_host_entry
def _advance_host(table):
    advance(table)


@_host_entry
def _adam_host(table, lr, beta1, beta2, out):
    adam_scalars(table, lr, beta1, beta2, out)


@_host_entry
def _adagrad_host(table, lr, lr_decay, lr_round, out):
    adagrad_scalars(table, lr, lr_decay, lr_round, out)


@_host_entry
def _adamax_host(table, lr, beta1, lr_round, out):
    adamax_scalars(table, lr, beta1, lr_round, out)


@_host_entry
def _radam_host(table, beta1, beta2, out):
    radam_scalars(table, beta1, beta2, out)


@_host_entry
def _nadam_host(table, lr, beta1, beta2, momentum_decay, col, out):
    nadam_scalars(table, lr, beta1, beta2, momentum_decay, col, out)


@_host_entry
def _asgd_host(table, lr, lambd, alpha, t0, eta_round, mu_f32, mu_col, eta_col, out):
    asgd_scalars(table, lr, lambd, alpha, t0, eta_round, mu_f32, mu_col, eta_col, out)


def advance_host_steps(table) -> None:
    """Advance every row's step counter (host memory) by one, in place."""
    _advance_host(table)


def adam_host_steps(table, *, lr, beta1, beta2) -> np.ndarray:
    """Advance every row's counter (host memory); float64 ``[rows, 2]``:
    Adam's step size and sqrt of the second bias correction."""
    out = np.empty((table.shape[0], 2), dtype=np.float64)
    _adam_host(table, float(lr), float(beta1), float(beta2), out)
    return out


def adagrad_host_steps(table, *, lr, lr_decay, lr_round=LR_F64) -> np.ndarray:
    """Advance every row's counter (host memory); float64 ``[rows, 1]``:
    Adagrad's clr."""
    out = np.empty((table.shape[0], 1), dtype=np.float64)
    _adagrad_host(table, float(lr), float(lr_decay), float(lr_round), out)
    return out


def adamax_host_steps(table, *, lr, beta1, lr_round=LR_F64) -> np.ndarray:
    """Advance every row's counter (host memory); float64 ``[rows, 1]``: Adamax's clr."""
    out = np.empty((table.shape[0], 1), dtype=np.float64)
    _adamax_host(table, float(lr), float(beta1), float(lr_round), out)
    return out


def radam_host_steps(table, *, beta1, beta2) -> np.ndarray:
    """Advance every row's counter (host memory); float64 ``[rows, 3]``:
    RAdam's per-row scalars (:func:`radam_scalars`)."""
    out = np.empty((table.shape[0], 3), dtype=np.float64)
    _radam_host(table, float(beta1), float(beta2), out)
    return out


def nadam_host_steps(table, *, lr, beta1, beta2, momentum_decay, col) -> np.ndarray:
    """Advance every row's counter and ``mu_product`` (host memory, column
    ``col``); float64 ``[rows, 3]``: NAdam's per-row scalars (:func:`nadam_scalars`)."""
    out = np.empty((table.shape[0], 3), dtype=np.float64)
    _nadam_host(table, float(lr), float(beta1), float(beta2), float(momentum_decay),
                int(col), out)
    return out


def asgd_host_steps(table, *, lr, lambd, alpha, t0, eta_round, mu_f32, mu_col,
                    eta_col) -> np.ndarray:
    """Advance every row's counter, eta and mu (host memory); float64 ``[rows, 3]``:
    ASGD's per-row scalars (:func:`asgd_scalars`)."""
    out = np.empty((table.shape[0], 3), dtype=np.float64)
    _asgd_host(table, float(lr), float(lambd), float(alpha), float(t0), float(eta_round),
               float(mu_f32), int(mu_col), int(eta_col), out)
    return out


light_loads(vars())  # warm-cache loads without Numba's full refresh
