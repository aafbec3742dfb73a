"""Shared pytest fixtures: every test imports the chapters through common.load."""
import os
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
