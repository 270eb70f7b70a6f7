"""CI checks of the fidelity and cadence benchmarks (benchmarks/fidelity.py, cadence_invariance.py).

1. The vectorized brute-force coupled LOO (``fidelity.coupled_loo``) equals a hand loop that
   retrains one model per left-out sample with ``torch.optim.SGD`` on linear regression (SGD
   with momentum, the shorter batch averaged over its B − 1 samples), to round-off.
2. One tiny configuration end to end (digits, small MLP, CE, SGD momentum): the monitored run
   reproduces the plain run bitwise and the engine/LOO ratio at the last measurement is finite
   and within [0.3, 3] (loose: the benchmark reports the real numbers).
3. The cadence harness on a tiny run: readouts at every 8 and 40 steps leave training unchanged.

About 15 s on one CPU thread.
"""
import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


def _hand_loo(model, x, y, batches, i, lr, momentum):
    """Retrain a copy without sample i (mean over the remaining samples of each batch)."""
    m = nn.Linear(x.shape[1], 1, bias=False, dtype=torch.float64)
    m.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum)
    for idx in batches:
        idx = idx[idx != i]
        opt.zero_grad()
        (0.5 * (m(x[idx]) - y[idx]) ** 2).sum(1).mean().backward()
        opt.step()
    return m


def test_coupled_loo_matches_hand_loop_on_linear_regression():
    torch.set_num_threads(1)
    fd = _load("fidelity")
    g = torch.Generator().manual_seed(0)
    n, d, lr, mom = 40, 12, 0.05, 0.9
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 1, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, 1, generator=g, dtype=torch.float64) + 0.3 * noise
    model = nn.Linear(d, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(0.1 * torch.randn(1, d, generator=g, dtype=torch.float64))
    batches = fd.epoch_batches(n, 8, 6, 1)
    drops = torch.tensor([0, 7, 23, 39])
    loss = lambda out, t: 0.5 * ((out - t) ** 2).sum(1)  # noqa: E731
    T = len(batches)
    res = fd.coupled_loo(model, loss, lambda ps: torch.optim.SGD(ps, lr=lr, momentum=mom), x, y, batches, drops,
                         [0, T // 2, T], chunk=3)  # chunk < K: two chunks, each with its own copy 0
    full = _hand_loo(model, x, y, batches, -1, lr, mom)
    assert torch.allclose(res["base"]["weight"], full.weight.detach(), rtol=0, atol=1e-12)
    assert torch.equal(res["gaps"][0], torch.zeros(len(drops), dtype=torch.float64))
    for a, i in enumerate(drops.tolist()):
        mi = _hand_loo(model, x, y, batches, i, lr, mom)
        with torch.no_grad():
            want = (loss(mi(x[i:i + 1]), y[i:i + 1]) - loss(full(x[i:i + 1]), y[i:i + 1]))[0]
        assert abs(float(res["gaps"][T][a] - want)) <= 1e-10 * max(1.0, abs(float(want)))
    assert float(res["gaps"][T].abs().min()) > 0


def test_tiny_config_end_to_end():
    torch.set_num_threads(1)
    fd = _load("fidelity")
    case = fd.Case("tiny-digits-mlp-ce-sgdm", "digits", 120, "mlp", "ce", "sgd", 0.05, 10, batch=24, hidden=32,
                   every=10, K=24)
    res = fd.run_case(case, log=lambda s: None)
    (summary,) = res["summaries"][:1]
    assert summary["max_dw"] == 0.0
    assert summary["vmap_dw"] < 1e-10
    last = [r for r in res["rows"] if r["engine"] == summary["engine"]][-1]
    assert last["step"] == case.total_steps()
    assert math.isfinite(last["ratio"]) and 0.3 <= last["ratio"] <= 3.0, last
    assert math.isfinite(last["corr"])
    assert any(line.startswith("Fidelity:") for line in fd.goal(res["summaries"]))


def test_cadence_harness_tiny():
    torch.set_num_threads(1)
    ci = _load("cadence_invariance")
    fd = _load("fidelity")
    case = dataclasses.replace(ci.CASES[2], n=96, batch=32, epochs=20, hidden=16)  # digits MLP, Adam, 60 steps
    rows = ci.run_case(case, cadences=(8, 40), log=lambda s: None)
    assert ci.common_steps(90, 40) == [40, 80, 90]
    assert {r["step"] for r in rows} == {60}  # no multiple of 200 yet: the final step only
    assert all(r["max_dw"] == 0.0 for r in rows)
    assert all(math.isfinite(r["predicted_gap"]) and math.isfinite(r["probe_gap"]) for r in rows)
    assert ci.goal(rows).startswith("Cadence: every-40 within 5% of every-8: ")
    assert fd.gramhook_commit()
