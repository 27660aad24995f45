"""Column layout of the int64 address table shared by the compiled backends.

One row per tensor. Pointer columns hold raw byte addresses (``data_ptr()``) of
tensors the API layer has checked: same shape, dtype and strides as the row's
param, dense (no gaps, no overlap), and inside their storage. A pointer of 0
means "role absent" and is never dereferenced.

=========  ==========================  ==================================
column     SGD                         Adam / AdamW
=========  ==========================  ==================================
PARAM      param                       param
GRAD       grad                        grad
STATE0     momentum_buffer             exp_avg
STATE1     (0)                         exp_avg_sq
STATE2     (0)                         max_exp_avg_sq (0 unless amsgrad)
STEP       (0)                         step scalar (float32 or float64)
NUMEL      elements in the row         elements in the row
START      first global element index  first global element index
FLAGS      FLAG_FRESH                  FLAG_STEP_F64, FLAG_STEP_HOST,
                                       FLAG_STEP_CPU
=========  ==========================  ==================================

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
NCOLS = 9

#: SGD: the momentum buffer was created this step and takes the gradient as is.
FLAG_FRESH = 1
#: Adam: the step counter is a float64 scalar (default dtype float64), else float32.
FLAG_STEP_F64 = 2
#: Adam: the step counter lives in host memory while the row's tensors do not
#: (torch's default for CUDA params): a GPU kernel cannot read it.
FLAG_STEP_HOST = 4
#: Adam: the step counter is a CPU tensor (the only host memory a backend may
#: read a FLAG_STEP_HOST counter from).
FLAG_STEP_CPU = 8

