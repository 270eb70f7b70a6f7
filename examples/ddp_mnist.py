"""Plain DistributedDataParallel with gramhook: one monitor per rank, one prediction.

Spawns ``--world`` CPU processes (gloo). Every rank builds a
:class:`gramhook.integrations.ddp.DistributedGramMonitor`; all ranks hold the same history and
stop at the same step.

    python examples/ddp_mnist.py --world 2 --epochs 3
"""
import argparse
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from gramhook.data import mnist_tensors
from gramhook.zoo import mlp
from gramhook.integrations.ddp import DistributedGramMonitor


def worker(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y, _, _ = mnist_tensors(n_train=args.n_train)
        data = torch.utils.data.TensorDataset(x, y)
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, seed=0)
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch, sampler=sampler)
        torch.manual_seed(0)
        model = mlp(784, hidden=64)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        monitor = DistributedGramMonitor(ddp, opt, probe=data, every=args.every, probe_size=args.probe_size)
        stopped = False
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            for xb, yb in loader:
                opt.zero_grad()
                F.cross_entropy(ddp(xb), yb).backward()
                opt.step()
                if args.stop and monitor.should_stop(patience=args.patience):
                    stopped = True
                    break
            if stopped:
                break
        print(json.dumps({"rank": rank, "step": monitor.monitor.step, "steps": [h.step for h in monitor.history],
                          "predicted_test_loss": monitor.predicted_test_loss}), flush=True)
        monitor.close()
    finally:
        dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--probe-size", type=int, default=128)
    ap.add_argument("--stop", action="store_true")
    ap.add_argument("--patience", type=int, default=5)
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.world, port, args), nprocs=args.world)


if __name__ == "__main__":
    main()
