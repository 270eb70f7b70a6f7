"""Fault suite: the monitor never breaks, stalls or silently corrupts a run.

Every case asserts one of:
- training is bitwise unchanged by the monitor (parameters after N steps, same seed), and the
  monitor recovers once the cause is gone;
- or the monitor refuses at construction with a message that names the cause and the fix.

Real models and data throughout (tiny sizes); where a fault cannot be provoked from outside
(out-of-memory, a measurement that raises or warns), it is injected into gramhook's own kernel
functions.
"""
import copy
import dataclasses
import gc
import glob
import logging
import math
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import gramhook.kernel as kernel
from gramhook import GramMonitor, MonitorConfig
from naive import naive_jacobian

N, D, K = 64, 5, 3
SETTINGS = {f.name for f in dataclasses.fields(MonitorConfig)} - {"every", "probe_size", "seed"}
QUICK = dict(probe_size=8, every=2, config=MonitorConfig(train_sample_size=0, effective_gram_size=4))


def _quick(**changes):
    """QUICK with ``changes``: GramMonitor keywords stay keywords, settings go into its config."""
    settings = {k: changes.pop(k) for k in list(changes) if k in SETTINGS}
    return {**QUICK, **changes, "config": dataclasses.replace(QUICK["config"], **settings)}


def _data(seed=0, n=N, d=D, k=K):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :k] + 0.3 * torch.randn(n, k, generator=g)).argmax(1)
    return x, y


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, K))


def _train(model, opt, x, y, steps, *, batch=16, seed=1, loss=None, call=None, accumulate=1, scheduler=None,
           autocast=False, skip_nonfinite=False, others=()):
    """A plain loop on a private batch generator; ``call`` is what the loop calls (the model or a
    compiled wrapper)."""
    loss = loss or F.cross_entropy
    call = call or model
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for o in (opt, *others):
            o.zero_grad()
        bad = False
        for _ in range(accumulate):
            idx = torch.randint(0, x.shape[0], (batch,), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                value = loss(call(x[idx]).float(), y[idx]) / accumulate
            bad = bad or not bool(torch.isfinite(value))
            value.backward()
        if skip_nonfinite and bad:
            continue
        for o in (*others, opt):
            o.step()
        if scheduler is not None:
            scheduler.step()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


def _watched(build, steps, monitor=True, **kwargs):
    """Train the model from ``build()`` (model, optimizer, train kwargs) with or without a monitor."""
    model, opt, train = build()
    x, y = train.pop("data", _data())
    pass_call, loss = train.pop("pass_call", False), train.pop("monitor_loss", "cross_entropy")
    mon = None
    if monitor:
        settings = _quick(**kwargs)
        mon = GramMonitor(train["call"] if pass_call else model, opt, probe=(x, y), n_train=x.shape[0], loss=loss,
                          **settings)
    _train(model, opt, x, y, steps, **train)
    return _params(model), mon, model, opt


def _bitwise(build, steps=10, action="always", **kwargs):
    """Parameters after ``steps`` with and without the monitor are identical; returns the monitor
    and the gramhook warnings of the monitored run (raised as errors with ``action="error"``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, _, _, _ = _watched(build, steps, monitor=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter(action)
        watched, mon, _, _ = _watched(build, steps, **kwargs)
    assert _same(plain, watched), "the monitor changed the training run"
    return mon, _messages(caught)


def _replayed(build, script, **kwargs):
    """Run ``script(model, opt, x, y, mon)`` on ``build()`` without a monitor (``mon=None``), then
    with one; assert the parameters end bitwise equal; return the monitor and its warnings."""
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, _ = build()
        script(model, opt, x, y, None)
        plain = _params(model)
    model, opt, _ = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = GramMonitor(model, opt, probe=(x, y), n_train=N, **_quick(**kwargs))
        script(model, opt, x, y, mon)
    assert _same(plain, _params(model)), "the monitor changed the training run"
    return mon, _messages(caught)


def _finite_history(mon, start=1):
    return [h for h in mon.history[start:] if math.isfinite(h.predicted_gap)]


def _messages(caught):
    return [str(w.message) for w in caught if "gramhook" in str(w.message)]


def _sgd(model, lr=0.1, **kw):
    return torch.optim.SGD(model.parameters(), lr=lr, **kw)


def _mlp_sgd():
    model = _mlp()
    return model, _sgd(model), {}


def _ntk_naive(model, x):
    j = naive_jacobian(model, x)
    return torch.einsum("iap,jbp->iajb", j, j)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# Silent wrong results

class _Tied(nn.Module):
    """Embedding reused as the output projection: ``h @ emb.weight.T``."""

    def __init__(self, vocab=7, d=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, d)

    def forward(self, t):
        h = torch.tanh(self.lin(self.emb(t).mean(1)))    # (B, d)
        return h @ self.emb.weight.T                     # (B, vocab)


class _SharedLinear(nn.Module):
    """One Linear called twice, and a second module pointing at the same weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("method", ["auto", "fast_jacobian"])
def test_tied_embedding_matches_naive_jacobian(method):
    torch.manual_seed(0)
    model = _Tied().double()
    x = torch.randint(0, 7, (4, 3))
    naive = naive_jacobian(model, x)
    if method == "auto":
        assert _rel(kernel.empirical_ntk(model, x), _ntk_naive(model, x)) < 1e-10
    else:
        assert _rel(kernel.flat_jacobian(model, x), naive) < 1e-10


def test_shared_weight_matches_naive_jacobian():
    torch.manual_seed(0)
    model = _SharedLinear().double()
    x = torch.randn(5, 4, dtype=torch.double)
    assert _rel(kernel.empirical_ntk(model, x), _ntk_naive(model, x)) < 1e-10


def test_tied_model_training_is_unchanged_and_measured():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 7, (N, 3), generator=g)
    y = torch.randint(0, 7, (N,), generator=g)

    def build():
        torch.manual_seed(0)
        model = _Tied()
        return model, _sgd(model, 0.2), {"data": (x, y)}

    mon, caught = _bitwise(build)
    assert len(_finite_history(mon)) >= 4 and mon.predicted_gap > 0


