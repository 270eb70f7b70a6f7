"""``gramhook report RUNDIR``: one self-contained HTML file from a run's TensorBoard events.

The charts are inline SVG written here (no JavaScript, no network): predicted against measured
test loss with the ±2 SE band, the gap and its dynamics, the per-sample gap histogram, the most
suspect samples (thumbnails when the inputs are images), the kernel spectrum, the companion
diagnostics and the forecast. The run is read back with TensorBoard's ``EventAccumulator``, or
from a saved history (``history.json``: ``[m.as_dict() for m in GramMonitor.history]``).
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["load_run", "render", "write_report"]

P = "gramhook/"
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
Series = List[Tuple[float, float]]


def load_run(rundir: Path) -> dict:
    """Scalars, histograms, texts and images of a run directory.

    Returns:
        ``{"scalars": {tag: [(step, value)]}, "histograms": {tag: (step, limits, counts)},
        "texts": {tag: (step, text)}, "images": {tag: png_bytes}}``; the latest event of each
        histogram, text and image tag.

    Raises:
        FileNotFoundError: no event file and no ``history.json`` in ``rundir``.
    """
    rundir = Path(rundir)
    events = sorted(rundir.rglob("events.out.tfevents.*"))
    if not events:
        saved = rundir / "history.json" if rundir.is_dir() else rundir
        if saved.is_file():
            return _from_history(json.loads(saved.read_text()))
        raise FileNotFoundError(
            f"No TensorBoard event files (events.out.tfevents.*) and no history.json in {rundir}: pass "
            "the logdir given to GramMonitor(logdir=...), or save json.dump([m.as_dict() for m in monitor.history], f) there.")
    from tensorboard.backend.event_processing import event_accumulator as ea

    run = {"scalars": {}, "histograms": {}, "texts": {}, "images": {}}
    for folder in sorted({e.parent for e in events}):
        acc = ea.EventAccumulator(str(folder), size_guidance={
            ea.SCALARS: 0, ea.HISTOGRAMS: 1, ea.TENSORS: 0, ea.IMAGES: 0})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            run["scalars"].setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in tags.get("histograms", []):
            last = acc.Histograms(tag)[-1]
            h = last.histogram_value
            run["histograms"][tag] = (last.step, list(h.bucket_limit), list(h.bucket))
        for tag in tags.get("tensors", []):
            if tag.endswith("/text_summary"):
                last = acc.Tensors(tag)[-1]
                run["texts"][tag[: -len("/text_summary")]] = (last.step, last.tensor_proto.string_val[0].decode())
        for tag in tags.get("images", []):
            last = acc.Images(tag)[-1]
            run["images"][tag] = last.encoded_image_string
    for tag in run["scalars"]:
        run["scalars"][tag].sort()
    return run


def _from_history(history: Sequence[dict]) -> dict:
    scalars: Dict[str, Series] = {}
    for rec in history:
        for key, value in rec.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                scalars.setdefault(P + key, []).append((rec["step"], float(value)))
        loss, se = rec.get("predicted_test_loss"), rec.get("predicted_gap_se")
        if isinstance(loss, (int, float)) and isinstance(se, (int, float)) and math.isfinite(loss + se):
            scalars.setdefault(P + "predicted_test_loss_lo", []).append((rec["step"], loss - 2 * se))
            scalars.setdefault(P + "predicted_test_loss_hi", []).append((rec["step"], loss + 2 * se))
    return {"scalars": scalars, "histograms": {}, "texts": {}, "images": {}}


# -- SVG ---------------------------------------------------------------------------------------
def _ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def line_chart(title: str, series: Sequence[Tuple[str, Series]], *, band: Optional[Tuple[Series, Series]] = None,
               logy: bool = False, xlabel: str = "step", width: int = 560, height: int = 260) -> str:
    """An SVG line chart; each series ``(name, [(x, y)])`` is one ``<path>``, the band a filled
    polygon. Non-finite points (and non-positive ones with ``logy``) are dropped."""
    tf = (lambda v: math.log10(v)) if logy else (lambda v: v)  # noqa: E731
    ok = lambda v: math.isfinite(v) and (v > 0 or not logy)  # noqa: E731
    clean = [(name, [(x, tf(y)) for x, y in pts if math.isfinite(x) and ok(y)]) for name, pts in series]
    clean = [(name, pts) for name, pts in clean if pts]
    bands = []
    if band is not None:
        lo = [(x, tf(y)) for x, y in band[0] if ok(y)]
        hi = [(x, tf(y)) for x, y in band[1] if ok(y)]
        if lo and hi:
            bands = [lo, hi]
    allpts = [p for _, pts in clean for p in pts] + [p for b in bands for p in b]
    head = f'<figure class="chart"><figcaption>{html.escape(title)}</figcaption>'
    if not allpts:
        return head + '<p class="empty">no data in this run</p></figure>'
    x0, x1 = min(p[0] for p in allpts), max(p[0] for p in allpts)
    y0, y1 = min(p[1] for p in allpts), max(p[1] for p in allpts)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.1 - 1e-9, y1 + abs(y1) * 0.1 + 1e-9
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    L, R, T, B = 56, 12, 10, 34
    sx = lambda x: L + (x - x0) / (x1 - x0) * (width - L - R)  # noqa: E731
    sy = lambda y: T + (y1 - y) / (y1 - y0) * (height - T - B)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">',
             f'<rect x="{L}" y="{T}" width="{width - L - R}" height="{height - T - B}" fill="#fff" stroke="#ccc"/>']
    for t in _ticks(y0, y1):
        label = _fmt(10 ** t) if logy else _fmt(t)
        parts.append(f'<line x1="{L}" x2="{width - R}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>'
                     f'<text x="{L - 4}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="10">{label}</text>')
    for t in _ticks(x0, x1):
        parts.append(f'<text x="{sx(t):.1f}" y="{height - B + 14}" text-anchor="middle" font-size="10">{_fmt(t)}</text>')
    parts.append(f'<text x="{(L + width - R) / 2}" y="{height - 4}" text-anchor="middle" font-size="11">'
                 f'{html.escape(xlabel)}</text>')
    if bands:
        poly = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in bands[1] + bands[0][::-1])
        parts.append(f'<polygon class="band" points="{poly}" fill="{COLORS[0]}" fill-opacity="0.18" stroke="none"/>')
    legend = []
    for i, (name, pts) in enumerate(clean):
        color = COLORS[i % len(COLORS)]
        d = "M" + " L".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<path class="series" data-name="{html.escape(name)}" data-points="{len(pts)}" d="{d}" '
                     f'fill="none" stroke="{color}" stroke-width="2"/>')
        if len(pts) == 1:
            parts.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        legend.append(f'<span style="color:{color}">&#9644; {html.escape(name)}</span>')
    parts.append("</svg>")
    return head + "".join(parts) + '<div class="legend">' + " ".join(legend) + "</div></figure>"


def bar_chart(title: str, limits: Sequence[float], counts: Sequence[float], *, width: int = 560,
              height: int = 220) -> str:
    """An SVG histogram from TensorBoard buckets (upper limits and counts)."""
    pairs = [(l, c) for l, c in zip(limits, counts) if math.isfinite(l)]
    head = f'<figure class="chart"><figcaption>{html.escape(title)}</figcaption>'
    if not pairs or not any(c > 0 for _, c in pairs):
        return head + '<p class="empty">no data in this run</p></figure>'
    first = next(i for i, (_, c) in enumerate(pairs) if c > 0)
    last = max(i for i, (_, c) in enumerate(pairs) if c > 0)
    pairs = pairs[first: last + 1]
    L, R, T, B = 56, 12, 10, 30
    top = max(c for _, c in pairs)
    bw = (width - L - R) / len(pairs)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f'<rect x="{L}" y="{T}" width="{width - L - R}" height="{height - T - B}" fill="#fff" stroke="#ccc"/>']
    for i, (_, c) in enumerate(pairs):
        h = c / top * (height - T - B)
        parts.append(f'<rect class="bar" x="{L + i * bw:.1f}" y="{height - B - h:.1f}" width="{max(bw - 1, 1):.1f}" '
                     f'height="{h:.1f}" fill="{COLORS[0]}"/>')
    parts.append(f'<text x="{L}" y="{height - 10}" font-size="10">{_fmt(pairs[0][0])}</text>'
                 f'<text x="{width - R}" y="{height - 10}" text-anchor="end" font-size="10">{_fmt(pairs[-1][0])}</text>'
                 f'<text x="{L - 4}" y="{T + 10}" text-anchor="end" font-size="10">{int(top)}</text></svg>')
    return head + "".join(parts) + "</figure>"


# -- page --------------------------------------------------------------------------------------
def _measured(scalars: Dict[str, Series]) -> List[Tuple[str, Series]]:
    """The user's own test-loss curves: tags outside ``gramhook/`` that mention test or val."""
    return [(tag, pts) for tag, pts in sorted(scalars.items())
            if not tag.startswith(P) and any(w in tag.lower() for w in ("test", "val")) and "loss" in tag.lower()]


