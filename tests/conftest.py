"""Shared fixture: a small demo dataset (raw nnU-Net layout + preprocessed), made once per session."""

import pytest

import preprocess


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """8 phantom heads of ~48^3 mm: 6 train and 2 test cases after preprocessing."""
    root = tmp_path_factory.mktemp("demo")
    preprocess.make_demo(root / "raw", n_cases=8, seed=0, quiet=True, shape=(48, 48, 48))
    done, _, failed = preprocess.run(root / "raw", root / "preprocessed", workers=2, quiet=True)
    assert not failed
    return root
