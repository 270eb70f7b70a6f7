"""The validation-free stopping baselines in benchmarks/stopping_baselines.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from stopping_baselines import (  # noqa: E402
    EvidenceCriterion,
    GradientDisparity,
    batch_gradient,
    evidence_value,
    gradient_disparity,
    per_sample_moments,
)

torch.set_num_threads(1)


def _mlp(seed: int = 0, out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, out))
    m[0].bias.requires_grad_(False)  # frozen: must be ignored
    return m


def _naive_per_sample(model, loss_fn, xb, yb):
    """(B, D) per-sample gradients of the trainable parameters by an autograd loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for b in range(xb.shape[0]):
        gs = torch.autograd.grad(loss_fn(model(xb[b:b + 1]), yb[b:b + 1]), params)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows).double()


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("chunk", [1 << 24, 140])  # one chunk; 2 samples per chunk (D = 67)
def test_per_sample_moments_match_naive_loop(loss, chunk):
    model = _mlp()
    gen = torch.Generator().manual_seed(1)
    xb = torch.randn(7, 5, generator=gen)
    if loss == "ce":
        yb, loss_fn = torch.randint(0, 3, (7,), generator=gen), F.cross_entropy
    else:
        yb, loss_fn = torch.randn(7, 3, generator=gen), F.mse_loss
    g, var = per_sample_moments(model, loss_fn, xb, yb, max_chunk_elems=chunk)
    G = _naive_per_sample(model, loss_fn, xb, yb)
    assert g.shape == var.shape == (G.shape[1],) == (67,)
    torch.testing.assert_close(g, G.mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(var, G.var(0, unbiased=True), rtol=1e-4, atol=1e-8)
    # the mean of per-sample gradients is the batch gradient of the mean loss
    torch.testing.assert_close(g.float(), batch_gradient(model, loss_fn, xb, yb), rtol=1e-5, atol=1e-7)


def test_evidence_value_formula_and_zero_variance_coordinates():
    g = torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    var = torch.tensor([2.0, 1.0, 0.0, 4.0], dtype=torch.float64)
    # B=4, D=3 coordinates with variance: 1 - 4/3 * (1/2 + 1/4 + 0)
    assert evidence_value(g, var, 4) == pytest.approx(1 - 4 / 3 * 0.75)


def _regression(noise_only: bool, n: int = 512, d: int = 10):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, d, generator=gen)
    if noise_only:
        y = torch.randn(n, 1, generator=gen)
    else:
        w = 3 * torch.randn(d, 1, generator=gen)
        y = x @ w + 0.1 * torch.randn(n, 1, generator=gen)
    return x, y


def _linear(d: int = 10) -> nn.Linear:
    """Starts far from both least-squares fits (``w = 0`` for noise, ``w*`` for the signal)."""
    m = nn.Linear(d, 1)
    with torch.no_grad():
        m.weight.fill_(-2.0)
        m.bias.zero_()
    return m


def _train_linear(x, y, crit, steps, batch=128):
    """Full-batch GD on MSE (lr 0.1: the error shrinks ~0.8x a step); the criterion is fed a
    random minibatch of ``batch`` rows after each step."""
    model = crit.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(4)
    stops = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        idx = torch.randperm(x.shape[0], generator=gen)[:batch]
        stops.append(crit.update(step, x[idx], y[idx]))
    return stops


def test_evidence_goes_positive_when_fitting_pure_noise():
    x, y = _regression(noise_only=True)
    crit = EvidenceCriterion(_linear(), F.mse_loss, smoothing=0.9, patience=3)
    stops = _train_linear(x, y, crit, steps=100)
    # At the least-squares fit the full-data gradient is 0, so a minibatch of B = n/4 shows
    # only noise: E[c] ≈ 1 − (n−B)/(n−1)·(B−1)/(B−3) ≈ 0.24 > 0.
    values = [c for _, c in crit.history]
    assert all(c < -1.0 for c in values[:3])
    assert crit.stop_step is not None and 10 < crit.stop_step < 100
    assert all(stops[crit.stop_step - 1:])  # stays True
    late = values[len(values) // 2:]
    assert sum(late) / len(late) > 0.1
    assert crit.best_step == crit.stop_step


def test_evidence_negative_early_on_learnable_problem():
    x, y = _regression(noise_only=False)
    crit = EvidenceCriterion(_linear(), F.mse_loss, smoothing=0.9, patience=1)
    stops = _train_linear(x, y, crit, steps=5)
    assert not any(stops) and crit.stop_step is None
    assert all(c < -1.0 for _, c in crit.history)
    assert all(v < 0 for _, v in crit.smoothed)


class _Mean(nn.Module):
    """``out = x @ w``; with ``loss = out.mean()`` the batch gradient is ``x.mean(0)``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x):
        return x @ self.w + self.frozen.sum()


def _mean_loss(out, y):
    return out.mean()


def test_gradient_disparity_hand_computed():
    g = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 8.0]])
    # pairwise distances 5, 8, 5
    assert gradient_disparity(g) == pytest.approx(6.0)
    gd = GradientDisparity(_Mean(), _mean_loss, s=3, patience=2)
    # two rows per batch whose mean is the wanted gradient
    batches = [(torch.stack([r + 1.0, r - 1.0]), torch.zeros(2)) for r in g]
    assert not gd.update(7, batches)
    assert gd.history == [(7, pytest.approx(6.0))] and gd.best_step == 7


def test_gradient_disparity_patience_on_minimum():
    g = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 8.0]])
    gd = GradientDisparity(_Mean(), _mean_loss, s=3, patience=2)
    out = []
    for epoch, scale in enumerate([3.0, 2.0, 1.0, 1.5, 2.5, 0.5]):
        out.append(gd.update(10 * epoch, [(scale * r[None], torch.zeros(1)) for r in g]))
    # GD = 6 * scale: minimum at epoch 2, second epoch without a new minimum is epoch 4
    assert [v for _, v in gd.history] == pytest.approx([18.0, 12.0, 6.0, 9.0, 15.0])
    assert out == [False, False, False, False, True, True]
    assert gd.best_step == 20 and gd.stop_step == 40


def _state(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()},
            [m.training for m in model.modules()],
            torch.get_rng_state())


def _assert_same(a, b):
    for da, db in zip(a[:3], b[:3]):
        assert da.keys() == db.keys()
        for k in da:
            assert (da[k] is None) == (db[k] is None)
            if da[k] is not None:
                assert torch.equal(da[k], db[k]), k
    assert a[3] == b[3]
    assert torch.equal(a[4], b[4])


@pytest.mark.parametrize("train_mode", [True, False])
def test_isolation(train_mode):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(8, 3))
    model.train(train_mode)
    model[0].bias.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    gen = torch.Generator().manual_seed(6)
    xb, yb = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    before = _state(model)
    eb = EvidenceCriterion(model, F.cross_entropy)
    gd = GradientDisparity(model, F.cross_entropy, s=2)
    gd.update(1, [(xb[:8], yb[:8]), (xb[8:], yb[8:])])
    _assert_same(before, _state(model))
    if train_mode:  # per-sample gradients through batch statistics are undefined
        with pytest.raises(ValueError, match="model.eval"):
            eb.update(1, xb, yb)
        model[1].eval()  # BatchNorm off, Dropout still in train mode under vmap
        before = _state(model)
    eb.update(1, xb, yb)
    _assert_same(before, _state(model))
    assert len(eb.history) == 1 and len(gd.history) == 1
