"""Column layout of the int64 address table shared by the compiled backends.

One row per tensor. Pointer columns hold raw byte addresses (``data_ptr()``) of
tensors the API layer has checked: same shape, dtype and strides as the row's
param, dense (no gaps, no overlap), and inside their storage. A pointer of 0
means "role absent" and is never dereferenced.

Columns are generic; each optimizer says what its STATE columns hold (its
record's ``state``, in order) and whether it has a STEP counter:

=========  ===============================================================
column     holds
=========  ===============================================================
PARAM      param
GRAD       grad
STATE0..2  the optimizer's state tensors, in its record's order, 0 where a
           role is absent (SGD: momentum_buffer; Adam/AdamW: exp_avg,
           exp_avg_sq, max_exp_avg_sq (amsgrad); Adagrad: sum; RMSprop:
           square_avg, momentum_buffer, grad_avg). A role may be a per-row
           scalar instead (a 0-dim float32/float64 state, placed as the STEP
           counter: NAdam's mu_product), which only the step prologue reads
           and writes; the element walk never views its column
STEP       the per-row step counter (float32 or float64 0-dim), 0 if none
NUMEL      elements in the row
START      first global element index
FLAGS      FLAG_ROW (the optimizer's own per-row switch), the STEP
           counter's placement: FLAG_STEP_F64, FLAG_STEP_HOST, FLAG_STEP_CPU,
           and FLAG_SCALAR_F64 (the row's scalar state roles are float64)
COMP       the Kahan compensation buffer (``kahan_sum``; bfloat16/float16
           rows only), 0 if none
SCALE0..2  the float32 block scales of STATE0..2 where they are stored in
           8 bits (``state_bits=8``: uint8 codes, one scale per
           ``reference._blockwise.BLOCK`` elements), 0 otherwise
=========  ===============================================================

``START`` is the prefix sum of ``NUMEL``; the compiled kernels split the global
element range ``[0, sum(NUMEL))`` evenly among threads or program blocks.
"""

PARAM = 0
GRAD = 1
STATE0 = 2
STATE1 = 3
STATE2 = 4
STEP = 5
NUMEL = 6
START = 7
FLAGS = 8
COMP = 9
SCALE0 = 10
SCALE1 = 11
SCALE2 = 12
NCOLS = 13

#: The optimizer's own per-row switch (``row_flags`` of the API's tables).
#: SGD: the momentum buffer was created this step and takes the gradient as is.
FLAG_ROW = 1
#: The step counter is a float64 scalar (default dtype float64), else float32.
FLAG_STEP_F64 = 2
#: The step counter lives in host memory while the row's tensors do not
#: (torch's default for CUDA params): a GPU kernel cannot read it.
FLAG_STEP_HOST = 4
#: The step counter is a CPU tensor (the only host memory a backend may
#: read a FLAG_STEP_HOST counter from).
FLAG_STEP_CPU = 8
#: The row's per-row scalar state roles (0-dim state tensors in STATE
#: columns, e.g. NAdam's mu_product) are float64, else float32.
FLAG_SCALAR_F64 = 16