def render(run: dict, title: str = "gramhook report") -> str:
    """The report's HTML for a run from :func:`load_run`."""
    s = run["scalars"]
    get = lambda key: s.get(P + key, [])  # noqa: E731
    sections = []
    main = [("predicted test loss", get("predicted_test_loss"))] + _measured(s) + [("train loss", get("train_loss"))]
    sections.append(("Test loss", [line_chart("Predicted (±2 SE) and measured test loss", main,
                                              band=(get("predicted_test_loss_lo"), get("predicted_test_loss_hi")))]))
    sections.append(("Gap and its dynamics", [
        line_chart("Predicted gap", [("predicted gap", get("predicted_gap")), ("probe gap", get("probe_gap"))]),
        line_chart("Contraction c̄ and perturbation ε̄", [("contraction", get("contraction")),
                                                        ("perturbation", get("perturbation"))]),
    ]))
    charts = []
    if P + "per_sample_gap" in run["histograms"]:
        step, limits, counts = run["histograms"][P + "per_sample_gap"]
        charts.append(bar_chart(f"Per-sample gap at step {step}", limits, counts))
    if P + "label_noise_score" in run["histograms"]:
        step, limits, counts = run["histograms"][P + "label_noise_score"]
        charts.append(bar_chart(f"Noisy-label score at step {step}", limits, counts))
    charts.append(_suspects(run))
    sections.append(("Per-sample view", charts))
    spectrum = []
    if P + "spectrum_json" in run["texts"]:
        step, text = run["texts"][P + "spectrum_json"]
        values = json.loads(text)
        spectrum.append(line_chart(f"Kernel spectrum Θ/m at step {step} (sub-probe)",
                                   [("eigenvalue", [(i + 1, v) for i, v in enumerate(values)])],
                                   logy=True, xlabel="index"))
    spectrum.append(line_chart("Effective rank and information dimension",
                               [("effective rank", get("effective_rank")), ("information dim", get("information_dim"))]))
    spectrum.append(line_chart("Alignment with the information space",
                               [("labels", get("label_alignment")), ("residual", get("residual_alignment")),
                                ("mean nuisance share", get("nuisance_mean"))]))
    spectrum.append(line_chart("Normalised margins (f/ρ) on the probe",
                               [("min", get("margin_min")), ("q10", get("margin_q10")),
                                ("median", get("margin_median")), ("q90", get("margin_q90"))]))
    spectrum.append(line_chart("Normalised cross-entropy CE(f/ρ) and ρ (log scale)",
                               [("normalised CE", get("normalized_ce")), ("ρ", get("rho"))], logy=True))
    sections.append(("Spectra and companion diagnostics", spectrum))
    forecast = [line_chart("Forecast of the final test loss, made at each step",
                           [("forecast final test loss", get("forecast_final_test_loss")),
                            ("predicted test loss", get("predicted_test_loss"))])]
    fb = get("forecast_best_step")
    if fb:
        forecast.append(f'<p>Latest forecast of the best step: <b>{fb[-1][1]:.0f}</b> (made at step {fb[-1][0]}).</p>')
    sections.append(("Forecast", forecast))
    body = "".join(f"<section><h2>{html.escape(name)}</h2>{''.join(items)}</section>" for name, items in sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:20px;max-width:1200px}figure{display:inline-block;margin:8px;"
            "vertical-align:top}figcaption{font-weight:bold;font-size:13px}.legend{font-size:11px}"
            "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
            "img.thumb{width:56px;height:56px;image-rendering:pixelated}.empty{color:#888}"
            f"</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _suspects(run: dict) -> str:
    head = '<figure class="chart"><figcaption>Most suspect samples (likely mislabeled)</figcaption>'
    if P + "suspects_json" not in run["texts"]:
        return head + '<p class="empty">no per-sample scores in this run</p></figure>'
    step, text = run["texts"][P + "suspects_json"]
    rows = json.loads(text)
    out = [f"<table class='suspects'><tr><th>rank</th><th>input</th><th>index</th><th>label</th>"
           f"<th>score</th><th>gap</th><th>loss</th></tr>"]
    for rank, row in enumerate(rows, 1):
        png = run["images"].get(f"{P}suspect_image/{rank}")
        img = (f"<img class='thumb' src='data:image/png;base64,{base64.b64encode(png).decode()}'>" if png else "")
        cell = lambda v: "" if v is None else (_fmt(v) if isinstance(v, float) else str(v))  # noqa: E731
        out.append(f"<tr><td>{rank}</td><td>{img}</td><td>{row['index']}</td><td>{cell(row['label'])}</td>"
                   f"<td>{cell(row['score'])}</td><td>{cell(row['gap'])}</td><td>{cell(row['loss'])}</td></tr>")
    return head + "".join(out) + f"</table><p>at step {step}</p></figure>"


def write_report(rundir: Path, out: Optional[Path] = None) -> Path:
    """Render ``rundir`` to ``out`` (default ``rundir/gramhook_report.html``) and return the path."""
    rundir = Path(rundir)
    run = load_run(rundir)
    out = Path(out) if out is not None else (rundir if rundir.is_dir() else rundir.parent) / "gramhook_report.html"
    out.write_text(render(run, title=f"gramhook report: {rundir.name}"), encoding="utf-8")
    return out
