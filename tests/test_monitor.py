"""GramMonitor inside real training loops: history, TensorBoard, no interference, failures."""
import functools
import copy
import math
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gramhook import GramMonitor, Measurement, MonitorConfig
from gramhook.measurement import HISTORY_KEYS

# These tests exercise the periodic engine and its reservoir and reference settings; the per-step
# engine has its own tests (tests/test_perstep.py).
Config = functools.partial(MonitorConfig, engine="periodic")
GramMonitor = functools.partial(GramMonitor, config=Config())


N, D, K = 96, 6, 3


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = (x[:, :K] + 0.5 * torch.randn(N, K, generator=g)).argmax(1)
    return x, y


def _model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, K))


def _train(model, opt, x, y, steps, batch=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, N, (batch,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def test_history_keys_types_and_properties():
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with GramMonitor(model, opt, probe=(x, y), n_train=N, every=5, probe_size=24) as mon:
        _train(model, opt, x, y, 20)
        assert [h.step for h in mon.history] == [0, 5, 10, 15, 20]
        for h in mon.history:
            assert set(HISTORY_KEYS) == set(h.as_dict())
            assert all(isinstance(v, (int, float)) for v in h.as_dict().values())
            assert math.isfinite(h.predicted_test_loss) and math.isfinite(h.train_loss)
        assert mon.history[0].predicted_gap == 0.0
        assert mon.history[-1].predicted_gap > 0
        assert mon.predicted_test_loss == mon.history[-1].predicted_test_loss
        assert mon.predicted_gap == mon.history[-1].predicted_gap
        assert mon.train_loss == mon.history[-1].train_loss
        assert mon.per_sample_gap().shape == (24,)
        assert mon.effective_gram().shape == (24 * K, 24 * K)
        assert mon.best["value"] == min(h.predicted_test_loss for h in mon.history)
        n = len(mon.history)
        mon.measure()
        assert len(mon.history) == n + 1


def test_schedule_callable_and_detach():
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = GramMonitor(model, opt, probe=(x, y), n_train=N, every=lambda s: s in (3, 7), probe_size=8)
    _train(model, opt, x, y, 10)
    assert [h.step for h in mon.history] == [0, 3, 7]
    mon.detach()
    _train(model, opt, x, y, 5)
    assert mon.step == 10 and len(mon.history) == 3
    mon.close()


def test_should_stop_on_scripted_history():
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = GramMonitor(model, opt, probe=(x, y), n_train=N, every=1000, probe_size=8)
    values = [1.0, 0.8, 0.7, 0.71, 0.72, 0.69, 0.75, 0.76, 0.77]
    mon.history = [Measurement(step=i, predicted_test_loss=v) for i, v in enumerate(values)]
    assert mon.should_stop(patience=3)                         # best 0.69 was 3 measurements ago
    assert not mon.should_stop(patience=4)
    assert mon.best == {"step": 5, "value": 0.69}
    mon.history = [Measurement(step=i, predicted_test_loss=v) for i, v in enumerate([1.0, 0.9, 0.89, 0.885])]
    assert not mon.should_stop(patience=2)                     # still improving
    assert mon.should_stop(patience=2, min_delta=0.05)         # but by less than min_delta
    assert not mon.should_stop(patience=4)                     # not enough measurements yet
    with pytest.raises(KeyError, match="Unknown metric"):
        mon.should_stop(metric="nope")
    mon.close()


def _run(steps, monitor_kwargs=None, split_at=None):
    """Train with a monitor; optionally save and resume from a state dict at ``split_at``."""
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    kwargs = dict(probe=(x, y), n_train=N, every=3, probe_size=16, **(monitor_kwargs or {}))
    mon = GramMonitor(model, opt, **kwargs)
    if split_at is None:
        _train(model, opt, x, y, steps)
        return mon
    _train(model, opt, x, y, split_at)
    state = copy.deepcopy(mon.state_dict())
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    mon.close()
    model2 = _model(seed=5)
    model2.load_state_dict(saved[0])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.2, momentum=0.5)
    opt2.load_state_dict(saved[1])
    mon2 = GramMonitor(model2, opt2, **kwargs)
    mon2.load_state_dict(state)
    _train(model2, opt2, x, y, steps - split_at, seed=2)
    return mon2


def test_resume_equals_uninterrupted_run():
    x, y = _data()
    # Same batch stream either way: one stream of 12 steps vs 6 + 6 with the second half's seed.
    full_model = _model()
    opt = torch.optim.SGD(full_model.parameters(), lr=0.2, momentum=0.5)
    mon = GramMonitor(full_model, opt, probe=(x, y), n_train=N, every=3, probe_size=16)
    _train(full_model, opt, x, y, 6)
    _train(full_model, opt, x, y, 6, seed=2)
    resumed = _run(12, split_at=6)
    timing = {"monitor_seconds", "overhead"}
    assert len(resumed.history) == len(mon.history)
    for a, b in zip(mon.history, resumed.history):
        a, b = a.as_dict(), b.as_dict()
        for key in set(a) - timing:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9, nan_ok=True), key
    mon.close()
    resumed.close()


