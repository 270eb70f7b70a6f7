"""The probe set: inputs accepted, deterministic sampling, RNG hygiene, validation, model checks."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from gramhook.probe import ProbeSet, check_probe_against_model, default_probe_size, make_probe
from gramhook.zoo import MODELS, make

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

N = 20


def _xy(n=N, d=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


class PairDataset(Dataset):
    """Map-style dataset: ``(tensor (1, 3, 3), int label)``; optionally uses every global RNG."""

    def __init__(self, n=N, augment=False):
        self.n, self.augment = n, augment

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.full((1, 3, 3), float(i))
        if self.augment:  # a random transform, as torchvision's would be
            x = x + torch.randn(1, 3, 3) + random.random() + float(np.random.rand())
        return x, i % 4


def _rng_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _assert_same_states(before, after):
    assert torch.equal(before[0], after[0])
    assert before[1] == after[1]
    np_b, np_a = before[2], after[2]
    assert np_b[0] == np_a[0] and np.array_equal(np_b[1], np_a[1]) and np_b[2:] == np_a[2:]


# == accepted inputs ===============================================================================
@pytest.mark.parametrize("container", [tuple, list])
def test_tensors_sampled_without_replacement(container):
    x, y = _xy()
    probe, n = make_probe(container((x, y)), size=7, n_train=1000, seed=3)
    assert n == 1000 and probe.m == len(probe) == 7
    idx = probe.indices
    assert idx.dtype == torch.long and idx.shape == (7,)
    assert len(set(idx.tolist())) == 7 and 0 <= int(idx.min()) and int(idx.max()) < N
    assert torch.equal(probe.x, x[idx]) and torch.equal(probe.y, y[idx])


def test_sampling_is_deterministic_and_seeded():
    x, y = _xy()
    a, _ = make_probe((x, y), size=7, n_train=N, seed=3)
    torch.manual_seed(123)  # the global seed plays no part
    b, _ = make_probe((x, y), size=7, n_train=N, seed=3)
    c, _ = make_probe((x, y), size=7, n_train=N, seed=4)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.x, b.x)
    assert not torch.equal(a.indices, c.indices)
    expected = torch.randperm(N, generator=torch.Generator().manual_seed(3))[:7].sort().values
    assert torch.equal(a.indices, expected)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), size=st.integers(1, 80), seed=st.integers(0, 2**31 - 1))
def test_sampling_properties(n, size, seed):
    x = torch.arange(n).reshape(n, 1).float()
    probe, n_train = make_probe((x, torch.arange(n)), size=size, n_train=n, seed=seed)
    assert n_train == n and probe.m == min(size, n)
    if size >= n:
        assert probe.indices is None
    else:
        idx = probe.indices.tolist()
        assert idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < n  # unique, sorted, in range
        assert probe.x[:, 0].long().tolist() == idx and probe.y.tolist() == idx


@pytest.mark.parametrize("size", [None, N, N + 5])
def test_all_samples_when_size_covers_the_data(size):
    x, y = _xy()
    probe, _ = make_probe((x, y), size=size, n_train=N)
    assert probe.indices is None
    assert torch.equal(probe.x, x) and torch.equal(probe.y, y)


def test_dataset_items_are_collated_and_n_train_inferred():
    ds = PairDataset()
    probe, n = make_probe(ds, size=5, n_train=None, seed=1)
    assert n == N
    assert probe.x.shape == (5, 1, 3, 3) and probe.y.shape == (5,)
    assert probe.y.dtype == torch.long  # labels via torch.as_tensor
    for row, i in enumerate(probe.indices.tolist()):
        x_i, y_i = ds[i]
        assert torch.equal(probe.x[row], x_i) and int(probe.y[row]) == y_i
    same_for_tensors, _ = make_probe((torch.zeros(N, 2), torch.zeros(N)), size=5, n_train=N, seed=1)
    assert torch.equal(probe.indices, same_for_tensors.indices)  # one sampling rule for every input


def test_dataloader_uses_its_dataset_and_infers_n_train():
    ds = PairDataset()
    loader = DataLoader(ds, batch_size=4, shuffle=True)
    probe, n = make_probe(loader, size=6, n_train=None, seed=2)
    direct, _ = make_probe(ds, size=6, n_train=None, seed=2)
    assert n == len(ds) == N
    assert torch.equal(probe.indices, direct.indices) and torch.equal(probe.x, direct.x)


def test_tensor_dataset_and_explicit_n_train():
    x, y = _xy()
    probe, n = make_probe(TensorDataset(x, y), size=6, n_train=None, seed=5)
    assert n == N
    assert torch.equal(probe.x, x[probe.indices]) and torch.equal(probe.y, y[probe.indices])
    _, n = make_probe(DataLoader(TensorDataset(x, y)), size=6, n_train=50_000)
    assert n == 50_000  # the user's n_train wins over len(dataset)


def test_dataset_without_sampling_takes_everything_in_order():
    probe, n = make_probe(PairDataset(n=6), size=None, n_train=None)
    assert n == 6 and probe.indices is None
    assert probe.x[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("source", ["tensors", "dataset", "augmenting_dataset", "dataloader"])
def test_global_rng_states_untouched(source):
    x, y = _xy()
    data = {
        "tensors": (x, y),
        "dataset": PairDataset(),
        "augmenting_dataset": PairDataset(augment=True),
        "dataloader": DataLoader(PairDataset(augment=True), batch_size=3, shuffle=True),
    }[source]
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    before = _rng_states()
    make_probe(data, size=5, n_train=N, seed=11)
    make_probe(data, size=None, n_train=N, seed=11)
    _assert_same_states(before, _rng_states())


def test_moves_to_device():
    x, y = _xy()
    probe, _ = make_probe((x, y), size=4, n_train=N, device="meta")  # a device every build has
    assert probe.x.device.type == "meta" and probe.y.device.type == "meta"
    assert probe.indices.device.type == "cpu"
    if torch.cuda.is_available():
        probe, _ = make_probe(PairDataset(), size=4, n_train=None, device="cuda")
        assert probe.x.is_cuda and probe.y.is_cuda
        assert probe.to("cpu").x.device.type == "cpu"


# == validation ====================================================================================
BAD_CALLS = {
    # id: (data, kwargs, message regex)
    "mismatched_first_dim": ((torch.randn(10, 4), torch.zeros(9)), {}, r"x has 10 samples but y has 9"),
    "empty_tensors": ((torch.randn(0, 4), torch.zeros(0)), {}, r"probe is empty"),
    "size_zero": ((torch.randn(5, 4), torch.zeros(5)), {"size": 0}, r"probe is empty"),
    "empty_dataset": (PairDataset(n=0), {"n_train": None}, r"probe is empty"),
    "n_train_smaller": ((torch.randn(10, 4), torch.zeros(10)), {"size": 8, "n_train": 5},
                        r"n_train=5 is smaller than the probe \(m=8\).*n_train=len\(train_set\)"),
    "n_train_smaller_all": ((torch.randn(10, 4), torch.zeros(10)), {"n_train": 3}, r"n_train=3 is smaller"),
    "n_train_missing": ((torch.randn(10, 4), torch.zeros(10)), {"n_train": None}, r"pass n_train=len\(train_set\)"),
    "y_list": ((torch.randn(3, 4), [0, 1, 2]), {}, r"probe y must be a torch.Tensor, got list.*torch.as_tensor"),
    "y_bool": ((torch.randn(3, 4), torch.tensor([True, False, True])), {}, r"dtype torch.bool"),
    "y_scalar": ((torch.randn(3, 4), torch.tensor(1)), {}, r"probe y is a scalar"),
    "x_numpy": ((np.zeros((3, 4)), torch.zeros(3)), {}, r"probe x must be a torch.Tensor, got ndarray"),
    "x_list": (([[0.0] * 4] * 3, torch.zeros(3)), {}, r"probe x must be a torch.Tensor, got list"),
    "single_tensor": (torch.randn(3, 4), {}, r"must be \(x, y\) tensors, a torch Dataset or a DataLoader"),
    "dict": ({"x": torch.randn(3, 4)}, {}, r"got dict"),
    "triple": ((torch.randn(3, 4), torch.zeros(3), torch.zeros(3)), {}, r"pair \(x, y\).*length 3"),
    "size_float": ((torch.randn(3, 4), torch.zeros(3)), {"size": 2.5}, r"size must be an int"),
    "n_train_float": ((torch.randn(3, 4), torch.zeros(3)), {"n_train": 10.0}, r"n_train must be an int"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_clear_value_errors(case):
    data, kwargs, message = BAD_CALLS[case]
    kwargs = {"size": None, "n_train": 100, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_probe(data, **kwargs)


class _Items(Dataset):
    def __init__(self, item):
        self.item = item

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return self.item


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(2), 0


class _NoLen(Dataset):
    def __getitem__(self, i):
        return torch.zeros(2), 0


@pytest.mark.parametrize(
    "data, message",
    [
        (_Items(torch.zeros(2)), r"items must be \(x, y\) pairs.*Tensor"),
        (_Items((torch.zeros(2), 0, "extra")), r"items must be \(x, y\) pairs.*length 3"),
        (_Items((np.zeros(2), 0)), r"input of type ndarray, not a tensor.*ToTensor"),
        (_Items((torch.zeros(2), "cat")), r"target of type str"),
        (_Stream(), r"IterableDataset.*map-style"),
        (_NoLen(), r"no __len__"),
    ],
    ids=["not_a_pair", "triple", "numpy_x", "str_label", "iterable", "no_len"],
)
def test_bad_datasets(data, message):
    with pytest.raises(ValueError, match=message):
        make_probe(data, size=None, n_train=None)


def test_unstackable_dataset_items():
    class Ragged(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(i + 1), 0

    with pytest.raises(ValueError, match="cannot be stacked.*share one shape"):
        make_probe(Ragged(), size=None, n_train=None)


def test_probe_set_is_frozen_and_validated():
    x, y = _xy(n=4)
    probe = ProbeSet(x, y, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        probe.x = x
    with pytest.raises(ValueError, match="x has 4 samples but y has 3"):
        ProbeSet(x, y[:3], None)
    with pytest.raises(ValueError, match="probe is empty"):
        ProbeSet(x[:0], y[:0], None)
    with pytest.raises(ValueError, match=r"indices must have shape \(4,\)"):
        ProbeSet(x, y, torch.arange(3))


# == the probe against the model ===================================================================
def _probe(x, y):
    return make_probe((x, y), size=None, n_train=max(100, x.shape[0]))[0]


def test_wrong_input_shape_for_the_model():
    model = nn.Linear(4, 3)
    probe = _probe(torch.randn(10, 5), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"probe inputs of shape \(10, 5\).*don't fit the model") as info:
        check_probe_against_model(model, probe, "cross_entropy")
    assert isinstance(info.value.__cause__, RuntimeError)  # the model's own error is kept


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(3, 6), r"shape \(3, 6\) \(dtype torch.float32\) don't fit"),  # floats into Embedding
        (torch.full((3, 6), 99), r"shape \(3, 6\) \(dtype torch.int64\) don't fit"),  # token ids ≥ vocab
    ],
    ids=["float_tokens", "out_of_vocab"],
)
def test_wrong_inputs_for_the_transformer(x, message):
    model, _ = make("transformer", k=3)
    with pytest.raises(ValueError, match=message):
        check_probe_against_model(model, _probe(x, torch.zeros(3, dtype=torch.long)), "cross_entropy")


@pytest.mark.parametrize("name", list(MODELS))
def test_returns_k_and_restores_modes(name):
    model, x_fn = make(name, k=3)
    model.train()
    submodule = [mod for mod in model.modules() if mod is not model][1]
    submodule.eval()
    flags = [mod.training for mod in model.modules()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    x = x_fn(5, torch.Generator().manual_seed(0))
    probe = _probe(x, torch.zeros(5, dtype=torch.long))
    assert check_probe_against_model(model, probe, "cross_entropy") == 3
    assert [mod.training for mod in model.modules()] == flags
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())  # eval: stats untouched
    assert all(p.grad is None for p in model.parameters())


class _Out2x3(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        return self.lin(x).reshape(-1, 2, 3)


def test_multi_dim_outputs_give_flattened_k_and_callable_losses_see_their_shape():
    seen = []

    def loss(out, t):
        seen.append(tuple(out.shape))
        return ((out - t) ** 2).sum((1, 2))

    x = torch.randn(5, 4)
    assert check_probe_against_model(_Out2x3(), _probe(x, torch.zeros(5, 2, 3)), loss) == 6
    assert seen and all(s[1:] == (2, 3) for s in seen)
    assert check_probe_against_model(_Out2x3(), _probe(x, torch.zeros(5, 6)), "mse") == 6


def test_single_sample_probe():
    probe = _probe(torch.randn(1, 4), torch.zeros(1, dtype=torch.long))
    assert check_probe_against_model(nn.Linear(4, 3), probe, "cross_entropy") == 3


class _Squeezed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return self.lin(x).squeeze(-1)


class _Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x), x


class _DropsBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).sum(0, keepdim=True)


@pytest.mark.parametrize(
    "model, message",
    [
        (_Squeezed(), r"returned shape \(2,\).*\(batch, 1\)"),
        (_Tuple(), r"returned tuple, not a tensor"),
        (_DropsBatch(), r"returned shape \(1, 3\).*batch=2"),
    ],
    ids=["squeezed", "tuple", "drops_batch"],
)
def test_bad_model_outputs(model, message):
    probe = _probe(torch.randn(5, 4), torch.zeros(5))
    with pytest.raises(ValueError, match=message):
        check_probe_against_model(model, probe, "mse")


def test_loss_checks():
    model = nn.Linear(4, 3)
    probe = _probe(torch.randn(5, 4), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="one value per sample.*reduction='none'"):
        check_probe_against_model(model, probe, lambda out, t: F.mse_loss(out, t))
    bad_targets = _probe(torch.randn(5, 4), torch.zeros(5, 7))
    with pytest.raises(ValueError, match=r"loss 'mse' failed on model outputs of shape \(2, 3\).*\(2, 7\)"):
        check_probe_against_model(model, bad_targets, "mse")
    assert check_probe_against_model(model, probe, "mse") == 3


def test_probe_and_model_on_different_devices():
    model = nn.Linear(4, 3).to("meta")
    probe = _probe(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"probe is on cpu but the model on meta.*device='meta'"):
        check_probe_against_model(model, probe, "cross_entropy")


@pytest.mark.parametrize(
    "device, expected",
    [(None, 128), ("cpu", 128), (torch.device("cpu"), 128), ("cuda", 512), ("cuda:1", 512), (torch.device("cuda", 0), 512)],
)
def test_default_probe_size(device, expected):
    assert default_probe_size(device) == expected
