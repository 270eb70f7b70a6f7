"""Validation-free early-stopping baselines: the evidence-based criterion and gradient disparity.

Both use only training data, so they are what a user without a validation split could pick
instead of gramhook. They live in ``benchmarks/`` and are not part of the product.

- :class:`EvidenceCriterion`: Mahsereci, Balles, Lassner & Hennig (2017), "Early Stopping without
  a Validation Set", arXiv:1703.09580.
- :class:`GradientDisparity`: Forouzesh & Thiran (2021), "Disparity Between Batches as a Signal
  for Early Stopping", ECML PKDD, arXiv:2107.06665.

Neither changes the model: gradients come from ``torch.func`` on detached copies of the
parameters and buffers (so BatchNorm running statistics are not updated), ``.grad`` is not
touched, the mode is left as is and the global RNG state is restored (dropout draws are private).

    python benchmarks/stopping_baselines.py --demo    # MNIST n=1000, ~1 minute on one thread
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Per-sample gradients are materialised in chunks of at most this many floats (64 MiB in fp32).
MAX_CHUNK_ELEMS = 1 << 24


def _trainable(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Detached copies of the parameters that require grad, by name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _constants(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Frozen parameters and cloned buffers: ``functional_call`` may update the clones in place."""
    out = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    out.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return out


def _flat(g: Dict[str, torch.Tensor], names: Sequence[str], lead: int = 0) -> torch.Tensor:
    """Concatenates ``g[n]`` over ``names`` into ``(*g.shape[:lead], D)``."""
    return torch.cat([g[n].reshape(*g[n].shape[:lead], -1) for n in names], dim=-1)


def _devices(model: nn.Module) -> List[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})


