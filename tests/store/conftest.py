"""Fixtures of the store's tests."""
import pytest

from support.cache_files import ROOT


@pytest.fixture
def store_env(subprocess_env):
    """The environment of a subprocess that imports tests/support (``DA_ROOT``)."""
    return dict(subprocess_env, DA_ROOT=str(ROOT))
