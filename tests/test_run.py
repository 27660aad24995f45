"""``python -m fused_optim run`` behaves like ``python script.py`` with
torch.optim patched."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fused_optim
from fused_optim import _patch, _run

TORCH_SGD = torch.optim.SGD


def _cli():
    """The command line that runs ``fused_optim run``."""
    try:
        import fused_optim.__main__  # noqa: F401
    except ImportError:  # dispatcher not there: call the runner directly
        return [sys.executable, "-c",
                "import sys, fused_optim._run as r; sys.exit(r.main(sys.argv[1:]))"]
    return [sys.executable, "-m", "fused_optim", "run"]


def _subprocess(cmd, cwd, timeout=120):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def _write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture(autouse=True)
def clean_state():
    argv, path, main = sys.argv, list(sys.path), sys.modules["__main__"]
    yield
    assert not _patch.is_patched(), "main() left torch.optim patched"
    assert sys.argv is argv and sys.path == path and sys.modules["__main__"] is main


# ------------------------------------------------------------- subprocesses

SCRIPT = """
    import os, sys
    import torch
    import torch.optim as optim
    from torch.optim import SGD, Adam, AdamW
    from torch.optim.sgd import SGD as SGD2
    import fused_optim

    assert __name__ == "__main__", __name__
    assert sys.modules["__main__"].__dict__ is globals()
    assert __file__ == os.path.abspath(sys.argv[0]), (__file__, sys.argv)
    assert sys.path[0] == os.path.dirname(os.path.abspath(__file__)), sys.path[0]
    assert optim.SGD is SGD is SGD2 is torch.optim.SGD is fused_optim.SGD
    assert (Adam, AdamW) == (fused_optim.Adam, fused_optim.AdamW)

    import helper  # found through sys.path[0], the script's directory
    model = torch.nn.Linear(3, 1)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    print("argv", sys.argv, type(opt).__module__, helper.NAME)
    sys.exit(int(sys.argv[-1]))
"""


def test_script_runs_as_main_with_patched_optim(tmp_path):
    _write(tmp_path / "proj" / "helper.py", "NAME = 'helper'\n")
    _write(tmp_path / "proj" / "train.py", SCRIPT)
    out = _subprocess(_cli() + ["proj/train.py", "--flag", "x y", "3"], cwd=tmp_path)
    assert out.returncode == 3, out.stderr
    assert out.stdout.splitlines() == [
        "argv ['proj/train.py', '--flag', 'x y', '3'] fused_optim.sgd helper"]


def test_same_script_under_plain_python_uses_torch(tmp_path):
    script = _write(tmp_path / "t.py", """
        import torch.optim as optim
        print(optim.SGD.__module__)
    """)
    assert _subprocess([sys.executable, str(script)], cwd=tmp_path).stdout == "torch.optim.sgd\n"
    assert _subprocess(_cli() + [str(script)], cwd=tmp_path).stdout == "fused_optim.sgd\n"


TRACEBACK_SCRIPT = """
    import sys

    def inner(d):
        return d["missing"]

    def outer():
        try:
            inner({})
        except KeyError as err:
            raise ValueError("bad config") from err

    print("before", flush=True)
    outer()
