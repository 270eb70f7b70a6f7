"""The reference batch stands for the *other* training samples, and the flow's clock follows SGD
momentum from an empty buffer."""
import functools
import math

import pytest
import torch
from torch import nn

from gramhook import GramMonitor, MonitorConfig
from gramhook.dynamics.engine import EngineConfig, ParameterSpaceEngine, Rates
from gramhook.capture import ProbeMatcher
from gramhook.optim import momentum_is_warm, step_dt

# These tests exercise the periodic engine and its reservoir and reference settings; the per-step
# engine has its own tests (tests/test_perstep.py).
Config = functools.partial(MonitorConfig, engine="periodic")
GramMonitor = functools.partial(GramMonitor, config=Config())


N, D, K = 80, 5, 3


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    return x, (x[:, :K] + 0.3 * torch.randn(N, K, generator=g)).argmax(1)


def test_probe_filter_matches_probe_rows_only():
    x, _ = _data()
    f = ProbeMatcher(x[:10], seed=0)
    batch = torch.cat([x[5:15], x[3:4] + 1e-4, x[:2].double().float()])
    keep = f.keep(batch)
    assert keep.tolist() == [False] * 5 + [True] * 5 + [True] + [False] * 2
    assert f.keep(torch.randn(4, D + 1)).all()  # other shapes: nothing to match


def test_reservoir_and_reference_exclude_probe_samples():
    x, y = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, K))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GramMonitor(model, opt, probe=(x, y), n_train=N, every=1000, probe_size=16, config=Config(reference_size=N, train_sample_size=0)) as mon:
        model(x)  # a training forward over every sample
        rows, _ = mon._reference_batch()
        assert rows.shape[0] == N - 16
        assert not (rows.unsqueeze(1) == mon.probe.x.unsqueeze(0)).all(-1).any()
    with GramMonitor(model, opt, probe=(x, y), n_train=N, every=1000, probe_size=16, config=Config(reference=(x, y), train_sample_size=0)) as mon:
        assert mon.reference[0].shape[0] == N - 16 and mon.reference[1].shape[0] == N - 16
    with pytest.raises(ValueError, match="only probe samples"):
        GramMonitor(model, opt, probe=(x[:16], y[:16]), n_train=N, config=Config(reference=x[:16]))


@pytest.mark.parametrize("dampening, nesterov", [(0.0, False), (0.3, False), (0.0, True)])
def test_momentum_startup_dt_matches_the_displacement(dampening, nesterov):
    """With a constant gradient c, step j of SGD from an empty buffer moves −step_dt(j)·c."""
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, dampening=dampening, nesterov=nesterov)
    assert not momentum_is_warm(opt)
    for j in range(1, 40):
        before = w.detach().clone()
        opt.zero_grad()
        (w * c).sum().backward()
        opt.step()
        torch.testing.assert_close(w.detach() - before, -step_dt(opt, j) * c, rtol=1e-12, atol=1e-15)
    assert momentum_is_warm(opt)
    assert math.isclose(step_dt(opt, 10**6), step_dt(opt), rel_tol=1e-12)


def test_probe_weight_scales_the_other_rows_and_excludes_the_own_row():
    """With no reference batch, sample i is contracted by the other probe rows, each carrying
    probe_weight/n: dδ_i/dt = −P Σ_{j≠i} (w/n) J_jᵀ Λ_j J_j δ_i."""
    torch.manual_seed(0)
    m, k, d, n = 4, 2, 6, 40
    jac = torch.randn(m, k, d, dtype=torch.float64)
    a = torch.randn(m, k, k, dtype=torch.float64)
    lam = a @ a.transpose(1, 2)
    rates = Rates(outputs=torch.zeros(m, k, dtype=torch.float64), targets=torch.zeros(m, k, dtype=torch.float64),
                  residual=torch.zeros(m, k, dtype=torch.float64), hessian=lam, probe_jac=jac,
                  probe_weight=(n - 1) / (m - 1))
    eng = ParameterSpaceEngine(EngineConfig(n_train=n, m=m), d, lambda f, y: ((f - y) ** 2).sum(1),
                               dtype=torch.float64)
    eng.delta = torch.randn(m, d, dtype=torch.float64)
    got = eng._own_velocity(rates)
    w = (n - 1) / (m - 1) / n
    for i in range(m):
        h = sum(w * jac[j].T @ lam[j] @ jac[j] for j in range(m) if j != i)
        torch.testing.assert_close(got[i], -jac[i] @ (h @ eng.delta[i]), rtol=1e-10, atol=1e-12)
