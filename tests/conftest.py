"""Shared pytest fixtures: every test imports the chapters through common.load."""
import os
import subprocess
import sys

os.environ.setdefault("MPLBACKEND", "Agg")  # figures render off-screen in tests

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402


@pytest.fixture(scope="session")
def load():
    return common.load


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: small tensors gain nothing from threads, and on a
    shared 2-core machine competing threads slow linear algebra down many-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _one_line_errors(script, bad_argvs, tmp_path):
    """Run `script` once per argv (in parallel): each must end in exactly one `error:` line, a non-zero exit
    and no traceback."""
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, script), "--outdir", str(tmp_path), *argv],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv in bad_argvs]
    for argv, proc in zip(bad_argvs, procs):
        out, err = proc.communicate(timeout=120)
        text = out + err
        assert proc.returncode != 0, (argv, text)
        assert sum("error:" in line for line in text.splitlines()) == 1, (argv, text)
        assert "Traceback" not in text, (argv, text)


@pytest.fixture
def assert_one_line_errors():
    """The chapters' bad-command-line check (see _one_line_errors)."""
    return _one_line_errors