def test_bitwise_no_interference():
    """Same seed: identical parameters, gradients, modes and RNG streams with and without the monitor."""
    x, y = _data()

    def train(with_monitor):
        torch.manual_seed(123)
        random.seed(1)
        np.random.seed(2)
        model = _model(dropout=0.2)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        mon = GramMonitor(model, opt, probe=(x, y), n_train=N, every=2, probe_size=12) if with_monitor else None
        grads = []
        for step in range(8):
            idx = torch.randint(0, N, (16,))                      # global RNG, like a user's sampler
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            grads.append([p.grad.clone() for p in model.parameters()])
        modes = [m.training for m in model.modules()]
        rng = (torch.get_rng_state(), random.random(), np.random.rand())
        if mon is not None:
            assert len(mon.history) == 5
            mon.close()
        return [p.detach().clone() for p in model.parameters()], grads, modes, rng

    p0, g0, m0, r0 = train(False)
    p1, g1, m1, r1 = train(True)
    for a, b in zip(p0, p1):
        assert torch.equal(a, b)
    for ga, gb in zip(g0, g1):
        for a, b in zip(ga, gb):
            assert torch.equal(a, b)
    assert m0 == m1
    assert torch.equal(r0[0], r1[0]) and r0[1:] == r1[1:]


def test_eval_mode_model_and_frozen_parameters():
    x, y = _data()
    model = _model()
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    mon = GramMonitor(model, opt, probe=(x, y), n_train=N, every=2, probe_size=12)
    model[2].eval()                     # a submodule in eval mode stays so
    _train(model, opt, x, y, 6)
    assert model.training and not model[2].training
    assert mon.engine.delta.shape[1] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(math.isfinite(h.predicted_test_loss) for h in mon.history)
    mon.close()


@pytest.mark.parametrize("engine", ["perstep", "periodic"])
def test_measurement_failure_never_stops_training(monkeypatch, engine):
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = GramMonitor(model, opt, probe=(x, y), n_train=N, every=1, probe_size=8, config=Config(engine=engine))
    import gramhook.monitor as monitor_module

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    if engine == "periodic":
        monkeypatch.setattr(monitor_module, "compute_rates", boom)
    else:
        monkeypatch.setattr(monitor_module.GramMonitor, "_readout", boom)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, x, y, 5)
    reports = [str(w.message) for w in caught if "injected failure" in str(w.message)]
    assert len([r for r in reports if "paused" not in r]) == 1, "a failure is reported once"
    assert any("measurements are paused" in r for r in reports), "repeated failures pause measurements"
    assert mon.step == 5 and len(mon.history) == 1
    monkeypatch.undo()
    _train(model, opt, x, y, 10)  # paused measurements are retried with growing gaps
    assert len(mon.history) >= 2 and math.isfinite(mon.predicted_test_loss)
    mon.close()


def test_nan_model_is_reported_and_skipped():
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = GramMonitor(model, opt, probe=(x, y), n_train=N, every=1, probe_size=8)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="gramhook"):
        _train(model, opt, x, y, 2)
    assert len(mon.history) == 1
    mon.close()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(probe=(torch.randn(10, 5), torch.randint(0, 3, (10,))), n_train=100), ValueError, "shape"),
        (dict(probe=(torch.randn(10, D), torch.randint(0, 3, (9,))), n_train=100), ValueError, "10 samples but y has 9"),
        (dict(probe=(torch.randn(0, D), torch.randint(0, 3, (0,))), n_train=100), ValueError, "empty"),
        (dict(probe=(torch.randn(10, D), torch.randint(0, 3, (10,))), n_train=5), ValueError, "n_train"),
        (dict(probe=(torch.randn(10, D), torch.randint(0, 3, (10,))), n_train=10, every=0), ValueError, "every"),
        (dict(probe=(torch.randn(10, D), torch.randint(0, 3, (10,))), n_train=10, loss="hinge"), ValueError, "Unknown loss"),
        (dict(probe=(torch.randn(10, D), torch.randint(0, 3, (10,))), n_train=10,
              loss=lambda o, t: nn.functional.cross_entropy(o, t)), ValueError, "per sample"),
        (dict(probe=(torch.randn(10, D), torch.randint(0, 3, (10,))), n_train=10,
              loss=lambda o, t: nn.functional.cross_entropy(o, t, reduction="none")), ValueError, "reference"),
        (dict(probe=(torch.randn(10, D), torch.randint(0, 3, (10,))), n_train=10, rows=8), TypeError,
         r"pass config=MonitorConfig\(rows=8\)"),
        (dict(probe=(torch.randn(10, D), torch.randint(0, 3, (10,))), n_train=10, sketch_extrapolation=True),
         TypeError, "removed because it hurt"),
        (dict(probe=(torch.randn(10, D), torch.randint(0, 3, (10,))), n_train=10, probe_sise=8), TypeError,
         "Did you mean 'probe_size'"),
        (dict(probe=(torch.randn(10, D), torch.randint(0, 3, (10,))), n_train=10, every=2,
              config=MonitorConfig(every=3)), TypeError, "given twice"),
    ],
    ids=["wrong-shape", "mismatched-batch", "empty", "n_train-small", "bad-every", "unknown-loss",
         "scalar-loss", "target-hessian-needs-reference", "setting-as-keyword", "removed-option", "misspelt",
         "every-twice"],
)
def test_bad_configuration_fails_at_construction(kwargs, error, match):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error, match=match):
        GramMonitor(model, opt, **kwargs)


