"""The per-step engine's sentinel: an uninjected perturbation that says when the first-order
leave-one-out dynamics stops contracting (Measurement.linear_growth)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from gramhook import GramMonitor
from gramhook.dynamics.perstep import PerStepEngine, StepRule


def _run(lr_curvature: float, steps: int = 60, momentum: float = 0.9):
    """Heavy-ball steps whose one row has curvature ``lr_curvature / lr`` (no saturation)."""
    lr = 0.1
    eng = PerStepEngine(3, 4, dtype=torch.float64)
    row = torch.zeros(1, 4, dtype=torch.float64)
    row[0, 0] = math.sqrt(lr_curvature / lr)
    inj = torch.zeros(1, 4, dtype=torch.float64)
    inj[0, :2] = 1.0                    # the sentinel starts along it: half on the row's direction
    growth = []
    for t in range(steps):
        rule = StepRule("sgd", lr=lr, momentum=momentum, first=t == 0)
        eng.step(rule, row, torch.tensor([-1]), torch.tensor([0]) if t == 0 else None, inj if t == 0 else None)
        growth.append(eng.growth())
    return eng, growth


def test_sentinel_stays_bounded_where_the_dynamics_contracts():
    eng, growth = _run(1.0)             # η·λ = 1 < 2(1 + μ): stable, oscillating
    assert max(growth) < 3.0
    assert eng.delta().shape == (3, 4)  # the sentinel is not a probe row


def test_sentinel_grows_past_the_stability_limit():
    _, growth = _run(4.5)               # η·λ = 4.5 > 2(1 + μ) = 3.8
    assert growth[-1] > 1e3


def test_sentinel_never_touches_the_probe_rows():
    eng, growth = _run(4.5)             # the sentinel diverges (and is renormalised) ...
    assert growth[-1] > 1e3
    # ... while sample 0, injected once, drifts as heavy ball says orthogonally to the row
    # (δ = −η Σ_k μ^k · inj there), and the samples never injected stay at zero.
    expected = -0.1 * sum(0.9 ** k for k in range(60))
    assert float(eng.delta()[0, 1]) == pytest.approx(expected, rel=1e-12)
    assert float(eng.delta()[1:].abs().max()) == 0.0


def test_monitor_records_the_growth_and_warns_once(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(48, 6), torch.randint(0, 3, (48,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mon = GramMonitor(model, opt, probe=(x, y), n_train=48, every=4)
    for _ in range(8):
        idx = torch.randperm(48)[:16]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    assert all(h.linear_growth < 3.0 for h in mon.history), [h.linear_growth for h in mon.history]
    monkeypatch.setattr(mon.perstep, "growth", lambda: 50.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(8):
            idx = torch.randperm(48)[:16]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    unstable = [w for w in caught if "unstable" in str(w.message)]
    assert len(unstable) == 1
    assert mon.history[-1].linear_growth == 50.0
    mon.close()
