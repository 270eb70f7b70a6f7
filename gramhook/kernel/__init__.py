"""Empirical NTK and gradient Grams (THEORY §1).

``method="reference"`` contracts explicit torch.func Jacobians and works for any module; it is the
ground truth. ``"fast"`` and ``"auto"`` use per-layer handlers where they exist (see
``gramhook.kernel.assemble``); until a handler covers a parameter, that parameter takes the
reference path.
"""
from __future__ import annotations

from .reference import (
    DEFAULT_MEMORY_BUDGET,
    eval_mode,
    flat_jacobian,
    gaussian_sketch_matrix,
    output_size,
    per_sample_gradients,
    per_sample_jacobians,
    sketched_jacobian,
    trainable_parameters,
)
from . import reference as _reference

METHODS = ("auto", "reference", "fast")

__all__ = [
    "METHODS",
    "DEFAULT_MEMORY_BUDGET",
    "empirical_ntk",
    "gradient_gram",
    "eval_mode",
    "flat_jacobian",
    "gaussian_sketch_matrix",
    "output_size",
    "per_sample_gradients",
    "per_sample_jacobians",
    "sketched_jacobian",
    "trainable_parameters",
]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")


def empirical_ntk(model, x1, x2=None, *, preconditioner=None, method="auto", memory_budget=DEFAULT_MEMORY_BUDGET):
    """Empirical NTK ``(m1, k, m2, k)`` in the optimizer metric; see :mod:`gramhook.kernel.reference`."""
    _check_method(method)
    return _reference.empirical_ntk(model, x1, x2, preconditioner=preconditioner, memory_budget=memory_budget)


def gradient_gram(model, loss, x, y, *, preconditioner=None, method="auto", memory_budget=DEFAULT_MEMORY_BUDGET):
    """Per-sample loss-gradient Gram ``(m, m)``, ``G[i, j] = ⟨∇ℓ_i, P ∇ℓ_j⟩``."""
    _check_method(method)
    return _reference.gradient_gram(model, loss, x, y, preconditioner=preconditioner, memory_budget=memory_budget)
