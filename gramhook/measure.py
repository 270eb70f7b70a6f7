"""Glue between a live model and the pure engines: compute :class:`Rates` at the current weights.

This is the only place that turns a module, an optimizer metric, a probe and a reference batch
into the tensors the engines of :mod:`gramhook.dynamics` consume.

Coordinates:
- ``"exact"``: ``δ`` in parameter coordinates (dimension P, the trainable parameters); the
  probe Jacobian is the plain ``J_i`` and the metric is P's diagonal.
- an integer ``s``: sketched coordinates ``x = Sᵀ P^{-1/2} δ``; the Jacobians are
  ``ĵ_iᵀ = J_i P^{1/2} S`` and the metric is the identity. When P changes over time (Adam) the
  sketched engine treats P as constant over each interval.
"""
from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

from . import kernel
from .dynamics.engine import KernelRates, Rates
from .losses import Loss, output_hessian, per_sample_losses, residual_and_hessian
from .optim import StepMetric

Coordinates = Union[str, int]

__all__ = ["probe_outputs", "engine_jacobian", "compute_rates", "compute_kernel_rates", "flat_metric"]


def probe_outputs(model: nn.Module, x: Tensor) -> Tensor:
    """Outputs ``(m, k)`` in eval mode, no grad, the model's mode restored."""
    with torch.no_grad(), kernel.eval_mode(model):
        out = model(x)
    return out.reshape(out.shape[0], -1)


def flat_metric(model: nn.Module, pre: Optional[Mapping[str, Tensor]], names=None) -> Optional[Tensor]:
    """P's diagonal flattened over trainable parameters ``(P,)``, or ``None`` for the identity."""
    if pre is None:
        return None
    params = kernel.trainable_parameters(model, names)
    return torch.cat([pre[n].reshape(-1) for n in params])


def _flat_decay(model: nn.Module, metric: StepMetric, names=None):
    if metric.decay is None:
        return None
    params = kernel.trainable_parameters(model, names)
    parts = []
    for n, p in params.items():
        rate = metric.decay.get(n, 0.0)
        parts.append(torch.as_tensor(rate, dtype=p.dtype, device=p.device).expand(p.shape).reshape(-1))
    return torch.cat(parts)


