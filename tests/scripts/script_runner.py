"""Run a script's main in this process, check the one-sentence error contract, snapshot a directory (to prove
that a refused input wrote nothing). Shared by the script tests (tests/scripts/conftest.py has the fixtures)."""
import hashlib
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def common(run):
    """The flags every digits script call in these tests shares: CPU, one thread, no progress bars."""
    return ["--preset", "digits", "--device", "cpu", "--run_dir", str(run), "--no_progress", "--threads", "1"]


def load_script(relpath):
    """The module of a script (quant_scripts/0X_*.py, scripts/*.py), imported under a private name."""
    directory = os.path.join(REPO, os.path.dirname(relpath))
    if directory not in sys.path:  # quant_scripts import their _common as a top-level module
        sys.path.insert(0, directory)
    name = "script_" + os.path.basename(relpath)[:-3].replace("-", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def run_main(relpath, argv, capsys):
    """cli_main(script.main, argv) in this process: (exit status, stdout, stderr)."""
    from ldm.util import cli_main

    module = load_script(relpath)
    capsys.readouterr()
    try:
        cli_main(module.main, [str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_sentence(code, err):
    """The user-error contract: exit status 2, exactly one stderr line starting with "error:", no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit status {code}; stderr: {err[-2000:]}"
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:"), err[-2000:]
    return lines[0]


def snapshot(directory):
    """{relative path: (mtime_ns, sha256)} of every file under ``directory``."""
    state = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            state[os.path.relpath(path, directory)] = (os.stat(path).st_mtime_ns, digest)
    return state
