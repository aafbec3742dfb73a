"""Shared pytest fixtures: every test imports the chapters through common.load."""
import contextlib
import io
import os
import subprocess
import sys

os.environ.setdefault("MPLBACKEND", "Agg")  # figures render off-screen in tests

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402


# The device tests/test_device.py checks against the CPU: EDM_TEST_DEVICE=cuda (or cuda:1, ...) on a GPU machine.
# Unset, those tests skip (the chapter tests cover the CPU); EDM_TEST_DEVICE=cpu runs them on the CPU, a check
# of the checks. Every other test runs on the CPU whatever the switch says.
TEST_DEVICE = os.environ.get("EDM_TEST_DEVICE")


@pytest.fixture(scope="session")
def device():
    """The device under test, or a skip that says why it cannot be tested here."""
    if TEST_DEVICE is None:
        pytest.skip("EDM_TEST_DEVICE is not set: set it to cuda to compare the GPU with the CPU")
    try:
        device = torch.device(TEST_DEVICE)
    except RuntimeError:
        pytest.fail(f"EDM_TEST_DEVICE={TEST_DEVICE!r} is not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"EDM_TEST_DEVICE={TEST_DEVICE} but this machine has no CUDA device (torch "
                    f"{torch.__version__}, torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        pytest.skip(f"EDM_TEST_DEVICE={TEST_DEVICE}: only cpu and cuda are tested")
    return device


@pytest.fixture(scope="session")
def load():
    return common.load


@pytest.fixture(scope="module")
def fid(load):
    """Chapter 08, for its three test files."""
    return load("08_evaluate_fid")


@pytest.fixture(scope="session")
def tiny_network(load, tmp_path_factory):
    """A real `07_train_cifar10.py --preset tiny` model (class-conditional 16x16 shapes), trained 1 kimg: the
    README's default run, cut short. Shared by 08's test files (tests only read its run folder)."""
    outdir = tmp_path_factory.mktemp("tiny_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # session fixtures start before the per-test one_thread fixture
    try:
        load("07_train_cifar10").main(["--preset", "tiny", "--duration", "0.001", "--outdir", str(outdir),
                                       "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    (snapshot,) = sorted(outdir.glob("network-snapshot-*.pt"))
    return str(snapshot)


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: small tensors gain nothing from threads, and on a
    shared 2-core machine competing threads slow linear algebra down many-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run_in_process(script, argv, cwd):
    """(exit status, printed text) of `script`'s main(argv), run in this process as its `__main__` would."""
    module = common.load(os.path.splitext(script)[0])
    out, threads, here = io.StringIO(), torch.get_num_threads(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            module.main([str(a) for a in argv])
        status = 0
    except SystemExit as exit:           # sys.exit("error: ...") prints its message; argparse printed its own
        status = exit.code if isinstance(exit.code, int) else 1
        out.write("" if exit.code is None or isinstance(exit.code, int) else f"{exit.code}\n")
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)   # a demo that failed late may have changed it
    return status, out.getvalue()        # any other exception propagates: a traceback fails the test


def _one_line_errors(script, bad_argvs, tmp_path, outdir=None, prefix=None):
    """Each argv must end in exactly one `error:` line, a non-zero exit and no traceback. The first runs as a
    real process (the script's `__main__` wiring); the others call its main(argv) in this process, which is
    what that process runs, without importing torch once per case. `prefix` (default: --outdir `outdir` or
    tmp_path) comes before each argv. Returns the printed text of each case, in order."""
    outdir = ["--outdir", str(outdir or tmp_path)] if prefix is None else prefix
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *outdir, *map(str, bad_argvs[0])],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    results = [(proc.returncode, proc.stdout + proc.stderr)]
    results += [_run_in_process(script, [*outdir, *argv], tmp_path) for argv in bad_argvs[1:]]
    for argv, (status, text) in zip(bad_argvs, results):
        assert status != 0, (argv, text)
        assert sum("error:" in line for line in text.splitlines()) == 1, (argv, text)
        assert "Traceback" not in text, (argv, text)
    return [text for _, text in results]


@pytest.fixture
def assert_one_line_errors():
    """The chapters' bad-command-line check (see _one_line_errors)."""
    return _one_line_errors
