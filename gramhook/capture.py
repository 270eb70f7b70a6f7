"""What one training step feeds the per-step engine (docs/theory.md §9): rows and injections from the
trained batch, at the weights it was trained at.

Called from the optimizer's step pre-hook, when ``.grad`` holds the batch's mean gradient and the
weights are still ``w_t``:

1. the batch inputs were recorded by the model's forward pre-hook (train mode only);
2. probe samples in the batch are recognised by :class:`ProbeMatcher`;
3. a random subsample of ``rows`` batch samples gives contraction rows ``z_j = P^{1/2} J_jᵀ c_j``,
   one output direction ``c_j`` each with ``E[c_j c_jᵀ] = Λ_j`` and ``|c_j|² = tr Λ_j`` (no labels
   needed): by default ``c_j = Σ_a sqrt(e_a) η_a v_a`` with random signs in Λ_j's eigenbasis
   (:func:`gramhook.measure.signed_half_hessian`), or one eigenvector drawn in proportion to its
   eigenvalue and scaled by ``sqrt(tr Λ_j)`` (``directions="eigen"``);
4. each recognised probe sample i gets its injection ``P^{1/2}(ḡ_B − ∇ℓ_i)/(B − 1)``, the change
   of the batch's mean gradient when i is dropped, with ``ḡ_B`` read from ``.grad``.

When no probe sample is ever recognised (augmented inputs, a probe given separately), injection
is *simulated*: at every step each probe sample is trained with probability ``B/n``, as a sample
of the training set would be, and injected from its own input. :attr:`StepCapture.mode` says which
is active.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from . import kernel
from .dynamics.perstep import PerStepEngine
from .losses import Loss, output_hessian, residual_and_hessian
from .measure import sampled_half_hessian, signed_half_hessian
from .optim import step_rule

__all__ = ["ProbeMatcher", "StepCapture", "BatchStatistics", "cancelled_biases"]


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def cancelled_biases(model: nn.Module, x: Tensor) -> tuple:
    """Names of the biases that a batch or instance normalisation cancels exactly: the bias of a
    linear or convolution layer whose output goes straight into a ``BatchNorm*d`` or
    ``InstanceNorm*d`` (which subtracts the per-channel mean). The training loss does not depend
    on them, so their gradient is round-off; with the normalisation's statistics held fixed, as
    the per-step rows take them, the bias would look like a live direction, and Adam's P (1/√v̂
    of a round-off gradient) would blow it up.

    Found by one forward of ``x`` (eval mode, no gradients) with hooks that match a layer's output
    tensor to a normalisation's input tensor.
    """
    producers: Dict[int, str] = {}
    found: List[str] = []
    names = {id(mod): name for name, mod in model.named_modules()}

    def produced(module, args, out):
        if isinstance(out, Tensor) and getattr(module, "bias", None) is not None and module.bias.requires_grad:
            producers[id(out)] = names[id(module)]

    def consumed(module, args):
        if args and isinstance(args[0], Tensor) and id(args[0]) in producers:
            found.append(producers[id(args[0])])

    layers = (nn.Linear, nn.modules.conv._ConvNd)
    handles = [mod.register_forward_hook(produced) for mod in model.modules() if isinstance(mod, layers)]
    handles += [mod.register_forward_pre_hook(consumed) for mod in model.modules() if isinstance(mod, _NORMS)]
    try:
        with torch.no_grad(), kernel.eval_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return tuple(dict.fromkeys(f"{n}.bias" if n else "bias" for n in found))


class ProbeMatcher:
    """Finds the probe's own samples among training inputs.

    Rows are matched by two fixed random projections (float64, relative tolerance 1e-9): an
    exact copy of a probe input matches, an augmented or perturbed copy does not.
    """

    def __init__(self, probe_x: Tensor, seed: int):
        self.shape = tuple(probe_x.shape[1:])
        g = torch.Generator().manual_seed(seed + 3)
        d = int(probe_x[0].numel())
        self.w = torch.randn(d, 2, generator=g, dtype=torch.float64).to(probe_x.device)
        self.keys = self._project(probe_x)                            # (m, 2)

    def _project(self, x: Tensor) -> Tensor:
        return x.detach().reshape(x.shape[0], -1).to(self.w.device, torch.float64) @ self.w

    def match(self, x: Tensor) -> Tensor:
        """Probe index of every row of ``x``, −1 where it is no probe sample, ``(B,)``."""
        none = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        if tuple(x.shape[1:]) != self.shape or x.shape[0] == 0:
            return none
        f = self._project(x)
        tol = 1e-9 * (1.0 + f.abs().unsqueeze(1) + self.keys.abs().unsqueeze(0))
        hit = ((f.unsqueeze(1) - self.keys.unsqueeze(0)).abs() <= tol).all(-1)      # (B, m)
        found = hit.any(1)
        idx = torch.where(found, hit.float().argmax(1), torch.full_like(found, -1, dtype=torch.long))
        return idx.to(x.device)

    def keep(self, x: Tensor) -> Tensor:
        """Boolean mask over the rows of ``x``: True for rows that are not probe samples."""
        return self.match(x) < 0


class BatchStatistics:
    """The batch statistics each BatchNorm layer normalised with in the training forwards of one
    step, so the step's rows are differentiated through the normalisation the step trained with
    (the statistics held fixed) rather than through the running averages.

    A forward pre-hook on every BatchNorm layer that tracks running statistics records its
    input's biased mean and variance while the layer is in train mode (the monitor's own
    forwards run in eval mode and are not recorded); :meth:`applied` writes them into the running
    buffers for the duration of a block and restores the buffers bitwise afterwards.
    """

    def __init__(self, model: nn.Module):
        self.layers = [mod for mod in model.modules()
                       if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats
                       and mod.running_mean is not None and mod.running_var is not None]
        self.records: Dict[int, List[tuple]] = {}
        self.handles = [mod.register_forward_pre_hook(self._record) for mod in self.layers]

    def _record(self, module, args) -> None:
        if not module.training or not torch.is_grad_enabled() or not args or not isinstance(args[0], Tensor):
            return
        try:
            self._add(module, args[0])
        except Exception:   # never break the user's forward; the layer then keeps its running stats
            self.records.pop(id(module), None)

    def _add(self, module, x: Tensor) -> None:
        with torch.no_grad():
            x = x.detach()
            if not x.is_floating_point():
                return
            dims = [0] + list(range(2, x.dim()))
            count = x.numel() // x.shape[1]
            var, mean = torch.var_mean(x, dims, correction=0)
            mean = mean.double()
            second = var.double() + mean * mean
        self.records.setdefault(id(module), []).append((count, mean, second))

    def clear(self) -> None:
        self.records = {}

    @contextlib.contextmanager
    def applied(self):
        """Running buffers replaced by the recorded batch statistics (pooled over the step's
        forwards), restored on exit; then the records are cleared."""
        saved = []
        try:
            for mod in self.layers:
                recs = self.records.get(id(mod))
                if not recs:
                    continue
                total = sum(c for c, _, _ in recs)
                mean = sum(c * m for c, m, _ in recs) / total
                var = (sum(c * q for c, _, q in recs) / total - mean * mean).clamp(min=0)
                saved.append((mod, mod.running_mean.clone(), mod.running_var.clone()))
                mod.running_mean.copy_(mean.to(mod.running_mean.dtype))
                mod.running_var.copy_(var.to(mod.running_var.dtype))
            yield
        finally:
            for mod, mean, var in saved:
                mod.running_mean.copy_(mean)
                mod.running_var.copy_(var)
            self.clear()


class StepCapture:
    """Feeds a :class:`PerStepEngine` from each training step.

    Args:
        model, optimizer, loss: the user's.
        probe_x, probe_y: the probe ``(m, ...)``.
        n_train: n.
        engine: the engine to advance.
        sketch: the sketch size s, or ``None`` for exact coordinates.
        rows: contraction rows per step (batch subsample; ``None``: half the batch).
        seed: of the sketch and of the row and direction draws (a private generator).
        method: kernel method.
        matcher: recognises probe rows (default: a new one from the probe and seed).
        names: the parameters of exact coordinates (default: the ``requires_grad`` ones now).
        directions: ``"signs"`` or ``"eigen"``, how each row's output direction is drawn (item 3
            above). On flat Λ (MSE) a drawn eigenvector contracts one output in k, k times as
            hard, and the noise inflates the gaps: on a digits MLP under MSE "signs" gave 1.13×
            brute-force leave-one-out (corr 0.99) where "eigen" gave 1.29× (0.97).
    """

    def __init__(self, model: nn.Module, optimizer, loss: Loss, probe_x: Tensor, probe_y: Tensor, n_train: int,
                 engine: PerStepEngine, *, sketch: Optional[int], rows: Optional[int], seed: int, method: str = "auto",
                 matcher: Optional[ProbeMatcher] = None, names: Optional[tuple] = None,
                 directions: str = "signs"):
        if directions not in ("signs", "eigen"):
            raise ValueError(f"directions must be 'signs' or 'eigen', got {directions!r}")
        self.directions = directions
        self.model, self.optimizer, self.loss = model, optimizer, loss
        self.probe_x, self.probe_y, self.n_train = probe_x, probe_y, n_train
        self.engine, self.sketch, self.rows, self.seed, self.method = engine, sketch, rows, seed, method
        self.matcher = matcher if matcher is not None else ProbeMatcher(probe_x, seed)
        self.names = None if sketch is not None else names
        self.gen = torch.Generator().manual_seed(seed + 5)
        self.pending: List[Tensor] = []
        self.recognised = 0          # probe samples recognised in training batches so far
        self.batch_rows = 0          # training rows seen so far
        self.simulate = False
        self.world = 1               # data-parallel replicas: .grad averages world·B samples
        self.statistics = BatchStatistics(model)
        try:
            self.still = cancelled_biases(model, probe_x[:2])
        except Exception:  # a model this forward cannot run keeps every coordinate
            self.still = ()

    @property
    def mode(self) -> str:
        """``"recognised"``: probe samples are injected at the steps that train them;
        ``"simulated"``: none was ever seen in a batch, so their training is simulated."""
        return "simulated" if self.simulate else "recognised"

    def record(self, x: Tensor) -> None:
        """Forward pre-hook body: keep a reference to the training inputs until the step."""
        if len(self.pending) < 64:
            self.pending.append(x.detach())

    def _batch(self) -> Optional[Tensor]:
        xs, self.pending = self.pending, []
        xs = [x for x in xs if tuple(x.shape[1:]) == tuple(self.probe_x.shape[1:])]
        if not xs:
            return None
        return xs[0] if len(xs) == 1 else torch.cat(xs)

    def step(self) -> None:
        """Step pre-hook body: one engine step from the pending batch (BatchNorm layers normalise
        with the batch statistics the step trained with)."""
        with self.statistics.applied():
            self._step()

    def _step(self) -> None:
        x = self._batch()
        rule, pre = step_rule(self.optimizer, self.model, self.names, self.still)
        if x is None or x.shape[0] == 0:
            self.engine.step(rule, None, None)
            return
        x = x.to(self.probe_x.device)
        B = x.shape[0]
        self.batch_rows += B
        owner = self.matcher.match(x)
        pos = torch.nonzero(owner >= 0).squeeze(1)
        ids = owner[pos]
        self.recognised += int(ids.numel())
        if not self.simulate and self.recognised == 0 and self.batch_rows >= 2 * self.n_train:
            self.simulate = True    # two epochs' worth of rows and no probe sample in any of them
        if self.simulate:
            draw = torch.rand(self.probe_x.shape[0], generator=self.gen) < min(1.0, B / self.n_train)
            ids = torch.nonzero(draw).squeeze(1).to(self.probe_x.device)
            x_inj = self.probe_x[ids]
        else:
            x_inj = x[pos]
        want = (B + 1) // 2 if self.rows is None else self.rows
        sub = torch.randperm(B, generator=self.gen)[: min(want, B)].to(x.device)
        x_rows = x[sub]
        with torch.no_grad(), kernel.eval_mode(self.model):
            f = self.model(torch.cat([x_rows, x_inj])).reshape(x_rows.shape[0] + x_inj.shape[0], -1)
        if not bool(torch.isfinite(f).all()):
            raise FloatingPointError("the model's outputs on the training batch are not finite (NaN/inf)")
        f_rows, f_inj = f[: x_rows.shape[0]], f[x_rows.shape[0]:]
        lam = output_hessian(self.loss, f_rows, None, target_like=self.probe_y[0])
        cot = (signed_half_hessian(lam, self.gen) if self.directions == "signs"
               else sampled_half_hessian(lam, 1, self.gen))                    # (R, 1, k)
        inject = ids.numel() > 0 and B > 1
        if inject:
            r, _ = residual_and_hessian(self.loss, f_inj, self.probe_y[ids])
            cot = torch.cat([cot, r.unsqueeze(1).to(cot.dtype)])
            x_all = torch.cat([x_rows, x_inj])
        else:
            x_all = x_rows
        vec = kernel.vjp_rows(self.model, x_all, cot, s=self.sketch, seed=self.seed, preconditioner=pre,
                              method=self.method, names=self.names)[:, 0]    # (R + q, D)
        R = x_rows.shape[0]
        rows = vec[:R] / math.sqrt(R)
        inj = None
        if inject:
            params = dict(self.model.named_parameters())
            names = self.names if self.names is not None else [n for n, p in params.items() if p.requires_grad]
            grads = {n: (params[n].grad if params[n].grad is not None else torch.zeros_like(params[n])) for n in names}
            mean = kernel.flat_vector(grads, s=self.sketch, seed=self.seed, preconditioner=pre).to(vec.dtype)
            inj = (mean.unsqueeze(0) - vec[R:]) / (B * self.world - 1)
        # Nothing non-finite may enter the engine's state: it would stay there after the cause is gone.
        if not bool(torch.isfinite(vec).all()) or (inj is not None and not bool(torch.isfinite(inj).all())):
            raise FloatingPointError("the gradients of this training step are not finite (NaN/inf)")
        self.engine.step(rule, rows, owner[sub], ids if inject else None, inj, batch=B * self.world, saturate=R < B)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "recognised": self.recognised, "batch_rows": self.batch_rows,
                "simulate": self.simulate}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.recognised, self.batch_rows = int(state["recognised"]), int(state["batch_rows"])
        self.simulate = bool(state["simulate"])
