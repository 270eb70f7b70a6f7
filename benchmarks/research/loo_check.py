"""Brute-force leave-one-out (LOO) against GramMonitor's per-sample gaps on accuracy.py's configs.

Question: when the monitor under-predicts the test loss (e.g. ``digits-n1000-mlp-ce-sgd``), is the
engine wrong about LOO, or is LOO on this probe far from the test gap?

Per configuration (``--config``, names as in ``benchmarks/accuracy.py``):

1. The monitored run: trained exactly as ``accuracy.py`` trains it (its minimal logic is copied into
   the class ``acc`` below) (same seed, init, batch order,
   SGD momentum 0.9, lr, epochs, monitor settings: probe 64, coordinates 4096, ``every`` ≈ total/20).
   At every measurement: the engine's per-sample gaps on the 64 probe samples, the probe train loss,
   the loss on the whole training set and the measured test loss.
2. A plain (unmonitored) full run with the same code as the LOO runs; it must reproduce the
   monitored run's weights exactly (printed as ``max|Δw|``).
3. Coupled LOO for the first K probe samples (``monitor.probe.indices[:K]``): the same init and
   batch sequence with sample i removed from the one batch per epoch that holds it. Normalisation
   of that batch (``--norm``): ``mean`` = batch mean over the remaining samples (B−1), ``fixed`` =
   sum over the remaining samples / B (the objective the engine models, Σ_{j≠i} ℓ_j / n).
   true gap_i(t) = ℓ(f_{−i}(t); z_i) − ℓ(f(t); z_i), eval mode.
4. Uncoupled LOO: the same with another batch-order seed (``--uncoupled`` seeds), against the full
   run of the original order; plus the pure order-noise term ℓ(f^{seed'}(t); z_i) − ℓ(f(t); z_i).
5. Optional ``--loo-all``: coupled LOO of *every* training sample at every measurement step, so
   mean LOO over the training set vs the measured test − train gap without probe sampling error.
6. Optional ``--variants``: re-run the monitor with other engine settings on the same trajectory
   and compare its per-sample gaps on the same K samples with the (unchanged) true LOO:
     every1       measure every optimizer step
     exact        coordinates="exact"
     ref128       reference_size=128
     probe128     probe_size=128 (the K samples are still in the probe; their gaps are used)
     refnonprobe  reference=(non-probe training inputs): reference batches never hold a probe sample
     resvnoprobe  the captured-batch reservoir skips probe rows (still the step-0 fallback)
     discrete     engine integrates the discrete optimizer map (steps = dt / step_dt)
     momramp      heavy-ball start-up: step j advances the engine's time by lr·(1−μ^j)/(1−μ) instead of
                  lr/(1−μ) (the displacement of step j under a constant gradient, zero initial velocity)
   joined with '+' for combinations, e.g. ``every1+refnonprobe``.
   The base run also records, per probe sample, how many reference batches it sat in (the reservoir
   captures training batches, probe samples included, weighted (n−m)/(n·B) each, ~(n−m)/B times the
   sample's real weight 1/n; the own-row exclusion only removes the probe row).

Usage::

    python benchmarks/research/loo_check.py --config digits-n1000-mlp-ce-sgd --k 64 --loo-all \
        --variants every1 exact ref128 probe128 refnonprobe resvnoprobe discrete

Outputs ``benchmarks/results/loo/<config>.md`` (the printed tables) and ``<config>.json`` (raw series).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch

from gramhook import GramMonitor, MonitorConfig
from gramhook.losses import resolve_loss
from gramhook.optim import step_dt

OUT = Path(__file__).resolve().parents[1] / "results" / "loo"


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import accuracy as acc  # noqa: E402  (configs, data, models, optimizers, batch order)


def load(cfg: "acc.Config", seed: int):
    """``(x_train, y_train, x_test, y_test, in_features)`` of an accuracy.py configuration."""
    d = acc.load(cfg, seed)
    if d is None:
        raise SystemExit(f"{cfg.name}: its dataset package is not installed")
    return d.x_train, d.y_train, d.x_test, d.y_test, d.feat


VARIANT_KEYS = ("every1", "exact", "ref128", "probe128", "refnonprobe", "resvnoprobe", "discrete", "momramp")


# -- helpers -------------------------------------------------------------------------------------
def mean_se(v: torch.Tensor):
    v = v.double()
    return float(v.mean()), (float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else math.nan)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else math.nan


def row_match(x: torch.Tensor, probe_x: torch.Tensor) -> torch.Tensor:
    """(B, m) bool: row b of x equals probe row j."""
    return (x.flatten(1)[:, None, :] == probe_x.flatten(1)[None, :, :]).all(-1)


def config_by_name(name: str, epochs: Optional[int]) -> acc.Config:
    for c in acc.all_configs():
        if c.name == name:
            return c if epochs is None else acc.Config(**{**c.__dict__, "epochs": epochs})
    raise SystemExit(f"unknown config {name!r}; known: {[c.name for c in acc.all_configs()]}")


# -- the monitored run ---------------------------------------------------------------------------
def run_monitor(cfg, data, args, init_state, variant: str) -> Dict:
    """Train as accuracy.run_monitored does, with the monitor set up per ``variant``."""
    flags = set(variant.split("+")) - {"base"}
    bad = flags - set(VARIANT_KEYS)
    if bad:
        raise SystemExit(f"unknown variant flag(s) {sorted(bad)}; known: {VARIANT_KEYS}")
    xtr, ytr, xte, yte, feat = data
    n = xtr.shape[0]
    ttr, tte = acc.targets(cfg, ytr), acc.targets(cfg, yte)
    torch.manual_seed(args.seed)
    model = acc.make_model(cfg, feat)
    model.load_state_dict(init_state)
    opt = acc.make_opt(cfg, model, args.lr)
    total = cfg.epochs * math.ceil(n / args.batch_size)
    every = 1 if "every1" in flags else (args.every or max(1, round(total / acc.TARGET_MEASUREMENTS)))
    m = min(128 if "probe128" in flags else args.probe_size, n)
    # The reservoir, reference and engine hooks below are the periodic engine's.
    config = dict(engine="periodic", coordinates="exact" if "exact" in flags else args.coordinates)
    if "ref128" in flags:
        config["reference_size"] = 128
    if "refnonprobe" in flags:
        # The probe draw is deterministic (make_probe with the same seed): compute it to exclude it.
        from gramhook.probe import make_probe
        pidx = make_probe((xtr, ttr), size=m, n_train=n, seed=args.seed)[0].indices
        keep = torch.ones(n, dtype=torch.bool)
        keep[pidx] = False
        config["reference"] = xtr[keep]
    loss_name = "mse" if cfg.loss == "mse" else "cross_entropy"
    rows: List[Dict] = []

    def on_measurement(rec):
        rows.append(dict(step=rec.step, time=rec.time, train_loss=rec.train_loss,
                         predicted_gap=rec.predicted_gap, predicted_gap_se=rec.predicted_gap_se,
                         full_train_loss=acc.evaluate(cfg, model, xtr, ttr),
                         measured_test_loss=acc.evaluate(cfg, model, xte, tte),
                         gaps=monitor.per_sample_gap().tolist()))

    wall = time.perf_counter()
    monitor = GramMonitor(model, opt, probe=(xtr, ttr), n_train=n, loss=loss_name, every=every, probe_size=m,
                          seed=args.seed, config=MonitorConfig(**config))
    probe_x = monitor.probe.x
    hits = torch.zeros(m, dtype=torch.long)        # reference batches that held probe sample j
    res = monitor._reservoir
    orig_take, orig_add = res.take, res.add

    def take():
        out = orig_take()
        if out is not None:
            # What the engine contracts with: the monitor drops probe rows after taking the batch.
            kept = out[monitor._probe_filter.keep(out.to(probe_x.device)).to(out.device)]
            hits.add_(row_match(kept, probe_x).any(0).long())
        return out

    def add_noprobe(x):
        keep = ~row_match(x.detach(), probe_x).any(1)
        if keep.any():
            orig_add(x[keep])

    res.take = take
    if "resvnoprobe" in flags:
        res.add = add_noprobe
    if "momramp" in flags:
        inner = monitor.engine.measure
        last = {"step": monitor.step}

        def measure_ramp(dt, rates, steps=None):
            s0, s1 = last["step"], monitor.step
            last["step"] = s1
            if dt > 0 and s1 > s0:
                g = opt.param_groups[0]
                lr, mu = float(g["lr"]), float(g.get("momentum", 0.0))
                dt = sum(lr * (1 - mu ** j) / (1 - mu) for j in range(s0 + 1, s1 + 1)) if mu > 0 else dt
            return inner(dt, rates, steps)

        monitor.engine.measure = measure_ramp
    if "discrete" in flags:
        orig_measure = monitor.engine.measure

        def measure(dt, rates, steps=None):
            h = step_dt(opt)
            return orig_measure(dt, rates, steps=max(1, round(dt / h)) if dt > 0 else None)

        monitor.engine.measure = measure
    seen = len(monitor.history)
    if seen:
        on_measurement(monitor.history[-1])
    gen = torch.Generator().manual_seed(args.seed + 1)
    step = 0
    model.train()
    try:
        for idx in acc.minibatches(n, args.batch_size, total, gen):
            opt.zero_grad(set_to_none=True)
            acc.batch_loss(cfg, model(xtr[idx]), ttr[idx]).backward()
            opt.step()
            step += 1
            for r in monitor.history[seen:]:
                on_measurement(r)
            seen = len(monitor.history)
        if not rows or rows[-1]["step"] != step:
            if monitor.measure() is not None:
                on_measurement(monitor.history[-1])
    finally:
        monitor.close()
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return dict(variant=variant, rows=rows, every=every, total=total, m=m,
                probe_indices=monitor.probe.indices.tolist(), hits=hits.tolist(),
                final_state=final, wall=time.perf_counter() - wall)


# -- plain runs: full and leave-one-out ----------------------------------------------------------
def train_plain(cfg, data, args, init_state, total: int, eval_steps: List[int], eval_idx: torch.Tensor,
                order_seed: int, drop: Optional[int] = None, norm: str = "mean"):
    """SGD as accuracy.py; ``drop`` removed from its batches. Returns losses (len(eval_steps), len(eval_idx))
    of the per-sample loss on training samples ``eval_idx`` (eval mode) and the final weights."""
    xtr, ytr, _, _, feat = data
    n = xtr.shape[0]
    ttr = acc.targets(cfg, ytr)
    per_sample = resolve_loss("mse" if cfg.loss == "mse" else "cross_entropy")
    model = acc.make_model(cfg, feat)
    model.load_state_dict(init_state)
    opt = acc.make_opt(cfg, model, args.lr)
    gen = torch.Generator().manual_seed(order_seed)
    want = {s: j for j, s in enumerate(eval_steps)}
    out = torch.full((len(eval_steps), eval_idx.numel()), math.nan)
    ex, et = xtr[eval_idx], ttr[eval_idx]

    def record(s):
        if s in want:
            model.eval()
            with torch.no_grad():
                o = model(ex)
                out[want[s]] = per_sample(o.reshape(o.shape[0], -1), et)
            model.train()

    record(0)
    step = 0
    model.train()
    for idx in acc.minibatches(n, args.batch_size, total, gen):
        opt.zero_grad(set_to_none=True)
        if drop is not None and bool((idx == drop).any()):
            keep = idx[idx != drop]
            o = model(xtr[keep])
            if norm == "mean":
                loss = acc.batch_loss(cfg, o, ttr[keep])
            else:  # fixed: Σ_{j≠i} ℓ_j / B, the engine's objective
                loss = per_sample(o.reshape(o.shape[0], -1), ttr[keep]).sum() / idx.numel()
        else:
            loss = acc.batch_loss(cfg, model(xtr[idx]), ttr[idx])
        loss.backward()
        opt.step()
        step += 1
        record(step)
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- one configuration ---------------------------------------------------------------------------
def fmt(v, spec="{:.4f}"):
    return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else spec.format(v)


def table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def check_config(name: str, args) -> str:
    cfg = config_by_name(name, args.epochs)
    data = load(cfg, args.seed)
    xtr = data[0]
    n = xtr.shape[0]
    torch.manual_seed(args.seed)
    init_state = {k: v.clone() for k, v in acc.make_model(cfg, data[4]).state_dict().items()}
    lines = [f"# LOO check: {cfg.name}", "",
             f"`python benchmarks/research/loo_check.py {' '.join(sys.argv[1:])}` — torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), seed {args.seed}, probe {args.probe_size}, "
             f"coordinates {args.coordinates}, K {args.k}, uncoupled seeds {args.uncoupled}", ""]

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        base = run_monitor(cfg, data, args, init_state, "base")
    rows = base["rows"]
    steps = [r["step"] for r in rows]
    total = base["total"]
    pidx = torch.tensor(base["probe_indices"])
    K = min(args.k, len(pidx))
    kidx = pidx[:K]
    say(f"n={n}, steps={total}, every={base['every']}, measurements={len(rows)}, probe m={base['m']}, "
        f"monitored run {base['wall']:.1f} s")

    t0 = time.perf_counter()
    full, full_state = train_plain(cfg, data, args, init_state, total, steps, pidx, args.seed + 1)
    dw = max(float((full_state[k] - base["final_state"][k]).abs().max()) for k in full_state)
    say(f"plain full run reproduces the monitored run: max|Δw| = {dw:.3g}")

    loo = {}
    for norm in args.norm:
        g = torch.full((len(steps), K), math.nan)
        for j in range(K):
            i = int(kidx[j])
            li, _ = train_plain(cfg, data, args, init_state, total, steps, kidx[j:j + 1], args.seed + 1, drop=i, norm=norm)
            g[:, j] = li[:, 0] - full[:, j]
        loo[norm] = g
    t_loo = time.perf_counter() - t0
    say(f"coupled LOO ({', '.join(args.norm)}) for K={K}: {t_loo:.1f} s")

    unc, noise = [], []
    for s in range(args.uncoupled):
        oseed = args.seed + 1 + 1000 * (s + 1)
        fs, _ = train_plain(cfg, data, args, init_state, total, steps, pidx, oseed)
        noise.append(fs - full)                                   # (T, m) order noise
        g = torch.full((len(steps), K), math.nan)
        for j in range(K):
            i = int(kidx[j])
            li, _ = train_plain(cfg, data, args, init_state, total, steps, kidx[j:j + 1], oseed, drop=i,
                                norm=args.norm[0])
            g[:, j] = li[:, 0] - full[:, j]
        unc.append(g)
    unc_mean = torch.stack(unc).mean(0) if unc else None
    noise_mean = torch.stack(noise).mean(0) if noise else None

    loo_all = None
    if args.loo_all:
        t1 = time.perf_counter()
        all_idx = torch.arange(n)
        full_all, _ = train_plain(cfg, data, args, init_state, total, steps, all_idx, args.seed + 1)
        loo_all = torch.full((len(steps), n), math.nan)
        for i in range(n):
            li, _ = train_plain(cfg, data, args, init_state, total, steps, all_idx[i:i + 1], args.seed + 1,
                                drop=i, norm=args.norm[0])
            loo_all[:, i] = li[:, 0] - full_all[:, i]
        say(f"coupled LOO of all n={n} training samples: {time.perf_counter() - t1:.1f} s")

    # -- table 1: engine vs true LOO on the same K samples, and vs the test gap ----------------
    eng = torch.tensor([r["gaps"] for r in rows])                 # (T, m)
    ref = loo[args.norm[0]]
    say()
    say(f"## Engine vs brute-force LOO on the first K={K} probe samples (coupled LOO, norm={args.norm[0]})")
    say()
    say("test gap = measured test loss − probe train loss (the quantity the monitor predicts); "
        "test−full = measured test loss − loss on the whole training set. ratio = engine mean / LOO mean "
        "on the same K; corr = Pearson across the K samples.")
    say()
    hdr = ["step", "t", "LOO mean ± SE (K)", "engine mean (K)", "ratio", "corr", "engine mean ± SE (m)",
           "test gap", "test−full", "probe train ± SE", "full train", "test"]
    extra_norm = [nm for nm in args.norm[1:]]
    hdr += [f"LOO {nm} (K)" for nm in extra_norm]
    if unc_mean is not None:
        hdr += [f"uncoupled LOO ± SE ({args.uncoupled} seeds)", "order noise (K)", "order noise (64)"]
    if loo_all is not None:
        hdr += ["LOO all n ± SE", "LOO all / (test−full)"]
    body = []
    for t, r in enumerate(rows):
        lm, lse = mean_se(ref[t])
        em = float(eng[t, :K].mean())
        am, ase = mean_se(eng[t])
        tg = r["measured_test_loss"] - r["train_loss"]
        row = [str(r["step"]), f"{r['time']:.1f}", f"{fmt(lm)} ± {fmt(lse)}", fmt(em),
               fmt(em / lm if lm > 0 else math.nan, "{:.2f}"), fmt(pearson(eng[t, :K], ref[t]) if r["step"] else math.nan, "{:.2f}"),
               f"{fmt(am)} ± {fmt(ase)}", fmt(tg), fmt(r["measured_test_loss"] - r["full_train_loss"])]
        pm, pse = mean_se(full[t])
        row += [f"{fmt(pm)} ± {fmt(pse)}", fmt(r["full_train_loss"]), fmt(r["measured_test_loss"])]
        row += [fmt(float(loo[nm][t].mean())) for nm in extra_norm]
        if unc_mean is not None:
            um, use = mean_se(unc_mean[t])
            row += [f"{fmt(um)} ± {fmt(use)}", fmt(float(noise_mean[t, :K].mean())), fmt(float(noise_mean[t].mean()))]
        if loo_all is not None:
            qm, qse = mean_se(loo_all[t])
            tf = r["measured_test_loss"] - r["full_train_loss"]
            row += [f"{fmt(qm)} ± {fmt(qse)}", fmt(qm / tf if tf > 0 else math.nan, "{:.2f}")]
        body.append(row)
    say(table(hdr, body))

    # -- probe sampling: what a random probe of m samples would give, from the all-n LOO -----------
    if loo_all is not None:
        m = len(pidx)
        say()
        say(f"## Probe sampling (from the LOO of all n={n} samples): predictor = mean train loss + mean LOO "
            f"over a random probe of m={m}; 20000 random probes")
        say()
        gsub = torch.Generator().manual_seed(12345)
        subs = torch.stack([torch.randperm(n, generator=gsub)[:m] for _ in range(20000)])
        in_probe = torch.zeros(n, dtype=torch.bool)
        in_probe[pidx] = True
        hdr2 = ["step", "test", "full train + LOO all", "random probe: 5% / 50% / 95% / mean", "this probe: train + LOO",
                "P(random ≤ this)", "top 2% share of train loss", "top 2% share of LOO", "this probe holds of top 2% (LOO)"]
        body2 = []
        for t, r in enumerate(rows):
            if r["step"] == 0:
                continue
            lt, gt = full_all[t], loo_all[t]
            pred = (lt + gt)[subs].mean(1)
            q = torch.quantile(pred, torch.tensor([0.05, 0.5, 0.95]))
            this = float((lt + gt)[pidx].mean())
            top = max(1, n // 50)
            share_l = float(lt.sort(descending=True).values[:top].sum() / lt.sum())
            share_g = float(gt.sort(descending=True).values[:top].sum() / gt.sum())
            top_g = gt.argsort(descending=True)[:top]
            body2.append([str(r["step"]), fmt(r["measured_test_loss"]), fmt(float(lt.mean() + gt.mean())),
                          " / ".join(fmt(float(v)) for v in q) + f" / {fmt(float(pred.mean()))}", fmt(this),
                          fmt(float((pred <= this).double().mean()), "{:.3f}"), fmt(share_l, "{:.2f}"),
                          fmt(share_g, "{:.2f}"), f"{int(in_probe[top_g].sum())}/{top}"])
        say(table(hdr2, body2))

    # -- reference-batch hits (base run) ---------------------------------------------------------
    hits = torch.tensor(base["hits"])
    say()
    say(f"Reference-batch hits in the base run (times a probe sample sat in the reservoir batch the engine "
        f"contracts with, weight (n−m)/(n·B) each): mean {hits.float().mean():.2f}, "
        f"{int((hits > 0).sum())}/{len(hits)} probe samples hit at least once.")
    hk = hits[:K]
    last = len(rows) - 1
    for lab, mask in (("hit ≥1", hk > 0), ("never hit", hk == 0)):
        if mask.any():
            say(f"  final step, {lab} ({int(mask.sum())} of K): engine mean {float(eng[last, :K][mask].mean()):.4f}, "
                f"LOO mean {float(ref[last][mask].mean()):.4f}, ratio {float(eng[last, :K][mask].mean() / ref[last][mask].mean()):.2f}")

    result = dict(config=cfg.name, steps=steps, probe_indices=base["probe_indices"], K=K,
                  base_rows=[{k: v for k, v in r.items()} for r in rows], hits=base["hits"],
                  loo={nm: v.tolist() for nm, v in loo.items()},
                  uncoupled=None if unc_mean is None else unc_mean.tolist(),
                  order_noise=None if noise_mean is None else noise_mean.tolist(),
                  loo_all=None if loo_all is None else loo_all.tolist(),
                  train_loss_all=None if loo_all is None else full_all.tolist(),
                  loo_all_mean=None if loo_all is None else loo_all.mean(1).tolist(),
                  loo_all_se=None if loo_all is None else (loo_all.std(1) / math.sqrt(n)).tolist(),
                  variants={})

    # -- table 2: engine variants on the same K samples ------------------------------------------
    if args.variants:
        cols = {"base": (eng, pidx.tolist(), base["wall"], base["hits"])}
        for v in args.variants:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
                out = run_monitor(cfg, data, args, init_state, v)
            dwv = max(float((out["final_state"][k] - base["final_state"][k]).abs().max()) for k in full_state)
            by_step = {r["step"]: r for r in out["rows"]}
            pos = {p: j for j, p in enumerate(out["probe_indices"])}
            sel = [pos[int(i)] for i in kidx]
            g = torch.tensor([[by_step[s]["gaps"][j] for j in sel] if s in by_step else [math.nan] * K for s in steps])
            full_m = torch.tensor([float(torch.tensor(by_step[s]["gaps"]).mean()) if s in by_step else math.nan
                                   for s in steps])
            cols[v] = (g, None, out["wall"], out["hits"])
            result["variants"][v] = dict(gaps_K=g.tolist(), mean_all=full_m.tolist(), wall=out["wall"],
                                         hits=out["hits"], max_dw=dwv)
            print(f"   variant {v}: {out['wall']:.1f} s, {len(out['rows'])} measurements, max|Δw| vs base {dwv:.3g}",
                  flush=True)
        say()
        say(f"## Engine settings: engine mean over the K={K} samples / true LOO mean (coupled, {args.norm[0]}); "
            "corr across K in brackets")
        say()
        names = list(cols)
        hdr = ["step", "LOO mean (K)"] + names
        body = []
        for t, s in enumerate(steps):
            lm = float(ref[t].mean())
            row = [str(s), fmt(lm)]
            for nm in names:
                g = cols[nm][0][t, :K]
                row.append(f"{float(g.mean()) / lm:.2f} ({pearson(g, ref[t]):.2f})" if s and lm > 0 else "–")
            body.append(row)
        say(table(hdr, body))
        say()
        say("monitor wall seconds: " + ", ".join(f"{nm} {cols[nm][2]:.1f}" for nm in names))
        say("mean reference-batch hits per probe sample: " +
            ", ".join(f"{nm} {sum(cols[nm][3]) / max(len(cols[nm][3]), 1):.2f}" for nm in names))

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{cfg.name}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{cfg.name}.json").write_text(json.dumps(result))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", nargs="+", required=True, help="configuration names as in accuracy.py")
    p.add_argument("--k", type=int, default=16, help="probe samples retrained (the first K of the probe)")
    p.add_argument("--norm", nargs="+", default=["mean"], choices=["mean", "fixed"],
                   help="normalisation of a batch that lost sample i; the first is the reference")
    p.add_argument("--uncoupled", type=int, default=2, help="batch-order seeds for the uncoupled LOO (0: skip)")
    p.add_argument("--loo-all", action="store_true", help="coupled LOO of every training sample too")
    p.add_argument("--variants", nargs="*", default=[], help=f"monitor variants: flags {VARIANT_KEYS} joined by '+'")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--probe-size", type=int, default=64)
    p.add_argument("--every", type=int, default=None)
    p.add_argument("--coordinates", default="4096")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.coordinates not in ("auto", "exact"):
        args.coordinates = int(args.coordinates)
    torch.set_num_threads(args.threads)
    for name in args.config:
        print(f"== {name}", flush=True)
        check_config(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
