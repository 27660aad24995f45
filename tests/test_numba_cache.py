"""The Numba backend's disk cache is dropped when an inlined source changed
(kernels/numba/_disk_cache.py): numba itself keys a kernel on its own file only."""

import types

from fused_optim.kernels.numba import _disk_cache


def _fake(path):
    return types.SimpleNamespace(_cache=types.SimpleNamespace(_cache_path=str(path)))


def test_stale_cache_is_cleared_once_and_only_ours(tmp_path):
    ours = ["sgd.sgd_serial-73.py311.nbi", "sgd.sgd_serial-73.py311.1.nbc",
            "_walk.x-1.py311.nbi", "adagrad.adagrad_parallel-75.py311.3.nbc"]
    theirs = ["userlib.f-1.py311.nbi", "sgd.pyc"]
    for name in ours + theirs:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / _disk_cache._STAMP).write_text("an older digest")
    assert _disk_cache.check(_fake(tmp_path)) is True
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(theirs + [_disk_cache._STAMP])
    assert (tmp_path / _disk_cache._STAMP).read_text() == _disk_cache.digest()
    (tmp_path / "sgd.sgd_serial-73.py311.nbi").write_bytes(b"x")  # compiled since
    assert _disk_cache.check(_fake(tmp_path)) is False  # the stamp matches: kept
    assert (tmp_path / "sgd.sgd_serial-73.py311.nbi").exists()


def test_digest_covers_every_inlined_source():
    names = {p.rsplit("/", 1)[-1] for p in _disk_cache.sources()}
    assert {"_walk.py", "_memory.py", "_precision.py", "sgd.py", "adam.py", "adagrad.py",
            "rmsprop.py", "columns.py", "steps.py"} <= names


def test_no_cache_directory_yet_is_fine(tmp_path):
    assert _disk_cache.check(_fake(tmp_path / "missing")) is False
    # stamped at once: concurrent first processes then keep each other's kernels
    assert (tmp_path / "missing" / _disk_cache._STAMP).read_text() == _disk_cache.digest()
    (tmp_path / "missing" / "sgd.sgd_serial-73.py311.nbi").write_bytes(b"x")
    assert _disk_cache.check(_fake(tmp_path / "missing")) is False
    assert (tmp_path / "missing" / "sgd.sgd_serial-73.py311.nbi").exists()