def _check_no_train_batchnorm(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(
                f"EvidenceCriterion needs per-sample gradients, which are undefined through "
                f"BatchNorm '{name}' in train mode (batch statistics couple the samples). Call "
                f"model.eval() before update() and model.train() after it.")


def batch_gradient(model: nn.Module, loss_fn: LossFn, xb: torch.Tensor,
                   yb: torch.Tensor) -> torch.Tensor:
    """Gradient of ``loss_fn(model(xb), yb)`` w.r.t. the trainable parameters, flattened.

    Returns:
        ``(D,)``, the parameters in ``named_parameters`` order; ``D`` counts only those that
        require grad.
    """
    params, consts = _trainable(model), _constants(model)
    names = list(params)

    def loss(p, c):
        return loss_fn(functional_call(model, (p, c), (xb,)), yb)

    with torch.random.fork_rng(devices=_devices(model)):
        g = grad(loss)(params, consts)
    return _flat(g, names)


def per_sample_moments(model: nn.Module, loss_fn: LossFn, xb: torch.Tensor, yb: torch.Tensor,
                       max_chunk_elems: int = MAX_CHUNK_ELEMS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased per-coordinate variance of the per-sample gradients of a batch.

    Per-sample gradient ``G_b = ∇_w loss_fn(model(x_b[None]), y_b[None])`` (the mean-reduced loss
    of one sample is its loss), computed with ``vmap(grad(functional_call))`` in chunks of
    ``max(1, max_chunk_elems // D)`` samples; sums are accumulated in float64.

    .. math:: \\hat g = \\frac1B \\sum_b G_b, \\qquad
              \\hat\\Sigma_k = \\frac{1}{B-1} \\sum_b (G_{bk} - \\hat g_k)^2

    Returns:
        ``(g, var)``, each ``(D,)`` float64: ``g`` equals the gradient of the batch's mean loss.

    Raises:
        ValueError: If ``B < 2`` or the model has BatchNorm in train mode.
    """
    _check_no_train_batchnorm(model)
    B = xb.shape[0]
    if B < 2:
        raise ValueError(f"per-sample variance needs a batch of at least 2 samples, got {B}")
    params, consts = _trainable(model), _constants(model)
    names = list(params)
    D = sum(p.numel() for p in params.values())

    def loss1(p, c, x, y):
        return loss_fn(functional_call(model, (p, c), (x[None],)), y[None])

    per_sample = vmap(grad(loss1), in_dims=(None, None, 0, 0), randomness="different")
    chunk = max(1, max_chunk_elems // max(D, 1))
    s1 = torch.zeros(D, dtype=torch.float64, device=xb.device)
    s2 = torch.zeros_like(s1)
    with torch.random.fork_rng(devices=_devices(model)):
        for i in range(0, B, chunk):
            G = _flat(per_sample(params, consts, xb[i:i + chunk], yb[i:i + chunk]), names, lead=1)  # (b, D)
            G = G.double()
            s1 += G.sum(0)
            s2 += (G * G).sum(0)
    g = s1 / B
    var = ((s2 - B * g * g) / (B - 1)).clamp_min(0.0)
    return g, var


def evidence_value(g: torch.Tensor, var: torch.Tensor, batch_size: int) -> float:
    """The EB criterion ``1 − (B/D) Σ_k ĝ_k² / Σ̂_k`` over the coordinates with ``Σ̂_k > 0``.

    Coordinates whose per-sample gradients are all equal (``Σ̂_k = 0``, e.g. dead ReLU units,
    where also ``ĝ_k = 0``) carry no evidence; they are left out of the sum and of ``D``.

    Args:
        g: ``(D,)`` batch mean gradient.
        var: ``(D,)`` per-coordinate variance of the per-sample gradients.
        batch_size: ``B``.
    """
    keep = var > 0
    d = int(keep.sum())
    if d == 0:
        return math.inf
    return float(1.0 - batch_size / d * (g[keep] ** 2 / var[keep]).sum())


class EvidenceCriterion:
    """Mahsereci et al. 2017: stop when the minibatch gradient is indistinguishable from noise.

    At each :meth:`update` on a batch of ``B`` samples, with ``ĝ`` the batch mean gradient and
    ``Σ̂_k`` the unbiased (``1/(B−1)``) per-coordinate variance of the per-sample gradients (see
    :func:`per_sample_moments`), the raw criterion is

    .. math:: c_t = 1 - \\frac{B}{D} \\sum_k \\frac{\\hat g_k^2}{\\hat\\Sigma_k}

    over the ``D`` trainable coordinates with ``Σ̂_k > 0`` (the paper's Eq. 7 form; it is ``> 0``
    when the gradient's signal-to-noise ratio is below what noise alone gives). The paper
    smooths the noisy minibatch criterion; here the smoothing is an exponential moving average
    started at the first value, ``s_1 = c_1``, ``s_t = smoothing·s_{t−1} + (1−smoothing)·c_t``.
    The rule stops at the first update at which ``s_t > 0`` has held for ``patience``
    consecutive updates. The stop step is the checkpoint a user keeps (``best_step`` is
    ``stop_step``): the rule says "stop now", not "go back".

    The paper evaluates the criterion on the gradient the optimizer steps with (before the
    step); called after the step on the same batch, as the benchmark does, the gradient is taken
    at the updated weights. Calling it on the next batch before its step matches the paper.

    Attributes:
        stop_step: The first step at which :meth:`update` returned True, else None.
        history: ``(step, c_t)`` raw criterion values.
        smoothed: ``(step, s_t)`` smoothed values, the ones the rule reads.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, smoothing: float = 0.9,
                 patience: int = 1):
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.model, self.loss_fn = model, loss_fn
        self.smoothing, self.patience = smoothing, patience
        self.stop_step: Optional[int] = None
        self.history: List[Tuple[int, float]] = []
        self.smoothed: List[Tuple[int, float]] = []
        self._s: Optional[float] = None
        self._above = 0

    @property
    def best_step(self) -> Optional[int]:
        """The checkpoint to keep: the stop step itself."""
        return self.stop_step

    def update(self, step: int, xb: torch.Tensor, yb: torch.Tensor) -> bool:
        """Evaluates the criterion on ``(xb, yb)`` at the current weights; True once stopped.

        After the stop it returns True without computing anything.
        """
        if self.stop_step is not None:
            return True
        g, var = per_sample_moments(self.model, self.loss_fn, xb, yb)
        c = evidence_value(g, var, xb.shape[0])
        self._s = c if self._s is None else self.smoothing * self._s + (1 - self.smoothing) * c
        self.history.append((step, c))
        self.smoothed.append((step, self._s))
        self._above = self._above + 1 if self._s > 0 else 0
        if self._above >= self.patience:
            self.stop_step = step
        return self.stop_step is not None


def gradient_disparity(grads: torch.Tensor) -> float:
    """Mean pairwise ℓ2 distance between batch gradients.

    .. math:: \\mathrm{GD} = \\frac{2}{s(s-1)} \\sum_{i<j} \\lVert g_i - g_j \\rVert_2

    Args:
        grads: ``(s, D)``, one flattened batch gradient per row, ``s >= 2``.
    """
    s = grads.shape[0]
    if s < 2:
        raise ValueError(f"gradient disparity needs at least 2 batch gradients, got {s}")
    g = grads.double()
    total = sum(float(torch.linalg.vector_norm(g[i] - g[j]))
                for i in range(s) for j in range(i + 1, s))
    return total / (s * (s - 1) / 2)


class GradientDisparity:
    """Forouzesh & Thiran 2021: stop when the disparity between batch gradients stops falling.

    Once per epoch, :meth:`update` takes ``s`` training batches, computes each batch's gradient
    ``g_i = ∇_w loss_fn(model(x_i), y_i)`` (mean loss of the batch, current weights and mode) and
    records the mean pairwise distance :func:`gradient_disparity`. The rule is patience on the
    GD curve: ``best_step`` is the step of the smallest GD so far (the checkpoint a user
    restores), and the rule stops at the first update that is the ``patience``-th in a row
    without a new minimum. ``patience=5`` epochs by default.

    Attributes:
        best_step: Step of the minimum GD so far.
        stop_step: The first step at which :meth:`update` returned True, else None.
        history: ``(step, GD)`` pairs.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, s: int = 5, patience: int = 5):
        if s < 2:
            raise ValueError(f"s must be >= 2 batches, got {s}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.model, self.loss_fn = model, loss_fn
        self.s, self.patience = s, patience
        self.best_step: Optional[int] = None
        self.stop_step: Optional[int] = None
        self.history: List[Tuple[int, float]] = []
        self._best = math.inf
        self._since = 0

    def update(self, step: int, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Records GD of ``batches`` (``s`` pairs ``(xb, yb)``) at ``step``; True once stopped.

        After the stop it returns True without computing anything.
        """
        if self.stop_step is not None:
            return True
        if len(batches) != self.s:
            raise ValueError(f"expected s={self.s} batches, got {len(batches)}")
        grads = torch.stack([batch_gradient(self.model, self.loss_fn, xb, yb)
                             for xb, yb in batches])  # (s, D)
        gd = gradient_disparity(grads)
        self.history.append((step, gd))
        if gd < self._best:
            self._best, self.best_step, self._since = gd, step, 0
        else:
            self._since += 1
            if self._since >= self.patience:
                self.stop_step = step
        return self.stop_step is not None


def _demo(model_name: str, epochs: int, seed: int) -> None:
    import torch.nn.functional as F

    from gramhook.data import mnist_tensors
    from gramhook.training import train
    from gramhook.zoo import mlp, small_cnn

    torch.set_num_threads(1)
    x, y, xt, yt = mnist_tensors(n_train=1000)
    torch.manual_seed(seed)
    model = small_cnn() if model_name == "cnn" else mlp(784)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    B, n = 64, x.shape[0]
    eb = EvidenceCriterion(model, F.cross_entropy)
    gd = GradientDisparity(model, F.cross_entropy)

    def test_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(xt), yt))

    test = {0: test_loss()}

    def on_step(step, idx, out):
        eb.update(step, x[idx], y[idx])
        test[step] = test_loss()

    def on_epoch(step):
        picks = torch.randint(0, n, (gd.s, B), generator=gen)   # the same generator as the batch order
        gd.update(step, [(x[p], y[p]) for p in picks])

    t0 = time.perf_counter()
    step = train(model, opt, x, y, loss=F.cross_entropy, batch_size=B, epochs=epochs, generator=gen,
                 on_step=on_step, on_epoch=on_epoch)
    secs = time.perf_counter() - t0

    best = min(test, key=test.get)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"MNIST n_train=1000, test={xt.shape[0]}, {model_name} ({n_params} parameters), "
          f"SGD lr 0.05 momentum 0.9, batch {B}, {epochs} epochs = {step} steps, {secs:.0f} s")
    print(f"minimum test loss {test[best]:.4f} at step {best}; final {test[step]:.4f}")
    eb_at = eb.stop_step if eb.stop_step is not None else step
    print(f"evidence (EB): stop_step={eb.stop_step} -> test loss {test[eb_at]:.4f} at step {eb_at} "
          f"({test[eb_at] / test[best]:.3f}x min); smoothed criterion first/last "
          f"{eb.smoothed[0][1]:.3f}/{eb.smoothed[-1][1]:.3f}, max {max(v for _, v in eb.smoothed):.3f}")
    print(f"gradient disparity: stop_step={gd.stop_step}, best_step={gd.best_step} -> test loss "
          f"{test[gd.best_step]:.4f} ({test[gd.best_step] / test[best]:.3f}x min); GD per epoch "
          + " ".join(f"{v:.3f}" for _, v in gd.history))
    every = max(1, step // 10)
    print("step  test   EB raw  EB smoothed")
    for (st, c), (_, sm) in zip(eb.history, eb.smoothed):
        if st % every == 0 or st == eb_at:
            print(f"{st:4d}  {test[st]:.3f}  {c:7.3f}  {sm:7.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", action="store_true", help="train MNIST and print where each rule stops")
    ap.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.demo:
        ap.print_help()
        return
    _demo(args.model, args.epochs, args.seed)


if __name__ == "__main__":
    main()