@pytest.mark.parametrize("settings, match", [
    (dict(reference_outputs=0), "reference_outputs"),
    (dict(rows=0), "rows"),
    (dict(engine="other"), "engine"),
    (dict(coordinates=0), "coordinates"),
    (dict(reference=torch.zeros(2, D)), "periodic engine only"),
    (dict(total_steps=0), "total_steps"),
], ids=["reference-outputs", "rows", "engine", "coordinates", "reference-needs-periodic", "total-steps"])
def test_bad_setting_fails_when_the_config_is_built(settings, match):
    with pytest.raises(ValueError, match=match):
        MonitorConfig(**settings)


def test_unsupported_optimizer_is_rejected():
    model = _model()
    opt = torch.optim.Rprop(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="SGD, Adam, AdamW, RMSprop"):
        GramMonitor(model, opt, probe=_data(), n_train=N)


def test_custom_loss_with_labelled_reference_and_mse():
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    onehot = nn.functional.one_hot(y, K).float()
    huber = lambda o, t: nn.functional.huber_loss(o, t, reduction="none").mean(1)
    mon = GramMonitor(model, opt, probe=(x, onehot), n_train=N, loss=huber, every=2, probe_size=8, config=Config(reference=(x, onehot)))
    for _ in range(4):
        opt.zero_grad()
        huber(model(x), onehot).mean().backward()
        opt.step()
    assert len(mon.history) == 3 and math.isfinite(mon.predicted_test_loss)
    mon.close()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GramMonitor(model, opt, probe=(x, onehot), n_train=N, loss="mse", every=2, probe_size=8) as mon:
        for _ in range(4):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), onehot).backward()
            opt.step()
        assert mon.predicted_gap > 0


def test_tensorboard_event_file_and_layout(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    mon = GramMonitor(model, opt, probe=(x, y), n_train=N, every=2, probe_size=12, logdir=str(tmp_path), config=Config(compare_tag="test/loss"))
    _train(model, opt, x, y, 6)
    mon.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for key in ("train_loss", "predicted_test_loss", "predicted_gap", "predicted_gap_se", "contraction",
                "perturbation", "monitor_seconds", "predicted_test_loss_lo", "predicted_test_loss_hi"):
        assert f"gramhook/{key}" in scalars
    steps = [e.step for e in acc.Scalars("gramhook/predicted_test_loss")]
    assert steps == [h.step for h in mon.history]
    values = [e.value for e in acc.Scalars("gramhook/predicted_test_loss")]
    assert values == pytest.approx([h.predicted_test_loss for h in mon.history], rel=1e-6)
    assert {"gramhook/per_sample_gap", "gramhook/ntk_spectrum"} <= set(acc.Tags()["histograms"])
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: c for cat in layout.category for c in cat.chart}
    margin = charts["Generalization"].margin.series[0]
    assert (margin.value, margin.lower, margin.upper) == (
        "gramhook/predicted_test_loss", "gramhook/predicted_test_loss_lo", "gramhook/predicted_test_loss_hi")
    curves = " ".join(charts["Generalization (curves)"].multiline.tag)
    assert "test/loss" in curves and "train_loss" in curves


