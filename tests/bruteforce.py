"""Brute-force leave-one-out (LOO) ground truth on tiny problems (float64, CPU, deterministic).

Tests import this module to get the exact quantity the gramhook engines estimate
(docs/theory.md §2): for a training sample z_i,

    g_i(t) = loss(w^(i)(t); z_i) - loss(w(t); z_i),

where w^(i) is retrained from the *same* initialization on S without z_i (LOO) or with z_i
replaced by a fresh sample (replace-one). Nothing here is approximated: every copy is really
retrained. ``loo_gaps`` and ``replace_one_gaps`` train all copies at once with
``torch.func.vmap`` over stacked parameters; ``train`` is the plain one-model-at-a-time version
(``torch.optim.SGD``) that the vectorized code is checked against.

Objective conventions (so that dropping z_i only removes its term):
  full batch:  L = sum_{j != drop} loss_j / n                        (n, not n - 1)
  minibatch:   L = sum_{b in batch, idx_b != drop} loss_b / batch_size (coupled LOO: same batches)
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

F64 = torch.float64
State = dict  # name -> Tensor, a state_dict (or a params dict) of Problem.model


@dataclass
class Problem:
    """A tiny supervised problem.

    model:   initial model, float64 (never mutated here; every function works on a deepcopy).
    x, y:    training set, x (n, d); y (n, 1) float for regression, (n,) int64 for classification.
    x_test, y_test: large test set with the same layout (20000 samples by default).
    loss:    per-sample loss, (out (b, k), y (b, ...)) -> (b,).
    x_fresh, y_fresh: optional extra samples (n, ...) to use as replacements in replace-one.
    generator: the data generator, positioned right after the data draws (the reference scripts
             keep drawing SGD batches and the probe from it). Drawing from it advances it.
    """

    model: nn.Module
    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    loss: Callable[[Tensor, Tensor], Tensor]
    x_fresh: Optional[Tensor] = None
    y_fresh: Optional[Tensor] = None
    generator: Optional[torch.Generator] = None

    @property
    def n(self) -> int:
        return self.x.shape[0]


def mse_loss(out: Tensor, y: Tensor) -> Tensor:
    """0.5 * ||out - y||^2 per sample: (b, k), (b, k) -> (b,)."""
    return 0.5 * ((out - y) ** 2).sum(1)


def ce_loss(out: Tensor, y: Tensor) -> Tensor:
    """Softmax cross-entropy per sample: logits (b, k), labels (b,) int64 -> (b,)."""
    return nn.functional.cross_entropy(out, y, reduction="none")


# ----------------------------------------------------------------------------- problems

def linear_regression_problem(n: int = 60, d: int = 80, noise: float = 0.5, seed: int = 0) -> Problem:
    """Linear regression as in docs/theory.md §7: w* ~ N(0, 1/d), x ~ 3 N(0, I)/sqrt(d), y = x w* + noise eps.

    Model: nn.Linear(d, 1, bias=False) with weight 0.3 N(0, 1); loss mse_loss. y has shape (n, 1).
    Generator draws follow the reference: w*, train set, fresh (replacement) set, test set, w0.
    """
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=g, dtype=F64) / math.sqrt(d)

    def sample(m):
        x = torch.randn(m, d, generator=g, dtype=F64) / math.sqrt(d) * 3
        return x, (x @ w_star + noise * torch.randn(m, generator=g, dtype=F64))[:, None]

    (x, y), (xf, yf), (xt, yt) = sample(n), sample(n), sample(20000)
    w0 = torch.randn(d, generator=g, dtype=F64) * 0.3
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init uses the global RNG
        model = nn.Linear(d, 1, bias=False, dtype=F64)
    with torch.no_grad():
        model.weight.copy_(w0[None])
    return Problem(model, x, y, xt, yt, mse_loss, xf, yf, g)


def _teacher_data(n, d, k, label_noise, seed):
    """Noisy linear-teacher labels: y = argmax(x Wt + label_noise * eps), x ~ N(0, I_d)."""
    g = torch.Generator().manual_seed(seed)
    wt = torch.randn(d, k, generator=g, dtype=F64)

    def sample(m):
        x = torch.randn(m, d, generator=g, dtype=F64)
        return x, (x @ wt + label_noise * torch.randn(m, k, generator=g, dtype=F64)).argmax(1)

    (x, y), (xt, yt) = sample(n), sample(20000)
    return g, x, y, xt, yt


def _tanh_mlp(sizes: Sequence[int], seed: int) -> nn.Module:
    """Linear-Tanh-...-Linear in float64, initialized after torch.manual_seed(seed) (global RNG restored)."""
    layers = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b, dtype=F64), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def tanh_mlp_problem(n: int = 64, width: int = 256, k: int = 3, d: int = 10, seed: int = 0,
                     label_noise: float = 0.8) -> Problem:
    """One-hidden-layer tanh MLP d-width-k with CE on teacher labels (reference mlp_loo.py)."""
    g, x, y, xt, yt = _teacher_data(n, d, k, label_noise, seed)
    return Problem(_tanh_mlp([d, width, k], seed), x, y, xt, yt, ce_loss, generator=g)


def sgd_mlp_problem(n: int = 256, width: int = 128, k: int = 3, d: int = 10, seed: int = 0) -> Problem:
    """Two-hidden-layer tanh MLP d-width-width-k with CE, label noise 1.0 (mlp_sgd_param_engine.py).

    To reproduce the reference, draw the batches and then the probe from ``problem.generator``:
    ``make_batches(n, 32, 600, p.generator)``, then ``torch.randperm(n, generator=p.generator)[:48]``.
    """
    g, x, y, xt, yt = _teacher_data(n, d, k, 1.0, seed)
    return Problem(_tanh_mlp([d, width, width, k], seed), x, y, xt, yt, ce_loss, generator=g)


def make_batches(n: int, batch_size: Optional[int], steps: int,
                 seed: Union[int, torch.Generator] = 0) -> list:
    """One int64 index tensor (batch_size,) per step, drawn with replacement by torch.randint.

    ``seed`` is an int or a Generator (which is advanced). batch_size None: full batch,
    every entry is arange(n), which trains exactly like ``batches=None``.
    """
    if batch_size is None:
        return [torch.arange(n)] * steps
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    return [torch.randint(0, n, (batch_size,), generator=g) for _ in range(steps)]


# ----------------------------------------------------------------------------- evaluation

def losses_at(problem: Problem, state: State, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample losses (m,) of the model with parameters ``state`` on inputs x (m, d), targets y."""
    with torch.no_grad():
        return problem.loss(functional_call(problem.model, state, (x,)), y)