"""


def test_uncaught_exception_prints_pythons_traceback(tmp_path):
    _write(tmp_path / "fail.py", TRACEBACK_SCRIPT)
    plain = _subprocess([sys.executable, "fail.py"], cwd=tmp_path)
    ours = _subprocess(_cli() + ["fail.py"], cwd=tmp_path)
    assert plain.returncode == ours.returncode == 1
    assert ours.stdout == plain.stdout == "before\n"
    assert ours.stderr == plain.stderr
    assert "fused_optim" not in ours.stderr and "runpy" not in ours.stderr


def test_console_script(tmp_path):
    exe = shutil.which("fused-optim", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("the fused-optim console script is not installed")
    _write(tmp_path / "helper.py", "NAME = 'h'\n")
    _write(tmp_path / "s.py", """
        import sys, torch.optim as optim
        import helper
        print(sys.argv, optim.Adam.__module__)
        sys.exit(4)
    """)
    out = _subprocess([exe, "run", "s.py", "a"], cwd=tmp_path)
    assert out.returncode == 4, out.stderr
    assert out.stdout == "['s.py', 'a'] fused_optim.adam\n"


def test_non_daemon_threads_still_see_the_patch(tmp_path):
    # python waits for non-daemon threads after the script body returns;
    # they may still build optimizers.
    _write(tmp_path / "threads.py", """
        import threading, time
        import torch.optim as optim

        def late():
            time.sleep(0.3)
            print(optim.AdamW.__module__, flush=True)

        threading.Thread(target=late).start()
    """)
    out = _subprocess(_cli() + ["threads.py"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "fused_optim.adam\n"


# ---------------------------------------------------------------- in-process

def _main(tmp_path, source, *args, name="script.py"):
    script = _write(tmp_path / name, source)
    return _run.main([str(script), *args])


def test_exit_codes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    assert _main(tmp_path, "import sys; sys.exit(3)") == 3
    assert _main(tmp_path, "import sys; sys.exit()") == 0
    assert _main(tmp_path, "x = 1") == 0
    assert _main(tmp_path, "raise SystemExit(0)") == 0
    assert _main(tmp_path, "import sys; sys.exit('stopping: bad input')") == 1
    assert capsys.readouterr().err == "stopping: bad input\n"
    assert _main(tmp_path, "raise KeyboardInterrupt") == 130
    assert capsys.readouterr().err.endswith("KeyboardInterrupt\n")


def test_uncaught_exception_goes_through_sys_excepthook(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *info: seen.append(info))
    assert _main(tmp_path, "raise ValueError('x')") == 1
    (etype, value, tb), = seen
    assert etype is ValueError and tb.tb_frame.f_code.co_filename == str(tmp_path / "script.py")


def test_argv_main_and_patch_inside_in_process_run(tmp_path, capsys):
    code = _main(tmp_path, """
        import sys, torch
        from torch.optim import AdamW
        from torch.optim.adam import Adam
        import torch.optim as optim
        import fused_optim
        assert (optim.SGD, Adam, AdamW) == (
            fused_optim.SGD, fused_optim.Adam, fused_optim.AdamW)
        print(__name__, sys.argv[1:], sys.modules["__main__"].__file__ == __file__)
    """, "--lr", "0.1")
    assert code == 0
    assert capsys.readouterr().out == "__main__ ['--lr', '0.1'] True\n"
    assert torch.optim.SGD is TORCH_SGD  # undone after the run


def test_in_process_traceback_has_no_runner_frames(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    assert _main(tmp_path, """
        def f():
            raise RuntimeError("kaput")
        f()
    """) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n")
    assert err.count('File "') == 2 and "_run.py" not in err
    assert err.endswith("RuntimeError: kaput\n")


def test_syntax_error_reported_like_python(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    assert _main(tmp_path, "def (\n") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert str(tmp_path / "script.py") in err and "SyntaxError" in err


def test_future_imports_of_the_runner_do_not_leak(tmp_path, capsys):
    # _run.py uses `from __future__ import annotations`; the script must not
    assert _main(tmp_path, "def f(x: int): pass\nprint(f.__annotations__['x'] is int)") == 0
    assert capsys.readouterr().out == "True\n"


def test_classes_defined_in_script_pickle(tmp_path, capsys):
    assert _main(tmp_path, """
        import io, torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(2, 2)
        buf = io.BytesIO()
        torch.save(Net(), buf)
        buf.seek(0)
        print(type(torch.load(buf, weights_only=False)).__name__)
    """) == 0
    assert capsys.readouterr().out == "Net\n"


def test_missing_script(tmp_path, capsys):
    assert _run.main([str(tmp_path / "nope.py")]) == 2
    assert "can't open file" in capsys.readouterr().err


def test_usage_errors(capsys):
    assert _run.main([]) == 2
    assert _run.main(["-m"]) == 2
    assert _run.main(["--bogus"]) == 2
    assert "usage:" in capsys.readouterr().err
    assert _run.main(["--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_module_mode(tmp_path, capsys, monkeypatch):
    _write(tmp_path / "pkg" / "__init__.py", "")
    _write(tmp_path / "pkg" / "train.py", """
        import sys, torch.optim as optim
        print(__name__, sys.argv[1:], sys.argv[0].endswith("train.py"), optim.SGD.__module__)
        sys.exit(5)
    """)
    monkeypatch.chdir(tmp_path)  # python -m puts the working directory first
    assert _run.main(["-m", "pkg.train", "a"]) == 5
    assert capsys.readouterr().out == "__main__ ['a'] True fused_optim.sgd\n"
    assert _run.main(["-m", "no_such_module_here"]) == 1
    assert "No module named" in capsys.readouterr().err


def test_double_dash_and_directory_with_main(tmp_path, capsys):
    _write(tmp_path / "app" / "__main__.py", """
        import sys, torch.optim as optim
        print(sys.argv[1:], optim.Adam.__module__)
    """)
    assert _run.main(["--", str(tmp_path / "app"), "z"]) == 0
    assert capsys.readouterr().out == "['z'] fused_optim.adam\n"


def test_patch_already_active_stays_active(tmp_path):
    with fused_optim.patch_torch():
        assert _main(tmp_path, "import torch.optim as o, fused_optim; "
                               "assert o.SGD is fused_optim.SGD") == 0
        assert torch.optim.SGD is fused_optim.SGD
    assert torch.optim.SGD is TORCH_SGD


def test_threads_alive_before_the_run_do_not_keep_the_patch(tmp_path):
    """A non-daemon thread the script did not start (Inductor's compile pool
    outlives its compile) must not leave torch.optim patched afterwards."""
    import threading

    release = threading.Event()
    bystander = threading.Thread(target=release.wait, daemon=False)
    bystander.start()
    try:
        assert _main(tmp_path, "import torch.optim as o, fused_optim; "
                               "assert o.SGD is fused_optim.SGD") == 0
        assert torch.optim.SGD is TORCH_SGD
    finally:
        release.set()
        bystander.join()


#: Unmodified torch.optim scripts: (kernel, exact) -> the optimizer's line
SCRIPTS = {
    ("rprop", True): "opt = torch.optim.Rprop(model.parameters(), lr=0.01, etas=(0.4, 1.3))",
    ("nadam", False): "opt = torch.optim.NAdam(model.parameters(), lr=0.01, weight_decay=0.01)",
    ("asgd", False): "opt = torch.optim.ASGD(model.parameters(), lr=0.01, t0=2.0)",
}

OPTIMIZER_SCRIPT = """
    import sys
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    {optimizer}
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for _ in range(8):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    torch.save([p.detach() for p in model.parameters()], sys.argv[1])
"""


@pytest.mark.parametrize("kernel_name, exact", list(SCRIPTS), ids=[k for k, _ in SCRIPTS])
def test_unmodified_script_ends_with_torchs_weights_through_the_kernels(
        tmp_path, monkeypatch, kernel_name, exact):
    import runpy

    from fused_optim.kernels import contract
    from fused_optim.kernels import numba as numba_backend

    script = _write(tmp_path / "train.py",
                    OPTIMIZER_SCRIPT.format(optimizer=SCRIPTS[kernel_name, exact]))
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "torch.pt")])
    runpy.run_path(str(script), run_name="__main__")  # plain torch.optim
    kernel, calls = contract.kernel(numba_backend, kernel_name), []

    def counted(batch, **kw):
        calls.append(batch.numel)
        return kernel(batch, **kw)

    monkeypatch.setattr(numba_backend, kernel_name, counted)
    monkeypatch.setenv("FUSED_OPTIM_BACKEND", "numba")
    assert _run.main([str(script), str(tmp_path / "fused.pt")]) == 0
    assert calls == [8 * 16 + 16 + 16 + 1] * 8  # one launch per step, every param in it
    tol = {"rtol": 0, "atol": 0} if exact else {}
    torch.testing.assert_close(torch.load(tmp_path / "fused.pt"),
                               torch.load(tmp_path / "torch.pt"), **tol)
