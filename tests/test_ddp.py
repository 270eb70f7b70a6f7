"""Plain DistributedDataParallel: 2 CPU processes over gloo (torch.multiprocessing.spawn).

Both ranks must hold the same history and stop at the same step, also when a measurement step
fails on one rank; the summed perturbations must match one process training on the same global
batches (up to the ranks' own contraction rows).
"""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gramhook import GramMonitor, MonitorConfig
from gramhook.integrations.ddp import DistributedGramMonitor

N, LOCAL_B, STEPS, WORLD = 96, 8, 10, 2
SETTINGS = dict(train_sample_size=0, effective_gram_size=0)
OPTS = dict(every=2, probe_size=16, config=MonitorConfig(**SETTINGS, rows=LOCAL_B))


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.TensorDataset(x, y)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _order():
    """The global batches: rank r's local batch t is the r-th interleaved share (DistributedSampler)."""
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    shards = [perm[r::WORLD] for r in range(WORLD)]
    return [[s[t * LOCAL_B:(t + 1) * LOCAL_B] for s in shards] for t in range(STEPS)]


def _failing_at(monitor, step, real):
    def call():
        if monitor.step == step:
            raise RuntimeError("injected failure")
        return real()
    return call


FAULTS = (None, "step", "readout", "timed")   # "timed": every=None, rank 0's time budget decides


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for fault in FAULTS:        # one process group for every scenario (spawning is the slow part)
            _scenario(rank, out, fault)
    finally:
        dist.destroy_process_group()
    # gloo's background threads can abort the interpreter's own teardown ("terminate called without
    # an active exception"); every result is on disk by now, so leave without it.
    os._exit(0)


def _scenario(rank, out, fault):
    data = _data()
    net = _model()
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.5)
    mon = DistributedGramMonitor(ddp, opt, probe=data, **{**OPTS, **({"every": None} if fault == "timed" else {})})
    if fault == "step" and rank == 1:       # this rank's state cannot be read at step 4
        mon.monitor.perstep.stacked = _failing_at(mon.monitor, 4, mon.monitor.perstep.stacked)
    if fault == "readout" and rank == 0:    # the readout on src fails at step 4
        mon.monitor._measure = _failing_at(mon.monitor, 4, mon.monitor._measure)
    stopped = None
    for t, shares in enumerate(_order()):
        x, y = data.tensors[0][shares[rank]], data.tensors[1][shares[rank]]
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        if mon.should_stop(patience=3, min_delta=1e9):   # true from the 4th measurement on
            stopped = t + 1
            break
    with open(os.path.join(out, f"{fault}-rank{rank}.json"), "w") as fh:
        json.dump({"stopped": stopped, "history": [h.as_dict() for h in mon.history]}, fh)
    mon.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False,
                             start_method="spawn")
    files = [out / f"{f}-rank{r}.json" for f in FAULTS for r in range(WORLD)]
    for _ in range(360):          # 180 s: a deadlock fails the test instead of hanging CI
        try:
            if ctx.join(timeout=0.5):
                break
        except mp.ProcessExitedException:
            if all(f.exists() for f in files):
                break             # a worker died after writing every result: its exit, not the runs
            raise
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("the DDP workers did not finish (deadlock)")
    return {f: [json.load(open(out / f"{f}-rank{r}.json")) for r in range(WORLD)] for f in FAULTS}


def _single_process():
    data = _data()
    net = _model()
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.5)
    mon = GramMonitor(net, opt, probe=data, **{**OPTS, "config": MonitorConfig(**SETTINGS, rows=WORLD * LOCAL_B)})
    for shares in _order():
        idx = torch.cat(shares)
        opt.zero_grad()
        nn.functional.cross_entropy(net(data.tensors[0][idx]), data.tensors[1][idx]).backward()
        opt.step()
    return [h.as_dict() for h in mon.history]


@pytest.mark.parametrize("fault", [None, "step", "readout", "timed"])
def test_ranks_agree_and_stop_together(runs, fault):
    r0, r1 = runs[fault]
    assert json.dumps(r0["history"]) == json.dumps(r1["history"])
    if fault == "timed":          # the measured steps depend on timing; the ranks agree on them
        assert r0["stopped"] == r1["stopped"]
        return
    want = [0, 2, 6, 8] if fault == "readout" else [0, 2, 4, 6]   # the failed readout is skipped
    assert [h["step"] for h in r0["history"]] == want
    assert r0["stopped"] == r1["stopped"] == want[-1]
    if fault is None:
        single = _single_process()
        got = {h["step"]: h["probe_gap"] for h in r0["history"]}
        for h in single:
            if h["step"] in got and h["step"] > 0:
                # One process on the same global batches: the same injections; the ranks' rows
                # differ from the global batch's only as two halves of it.
                assert got[h["step"]] == pytest.approx(h["probe_gap"], rel=0.1)
