"""TensorBoardSink round-trip tests: write events, read them back with EventAccumulator."""

import glob
import math
import re

import pytest
import torch

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing import event_accumulator as ea  # noqa: E402
from tensorboard.plugins.custom_scalar import layout_pb2  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from gramhook.sinks import TensorBoardSink  # noqa: E402

LAYOUT_TAG = "custom_scalars__config__"


def _load(logdir):
    acc = ea.EventAccumulator(str(logdir), size_guidance={
        ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _layout(acc):
    (event,) = acc.Tensors(LAYOUT_TAG)
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    return layout


def _write_run(sink):
    sink.write_layout()
    sink.write_layout()  # second call must be a no-op (add_custom_scalars is once-only)
    sink.write_scalars(10, {"train_loss": 0.5, "predicted_test_loss": 0.9,
                            "predicted_gap": 0.4, "predicted_gap_se": 0.05,
                            "alignment": torch.tensor(0.25), "skip_none": None,
                            "skip_nan": float("nan"), "skip_inf": math.inf})
    sink.write_scalars(20, {"train_loss": 0.3, "predicted_test_loss": 0.7})
    sink.write_histograms(10, torch.tensor([0.1, -0.2, 0.3, float("nan")]),
                          torch.linspace(0.0, 5.0, 50))
    sink.write_histograms(20, None, None)
    sink.write_text(10, "error", "gram measurement failed: OOM")


def test_roundtrip_scalars_histograms_text_layout(tmp_path):
    sink = TensorBoardSink(tmp_path, compare_tag="test/loss")
    _write_run(sink)
    sink.close()
    sink.close()  # idempotent
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
    acc = _load(tmp_path)
    tags = acc.Tags()

    assert _scalars(acc, "gramhook/train_loss") == [(10, 0.5), (20, pytest.approx(0.3))]
    assert _scalars(acc, "gramhook/predicted_test_loss") == [
        (10, pytest.approx(0.9)), (20, pytest.approx(0.7))]
    assert _scalars(acc, "gramhook/alignment") == [(10, 0.25)]
    # ±2 SE band only where the SE was given (step 10).
    assert _scalars(acc, "gramhook/predicted_test_loss_lo") == [(10, pytest.approx(0.8))]
    assert _scalars(acc, "gramhook/predicted_test_loss_hi") == [(10, pytest.approx(1.0))]
    assert not any(t.startswith("gramhook/skip") for t in tags["scalars"])

    assert set(tags["histograms"]) == {"gramhook/per_sample_gap", "gramhook/ntk_spectrum"}
    (gap,) = acc.Histograms("gramhook/per_sample_gap")
    assert gap.step == 10 and gap.histogram_value.num == 3  # NaN dropped
    (spec,) = acc.Histograms("gramhook/ntk_spectrum")
    assert spec.histogram_value.num == 50 and spec.histogram_value.max == pytest.approx(5.0)

    (text,) = acc.Tensors("gramhook/error/text_summary")  # add_text suffix
    assert text.step == 10
    assert text.tensor_proto.string_val[0].decode() == "gram measurement failed: OOM"

    layout = _layout(acc)
    (category,) = layout.category
    assert category.title == "gramhook"
    charts = {c.title: c for c in category.chart}
    assert set(charts) == {"Generalization", "Generalization (curves)", "Gap", "Gap reliability",
                           "Dynamics", "Effective Gram", "Cost", "Information space", "Spectrum",
                           "Normalized margins", "Forecast"}
    (series,) = charts["Generalization"].margin.series
    assert (series.value, series.lower, series.upper) == (
        "gramhook/predicted_test_loss", "gramhook/predicted_test_loss_lo",
        "gramhook/predicted_test_loss_hi")
    # Multiline entries are regexes that TensorBoard applies with re.match; they must
    # select exactly the intended tags (predicted_test_loss must not catch _lo/_hi).
    curves = list(charts["Generalization (curves)"].multiline.tag)
    all_tags = tags["scalars"] + ["test/loss", "test/loss_ema"]
    matched = {t for t in all_tags if any(re.match(rx, t) for rx in curves)}
    assert matched == {"gramhook/train_loss", "gramhook/predicted_test_loss", "test/loss"}
    gap_rx = list(charts["Gap"].multiline.tag)
    assert [t for t in tags["scalars"] if any(re.match(rx, t) for rx in gap_rx)] == [
        "gramhook/predicted_gap"]
    for title, expected in {
        "Dynamics": {"gramhook/contraction", "gramhook/perturbation"},
        "Effective Gram": {"gramhook/alignment", "gramhook/benign_fraction",
                           "gramhook/kernel_fidelity"},
        "Cost": {"gramhook/monitor_seconds", "gramhook/overhead"},
        "Gap reliability": {"gramhook/gap_effective_samples"},
    }.items():
        rx = list(charts[title].multiline.tag)
        assert {t for t in expected if any(re.match(r, t) for r in rx)} == expected


def test_layout_without_compare_tag():
    sink_layout = TensorBoardSink.__new__(TensorBoardSink)
    sink_layout.compare_tag = None
    curves = sink_layout.layout()["gramhook"]["Generalization (curves)"]
    assert curves[0] == "Multiline" and len(curves[1]) == 2


def test_external_writer_is_not_closed(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    sink = TensorBoardSink(writer)
    sink.write_scalars(1, {"overhead": 0.1})
    sink.close()
    assert writer.file_writer is not None  # SummaryWriter.close() sets it to None
    writer.add_scalar("user/metric", 2.0, 1)  # still usable by its owner
    writer.close()
    acc = _load(tmp_path)
    assert _scalars(acc, "gramhook/overhead") == [(1, pytest.approx(0.1))]
    assert _scalars(acc, "user/metric") == [(1, 2.0)]


def test_owned_writer_is_closed(tmp_path):
    sink = TensorBoardSink(str(tmp_path / "run"))
    sink.write_scalars(0, {"contraction": 0.9})
    sink.flush()
    assert _scalars(_load(tmp_path / "run"), "gramhook/contraction") == [
        (0, pytest.approx(0.9))]
    sink.close()
    assert sink.writer.file_writer is None


def test_rejects_bad_target():
    with pytest.raises(TypeError):
        TensorBoardSink(123)
