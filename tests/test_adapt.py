"""Models that are not ``model(x) -> Tensor``: dict/keyword inputs, ModelOutput/dict/tuple outputs.

Kernels on transformers' own modules (BERT: Linear, LayerNorm, embeddings with broadcast position
ids; GPT-2: Conv1D, tied embeddings) are checked against a naive autograd Jacobian, one backward
per sample and output.
"""
import math

import pytest
import torch
from torch import nn

from gramhook import GramMonitor, MonitorConfig, kernel
from gramhook.adapt import Adapted, InputSpec, prepare, select_output
from gramhook.kernel.plan import make_plan

transformers = pytest.importorskip("transformers")

SEQ, VOCAB = 6, 20


def _bert(**kw):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=SEQ, num_labels=3, **kw)
    return transformers.BertForSequenceClassification(cfg)


def _gpt2(cls, **kw):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=SEQ,
                                  num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=1, **kw)
    return getattr(transformers, cls)(cfg)


MODELS = {
    "bert-sdpa": (lambda: _bert(), None),
    "bert-eager": (lambda: _bert(attn_implementation="eager"), None),
    "gpt2-conv1d": (lambda: _gpt2("GPT2ForSequenceClassification"), None),
    "gpt2-tied-lm": (lambda: _gpt2("GPT2LMHeadModel"), lambda out: out.logits[:, -1]),
}


