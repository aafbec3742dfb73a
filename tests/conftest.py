"""Shared pytest fixtures: every test imports the chapters through common.load."""
import os
import sys

os.environ.setdefault("MPLBACKEND", "Agg")  # figures render off-screen in tests

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402


@pytest.fixture(scope="session")
def load():
    return common.load
