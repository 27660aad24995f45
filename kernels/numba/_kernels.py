"""Former home of the Numba kernels, kept so that existing imports work.

The row walk and spans are now in ``_walk``, each optimizer's element math,
entry points and launcher in ``sgd.py`` / ``adam.py``. New code should import
from those.
"""

from ._walk import grad as _grad, view as _view  # noqa: F401
from .adam import (_adam_element, _adam_scalars, _div_by_row_constant,  # noqa: F401
                   _nanmax, adam_parallel, adam_serial, host_step_scalars)
from .sgd import _sgd_element, sgd_parallel, sgd_serial  # noqa: F401
