"""TensorBoard sink: the only module in gramhook that imports TensorBoard."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch.utils.tensorboard import SummaryWriter

PREFIX = "gramhook/"


def _exact(tag: str) -> str:
    """Anchors a tag for Multiline charts, whose entries are regexes (``re.match``)."""
    return re.escape(tag) + "$"


def _as_float(value: object) -> Optional[float]:
    """Returns ``value`` as a finite float, or None if missing, non-numeric or NaN/inf."""
    if value is None:
        return None
    try:
        f = float(value)  # works for Python numbers, numpy scalars, 1-element tensors
    except (TypeError, ValueError, RuntimeError):
        return None
    return f if math.isfinite(f) else None


class TensorBoardSink:
    """Writes gramhook measurements to TensorBoard under the ``gramhook/`` prefix.

    Args:
        logdir_or_writer: A log directory (``str``/``Path``), for which a new
            ``SummaryWriter`` is created and owned, or an existing ``SummaryWriter``,
            which is used as-is and never closed by this sink.
        compare_tag: Optional tag of the user's own measured test loss (e.g.
            ``"test/loss"``); it is drawn in the "Generalization (curves)" chart.
    """

    def __init__(self, logdir_or_writer: Union[str, Path, SummaryWriter], *,
                 compare_tag: Optional[str] = None) -> None:
        if isinstance(logdir_or_writer, (str, Path)):
            self.writer = SummaryWriter(log_dir=str(logdir_or_writer))
            self._owns_writer = True
        elif isinstance(logdir_or_writer, SummaryWriter):
            self.writer = logdir_or_writer
            self._owns_writer = False
        else:
            raise TypeError("logdir_or_writer must be a str, Path or SummaryWriter, "
                            f"got {type(logdir_or_writer).__name__}")
        self.compare_tag = compare_tag
        self._layout_written = False
        self._closed = False

    def layout(self) -> dict:
        """Returns the custom-scalars layout dict passed to ``add_custom_scalars``."""
        p = PREFIX
        curves = [p + "train_loss", p + "predicted_test_loss"]
        if self.compare_tag:
            curves.append(self.compare_tag)
        multi = lambda tags: ["Multiline", [_exact(t) for t in tags]]  # noqa: E731
        return {"gramhook": {
            "Generalization": ["Margin", [p + "predicted_test_loss",
                                          p + "predicted_test_loss_lo",
                                          p + "predicted_test_loss_hi"]],
            "Generalization (curves)": multi(curves),
            "Gap": multi([p + "predicted_gap"]),
            "Gap reliability": multi([p + "gap_effective_samples"]),
            "Dynamics": multi([p + "contraction", p + "perturbation"]),
            "Effective Gram": multi([p + "alignment", p + "benign_fraction",
                                     p + "kernel_fidelity"]),
            "Cost": multi([p + "monitor_seconds", p + "overhead"]),
        }}

    def write_layout(self) -> None:
        """Writes the custom-scalars layout; later calls are no-ops."""
        if not self._layout_written:
            self.writer.add_custom_scalars(self.layout())
            self._layout_written = True

    def write_scalars(self, step: int, values: Mapping[str, object]) -> None:
        """Writes ``gramhook/<key>`` for every finite value; skips None/NaN/inf.

        When both ``predicted_test_loss`` and ``predicted_gap_se`` are finite, also
        writes ``gramhook/predicted_test_loss_lo`` / ``_hi`` at ±2 standard errors.

        Args:
            step: Global training step.
            values: Mapping from metric name to number (float, int, numpy or tensor).
        """
        for key, value in values.items():
            f = _as_float(value)
            if f is not None:
                self.writer.add_scalar(PREFIX + key, f, step)
        loss = _as_float(values.get("predicted_test_loss"))
        se = _as_float(values.get("predicted_gap_se"))
        if loss is not None and se is not None:
            self.writer.add_scalar(PREFIX + "predicted_test_loss_lo", loss - 2.0 * se, step)
            self.writer.add_scalar(PREFIX + "predicted_test_loss_hi", loss + 2.0 * se, step)

    def write_histograms(self, step: int, per_sample_gap: Optional[torch.Tensor],
                         ntk_spectrum: Optional[torch.Tensor]) -> None:
        """Writes histograms ``gramhook/per_sample_gap`` and ``gramhook/ntk_spectrum``.

        Args:
            step: Global training step.
            per_sample_gap: Per-sample predicted gap contributions, or None.
            ntk_spectrum: Eigenvalues of the empirical NTK / Gram matrix, or None.
        """
        for name, t in (("per_sample_gap", per_sample_gap), ("ntk_spectrum", ntk_spectrum)):
            if t is None:
                continue
            v = torch.as_tensor(t).detach().reshape(-1).to("cpu", torch.float64)
            v = v[torch.isfinite(v)]
            if v.numel() > 0:
                self.writer.add_histogram(PREFIX + name, v.numpy(), step)

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Writes a text summary under ``gramhook/<tag>`` (e.g. a failure report).

        ``SummaryWriter.add_text`` stores it as ``gramhook/<tag>/text_summary``.
        """
        self.writer.add_text(PREFIX + tag, text, step)

    def flush(self) -> None:
        """Flushes pending events to disk."""
        self.writer.flush()

    def close(self) -> None:
        """Flushes, and closes the writer only if this sink created it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_writer:
            self.writer.close()
        else:
            self.writer.flush()