def _batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _naive_jacobian(model, x):
    """``(m, k, P)`` by one autograd backward per sample and output (eval mode)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    model.eval()
    for i in range(x.shape[0]):
        out = model(x[i:i + 1]).reshape(-1)
        per_out = []
        for a in range(out.shape[0]):
            g = torch.autograd.grad(out[a], params, retain_graph=True, allow_unused=True)
            per_out.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1)
                                      for p, gi in zip(params, g)]))
        rows.append(torch.stack(per_out))
    return torch.stack(rows)


@pytest.mark.parametrize("name", list(MODELS))
def test_kernels_on_transformer_modules_match_autograd(name):
    torch.manual_seed(0)
    make, output = MODELS[name]
    net = make().double()
    batch = _batch(4)
    spec = InputSpec.of(batch)
    model = Adapted(net, spec, output)
    x = spec.pack(batch)
    truth = _naive_jacobian(model, x)
    for method in ("auto", "reference"):
        jac = kernel.flat_jacobian(model, x, method=method)
        assert torch.allclose(jac, truth, atol=1e-10, rtol=1e-8), (name, method)
    ntk = kernel.empirical_ntk(model, x)
    assert torch.allclose(ntk, torch.einsum("iap,jbp->iajb", truth, truth), atol=1e-9)
    v = torch.randn(x.shape[0], truth.shape[2], dtype=torch.float64)
    u = kernel.tangent_outputs(model, x, v)
    assert torch.allclose(u, torch.einsum("ikd,id->ik", truth, v), atol=1e-10)
    cot = torch.randn(x.shape[0], 1, truth.shape[1], dtype=torch.float64)
    assert torch.allclose(kernel.vjp_rows(model, x, cot), torch.einsum("mqk,mkd->mqd", cot, truth), atol=1e-12)
    sk = kernel.sketched_jacobian(model, x, 8192)            # unbiased, relative error ~ 1/sqrt(s)
    est = torch.einsum("iap,jbp->iajb", sk, sk)
    assert float((est - ntk).norm() / ntk.norm()) < 0.1
    plan = make_plan(model, x)
    handled = {full for lp in plan.layers for _, full in lp.params}
    if name.startswith("gpt2"):
        assert "model.transformer.h.0.attn.c_attn.weight" in handled          # the Conv1D handler
    if name == "gpt2-tied-lm":
        assert "model.transformer.wte.weight" in plan.fallback                 # tied to lm_head
    if name.startswith("bert"):
        assert "model.bert.embeddings.position_embeddings.weight" in plan.fallback  # ids (1, T)
        assert "model.bert.embeddings.word_embeddings.weight" in handled


def test_monitor_on_a_dict_model_recognises_probe_samples():
    torch.manual_seed(0)
    net = _bert()
    n = 48
    data = _batch(n)
    labels = data["input_ids"][:, 0] % 3
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    mon = GramMonitor(net, opt, probe={**data, "labels": labels}, n_train=n, every=2, probe_size=8, config=MonitorConfig(train_sample_size=0, effective_gram_size=4))
    assert isinstance(mon.model, Adapted) and mon.k == 3
    for step in range(4):
        idx = torch.arange(step * 12, step * 12 + 12)
        out = net(input_ids=data["input_ids"][idx], attention_mask=data["attention_mask"][idx], labels=labels[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert len(mon.history) == 3
    assert mon._stepper.recognised > 0 and mon.perstep.injections > 0
    assert all(math.isfinite(h.predicted_test_loss) for h in mon.history)
    assert mon.history[-1].probe_gap > 0
    mon.close()


class _DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)

    def forward(self, x, z=None):
        return {"pred": self.a(x) + (0 if z is None else self.b(z)), "aux": x.sum(1)}


class _TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x):
        return self.a(x), x


def test_output_selector_and_inputs_adapter():
    x, z, y = torch.randn(10, 3), torch.randn(10, 2), torch.arange(10) % 2
    net = _DictOut()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="output="):
        GramMonitor(net, opt, probe={"x": x, "labels": y}, n_train=10, every=1)
    mon = GramMonitor(net, opt, probe={"x": x, "z": z, "labels": y}, n_train=10, every=1, config=MonitorConfig(output="pred"))
    assert mon.k == 2 and len(mon.history) == 1
    # inputs= selects the keys; a callable maps a sample to (model_inputs, target).
    mon2 = GramMonitor(net, opt, probe={"x": x, "z": z, "labels": y}, n_train=10, config=MonitorConfig(output="pred", inputs=("x",)))
    assert mon2.model.spec.width == 3
    mon3 = GramMonitor(net, opt, probe=(x, y), n_train=10, config=MonitorConfig(output=lambda o: o["pred"], inputs=lambda s: ({"x": s[0]}, s[1])))
    assert mon3.k == 2
    # A tuple output: its first element by default; a plain tensor probe passes through unpacked.
    tup = _TupleOut()
    mon4 = GramMonitor(tup, torch.optim.SGD(tup.parameters(), lr=0.1), probe=(x, y), n_train=10, every=1)
    assert isinstance(mon4.model, Adapted) and mon4.model.spec is None and mon4.k == 2
    for mon_ in (mon, mon2, mon3, mon4):
        mon_.close()


def test_dataset_of_dicts_probe_and_packing():
    ids = torch.randint(0, 2 ** 30, (12, 4))
    spec = InputSpec.of({"ids": ids, "w": torch.randn(12, 2)})
    assert spec.dtype == torch.float64                       # integers beyond 2**24 stay exact
    args, kw = spec.unpack(spec.pack({"ids": ids, "w": torch.zeros(12, 2)}))
    assert torch.equal(kw["ids"], ids) and kw["ids"].dtype == torch.long and not args
    assert spec.pack({"ids": ids[:, :3], "w": torch.zeros(12, 2)}) is None   # another layout

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return {"x": torch.full((3,), float(i)), "z": torch.ones(2), "label": i % 2}

    net = _DictOut()
    probe, model = prepare(net, Items(), output="pred")
    assert isinstance(model, Adapted) and len(probe) == 12
    mon = GramMonitor(net, torch.optim.SGD(net.parameters(), lr=0.1), probe=Items(), every=1, config=MonitorConfig(output="pred"))
    assert mon.n_train == 12 and mon.probe.x.shape == (12, 5) and torch.equal(mon.probe.y, torch.arange(12) % 2)
    with pytest.raises(ValueError, match="no target"):
        prepare(net, {"x": torch.randn(3, 3)})
    with pytest.raises(ValueError, match="not a tensor"):
        select_output({"a": 1}, "a")
    mon.close()


def test_closure_step_matches_plain_step():
    """optimizer.step(closure) (as Lightning calls it): the engine steps after the closure."""
    histories = []
    for use_closure in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        x, y = torch.randn(32, 4), torch.arange(32) % 3
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        mon = GramMonitor(net, opt, probe=(x, y), n_train=32, every=2, probe_size=8, config=MonitorConfig(train_sample_size=0))
        for step in range(6):
            idx = torch.arange(step * 5, step * 5 + 8) % 32

            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                loss.backward()
                return loss
            if use_closure:
                opt.step(closure)
            else:
                closure()
                opt.step()
        histories.append([h.predicted_test_loss for h in mon.history])
        assert mon._stepper.recognised > 0
        mon.close()
    assert histories[0] == pytest.approx(histories[1], rel=1e-6)