class _Recurrent(nn.Module):
    def __init__(self, kind):
        super().__init__()
        if kind == "mha":
            self.core = nn.MultiheadAttention(4, 2, batch_first=True)
        else:
            self.core = getattr(nn, kind)(4, 6, batch_first=True)
        self.kind = kind
        self.head = nn.Linear(4 if kind == "mha" else 6, 2)

    def forward(self, x):                                 # x (B, T, 4)
        if self.kind == "mha":
            h, _ = self.core(x, x, x)                      # (B, T, 4)
            return self.head(h.mean(1))
        h, _ = self.core(x)                                # (B, T, 6)
        return self.head(h[:, -1])


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["GRU", "LSTM", "mha"])
def test_recurrent_and_attention_match_naive_jacobians(kind, dtype, tol):
    """float32 LSTM on CPU runs mkldnn, which has no forward AD: its readout takes reverse mode."""
    torch.manual_seed(0)
    model = _Recurrent(kind).to(dtype)
    x = torch.randn(4, 5, 4, dtype=dtype)
    naive = _ntk_naive(model, x)
    for method in ("auto", "reference"):
        assert _rel(kernel.empirical_ntk(model, x, method=method), naive) < tol, method
    # Forward mode (the readout's u_i = J_i v_i) against the same Jacobians.
    jac = naive_jacobian(model, x)
    v = torch.randn(4, jac.shape[2], dtype=dtype)
    u = kernel.tangent_outputs(model, x, v)
    assert _rel(u, torch.einsum("ikp,ip->ik", jac, v)) < tol


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_recurrent_model_is_measured(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, 4, generator=g)
    y = (x[:, -1, 0] > 0).long()

    def build():
        torch.manual_seed(0)
        model = _Recurrent(kind)
        return model, _sgd(model, 0.3), {"data": (x, y)}

    mon, caught = _bitwise(build, steps=6)
    assert len(_finite_history(mon)) == 3 and mon.predicted_gap > 0
    assert caught == []


def test_lr_zero_first_group_keeps_time_moving():
    x, y = _data()

    def gap(frozen_first):
        torch.manual_seed(0)
        model = _mlp()
        groups = [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters(), "lr": 0.2}]
        opt = torch.optim.SGD(groups if frozen_first else groups[::-1], lr=0.2)
        mon = GramMonitor(model, opt, probe=(x, y), n_train=N, **QUICK)
        _train(model, opt, x, y, 10)
        return mon.predicted_gap

    first, last = gap(True), gap(False)
    assert first > 0
    assert first == pytest.approx(last, rel=1e-5)


def _saved_run(**kwargs):
    x, y = _data()
    model = _mlp()
    opt = _sgd(model)
    mon = GramMonitor(model, opt, probe=(x, y), n_train=N, **_quick(**kwargs))
    _train(model, opt, x, y, 6)
    return mon.state_dict()


@pytest.mark.parametrize("change, match", [
    (dict(probe_size=10), "m: saved 8, here 10"),
    (dict(data_seed=3), "probe: saved"),
    (dict(model="wide"), "parameters: saved"),
    (dict(n_train=128), "n_train: saved 64, here 128"),
    (dict(coordinates=32), "coordinates: saved 'exact', here 32"),
    (dict(seed=4), "probe: saved"),
], ids=["other-probe-size", "other-probe-data", "other-model", "other-n_train", "other-coordinates", "other-seed"])
def test_load_state_dict_refuses_a_foreign_state(change, match):
    state = _saved_run()
    x, y = _data(change.pop("data_seed", 0))
    n_train = change.pop("n_train", N)
    if change.pop("model", None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(D, 9), nn.Tanh(), nn.Linear(9, K))
    else:
        model = _mlp()
    opt = _sgd(model)
    mon = GramMonitor(model, opt, probe=(x, y), n_train=n_train, **_quick(**change))
    _train(model, opt, x, y, 2)
    before = copy.deepcopy(mon.state_dict())
    with pytest.raises(ValueError, match="Cannot load this monitor state") as err:
        mon.load_state_dict(state)
    assert match in str(err.value) and "same model, probe data" in str(err.value)
    after = mon.state_dict()
    assert after["step"] == before["step"] and after["history"] == before["history"]
    assert torch.equal(after["perstep"]["delta"], before["perstep"]["delta"])
    _train(model, opt, x, y, 2)  # and it goes on measuring
    assert len(mon.history) == len(before["history"]) + 1