def sampled_half_hessian(hessian: Tensor, q: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """q random rows ``c`` per sample with ``E[Σ_c c cᵀ] = Λ``, ``(B, q, k)``.

    Each row is an eigenvector ``v_a`` of ``Λ_b`` drawn with probability ``e_a / tr Λ_b`` and
    scaled by ``sqrt(tr Λ_b / q)``: a confident softmax prediction, whose Λ has one or two
    non-negligible eigenvalues, is then represented almost exactly by a single row.
    """
    e, v = torch.linalg.eigh(hessian.double())
    e = e.clamp(min=0)
    total = e.sum(1, keepdim=True)
    prob = torch.where(total > 0, e / total.clamp(min=1e-300), torch.full_like(e, 1.0 / e.shape[1]))
    idx = torch.multinomial(prob.cpu(), q, replacement=True, generator=generator).to(e.device)   # (B, q)
    rows = torch.gather(v.transpose(1, 2), 1, idx.unsqueeze(-1).expand(-1, -1, v.shape[1]))     # (B, q, k)
    return (rows * (total / q).sqrt().unsqueeze(-1)).to(hessian.dtype)


def signed_half_hessian(hessian: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """One row ``c = Σ_a sqrt(e_a) η_a v_a`` per sample, random signs ``η_a = ±1`` in Λ_b's
    eigenbasis, ``(B, 1, k)``.

    ``E[c cᵀ] = Λ`` and ``|c|² = tr Λ`` exactly, like one eigenvector drawn with probability
    ``e_a / tr Λ`` (:func:`sampled_half_hessian`), but every eigendirection is in every row: the
    operator ``Jᵀ c cᵀ J`` is exact along each ``J_aᵀ`` direction when the ``J`` rows are nearly
    orthogonal, and its noise sits only in the cross terms. For a rank-one Λ (a confident softmax)
    both are the same row; for a flat Λ (MSE: ``2I/k``) a drawn eigenvector contracts one output
    in k, k times as hard.
    """
    e, v = torch.linalg.eigh(hessian.double())
    e = e.clamp(min=0)
    signs = torch.randint(0, 2, e.shape, generator=generator).to(e.device, e.dtype) * 2 - 1
    rows = torch.einsum("bka,ba->bk", v, e.sqrt() * signs)
    return rows.unsqueeze(1).to(hessian.dtype)


def engine_jacobian(
    model: nn.Module,
    x: Tensor,
    coordinates: Coordinates,
    metric: StepMetric,
    *,
    seed: int = 0,
    method: str = "auto",
    memory_budget: int = kernel.DEFAULT_MEMORY_BUDGET,
    cotangents: Optional[Tensor] = None,
) -> Tensor:
    """Per-sample Jacobians in engine coordinates, ``(m, k, D)``; with ``cotangents`` ``(m, q, k)``
    their combinations ``(m, q, D)``."""
    if coordinates == "exact":
        jac = kernel.flat_jacobian(model, x, names=metric.names, method=method, memory_budget=memory_budget)
        return jac if cotangents is None else torch.einsum("mqk,mkd->mqd", cotangents.to(jac.dtype), jac)
    # Parameters the optimizer does not train do not move: P = 0 on them.
    trained = set(metric.names)
    pre = metric.preconditioner
    others = {n: p for n, p in kernel.trainable_parameters(model).items() if n not in trained}
    if others:
        pre = dict(pre) if pre is not None else {n: torch.ones_like(p) for n, p in model.named_parameters() if n in trained}
        pre.update({n: torch.zeros_like(p) for n, p in others.items()})
    return kernel.sketched_jacobian(model, x, int(coordinates), seed=seed, preconditioner=pre, method=method,
                                    cotangents=cotangents)


def compute_rates(
    model: nn.Module,
    loss: Loss,
    probe_x: Tensor,
    probe_y: Tensor,
    metric: StepMetric,
    *,
    coordinates: Coordinates = "exact",
    ref_x: Optional[Tensor] = None,
    ref_y: Optional[Tensor] = None,
    ref_weight: float = 1.0,
    holdout: Optional[tuple] = None,
    seed: int = 0,
    method: str = "auto",
    ref_outputs: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Rates:
    """Everything engine (a) needs at the current weights.

    Args:
        probe_x, probe_y: the probe ``(m, ...)``.
        metric: the optimizer's dt, P and decay now.
        coordinates: ``"exact"`` or a sketch dimension.
        ref_x: a reference batch of training inputs ``(B, ...)``; ``ref_y`` only for losses
            whose Hessian needs targets.
        ref_weight: the share of the training set the reference batch stands for.
        holdout: ``(x, y)`` for replace-one with a holdout stand-in.
        ref_outputs: output directions per reference sample (``None``: all k). With q of them the
            reference rows are q sampled rows of ``Λ_b^{1/2} J_b`` (see :func:`sampled_half_hessian`),
            an unbiased estimate of ``J_bᵀ Λ_b J_b`` at q/k of the Jacobian cost, so that more
            distinct samples can enter the contraction for the same cost.
        generator: draws those directions (``None``: the global generator).
    """
    out = probe_outputs(model, probe_x)
    per_sample_losses(loss, out, probe_y)
    r, lam = residual_and_hessian(loss, out, probe_y)
    jac = engine_jacobian(model, probe_x, coordinates, metric, seed=seed, method=method)
    exact = coordinates == "exact"
    rates = Rates(
        outputs=out,
        targets=probe_y,
        residual=r,
        hessian=lam,
        probe_jac=jac,
        ref_weight=ref_weight,
        metric=flat_metric(model, metric.preconditioner, metric.names) if exact else None,
        decay=_flat_decay(model, metric, metric.names) if exact else _mean_decay(model, metric),
    )
    if ref_x is not None and ref_x.shape[0] > 0:
        ref_out = probe_outputs(model, ref_x)
        ref_hessian = output_hessian(loss, ref_out, ref_y, target_like=probe_y[0])
        if ref_outputs is not None and ref_outputs < out.shape[1]:
            # The probe's own contraction rows with the same economy (its Jacobians are full anyway).
            rates.own_cotangents = sampled_half_hessian(lam, ref_outputs, generator)
        if ref_outputs is None or ref_outputs >= ref_out.shape[1]:
            rates.ref_hessian = ref_hessian
            rates.ref_jac = engine_jacobian(model, ref_x, coordinates, metric, seed=seed, method=method)
        else:
            cot = sampled_half_hessian(ref_hessian, ref_outputs, generator)
            rates.ref_jac = engine_jacobian(model, ref_x, coordinates, metric, seed=seed, method=method, cotangents=cot)
            rates.ref_hessian = torch.eye(ref_outputs, dtype=ref_hessian.dtype, device=ref_hessian.device).expand(
                ref_x.shape[0], ref_outputs, ref_outputs)
    if holdout is not None:
        hx, hy = holdout
        h_out = probe_outputs(model, hx)
        h_r, _ = residual_and_hessian(loss, h_out, hy)
        h_jac = engine_jacobian(model, hx, coordinates, metric, seed=seed, method=method)
        grads = torch.einsum("hkd,hk->hd", h_jac, h_r.to(h_jac.dtype))
        # A holdout as large as the probe pairs z'_i with probe sample i; otherwise its mean stands in.
        if hx.shape[0] == probe_x.shape[0]:
            rates.standin_grad, rates.standin_jac = grads, h_jac
            rates.standin_hessian = residual_and_hessian(loss, h_out, hy)[1]
        else:
            rates.standin_grad = grads.mean(0)
    return rates


def _mean_decay(model: nn.Module, metric: StepMetric) -> Optional[float]:
    """Sketched coordinates carry one decay rate: the parameter-count-weighted mean."""
    flat = _flat_decay(model, metric, metric.names)
    return None if flat is None else float(flat.mean())


def compute_kernel_rates(
    model: nn.Module,
    loss: Loss,
    probe_x: Tensor,
    probe_y: Tensor,
    metric: StepMetric,
    *,
    holdout: Optional[tuple] = None,
    method: str = "auto",
) -> KernelRates:
    """Everything engine (b) needs: the probe NTK in the optimizer metric and r, Λ."""
    out = probe_outputs(model, probe_x)
    per_sample_losses(loss, out, probe_y)
    r, lam = residual_and_hessian(loss, out, probe_y)
    theta = kernel.empirical_ntk(model, probe_x, preconditioner=metric.preconditioner, method=method)
    rates = KernelRates(out, probe_y, r, lam, theta, decay=_mean_decay(model, metric))
    if holdout is not None:
        hx, hy = holdout
        h_r, _ = residual_and_hessian(loss, probe_outputs(model, hx), hy)
        cross = kernel.empirical_ntk(model, probe_x, hx, preconditioner=metric.preconditioner, method=method)
        cols = torch.einsum("iahb,hb->iah", cross, h_r.to(cross.dtype))     # Θ_{:,h} r_h, (m, k, H)
        rates.standin_cross = cols if hx.shape[0] == probe_x.shape[0] else cols.mean(2)
    return rates
