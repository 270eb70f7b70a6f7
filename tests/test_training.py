"""gramhook.training.train against a hand-written loop."""
import pytest
import torch
import torch.nn.functional as F

from gramhook.training import shuffled_batches, train
from gramhook.zoo import make


def _hand_loop(model, opt, sched, x, y, *, epochs, steps, batch, seed):
    """The loop ``train`` replaces: one randperm per epoch, scheduler stepped per epoch."""
    gen, step = torch.Generator().manual_seed(seed), 0
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            F.mse_loss(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
            if step == steps:
                return step
        sched.step()
    return step


@pytest.mark.parametrize("epochs, steps", [(3, None), (3, 7)], ids=["epochs", "steps-mid-epoch"])
def test_train_matches_the_hand_written_loop(epochs, steps):
    runs = []
    for use_train in (False, True):
        model, x_fn = make("mlp", seed=0)
        x = x_fn(20, torch.Generator().manual_seed(1))
        y = torch.randn(20, 3, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        if use_train:
            n = train(model, opt, x, y, loss=F.mse_loss, batch_size=6, epochs=epochs, steps=steps,
                      generator=torch.Generator().manual_seed(3), scheduler=sched)
        else:
            n = _hand_loop(model, opt, sched, x, y, epochs=epochs, steps=steps or 10**9, batch=6, seed=3)
        runs.append((n, [p.detach().clone() for p in model.parameters()]))
    (n_hand, w_hand), (n_train, w_train) = runs
    assert n_train == n_hand == (steps or epochs * 4)
    for a, b in zip(w_hand, w_train):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hooks_see_every_step_and_can_stop():
    model, x_fn = make("mlp", seed=0)
    x = x_fn(10, torch.Generator().manual_seed(1))
    y = torch.randn(10, 3, dtype=x.dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen, epochs = [], []

    def on_step(step, idx, out):
        seen.append((step, idx.tolist(), out.shape, out.requires_grad))
        return step == 5

    n = train(model, opt, x, y, loss=F.mse_loss, batch_size=4, epochs=10, generator=torch.Generator(),
              on_step=on_step, on_epoch=epochs.append)
    assert n == 5 and [s for s, *_ in seen] == [1, 2, 3, 4, 5]
    assert epochs == [3]                                   # 3 batches per epoch; stopped in the second
    assert seen[0][2] == (4, 3) and not seen[0][3]         # detached outputs of the batch
    batches = [torch.tensor([0, 1]), torch.tensor([2])]
    assert train(model, opt, x, y, loss=F.mse_loss, batches=batches) == 2


def test_shuffled_batches_cover_the_epoch_once():
    parts = shuffled_batches(10, 4, torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))


def test_train_needs_a_batch_order():
    model, x_fn = make("mlp")
    x = x_fn(4, torch.Generator())
    with pytest.raises(ValueError, match="generator= with epochs= or steps="):
        train(model, torch.optim.SGD(model.parameters(), lr=0.1), x, x, loss=F.mse_loss, epochs=1)