def test_default_schedule_keeps_overhead_within_budget(fake_clock, costly_readouts):
    """every=None spaces readouts so monitor time stays at `overhead` × the loop's time.

    On a fake clock a step takes 10 ms and a readout 50 ms: with overhead 0.2 a readout is due
    once the loop has run 0.05 / 0.2 = 0.25 s since the last, every 25 steps."""
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = GramMonitor(model, opt, probe=(x, y), n_train=N, probe_size=32, config=Config(overhead=0.2))
    costly_readouts(mon, fake_clock, 0.05)
    start = fake_clock()
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, N, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        fake_clock.advance(0.01)
    mon.close()
    wall = fake_clock() - start
    readouts = mon.history[1:]
    spent = sum(h.monitor_seconds for h in readouts)
    assert spent == pytest.approx(0.05 * len(readouts))
    assert spent <= 0.2 * (wall - spent) + 0.05, (spent, wall)
    assert len(readouts) == pytest.approx(200 / 25, abs=1)
    gaps = [b.step - a.step for a, b in zip(readouts, readouts[1:])]
    assert all(abs(d - 25) <= 1 for d in gaps), gaps


def test_train_sample_regression_estimate():
    """The train loss comes from a larger labelled sample containing the probe, and the gap is the
    probe's mean gap corrected along the regression of g on ℓ (gramhook.dynamics.aggregate)."""
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with GramMonitor(model, opt, probe=(x, y), n_train=N, every=10, probe_size=16, config=Config(train_sample_size=64)) as mon:
        _train(model, opt, x, y, 30)
        assert set(mon.probe.indices.tolist()) <= set(mon.train_sample.indices.tolist())
        assert mon.train_sample.x.shape[0] == 64
        h = mon.history[-1]
        xs, ys = mon.train_sample.x, mon.train_sample.y
        with torch.no_grad():
            want_train = float(nn.functional.cross_entropy(model(xs), ys))
            probe_losses = nn.functional.cross_entropy(model(mon.probe.x), mon.probe.y, reduction="none")
        assert math.isclose(h.train_loss, want_train, rel_tol=1e-5)
        assert math.isclose(h.probe_train_loss, float(probe_losses.mean()), rel_tol=1e-5)
        g, lp = mon.per_sample_gap().double(), probe_losses.double()
        slope = float(((lp - lp.mean()) * (g - g.mean())).sum() / ((lp - lp.mean()) ** 2).sum())
        assert math.isclose(h.gap_slope, min(max(slope, 0.0), 5.0), rel_tol=1e-4, abs_tol=1e-9)
        want_gap = h.probe_gap + h.gap_slope * (h.train_loss - h.probe_train_loss)
        assert math.isclose(h.predicted_gap, want_gap, rel_tol=1e-9, abs_tol=1e-12)
        assert h.predicted_test_loss == h.train_loss + h.predicted_gap
    with GramMonitor(model, opt, probe=(x, y), n_train=N, every=10, probe_size=16, config=Config(train_sample_size=0)) as mon:
        h = mon.history[-1]
        assert mon.train_sample is None and h.gap_slope == 0.0
        assert h.train_loss == h.probe_train_loss and h.predicted_gap == h.probe_gap
    with pytest.raises(ValueError, match="train_sample_size"):
        GramMonitor(model, opt, probe=(x, y), n_train=N, config=Config(train_sample_size=-1))


def test_train_sample_holds_the_probe():
    """The train sample is drawn with the probe's seed, so the probe is its first m rows; one as large
    as the data set takes all of it, in order (no indices)."""
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with GramMonitor(model, opt, probe=(x, y), n_train=N, every=10, probe_size=16,
                     config=Config(train_sample_size=64)) as mon:
        rows = mon._probe_rows
        assert torch.equal(mon.train_sample.indices[rows], mon.probe.indices)
        assert torch.equal(mon.train_sample.x[rows], mon.probe.x)
    with GramMonitor(model, opt, probe=(x, y), n_train=N, every=10, probe_size=16,
                     config=Config(train_sample_size=10 * N)) as mon:
        assert mon.train_sample.indices is None
        assert torch.equal(mon.train_sample.x[mon._probe_rows], mon.probe.x)


def test_reference_rows_are_sampled_output_directions():
    """By default each captured reference sample enters the contraction through one output direction
    drawn from its Λ (``reference_outputs=1``), and so do the probe's own rows; ``None`` keeps all k."""
    x, y = _data()
    for q, want in ((1, 1), (None, 3)):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        with GramMonitor(model, opt, probe=(x, y), n_train=N, every=5, probe_size=8, config=Config(reference_size=12, reference_outputs=q)) as mon:
            _train(model, opt, x, y, 5)
            rates = mon.engine._pending
            assert rates.ref_jac is not None and rates.ref_jac.shape[1] == want
            assert 6 <= rates.ref_jac.shape[0] <= 12  # the reservoir's rows, probe rows left out
            assert (rates.own_cotangents is None) == (q is None)
            if q is not None:
                assert rates.own_cotangents.shape == (8, 1, 3)
                assert mon.engine._own_rows(rates).shape[:2] == (8, 1)
