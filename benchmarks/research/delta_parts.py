"""Where the per-step engine's perturbation differs from the true one, parameter by parameter.

For one ``benchmarks/fidelity.py`` case, trains the coupled leave-one-out runs of the first K
probe samples and keeps their final weights, so that the true ``δ_i = w^(−i) − w`` sits beside
the default engine's (exact coordinates, ``δ = P^{1/2} y``). Per parameter tensor it prints the
median over samples of ‖δ_engine‖/‖δ_LOO‖ and of their cosine, and for the weights that feed a
normalisation (scale-invariant per output channel) the share of each δ that is radial (along
the channel's weight). Then the gaps: true LOO, the true δ read out linearly (the engine's
readout applied to the true perturbation), and the engine's.

    python benchmarks/research/delta_parts.py --case digits-bncnn-ce-adam --k 32
"""
from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

from gramhook import GramMonitor, MonitorConfig
from gramhook.capture import cancelled_biases
from gramhook.optim import whitening

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fidelity as fid  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", default="digits-bncnn-ce-adam")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--epochs", type=int, default=None, help="override the case's epochs")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    case = next(c for c in fid.CASES if args.case in c.name)
    if args.epochs:
        case = fid.dataclasses.replace(case, epochs=args.epochs)
    x, t, classes = data = fid.load_data(case)
    init = fid.initial_state(case, x, classes)
    batches = fid.epoch_batches(case.n, case.batch, case.epochs, case.seed + 1)
    model, opt, sched = fid.fresh(case, x, classes, init)
    mon = GramMonitor(model, opt, probe=(x, t), n_train=case.n, loss=case.loss_name, every=10**9, seed=case.seed,
                      config=MonitorConfig(coordinates="exact"))
    fid.train_loop(case, model, opt, sched, x, t, batches)
    rec = mon.measure()
    names = [n for n, q in model.named_parameters() if q.requires_grad]
    pre = whitening(opt, model, still=cancelled_biases(model, x[:2]))
    y = mon.perstep.delta()[: args.k].double()
    sizes = [dict(model.named_parameters())[n].numel() for n in names]
    eng = dict(zip(names, y.split(sizes, dim=1)))
    for n in names:
        if pre is not None and n in pre:
            eng[n] = eng[n] * pre[n].reshape(1, -1).double().sqrt()
    gaps_engine = mon.per_sample_gap()[: args.k].double()
    mon.close()

    drops = mon.probe.indices[: args.k]
    base = fid.build_model(case, x, classes)
    base.load_state_dict(init)
    loo = fid.coupled_loo(base, fid.per_sample_loss(case), lambda ps: fid.make_optimizer(case, ps), x, t, batches,
                          drops, [len(batches)], make_sched=lambda o: fid.make_scheduler(case, o), keep_final=True)
    final = dict(model.named_parameters())
    print(f"{case.name}: K={args.k}, {len(batches)} steps; LOO gap mean {float(loo['gaps'][len(batches)].mean()):.4f}, "
          f"engine {float(gaps_engine.mean()):.4f}, monitor probe gap {rec.probe_gap:.4f}")
    print("| parameter | size | ‖δ_LOO‖ median | ‖δ_eng‖/‖δ_LOO‖ | cos | radial share LOO | radial share engine |")
    print("|---|---|---|---|---|---|---|")
    true_all, eng_all = [], []
    for n in names:
        w = final[n].detach().double().reshape(-1)
        tru = (loo["final"][n].double().reshape(args.k, -1) - w)
        e = eng[n]
        true_all.append(tru)
        eng_all.append(e)
        ratio = statistics.median((e.norm(dim=1) / tru.norm(dim=1).clamp(min=1e-300)).tolist())
        cos = statistics.median(torch.nn.functional.cosine_similarity(e, tru, dim=1).tolist())
        radial = ""
        shape = final[n].shape
        if len(shape) > 1 and shape[0] > 1:
            wc = w.reshape(shape[0], -1)
            unit = wc / wc.norm(dim=1, keepdim=True)

            def share(d):
                d = d.reshape(args.k, shape[0], -1)
                r = (d * unit).sum(-1)                                          # (K, channels)
                return statistics.median(((r ** 2).sum(1) / (d ** 2).sum((1, 2)).clamp(min=1e-300)).tolist())
            radial = f"{share(tru):.3f} | {share(e):.3f}"
        else:
            radial = " | "
        print(f"| {n} | {w.numel()} | {statistics.median(tru.norm(dim=1).tolist()):.3g} | {ratio:.2f} | {cos:.2f} | {radial} |")
    tru, e = torch.cat(true_all, 1), torch.cat(eng_all, 1)
    print(f"| all | {tru.shape[1]} | {statistics.median(tru.norm(dim=1).tolist()):.3g} "
          f"| {statistics.median((e.norm(dim=1) / tru.norm(dim=1)).tolist()):.2f} "
          f"| {statistics.median(torch.nn.functional.cosine_similarity(e, tru, dim=1).tolist()):.2f} | | |")

    # The readouts: the engine's linear readout (eval mode, the run's running statistics) applied to
    # the true δ and to the engine's, and the true δ applied without linearizing (the run's
    # running statistics kept): how much of the gap the readout itself explains.
    from torch.func import functional_call, jvp
    params = {n: final[n].detach().double() for n in names}
    buffers = {n: b.double() for n, b in model.named_buffers()}
    loss = fid.per_sample_loss(case)
    xs, ts = x[drops].double(), t[drops]
    model.double().eval()

    def out(ps, xi):
        return functional_call(model, (ps, buffers), (xi.unsqueeze(0),))[0]

    def split(d):
        return dict(zip(names, (v.reshape(final[n].shape) for n, v in zip(names, d.split(sizes)))))

    def linear(deltas):
        g = []
        for i in range(args.k):
            f0, u = jvp(lambda ps: out(ps, xs[i]), (params,), (split(deltas[i]),))
            g.append(float(loss((f0 + u).unsqueeze(0), ts[i:i + 1]) - loss(f0.unsqueeze(0), ts[i:i + 1])))
        return torch.tensor(g)

    with torch.no_grad():
        moved = []
        for i in range(args.k):
            shifted = {n: params[n] + d for n, d in split(tru[i]).items()}
            moved.append(float(loss(out(shifted, xs[i]).unsqueeze(0), ts[i:i + 1])
                               - loss(out(params, xs[i]).unsqueeze(0), ts[i:i + 1])))
        moved = torch.tensor(moved)
    print(f"gaps (mean over K): LOO {float(loo['gaps'][len(batches)].mean()):.4f}; true δ read out linearly "
          f"{float(linear(tru).mean()):.4f}; true δ, nonlinear, the run's running statistics {float(moved.mean()):.4f}; "
          f"engine δ read out linearly {float(linear(e).mean()):.4f}")


if __name__ == "__main__":
    main()