def true_gap(problem: Problem, state: State) -> float:
    """Mean test loss minus mean train loss at ``state``."""
    return (losses_at(problem, state, problem.x_test, problem.y_test).mean()
            - losses_at(problem, state, problem.x, problem.y).mean()).item()


# ----------------------------------------------------------------------------- training

def train(problem: Problem, lr: float, steps: int, *, batches: Optional[Sequence[Tensor]] = None,
          drop: Optional[int] = None, momentum: float = 0.0, record: Iterable[int] = ()) -> dict:
    """Train a deepcopy of problem.model with torch.optim.SGD(lr, momentum), optionally without z_drop.

    Returns {t: state_dict copy} for every t in ``record`` (t = 0 is the initialization).
    """
    model = copy.deepcopy(problem.model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    keep = torch.ones(problem.n, dtype=F64)
    if drop is not None:
        keep[drop] = 0.0
    record, states = set(record), {}
    for t in range(steps + 1):
        if t in record:
            states[t] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if t == steps:
            break
        if batches is None:
            x, y, w, denom = problem.x, problem.y, keep, problem.n
        else:
            idx = batches[t]
            x, y, w, denom = problem.x[idx], problem.y[idx], keep[idx], len(idx)
        opt.zero_grad()
        ((problem.loss(model(x), y) * w).sum() / denom).backward()
        opt.step()
    return states


def _train_copies(problem, lr, steps, checkpoints, xs, ys, ws, batches, momentum) -> dict:
    """Train C copies of problem.model at once, copy c on data (xs[c], ys[c]) with sample weights ws[c].

    xs (C, n, d), ys (C, n, ...), ws (C, n). Same update as ``train`` (SGD, heavy-ball buffer
    initialized to the first gradient). Returns {t: {name: stacked params (C, *shape)}}.
    """
    C = xs.shape[0]
    params = {k: v.detach().unsqueeze(0).repeat(C, *[1] * v.dim())
              for k, v in problem.model.named_parameters()}

    def objective(p, x, y, w, denom):
        return (problem.loss(functional_call(problem.model, p, (x,)), y) * w).sum() / denom

    grads_of = vmap(grad(objective), in_dims=(0, 0, 0, 0, None))
    bufs, out = {}, {}
    for t in range(steps + 1):
        if t in checkpoints:
            out[t] = {k: v.clone() for k, v in params.items()}
        if t == steps:
            break
        if batches is None:
            grads = grads_of(params, xs, ys, ws, problem.n)
        else:
            idx = batches[t]
            grads = grads_of(params, xs[:, idx], ys[:, idx], ws[:, idx], len(idx))
        for k, gk in grads.items():
            if momentum:
                gk = bufs[k] = gk.clone() if t == 0 else bufs[k].mul_(momentum).add_(gk)
            params[k] = params[k].add(gk, alpha=-lr)
    return out


def _own_sample_gaps(problem, lr, steps, checkpoints, samples, make_data, batches, momentum, chunk):
    """Shared driver: per chunk of samples, copy 0 is the unperturbed run, copy 1 + a perturbs samples[a].

    make_data(chunk_indices) -> (xs, ys, ws) for the perturbed copies. Returns {t: g (m,)}.
    """
    samples = torch.arange(problem.n) if samples is None else torch.as_tensor(list(samples))
    checkpoints = sorted(set(checkpoints))
    one_loss = vmap(lambda p, x, y: problem.loss(functional_call(problem.model, p, (x[None],)), y[None])[0])
    parts = {t: [] for t in checkpoints}
    for idx in samples.split(chunk):
        xs, ys, ws = make_data(idx)
        xs = torch.cat([problem.x[None], xs])
        ys = torch.cat([problem.y[None], ys])
        ws = torch.cat([torch.ones(1, problem.n, dtype=F64), ws])
        runs = _train_copies(problem, lr, steps, set(checkpoints), xs, ys, ws, batches, momentum)
        with torch.no_grad():
            for t, p in runs.items():
                x, y = problem.x[idx], problem.y[idx]  # both evaluated alike, so g(0) == 0 exactly
                base = one_loss({k: v[:1].expand(len(idx), *v.shape[1:]) for k, v in p.items()}, x, y)
                parts[t].append(one_loss({k: v[1:] for k, v in p.items()}, x, y) - base)
    return {t: torch.cat(v) for t, v in parts.items()}


def loo_gaps(problem: Problem, lr: float, steps: int, checkpoints: Iterable[int], *,
             samples: Optional[Iterable[int]] = None, batches: Optional[Sequence[Tensor]] = None,
             momentum: float = 0.0, chunk: int = 64) -> dict:
    """Brute-force (coupled) LOO: {t: g (m,)}, g[a] = loss(w^(i)(t); z_i) - loss(w(t); z_i), i = samples[a].

    samples defaults to all n; with ``batches`` every copy sees the same batch sequence with z_i
    masked out. ``chunk`` copies are trained at once. Equals ``train(drop=i)`` to rounding.
    """
    def make_data(idx):
        ws = torch.ones(len(idx), problem.n, dtype=F64)
        ws[torch.arange(len(idx)), idx] = 0.0
        xs = problem.x.expand(len(idx), *problem.x.shape)
        return xs, problem.y.expand(len(idx), *problem.y.shape), ws

    return _own_sample_gaps(problem, lr, steps, checkpoints, samples, make_data, batches, momentum, chunk)


def replace_one_gaps(problem: Problem, lr: float, steps: int, checkpoints: Iterable[int],
                     x_new: Tensor, y_new: Tensor, *, samples: Optional[Iterable[int]] = None,
                     batches: Optional[Sequence[Tensor]] = None, momentum: float = 0.0,
                     chunk: int = 64) -> dict:
    """Brute-force replace-one: z_i -> (x_new[i], y_new[i]) (x_new (n, d), y_new like y), retrain.

    Returns {t: g (m,)} with g[a] = loss(w^(i)(t); z_i) - loss(w(t); z_i) on the *original* z_i.
    """
    def make_data(idx):
        rows = torch.arange(len(idx))
        xs = problem.x.expand(len(idx), *problem.x.shape).clone()
        ys = problem.y.expand(len(idx), *problem.y.shape).clone()
        xs[rows, idx], ys[rows, idx] = x_new[idx], y_new[idx]
        return xs, ys, torch.ones(len(idx), problem.n, dtype=F64)

    return _own_sample_gaps(problem, lr, steps, checkpoints, samples, make_data, batches, momentum, chunk)
