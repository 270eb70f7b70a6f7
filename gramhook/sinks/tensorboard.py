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
            "Information space": multi([p + "label_alignment", p + "residual_alignment",
                                        p + "nuisance_mean"]),
            "Spectrum": multi([p + "effective_rank", p + "information_dim"]),
            "Normalized margins": multi([p + "margin_min", p + "margin_q10", p + "margin_median",
                                         p + "normalized_ce"]),
            "Forecast": multi([p + "forecast_final_test_loss", p + "predicted_test_loss"]),
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

    def write_suspects(self, step: int, rows, scores: Optional[torch.Tensor],
                       images: Optional[torch.Tensor] = None,
                       spectrum: Optional[torch.Tensor] = None) -> None:
        """Writes the noisy-label view of one readout.

        - ``gramhook/suspects``: a Markdown table of ``rows`` (dicts with ``index``, ``score``,
          ``label``, ``gap``, ``loss``), most suspect first, and ``gramhook/suspects_json``, the
          same rows as JSON for ``gramhook report``;
        - ``gramhook/label_noise_score``: histogram of every sample's score;
        - ``gramhook/suspect_image/<rank>``: each suspect's input, from ``images``
          ``(k, C, H, W)`` with C in {1, 3}, min-max scaled to [0, 1], when given;
        - ``gramhook/spectrum_json``: the kernel's eigenvalues (descending, at most 256) as JSON.
        """
        import json

        cols = ("index", "score", "label", "gap", "loss")
        lines = ["| rank | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
        for rank, row in enumerate(rows, 1):
            cells = [str(row[c]) if c in ("index", "label") else f"{row[c]:.4g}" for c in cols]
            lines.append(f"| {rank} | " + " | ".join(cells) + " |")
        self.writer.add_text(PREFIX + "suspects", "\n".join(lines), step)
        clean = [{c: (None if isinstance(row[c], float) and not math.isfinite(row[c]) else row[c]) for c in cols}
                 for row in rows]
        self.writer.add_text(PREFIX + "suspects_json", json.dumps(clean), step)
        if scores is not None:
            v = torch.as_tensor(scores).detach().reshape(-1).to("cpu", torch.float64)
            v = v[torch.isfinite(v)]
            if v.numel() > 0:
                self.writer.add_histogram(PREFIX + "label_noise_score", v.numpy(), step)
        if images is not None and images.dim() == 4 and images.shape[1] in (1, 3) and images.shape[0] > 0:
            im = images.detach().to("cpu", torch.float32)
            lo = im.amin(dim=(1, 2, 3), keepdim=True)
            hi = im.amax(dim=(1, 2, 3), keepdim=True)
            im = (im - lo) / (hi - lo).clamp(min=1e-12)
            for rank in range(im.shape[0]):
                self.writer.add_image(f"{PREFIX}suspect_image/{rank + 1}", im[rank], step)
        if spectrum is not None:
            e = torch.as_tensor(spectrum).detach().reshape(-1).to("cpu", torch.float64)
            e = e[torch.isfinite(e)].sort(descending=True).values[:256]
            self.writer.add_text(PREFIX + "spectrum_json", json.dumps([float(x) for x in e]), step)

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