def test_load_state_dict_refuses_what_is_not_a_state():
    x, y = _data()
    model = _mlp()
    mon = GramMonitor(model, _sgd(model), probe=(x, y), n_train=N, **QUICK)
    with pytest.raises(ValueError, match="not a GramMonitor state"):
        mon.load_state_dict({"weights": 1})
    mon.close()


def test_resume_into_the_same_logdir_writes_one_step0_point(tmp_path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    x, y = _data()
    model = _mlp()
    opt = _sgd(model)
    mon = GramMonitor(model, opt, probe=(x, y), n_train=N, logdir=str(tmp_path), **QUICK)
    _train(model, opt, x, y, 4)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), mon.state_dict())
    mon.close()
    model = _mlp()
    model.load_state_dict(saved[0])
    opt = _sgd(model)
    opt.load_state_dict(saved[1])
    mon = GramMonitor(model, opt, probe=(x, y), n_train=N, logdir=str(tmp_path), **QUICK)
    mon.load_state_dict(saved[2])
    _train(model, opt, x, y, 4)
    mon.close()
    steps = []
    for path in glob.glob(str(tmp_path / "events.out.tfevents.*")):
        acc = ea.EventAccumulator(path)
        acc.Reload()
        if "gramhook/predicted_test_loss" in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars("gramhook/predicted_test_loss")]
    assert sorted(steps) == [0, 2, 4, 6, 8]


