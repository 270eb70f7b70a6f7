"""The gap engines' ``state_dict``: a resumed engine continues exactly like an uninterrupted one.

The rates are synthetic (a random PSD kernel and Jacobians that drift from one measurement to the
next), so the check is about the engines' state and not about any model.
"""
import io

import pytest
import torch

from gramhook.dynamics.engine import EngineConfig, FunctionSpaceEngine, KernelRates, ParameterSpaceEngine, Rates

F64 = torch.float64
M, K, D, N = 5, 3, 12, 40


def _mse(f, y):
    return 0.5 * ((f - y) ** 2).sum(1)


def _rates(engine: str, step: int):
    """Rates at measurement ``step``: the Jacobian and outputs move a little every step."""
    g = torch.Generator().manual_seed(100 + step)
    base = torch.Generator().manual_seed(0)
    jac = torch.randn(M, K, D, generator=base, dtype=F64) + 0.1 * step * torch.randn(M, K, D, generator=g, dtype=F64)
    y = torch.randn(M, K, generator=base, dtype=F64)
    out = y + torch.randn(M, K, generator=g, dtype=F64) * 0.9 ** step
    hess = torch.eye(K, dtype=F64).expand(M, K, K).clone()
    if engine == "param":
        return Rates(out, y, out - y, hess, jac, decay=0.01)
    theta = torch.einsum("ikd,jld->ikjl", jac, jac) / D
    return KernelRates(out, y, out - y, hess, theta, decay=0.01)


def _engine(engine: str):
    cfg = EngineConfig(n_train=N, m=M)
    if engine == "param":
        return ParameterSpaceEngine(cfg, D, _mse, dtype=F64)
    return FunctionSpaceEngine(cfg, K, _mse, dtype=F64)


def _measure(eng, engine, steps):
    return [eng.measure(0.0 if s == 0 else 0.5, _rates(engine, s)).per_sample for s in steps]


@pytest.mark.parametrize("engine", ["param", "function"])
def test_resumed_engine_continues_like_an_uninterrupted_one(engine):
    whole = _measure(_engine(engine), engine, range(8))
    assert all(torch.isfinite(g).all() for g in whole)
    assert whole[-1].abs().max() > 1e-4          # the perturbations have grown: the state carries something

    first = _engine(engine)
    _measure(first, engine, range(4))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = _engine(engine)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    assert resumed.time == first.time
    rest = _measure(resumed, engine, range(4, 8))
    for a, b in zip(whole[4:], rest):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("engine", ["param", "function"])
def test_state_without_a_measurement_round_trips(engine):
    eng = _engine(engine)
    fresh = _engine(engine)
    fresh.load_state_dict(eng.state_dict())
    assert fresh.time == 0.0 and fresh._pending is None
