"""Drop Numba's disk cache of these kernels when any source they inline changed.

Numba keys a cached kernel on its own file's modification time and size
only. The kernels inline code from ``_walk``, ``_memory``, ``_precision``
and the table layout (``kernels/layout.py``), so an edit there, or a ``git
pull`` or editable install that rewrites only those files, left kernels
compiled against the old code in the cache: seen here as a Kahan buffer that
stayed zero after ``_precision`` was fixed, and a layout change (the table's
column count) would have had cached kernels read the wrong columns. So the
cache carries a stamp, the SHA-256 of every source the kernels are compiled
from; where it differs, this backend's cached kernels are deleted before
anything is compiled or loaded, and the stamp rewritten (atomically: a
concurrent process sees the old stamp or the new, and a kernel file deleted
under it is a cache miss to Numba, not an error). Installs from a wheel
rewrite every file and never needed this; checkouts do.
"""

from __future__ import annotations

import glob
import hashlib
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_STAMP = "fused_optim_kernels.stamp"


def sources() -> list:
    """Every file whose code the jitted kernels are compiled from."""
    return sorted(glob.glob(os.path.join(_HERE, "*.py"))) + [
        os.path.join(os.path.dirname(_HERE), "layout.py")]


def digest() -> str:
    h = hashlib.sha256()
    for path in sources():
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def check(dispatcher) -> bool:
    """Clear the cache directory of ``dispatcher`` (any kernel of this
    package: they share one) of this package's kernels if its stamp is not
    the sources' digest. Returns whether anything was cleared."""
    cache = getattr(dispatcher, "_cache", None)
    path = getattr(cache, "_cache_path", None)
    if not path or not os.path.isdir(path):
        return False  # nothing cached yet (numba makes the directory on first save)
    stamp = os.path.join(path, _STAMP)
    want = digest()
    try:
        with open(stamp, encoding="ascii") as f:
            if f.read().strip() == want:
                return False
    except OSError:
        pass
    modules = {os.path.splitext(os.path.basename(p))[0] for p in sources()}
    cleared = False
    for name in os.listdir(path):
        if name.endswith((".nbi", ".nbc")) and name.split(".", 1)[0] in modules:
            try:
                os.remove(os.path.join(path, name))
                cleared = True
            except OSError:
                pass  # another process removed it first
    tmp = f"{stamp}.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(want)
        os.replace(tmp, stamp)
    except OSError:
        pass  # a read-only cache: numba then uses its own fallback location
    return cleared
