"""Drive the gap engines along a real training run of a brute-force :class:`bruteforce.Problem`.

The training loop is the same one ``bruteforce.train`` uses (SGD on ``Σ loss / n`` full batch or
``Σ loss / batch_size`` per minibatch), so engine estimates and brute-force leave-one-out see the
same trajectory. Used by the engine tests and by ``benchmarks/research/cadence.py``.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional, Sequence, Union

import torch

from gramhook.dynamics.engine import EngineConfig, FunctionSpaceEngine, ParameterSpaceEngine
from gramhook.losses import Loss
from gramhook.measure import compute_kernel_rates, compute_rates
from gramhook.optim import read_optimizer, step_dt


@dataclasses.dataclass
class EngineRun:
    """Engine estimates at checkpoints: ``gaps[t]`` is the per-sample ``g`` ``(m,)``."""

    gaps: dict
    estimates: dict
    true_gap: dict


def run_engine(
    problem,
    lr: float,
    steps: int,
    checkpoints: Sequence[int],
    *,
    engine: str = "param",
    probe: Optional[torch.Tensor] = None,
    batches=None,
    every: int = 1,
    ref_batches_per_interval: int = 1,
    ref_size: int = 32,
    coordinates: Union[str, int] = "exact",
    mode: str = "loo",
    standin: str = "probe",
    holdout=None,
    seed: int = 0,
    momentum: float = 0.0,
    integrator: str = "exponential",
    ref_outputs: Optional[int] = None,
    reference_history: int = 1,
    sketch_extrapolation: bool = False,
    adam: bool = False,
) -> EngineRun:
    """Train ``problem`` and integrate an engine; measurements every ``every`` steps.

    With ``probe=None`` the probe is the whole training set and there are no reference batches.
    Otherwise reference batches of ``ref_size`` are drawn from the non-probe samples and stand for
    their share ``(n − m)/n`` of the data; the probe's own rows enter the contraction exactly.
    """
    n = problem.n
    loss = Loss("problem", problem.loss, hessian_needs_target=False)
    model = copy.deepcopy(problem.model)
    opt = torch.optim.Adam(model.parameters(), lr=lr) if adam else torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    idx = torch.arange(n) if probe is None else probe
    px, py = problem.x[idx], problem.y[idx]
    m = len(idx)
    nonprobe = torch.tensor(sorted(set(range(n)) - set(idx.tolist())), dtype=torch.long)
    cfg = EngineConfig(n_train=n, m=m, mode=mode, standin=standin, reference_history=reference_history,
                       sketch_extrapolation=sketch_extrapolation)
    k = int(model(px[:1]).reshape(1, -1).shape[1])
    if engine == "param":
        dim = sum(p.numel() for p in model.parameters()) if coordinates == "exact" else int(coordinates)
        eng = ParameterSpaceEngine(cfg, dim, loss, dtype=torch.float64)
    else:
        eng = FunctionSpaceEngine(cfg, k, loss, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    gaps, estimates, true = {}, {}, {}
    elapsed, nsteps, nsteps_total = 0.0, 0, 0
    for t in range(steps + 1):
        if t % every == 0 or t in checkpoints:
            met = read_optimizer(opt, model)
            if engine == "param":
                ref_x = None
                if len(nonprobe) and ref_batches_per_interval:
                    draws = torch.randint(0, len(nonprobe), (ref_batches_per_interval * ref_size,), generator=gen)
                    ref_x = problem.x[nonprobe[draws]]
                rates = compute_rates(
                    model, loss, px, py, met, coordinates=coordinates, ref_x=ref_x,
                    ref_weight=(n - m) / n, holdout=holdout, seed=seed, method="auto",
                    ref_outputs=ref_outputs, generator=gen,
                )
            else:
                rates = compute_kernel_rates(model, loss, px, py, met, holdout=holdout, method="reference")
            est = eng.measure(elapsed, rates, steps=(nsteps or None) if integrator == "discrete" else None)
            elapsed, nsteps = 0.0, 0
            if t in checkpoints:
                gaps[t] = est.per_sample.clone()
                estimates[t] = est
                with torch.no_grad():
                    true[t] = float(problem.loss(model(problem.x_test), problem.y_test).mean()
                                    - problem.loss(model(problem.x), problem.y).mean())
        if t == steps:
            break
        opt.zero_grad()
        if batches is None:
            (problem.loss(model(problem.x), problem.y).sum() / n).backward()
        else:
            b = batches[t]
            (problem.loss(model(problem.x[b]), problem.y[b]).sum() / len(b)).backward()
        opt.step()
        elapsed += step_dt(opt, nsteps_total + 1)  # momentum start-up included
        nsteps_total += 1
        nsteps += 1
    return EngineRun(gaps, estimates, true)
