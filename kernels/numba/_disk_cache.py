"""Drop Numba's disk cache of these kernels when any source they inline changed.

Numba keys a cached kernel on its own file's modification time and size
only. The kernels inline code from ``_walk``, ``_memory``, ``_precision``,
the table layout (``kernels/columns.py``), the raw-address intrinsic
(``kernels/_jit.py``) and the step arithmetic
(``kernels/steps.py``), so an edit there, or a ``git pull`` or editable
install that rewrites only those files, left kernels
compiled against the old code in the cache: seen here as a Kahan buffer that
stayed zero after ``_precision`` was fixed, and a layout change (the table's
column count) would have had cached kernels read the wrong columns. So the
cache carries a stamp, the SHA-256 of every source the kernels are compiled
from; where it differs, this backend's cached kernels are deleted before
anything is compiled or loaded, and the stamp rewritten (atomically: a
concurrent process sees the old stamp or the new, and a kernel file deleted
under it is a cache miss to Numba, not an error). Installs from a wheel
rewrite every file and never needed this; checkouts do.

Where the cache lives (:func:`choose_location`, :func:`seed`): Numba caches
next to the sources (``__pycache__``) when it can write there, else in its
user-wide directory (``~/.cache/numba``), and with neither it refuses to
import a ``cache=True`` kernel at all (a read-only install under a user
without a writable home, as in some container images). Then a per-user
directory under the system's temporary one is used instead. And where the
cache in use is not the one beside the sources but that one holds kernels
(``fused-optim warmup`` run at image build time, as root, into a tree the
training user cannot write), their files are copied over once (not into a
``NUMBA_CACHE_DIR`` the user set), so that the
warm-up is not lost on the first process (Numba keys a cached kernel by its
source file's content, so the copies are valid for these very sources).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
_STAMP = "fused_optim_kernels.stamp"


def sources() -> list:
    """Every file whose code the jitted kernels are compiled from."""
    return sorted(glob.glob(os.path.join(_HERE, "*.py"))) + [
        os.path.join(os.path.dirname(_HERE), name)
        for name in ("columns.py", "steps.py", "_jit.py",
                     os.path.join("reference", "_blockwise.py"))]


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
    if not path:
        return False
    stamp = os.path.join(path, _STAMP)
    want = digest()
    if not any(n.endswith((".nbi", ".nbc")) for n in _listdir(path)):
        # nothing cached: stamp it now, or the first processes to compile
        # into it (DDP ranks, test workers) would each find kernels without
        # a stamp and delete the ones the others had just written
        _write_stamp(stamp, want)
        return False
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
    _write_stamp(stamp, want)
    return cleared


def _listdir(path) -> list:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _write_stamp(stamp, want) -> None:
    tmp = f"{stamp}.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(stamp), exist_ok=True)
        with open(tmp, "w", encoding="ascii") as f:
            f.write(want)
        os.replace(tmp, stamp)
    except OSError:
        pass  # a read-only cache: numba then uses its own fallback location


def _probe():
    """A function of this file, for asking Numba's cache locators about it."""


def anchor():
    """A dispatcher (never compiled) whose cache directory is the one every
    kernel of this package uses: Numba chooses it by the source file's
    directory. For :func:`seed` and :func:`check`; made after
    :func:`choose_location`, which that choice depends on."""
    from numba import njit

    return njit(cache=True)(_probe)


def choose_location() -> str | None:
    """Before any kernel is decorated: make sure Numba has a writable cache.

    Returns the directory set (``numba.config.CACHE_DIR``), or None where
    Numba's own choice stands (``NUMBA_CACHE_DIR``, beside the sources, or
    its user-wide directory).
    """
    import numba
    from numba.core import caching

    if numba.config.CACHE_DIR:
        return None
    for cls in (caching.InTreeCacheLocator, caching.UserWideCacheLocator):
        try:
            if cls.from_function(_probe, __file__) is not None:
                return None
        except Exception:  # noqa: BLE001 - an unusable location
            continue
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    path = os.path.join(tempfile.gettempdir(), f"fused_optim-numba-cache-{uid}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError:
        return None  # nowhere to write: Numba's own error stands
    numba.config.CACHE_DIR = path
    return path


def seed(dispatcher, beside: str | None = None) -> int:
    """Copy this package's kernels from the cache beside the sources into
    ``dispatcher``'s cache (the one in use) where that is elsewhere and lacks
    them (``beside``: that cache, for tests). Returns the number of files copied."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return 0  # a cache of the user's choosing, as it is
    cache = getattr(dispatcher, "_cache", None)
    path = getattr(cache, "_cache_path", None)
    beside = beside or os.path.join(_HERE, "__pycache__")
    if not path or os.path.abspath(path) == os.path.abspath(beside) or not os.path.isdir(beside):
        return 0
    modules = {os.path.splitext(os.path.basename(p))[0] for p in sources()}
    copied = 0
    try:
        names = os.listdir(beside)
        os.makedirs(path, exist_ok=True)
    except OSError:
        return 0
    for name in names:
        ours = name == _STAMP or (name.endswith((".nbi", ".nbc"))
                                  and name.split(".", 1)[0] in modules)
        dest = os.path.join(path, name)
        if not ours or os.path.exists(dest):
            continue
        tmp = f"{dest}.{os.getpid()}.tmp"
        try:
            shutil.copyfile(os.path.join(beside, name), tmp)
            os.replace(tmp, dest)  # whole files only, for concurrent readers
            copied += 1
        except OSError:
            try:
                os.remove(tmp)
            except OSError:
                pass
    return copied