def test_first_point_is_written_without_any_step(tmp_path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    x, y = _data()
    model = _mlp()
    GramMonitor(model, _sgd(model), probe=(x, y), n_train=N, logdir=str(tmp_path), **QUICK).close()
    (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    acc = ea.EventAccumulator(path)
    acc.Reload()
    assert [e.step for e in acc.Scalars("gramhook/predicted_test_loss")] == [0]


def _compiled_build(warm):
    def build():
        model = _mlp()
        compiled = torch.compile(model, backend="eager")
        if warm:  # compiled and run once before the monitor is attached
            compiled(_data()[0][:4]).sum().backward()
            model.zero_grad()
        return model, _sgd(model), {"call": compiled, "pass_call": not warm}
    return build


def _compiled_in_place():
    model = _mlp()
    model.compile(backend="eager")
    return model, _sgd(model), {}


@pytest.mark.parametrize("how", ["wrapper", "in-place"])
def test_compiled_module_is_measured(how):
    torch._dynamo.reset()
    mon, caught = _bitwise(_compiled_build(warm=False) if how == "wrapper" else _compiled_in_place)
    assert len(_finite_history(mon)) == 5 and mon.predicted_gap > 0
    assert mon._failures.messages == [] and mon._stepper.batch_rows > 0


def test_module_compiled_before_attaching_is_reported_not_zero():
    torch._dynamo.reset()
    mon, caught = _bitwise(_compiled_build(warm=True))
    assert any("torch.compile" in m and "pass the compiled module" in m for m in caught)
    assert all(h.predicted_gap != 0.0 for h in mon.history[1:]), "no silent zero gap"
    # Recovery: the same model trained through its own __call__ is followed again.
    x, y = _data()
    _train(mon.model, mon.optimizer, x, y, 40)
    assert mon.predicted_gap > 0 and mon.history[-1].step > 30


# ---------------------------------------------------------------------------------------------
# Crashes in the user's run

def _boom(*args, **kwargs):
    raise RuntimeError("injected failure")


def _warn(*args, **kwargs):
    warnings.warn("an internal deprecation", FutureWarning)
    raise RuntimeError("after a warning")


@pytest.mark.parametrize("where", ["readout", "step", "construction"])
def test_warnings_as_errors_never_reach_the_loop(monkeypatch, caplog, where):
    target = {"readout": (kernel, "tangent_outputs"), "step": (kernel, "vjp_rows"),
              "construction": (kernel, "tangent_outputs")}[where]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, _, _, _ = _watched(_mlp_sgd, 8, monitor=False)
    x, y = _data()
    model, opt, _ = _mlp_sgd()
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="gramhook"):
        warnings.simplefilter("error")
        if where == "construction":
            monkeypatch.setattr(*target, _warn)
        mon = GramMonitor(model, opt, probe=(x, y), n_train=N, **QUICK)
        monkeypatch.setattr(*target, _warn if where == "readout" else _boom)
        _train(model, opt, x, y, 8)
    assert _same(plain, _params(model))
    assert any("gramhook" in r.getMessage() for r in caplog.records), "reported through logging"
    monkeypatch.undo()
    _train(model, opt, x, y, 30)
    assert mon.history[-1].step > 8 and math.isfinite(mon.predicted_gap)


def test_torch_internal_warnings_are_silenced_under_W_error():
    """The one-time ``torch.jit.script`` FutureWarning of forward-mode AD must not surface."""
    mon, caught = _bitwise(_mlp_sgd, action="error")
    assert mon._failures.messages == [] and len(_finite_history(mon)) == 5


_W_ERROR_SCRIPT = r"""
import torch, torch.nn.functional as F
from torch import nn
import gramhook.kernel as kernel
from gramhook import GramMonitor
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)

def run(watch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = GramMonitor(model, opt, probe=(x, y), n_train=64, probe_size=8, every=2) if watch else None
    real = kernel.tangent_outputs
    for step in range(12):
        if step == 4:
            kernel.tangent_outputs = lambda *a, **k: 1 / 0   # a measurement failing mid-training
        if step == 8:
            kernel.tangent_outputs = real
        opt.zero_grad()
        F.cross_entropy(model(x[step::4][:16]), y[step::4][:16]).backward()
        opt.step()
    return [p.detach() for p in model.parameters()], mon

plain, _ = run(False)
watched, mon = run(True)
assert all(torch.equal(p, q) for p, q in zip(plain, watched))
assert mon.history[0].step == 0 and mon.history[-1].step == 12, [h.step for h in mon.history]
print("ok", len(mon.history))
"""


@pytest.mark.parametrize("action", ["error", "always"])
def test_python_W_error_in_a_fresh_interpreter(action):
    """``python -W error``: construction (torch's one-time jit FutureWarning is first hit there)
    and a measurement failing mid-training never raise into the loop; with every warning shown,
    torch's internal deprecation notice is not among them."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-W", action, "-c", _W_ERROR_SCRIPT], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
    assert "ZeroDivisionError" in done.stderr, "the failure is reported (through logging under -W error)"
    assert "torch.jit.script" not in done.stderr


def test_state_round_trips_through_weights_only_load(tmp_path):
    x, y = _data()
    model, opt, _ = _mlp_sgd()
    mon = GramMonitor(model, opt, probe=(x, y), n_train=N, **QUICK)
    _train(model, opt, x, y, 4)
    torch.save(mon.state_dict(), tmp_path / "mon.pt")
    fresh = GramMonitor(model, opt, probe=(x, y), n_train=N, **QUICK)
    fresh.load_state_dict(torch.load(tmp_path / "mon.pt", weights_only=True))
    assert [h.predicted_gap for h in fresh.history] == [h.predicted_gap for h in mon.history]
    assert fresh.step == 4 and torch.equal(fresh.perstep.delta(), mon.perstep.delta())


def test_distinct_failures_pause_and_recover_and_a_second_episode_is_reported(monkeypatch):
    x, y = _data()
    model, opt, _ = _mlp_sgd()
    mon = GramMonitor(model, opt, probe=(x, y), n_train=N, **{**QUICK, "every": 1})
    errors = iter([RuntimeError("first cause"), ValueError("second cause")] + [RuntimeError("first cause")] * 100)

    def failing(*args, **kwargs):
        raise next(errors)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monkeypatch.setattr(kernel, "tangent_outputs", failing)
        _train(model, opt, x, y, 20)
        first = _messages(caught)
        monkeypatch.undo()
        _train(model, opt, x, y, 40)
        recovered = _messages(caught)[len(first):]
        monkeypatch.setattr(kernel, "tangent_outputs", _boom)
        _train(model, opt, x, y, 3)
        second = _messages(caught)[len(first) + len(recovered):]
    assert any("first cause" in m and "this measurement is skipped" in m for m in first)
    assert any("second cause" in m for m in first), "a distinct failure is reported"
    assert any("measurements are paused" in m for m in first)
    assert len(first) <= 4, "rate-limited"
    assert sum(1 for h in mon.history if 1 < h.step <= 20) < 10, "paused measurements back off"
    assert any("works again" in m for m in recovered) and mon.history[-1].step > 20, (first, recovered)
    assert any("injected failure" in m for m in second), "a later episode is reported again"
    plain, plain_opt, _ = _mlp_sgd()
    for steps in (20, 40, 3):
        _train(plain, plain_opt, x, y, steps)
    assert _same(_params(plain), _params(model))


def test_failing_tensorboard_and_schedule_never_stop_training(tmp_path):
    def schedule(step):
        if step == 3:
            raise RuntimeError("schedule bug")
        return step % 2 == 0

    def build():
        model = _mlp()
        return model, _sgd(model), {}

    mon, caught = _bitwise(build, every=schedule, logdir=str(tmp_path))
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        mon.sink.writer.add_scalar = _boom
        x, y = _data()
        _train(mon.model, mon.optimizer, x, y, 4)
    assert any("schedule bug" in m for m in caught)
    assert any("tensorboard failed" in m for m in _messages(later))
    assert mon.history[-1].step == 14


# ---------------------------------------------------------------------------------------------
# Construction succeeds, then measurements must go on

@pytest.mark.parametrize("engine", ["perstep", "periodic"])
def test_parameter_outside_the_optimizer_is_held_fixed(engine):

    def build_outside():
        model = _mlp()
        return model, torch.optim.SGD(model[2].parameters(), lr=0.2), {}

    def build_frozen():
        model = _mlp()
        model[0].requires_grad_(False)
        return model, torch.optim.SGD(model[2].parameters(), lr=0.2), {}

    mon, caught = _bitwise(build_outside, engine=engine)
    assert any("not in the optimizer (0.weight, 0.bias)" in m for m in caught)
    frozen, _ = _bitwise(build_frozen, engine=engine)
    assert len(_finite_history(mon)) == 5 and mon.predicted_gap > 0
    assert mon.predicted_gap == pytest.approx(frozen.predicted_gap, rel=1e-4)


def test_two_optimizers_on_one_model():
    def build():
        model = _mlp()
        first = torch.optim.SGD(model[2].parameters(), lr=0.2)
        second = torch.optim.Adam(model[0].parameters(), lr=1e-2)
        return model, first, {"others": [second]}

    mon, caught = _bitwise(build)
    assert any("another optimizer trains them" in m for m in caught)
    assert len(_finite_history(mon)) == 5 and mon.predicted_gap > 0


def test_add_param_group_mid_training_is_followed():
    def build():
        model = _mlp()
        return model, torch.optim.SGD(model[2].parameters(), lr=0.2), {}

    before = []

    def script(model, opt, x, y, mon):
        _train(model, opt, x, y, 6)
        before.append(mon.predicted_gap if mon else None)
        opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.2})
        _train(model, opt, x, y, 6)

    mon, caught = _replayed(build, script)
    assert not any("failed" in m for m in caught)
    assert len(_finite_history(mon)) == 6 and mon.predicted_gap > before[-1]


class _Shaped(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = shape
        self.lin = nn.Linear(D, math.prod(shape))

    def forward(self, x):
        return self.lin(x).reshape(x.shape[0], *self.shape)


@pytest.mark.parametrize("shape, loss", [((1, K), "cross_entropy"), ((2, 3), "mse")], ids=["B1K-ce", "B23-mse"])
def test_output_shapes_are_flattened(shape, loss):
    x, y = _data()
    target = y if loss == "cross_entropy" else torch.randn(N, *shape, generator=torch.Generator().manual_seed(2))

    def build():
        torch.manual_seed(0)
        model = _Shaped(shape)
        fn = (lambda o, t: F.cross_entropy(o.reshape(o.shape[0], -1), t)) if loss == "cross_entropy" else F.mse_loss
        return model, _sgd(model), {"data": (x, target), "loss": fn, "monitor_loss": loss}

    mon, caught = _bitwise(build, train_sample_size=32)
    assert mon.train_sample is not None
    assert len(_finite_history(mon)) == 5 and mon.predicted_gap > 0 and mon._failures.messages == []


@pytest.mark.parametrize("labels, match", [
    ("late-out-of-range", r"labels must lie in \[0, 3\).*samples \[40\]"),
    ("negative", r"labels must lie in \[0, 3\).*\[-1, "),
    ("one-hot", r"one-hot.*y.argmax\(1\)"),
    ("fractional", "fractional"),
])
def test_labels_are_all_checked_against_k(labels, match):
    x, y = _data()
    y = y.clone()
    if labels == "late-out-of-range":
        y[40] = K
    elif labels == "negative":
        y[7] = -1
    elif labels == "one-hot":
        y = F.one_hot(y, K).float()
    else:
        y = y.float()
        y[3] = 0.5
    model = _mlp()
    with pytest.raises(ValueError, match=match):
        GramMonitor(model, _sgd(model), probe=(x, y), n_train=N, probe_size=None)


def test_train_sample_labels_are_checked():
    x, y = _data()
    y = y.clone()
    model = _mlp()
    probe_rows = GramMonitor(model, _sgd(model), probe=(x, y), n_train=N, probe_size=8, config=MonitorConfig(train_sample_size=0)).probe.indices
    outside = next(i for i in range(N) if i not in set(probe_rows.tolist()))
    y[outside] = 9
    model = _mlp()
    with pytest.raises(ValueError, match="train sample"):
        GramMonitor(model, _sgd(model), probe=(x, y), n_train=N, probe_size=8, config=MonitorConfig(train_sample_size=N))


@pytest.mark.parametrize("engine", ["perstep", "periodic"])
def test_nan_weights_fixed_later_recover(engine):
    def script(model, opt, x, y, mon):
        _train(model, opt, x, y, 4)
        good = copy.deepcopy(model.state_dict())
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
        _train(model, opt, x, y, 4)
        model.load_state_dict(good)          # the fix: a finite checkpoint
        _train(model, opt, x, y, 40)

    mon, msgs = _replayed(_mlp_sgd, script, engine=engine, reference_outputs=None)
    assert any("NaN" in m and "0.weight" in m for m in msgs), msgs
    assert not any("converge" in m for m in msgs), "NaN is named as NaN"
    assert mon.history[-1].step > 30 and math.isfinite(mon.predicted_gap) and mon.predicted_gap > 0
    if engine == "perstep":
        assert torch.isfinite(mon.perstep.delta()).all(), "no NaN left in the engine's state"


def test_nan_batch_skipped_by_the_loop_is_named_and_recovers():
    x, y = _data()
    x = x.clone()
    x[5] = float("nan")

    def build():
        model = _mlp()
        return model, _sgd(model), {"data": (x, y), "skip_nonfinite": True}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, opt, train = build()
        clean = torch.cat([torch.arange(0, 5), torch.arange(6, N)])
        mon = GramMonitor(model, opt, probe=(x[clean], y[clean]), n_train=N, **QUICK)
        _train(model, opt, x, y, 30, skip_nonfinite=True)
    assert any("NaN" in m and "inputs" in m for m in _messages(caught))
    assert math.isfinite(mon.predicted_gap) and mon.history[-1].step >= 10
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Refusals at construction: the message names the cause and the fix

@pytest.mark.parametrize("probe, n_train, match", [
    ("one-sample", 64, "at least 2.*Pass more samples"),
    ("larger-than-n_train", 32, r"n_train=32 is smaller than the probe \(m=64\).*len\(train_set\)"),
    ("dataset-larger-than-n_train", 32, r"n_train=32 is smaller than the probe"),
    ("empty", 64, "empty"),
    ("empty-dataset", None, "empty"),
    ("wrong-features", 64, r"don't fit the model.*\(m, \.\.\.\)"),
    ("float64-inputs", 64, r"dtype torch.float64.*don't fit"),
    ("mismatched-rows", 64, "10 samples but y has 9"),
    ("scalar-x", 64, "scalar"),
    ("bool-labels", 64, r"y.long\(\)"),
    ("list-inputs", 64, r"torch.as_tensor\(x\)"),
    ("int-inputs", 64, r"dtype torch.int64.*don't fit"),
    ("mse-target-shape", 64, r"failed on model outputs of shape \(2, 3\).*mse"),
    ("n_train-missing", None, r"n_train=len\(train_set\)"),
    ("n_train-float", 64.0, "n_train must be an int"),
    ("nan-inputs", 64, r"NaN/inf values \(samples \[2\]\)"),
    ("inf-inputs", 64, r"NaN/inf values \(samples \[0, 4\]\)"),
])
def test_bad_probes_are_refused(probe, n_train, match):
    x, y = _data()
    data = {
        "one-sample": (x[:1], y[:1]),
        "larger-than-n_train": (x, y),
        "dataset-larger-than-n_train": TensorDataset(x, y),
        "empty": (x[:0], y[:0]),
        "empty-dataset": TensorDataset(x[:0], y[:0]),
        "wrong-features": (torch.randn(10, D + 1), y[:10]),
        "float64-inputs": (x[:10].double(), y[:10]),
        "mismatched-rows": (x[:10], y[:9]),
        "scalar-x": (torch.tensor(1.0), y[:1]),
        "bool-labels": (x[:10], y[:10] > 0),
        "list-inputs": (x[:10].tolist(), y[:10]),
        "int-inputs": (torch.randint(0, 3, (10, D)), y[:10]),
        "mse-target-shape": (x[:10], torch.randn(10, 2)),
        "n_train-missing": (x[:10], y[:10]),
        "n_train-float": (x[:10], y[:10]),
        "nan-inputs": (x[:10].clone().index_fill_(0, torch.tensor([2]), float("nan")), y[:10]),
        "inf-inputs": (x[:10].clone().index_fill_(0, torch.tensor([0, 4]), float("inf")), y[:10]),
    }[probe]
    model = _mlp()
    loss = "mse" if probe == "mse-target-shape" else "cross_entropy"
    with pytest.raises(ValueError, match=match):
        GramMonitor(model, _sgd(model), probe=data, n_train=n_train, probe_size=None, loss=loss)


@pytest.mark.parametrize("case, match", [
    ("all-frozen", "no trainable parameters"),
    ("no-parameters", "no trainable parameters"),
    ("foreign-optimizer", "trains none of the model's parameters"),
    ("unsupported-optimizer", "does not support the optimizer"),
])
def test_bad_models_and_optimizers_are_refused(case, match):
    x, y = _data()
    model = _mlp()
    opt = _sgd(model)
    if case == "all-frozen":
        model.requires_grad_(False)
    elif case == "no-parameters":
        model = nn.Sequential(nn.Flatten())
    elif case == "foreign-optimizer":
        opt = _sgd(_mlp(1))
    else:
        opt = torch.optim.LBFGS(model.parameters())
    with pytest.raises((ValueError, TypeError), match=match):
        GramMonitor(model, opt, probe=(x, y), n_train=N, **QUICK)


@pytest.mark.parametrize("case", ["eval-mode-training", "step-closure"])
def test_steps_the_monitor_cannot_see_are_named(case):
    """No training forward before the step: said with the fix, never a silent zero gap, and the
    run unchanged."""
    x, y = _data()

    def build():
        model = _mlp()
        return model, _sgd(model), {}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, _, _, _ = _watched(build, 6, monitor=False)
    model, opt, _ = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = GramMonitor(model, opt, probe=(x, y), n_train=N, **QUICK)
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            idx = torch.randint(0, N, (16,), generator=g)

            def closure():
                opt.zero_grad()
                value = F.cross_entropy(model(x[idx]), y[idx])
                value.backward()
                return value

            if case == "eval-mode-training":
                model.eval()
                closure()
                opt.step()
            else:
                opt.step(closure)
    assert _same(plain, _params(model))
    if case == "step-closure":
        # optimizer.step(closure) is followed (the engine steps after the closure, as Lightning
        # calls the optimizer): nothing to report, and the steps are seen.
        assert not _messages(caught), _messages(caught)
        assert mon.perstep.steps == 6 and mon._stepper.batch_rows == 6 * 16
    else:
        assert any("model.train()" in m for m in _messages(caught)), _messages(caught)
    assert all(h.predicted_gap != 0.0 for h in mon.history[1:]), "no silent zero gap"


def test_measure_called_directly_never_raises(monkeypatch):
    x, y = _data()
    model, opt, _ = _mlp_sgd()
    mon = GramMonitor(model, opt, probe=(x, y), n_train=N, **QUICK)
    monkeypatch.setattr(kernel, "tangent_outputs", _boom)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert mon.measure() is None
    monkeypatch.undo()
    _train(model, opt, x, y, 2)
    assert mon.measure() is not None and math.isfinite(mon.predicted_gap)


@pytest.mark.parametrize("form", ["tensors", "dataset"])
def test_probe_data_larger_than_n_train_are_refused(form):
    """A probe of 8 drawn from 64 samples declared as a training set of 32."""
    x, y = _data()
    data = (x, y) if form == "tensors" else TensorDataset(x, y)
    model = _mlp()
    with pytest.raises(ValueError, match=r"probe data hold 64 samples, more than n_train=32.*training samples only"):
        GramMonitor(model, _sgd(model), probe=data, n_train=32, probe_size=8)


def test_nan_regression_targets_are_refused():
    x, _ = _data()
    y = torch.randn(N, K)
    y[3, 1] = float("nan")
    model = _mlp()
    with pytest.raises(ValueError, match=r"targets hold NaN/inf values \(samples \[3\]\)"):
        GramMonitor(model, _sgd(model), probe=(x, y), n_train=N, loss="mse", probe_size=None)


def test_nan_model_is_refused_by_name():
    x, y = _data()
    model = _mlp()
    with torch.no_grad():
        model[2].bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"parameter '2.bias' holds NaN/inf.*finite checkpoint"):
        GramMonitor(model, _sgd(model), probe=(x, y), n_train=N)


def test_deleted_monitor_stops_measuring():
    x, y = _data()
    model, opt, _ = _mlp_sgd()
    mon = GramMonitor(model, opt, probe=(x, y), n_train=N, **QUICK)
    ref = weakref.ref(mon)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del mon
        gc.collect()
    assert ref() is None, "hooks must not keep the monitor alive"
    assert any(issubclass(w.category, ResourceWarning) and "close()" in str(w.message) for w in caught)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not model._forward_pre_hooks
    _train(model, opt, x, y, 3)


# ---------------------------------------------------------------------------------------------
# Out of memory, frozen layers, schedulers, accumulation, AMP

@pytest.mark.parametrize("where", ["readout", "step"])
def test_out_of_memory_is_survived(monkeypatch, where):
    def oom(*args, **kwargs):
        raise getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)("CUDA out of memory. Tried to allocate 2.00 GiB")

    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, _, _, _ = _watched(_mlp_sgd, 8, monitor=False)
    model, opt, _ = _mlp_sgd()
    mon = GramMonitor(model, opt, probe=(x, y), n_train=N, **QUICK)
    monkeypatch.setattr(kernel, "tangent_outputs" if where == "readout" else "vjp_rows", oom)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, x, y, 8)
    assert _same(plain, _params(model))
    assert any("OutOfMemoryError" in m for m in _messages(caught))
    monkeypatch.undo()
    _train(model, opt, x, y, 30)
    assert mon.history[-1].step > 8 and math.isfinite(mon.predicted_gap)


def test_frozen_layer_at_construction():
    def build():
        model = _mlp()
        model[0].weight.requires_grad_(False)
        return model, _sgd(model), {}

    mon, caught = _bitwise(build)
    assert mon.perstep.dim == sum(p.numel() for p in mon.model.parameters() if p.requires_grad)
    assert len(_finite_history(mon)) == 5


@pytest.mark.parametrize("coordinates", ["exact", 64])
def test_layer_unfrozen_mid_training(coordinates):
    """Unfreezing (requires_grad False -> True, then add_param_group) keeps measuring; exact
    coordinates, fixed at attach time, say that they hold the new parameters fixed."""
    def build():
        model = _mlp()
        model[0].requires_grad_(False)
        return model, torch.optim.SGD(model[2].parameters(), lr=0.2), {}

    def script(model, opt, x, y, mon):
        _train(model, opt, x, y, 4)
        model[0].requires_grad_(True)
        opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.2})
        _train(model, opt, x, y, 6)

    mon, caught = _replayed(build, script, coordinates=coordinates)
    told = [m for m in caught if "became trainable" in m]
    assert len(told) == (1 if coordinates == "exact" else 0) and not any("failed" in m for m in caught)
    assert len(_finite_history(mon)) == 5 and mon.predicted_gap > 0


@pytest.mark.parametrize("engine, coordinates", [("periodic", "exact"), ("periodic", 64), ("perstep", "exact"),
                                                 ("perstep", 64)])
def test_layer_frozen_mid_training_is_held_fixed(engine, coordinates):
    def script(model, opt, x, y, mon):
        _train(model, opt, x, y, 4)
        model[0].requires_grad_(False)
        _train(model, opt, x, y, 6)

    mon, caught = _replayed(_mlp_sgd, script, engine=engine, coordinates=coordinates)
    assert caught == []
    assert len(_finite_history(mon)) == 5 and mon.predicted_gap > 0


@pytest.mark.parametrize("schedule", ["step", "onecycle", "cosine-to-zero"])
def test_schedulers(schedule):
    def build():
        model = _mlp()
        opt = _sgd(model, 0.2, momentum=0.9)
        sched = {
            "step": lambda: torch.optim.lr_scheduler.StepLR(opt, 3, gamma=0.5),
            "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.3, total_steps=10),
            "cosine-to-zero": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=9, eta_min=0.0),
        }[schedule]()
        return model, opt, {"scheduler": sched}

    mon, caught = _bitwise(build)
    assert len(_finite_history(mon)) == 5 and mon.predicted_gap > 0 and mon._failures.messages == []


def test_gradient_accumulation():
    def build():
        model = _mlp()
        return model, _sgd(model), {"accumulate": 3, "batch": 8}

    mon, caught = _bitwise(build)
    assert len(_finite_history(mon)) == 5 and mon.perstep.injections > 0


def test_cpu_autocast_bf16():
    def build():
        model = _mlp()
        return model, torch.optim.Adam(model.parameters(), lr=1e-2), {"autocast": True}

    mon, caught = _bitwise(build)
    assert len(_finite_history(mon)) == 5 and mon.predicted_gap > 0 and mon._failures.messages == []


class _SparseEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=True)
        self.head = nn.Linear(4, K)

    def forward(self, t):                                  # t (B, 3) token ids
        return self.head(self.emb(t).mean(1))


@pytest.mark.parametrize("coordinates", ["exact", 64])
def test_sparse_gradients(coordinates):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 10, (N, 3), generator=g), torch.randint(0, K, (N,), generator=g)

    def build():
        torch.manual_seed(0)
        model = _SparseEmbedding()
        return model, _sgd(model), {"data": (x, y)}

    mon, caught = _bitwise(build, coordinates=coordinates)
    assert caught == [] and len(_finite_history(mon)) == 5 and mon.predicted_gap > 0


@pytest.mark.parametrize("engine", ["perstep", "periodic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_models(engine, dtype):
    x, y = _data()

    def build():
        model = _mlp().to(dtype)
        return model, _sgd(model), {"data": (x.to(dtype), y)}

    mon, caught = _bitwise(build, engine=engine)
    assert caught == [] and len(_finite_history(mon)) == 5 and mon.predicted_gap > 0


class _Noisy(nn.Module):
    """Warns at every training forward, as some user code does."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()

    def forward(self, x):
        if self.training:
            warnings.warn("the user's own warning", UserWarning)
        return self.net(x)


def test_users_own_warnings_keep_their_once_per_location_filter():
    x, y = _data()
    model = _Noisy()
    opt = _sgd(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        GramMonitor(model, opt, probe=(x, y), n_train=N, **QUICK)
        _train(model, opt, x, y, 6)
    assert sum("the user's own warning" in str(w.message) for w in caught) == 1
