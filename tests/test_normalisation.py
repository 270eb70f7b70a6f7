"""Biases that a BatchNorm cancels: found by construction, held still by the per-step engine.

Such a bias has a round-off gradient; Adam's P = 1/(√v̂ + ε) of a round-off gradient is huge
(about 1e7 in float32), and the rows, taken with the batch statistics held fixed, see the bias as a
live direction. Without holding it still, the float32 BatchNorm CNN below predicts gaps about
1,000× its float64 twin after twelve AdamW steps (in float64 the round-off is below ε, so P is 0).
"""
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from gramhook import GramMonitor, MonitorConfig
from gramhook.capture import cancelled_biases
from gramhook.optim import whitening


def _bn_cnn():
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 4))


def test_finds_exactly_the_biases_a_normalisation_cancels():
    model = _bn_cnn()
    # conv → BN and linear → BN1d are cancelled; conv → ReLU → BN and the last linear are not.
    assert cancelled_biases(model, torch.randn(2, 1, 8, 8)) == ("0.bias", "7.bias")
    model.train()
    assert model.training  # the detection forward leaves the mode as it was
    plain = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
    assert cancelled_biases(plain, torch.randn(2, 1, 8, 8)) == ()


def test_cancelled_bias_has_no_preconditioner():
    model = _bn_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(16, 1, 8, 8)), torch.arange(16) % 4).backward()
        opt.step()
    pre = whitening(opt, model, still=("0.bias", "7.bias"))
    assert float(pre["0.bias"].abs().max()) == 0.0 and float(pre["7.bias"].abs().max()) == 0.0
    assert float(pre["3.bias"].max()) > 0.0


def _gaps(dtype, steps=12):
    torch.manual_seed(0)
    model = _bn_cnn().to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(96, 1, 8, 8, generator=gen).to(dtype)
    y = (x.flatten(1)[:, :4].argmax(1))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = GramMonitor(model, opt, probe=(x, y), n_train=96, every=10**9, probe_size=96,
                          config=MonitorConfig(coordinates="exact"))
    for _ in range(steps):
        idx = torch.randperm(96, generator=gen)[:32]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    mon.measure()
    gaps = mon.per_sample_gap().double()
    mon.close()
    return gaps


def test_float32_bn_adam_matches_its_float64_twin():
    g32, g64 = _gaps(torch.float32), _gaps(torch.float64)
    assert float(g64.mean()) > 0
    assert 0.8 < float(g32.mean() / g64.mean()) < 1.25
    assert float(torch.corrcoef(torch.stack([g32, g64]))[0, 1]) > 0.9
