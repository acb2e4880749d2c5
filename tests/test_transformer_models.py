"""Modular-arithmetic data (LIFTR's benchmark) and the transformer / ViT reference networks."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from laftr.data import ARITHMETIC_TASKS, DATASET_NAMES, arithmetic_tasks, load_arithmetic, load_dataset
from laftr.models import copy_attention_weights, transformer, vit

P = 7
SMALL = {"vocab_size": P + 5, "seq_len": 4, "out_features": P, "d_model": 16, "heads": 2, "blocks": 2,
         "d_mlp": 32}
VARIANTS = ("manual", "sdpa", "mha")


def _pairs(x: torch.Tensor, p: int) -> torch.Tensor:
    """Pair index ``a * p + b`` of each sequence ``(a, op, b, =)``."""
    return x[:, 0] * p + x[:, 2]


def _table(ds) -> dict[tuple[int, int], int]:
    """``(a, b) -> label`` over the training and test parts."""
    x = torch.cat([ds.x_train, ds.x_test])
    y = torch.cat([ds.y_train, ds.y_test])
    return {(int(r[0]), int(r[2])): int(t) for r, t in zip(x, y, strict=True)}


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (n, SMALL["seq_len"]), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ arithmetic data


def test_arithmetic_shapes_and_tokens() -> None:
    ds = load_arithmetic("subtract", p=P, train_fraction=0.7, seed=0)
    assert ds.x_train.dtype == ds.x_test.dtype == ds.y_train.dtype == ds.y_test.dtype == torch.int64
    assert ds.x_train.shape == (round(0.7 * P * P), 4) and ds.x_test.shape == (P * P - round(0.7 * P * P), 4)
    assert ds.y_train.shape == (ds.n_train,) and ds.y_test.shape == (ds.n_test,)
    assert ds.num_classes == P and ds.classes is None and ds.input_shape == (4,)
    m = ds.meta
    assert m["p"] == P and m["task"] == "subtract" and m["vocab_size"] == P + 5 and m["seq_len"] == 4
    assert m["op_tokens"] == {"add": P, "subtract": P + 1, "quadratic": P + 2, "random": P + 3}
    assert m["op_token"] == P + 1 and m["eq_token"] == P + 4
    for x in (ds.x_train, ds.x_test):
        assert (x[:, 1] == P + 1).all() and (x[:, 3] == P + 4).all()
        assert x[:, [0, 2]].min() >= 0 and x[:, [0, 2]].max() < P
    for y in (ds.y_train, ds.y_test):
        assert y.min() >= 0 and y.max() < P


def test_arithmetic_labels_hand_checked() -> None:
    add, sub, quad = (_table(load_arithmetic(t, p=P)) for t in ("add", "subtract", "quadratic"))
    assert add[(3, 5)] == 1 and add[(6, 6)] == 5 and add[(0, 0)] == 0
    assert sub[(2, 5)] == 4 and sub[(5, 2)] == 3 and sub[(0, 6)] == 1
    assert quad[(3, 5)] == 0 and quad[(2, 3)] == 5 and quad[(1, 0)] == 1  # 49, 19, 1 mod 7
    for (a, b), y in quad.items():
        assert y == (a * a + a * b + b * b) % P
    assert _table(load_arithmetic("x2+xy+y2", p=P)) == quad
    assert load_arithmetic("x2+xy+y2", p=P).meta["task"] == "quadratic"
    # each task has its own operator token
    ops = {load_arithmetic(t, p=P).x_train[0, 1].item() for t in ARITHMETIC_TASKS}
    assert ops == {P, P + 1, P + 2, P + 3}


def test_arithmetic_split_disjoint_covering_reproducible() -> None:
    for task in ARITHMETIC_TASKS:
        ds = load_arithmetic(task, p=P, train_fraction=0.6, seed=3)
        tr, te = _pairs(ds.x_train, P), _pairs(ds.x_test, P)
        assert not set(tr.tolist()) & set(te.tolist())
        assert sorted(tr.tolist() + te.tolist()) == list(range(P * P))
        again = load_arithmetic(task, p=P, train_fraction=0.6, seed=3)
        assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)
    a = load_arithmetic("add", p=P, seed=0)
    b = load_arithmetic("add", p=P, seed=1)
    assert not torch.equal(_pairs(a.x_train, P), _pairs(b.x_train, P))
    # tiny fractions still leave one pair on each side
    assert load_arithmetic("add", p=2, train_fraction=0.01).n_train == 1
    assert load_arithmetic("add", p=2, train_fraction=0.99).n_test == 1


def test_arithmetic_random_task_is_a_fixed_function() -> None:
    t0 = _table(load_arithmetic("random", p=P, train_fraction=0.3, seed=5))
    t1 = _table(load_arithmetic("random", p=P, train_fraction=0.8, seed=5))
    assert t0 == t1 and len(t0) == P * P
    assert set(t0.values()) <= set(range(P)) and len(set(t0.values())) > 1
    assert _table(load_arithmetic("random", p=P, seed=6)) != t0


def test_arithmetic_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"unknown arithmetic task 'mul'.*add, subtract, quadratic, random"):
        load_arithmetic("mul")
    with pytest.raises(ValueError, match="unknown arithmetic task"):
        load_arithmetic(3)  # type: ignore[arg-type]
    for p in (1, 0, 2.5, "7", True):
        with pytest.raises(ValueError, match="p must be an integer >= 2"):
            load_arithmetic("add", p=p)  # type: ignore[arg-type]
    for f in (0.0, 1.0, -0.1, 1.5, "0.5"):
        with pytest.raises(ValueError, match="train_fraction must be in"):
            load_arithmetic("add", p=P, train_fraction=f)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed must be an integer"):
        load_arithmetic("add", p=P, seed=1.5)  # type: ignore[arg-type]


def test_load_dataset_arithmetic() -> None:
    assert "arithmetic" in DATASET_NAMES
    ds = load_dataset("Arithmetic")
    assert ds.name == "arithmetic-add" and ds.num_classes == 113 and ds.n_train + ds.n_test == 113 * 113
    assert ds.meta["vocab_size"] == 118 and ds.x_train.dtype == torch.int64


def test_arithmetic_task_stream_val_split() -> None:
    stream = arithmetic_tasks(("add", "subtract"), p=11, split="val", val_fraction=0.2, seed=2)
    assert len(stream) == 2 and stream.name == "arithmetic" and stream.split == "val"
    assert stream.num_outputs == 11 and not stream.multi_head and stream.input_shape == (4,)
    m = stream.meta
    assert m["p"] == 11 and m["task_names"] == ["add", "subtract"] and m["vocab_size"] == 16 and m["seq_len"] == 4
    assert m["seed"] == 2
    for task, ds_name in zip(stream, ("add", "subtract"), strict=True):
        ds = load_arithmetic(ds_name, p=11, seed=2)
        assert task.name == ds_name and task.outputs == list(range(11))
        tr, ev = set(_pairs(task.x_train, 11).tolist()), set(_pairs(task.x_eval, 11).tolist())
        assert tr and ev and not tr & ev
        assert tr | ev == set(_pairs(ds.x_train, 11).tolist())  # evaluation carved from the training part
        assert (task.x_train[:, 1] == ds.meta["op_token"]).all()
        table = _table(ds)
        for x, y in ((task.x_train, task.y_train), (task.x_eval, task.y_eval)):
            assert [table[(int(r[0]), int(r[2]))] for r in x] == y.tolist()
    info = stream.describe()
    assert info["task_names"] == ["add", "subtract"] and info["tasks"][0]["n_eval"] == len(stream[0].x_eval)


def test_arithmetic_task_stream_test_split_and_limits() -> None:
    stream = arithmetic_tasks(["quadratic", "random"], p=P, n_train=10, n_eval=5)
    ds = load_arithmetic("random", p=P)
    assert stream.split == "test" and [t.name for t in stream] == ["quadratic", "random"]
    assert all(t.n_train == 10 and len(t.x_eval) == 5 for t in stream)
    assert set(_pairs(stream[1].x_eval, P).tolist()) <= set(_pairs(ds.x_test, P).tolist())
    full = arithmetic_tasks(("add",), p=P)
    assert torch.equal(full[0].x_eval, load_arithmetic("add", p=P).x_test)
    with pytest.raises(ValueError, match="at least one"):
        arithmetic_tasks((), p=P)
    with pytest.raises(ValueError, match="repeat"):
        arithmetic_tasks(("add", "add"), p=P)
    with pytest.raises(ValueError, match="unknown arithmetic task"):
        arithmetic_tasks(("add", "divide"), p=P)
    with pytest.raises(ValueError, match="split must be one of"):
        arithmetic_tasks(p=P, split="train")
    with pytest.raises(ValueError, match="val_fraction"):
        arithmetic_tasks(p=P, split="val", val_fraction=1.0)
    with pytest.raises(ValueError, match="n_train"):
        arithmetic_tasks(p=P, n_train=0)


# ------------------------------------------------------------------ transformer


@pytest.mark.parametrize("attention", VARIANTS)
@pytest.mark.parametrize("readout", ["last", "first", "mean"])
def test_transformer_shape_and_trace(attention: str, readout: str) -> None:
    torch.manual_seed(0)
    model = transformer(**SMALL, attention=attention, readout=readout).eval()
    x = _tokens(5)
    out = model(x)
    assert out.shape == (5, P) and out.dtype == torch.float32
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), out, rtol=0, atol=0)


def test_transformer_deterministic_given_seed() -> None:
    torch.manual_seed(3)
    a = transformer(**SMALL)
    torch.manual_seed(3)
    b = transformer(**SMALL)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    # the masks are not saved
    assert not any(k.endswith("mask") for k in a.state_dict())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("readout", ["last", "mean"])
def test_attention_variants_agree(causal: bool, readout: str) -> None:
    torch.manual_seed(1)
    models = {a: transformer(**SMALL, attention=a, causal=causal, readout=readout).double().eval()
              for a in VARIANTS}
    copy_attention_weights(models["manual"], models["sdpa"])
    copy_attention_weights(models["manual"], models["mha"])
    x = _tokens(6, seed=1)
    ref = models["manual"](x)
    for a in ("sdpa", "mha"):
        torch.testing.assert_close(models[a](x), ref)
    # and back: mha -> a fresh manual network
    fresh = transformer(**SMALL, attention="manual", causal=causal, readout=readout).double().eval()
    copy_attention_weights(models["mha"], fresh)
    torch.testing.assert_close(fresh(x), ref)
    # the packed in-projection is cat(Wq, Wk, Wv)
    attn = models["manual"].blocks[0].attn
    mha = models["mha"].blocks[0].attn.mha
    torch.testing.assert_close(mha.in_proj_weight, torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
    torch.testing.assert_close(mha.out_proj.bias, attn.o.bias)


def test_attention_variants_agree_with_gradients() -> None:
    torch.manual_seed(2)
    models = {a: transformer(**SMALL, attention=a).double() for a in VARIANTS}
    for a in ("sdpa", "mha"):
        copy_attention_weights(models["manual"], models[a])
    x = _tokens(4, seed=2)
    grads = {}
    for a, m in models.items():
        m.zero_grad()
        m(x).pow(2).sum().backward()
        grads[a] = m.head.weight.grad.clone()
    torch.testing.assert_close(grads["sdpa"], grads["manual"])
    torch.testing.assert_close(grads["mha"], grads["manual"])


@pytest.mark.parametrize("attention", VARIANTS)
def test_causal_is_causal(attention: str) -> None:
    torch.manual_seed(4)
    causal = transformer(**SMALL, attention=attention, readout="first").eval()
    full = transformer(**SMALL, attention=attention, causal=False, readout="first").eval()
    full.load_state_dict(causal.state_dict())
    x = _tokens(5, seed=4)
    x2 = x.clone()
    x2[:, 2] = (x2[:, 2] + 1) % SMALL["vocab_size"]
    x2[:, 3] = (x2[:, 3] + 3) % SMALL["vocab_size"]
    with torch.no_grad():
        assert torch.equal(causal(x), causal(x2))
        assert not torch.allclose(full(x), full(x2))
        # last position sees the change
        causal.readout = "last"
        assert not torch.allclose(causal(x), causal(x2))


def test_dropout_only_in_training() -> None:
    torch.manual_seed(5)
    model = transformer(**SMALL, dropout=0.5)
    x = _tokens(8, seed=5)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_transformer_bad_arguments() -> None:
    cases = [
        ({"d_model": 15}, "d_model .*divisible by heads"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
        ({"seq_len": -1}, "seq_len must be a positive integer"),
        ({"out_features": 2.0}, "out_features must be a positive integer"),
        ({"heads": 0}, "heads must be a positive integer"),
        ({"blocks": 0}, "blocks must be a positive integer"),
        ({"d_mlp": 0}, "d_mlp must be a positive integer"),
        ({"attention": "flash"}, "unknown attention 'flash'.*manual, sdpa, mha"),
        ({"readout": "max"}, "unknown readout 'max'.*last, first, mean"),
        ({"dropout": 1.0}, "dropout must be in"),
    ]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            transformer(**{**SMALL, **change})


def test_copy_attention_weights_mismatch() -> None:
    a = transformer(**SMALL)
    with pytest.raises(ValueError, match="attention layers differ"):
        copy_attention_weights(a, transformer(**{**SMALL, "blocks": 1}, attention="mha"))
    with pytest.raises(ValueError, match="shape"):
        copy_attention_weights(a, transformer(**{**SMALL, "out_features": 3}))
    with pytest.raises(ValueError, match="shape"):
        copy_attention_weights(a, transformer(**{**SMALL, "d_mlp": 8}, attention="mha"))


# ------------------------------------------------------------------ ViT

VIT_SMALL = {"image_size": 8, "patch": 4, "channels": 2, "out_features": 3, "d_model": 16, "heads": 2,
             "blocks": 2, "d_mlp": 32}


@pytest.mark.parametrize("readout", ["cls", "mean"])
def test_vit_shape_trace_and_variants(readout: str) -> None:
    torch.manual_seed(6)
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    models = {a: vit(**VIT_SMALL, attention=a, readout=readout).double().eval() for a in VARIANTS}
    ref = models["manual"](x)
    assert ref.shape == (3, 3)
    traced = torch.fx.symbolic_trace(models["manual"])
    torch.testing.assert_close(traced(x), ref, rtol=0, atol=0)
    for a in ("sdpa", "mha"):
        copy_attention_weights(models["manual"], models[a])
        torch.testing.assert_close(models[a](x), ref)
        torch.testing.assert_close(torch.fx.symbolic_trace(models[a])(x), ref)
    n_tokens = 4 + (readout == "cls")
    assert models["manual"].pos.shape == (n_tokens, 16)


def test_vit_defaults_and_bad_arguments() -> None:
    torch.manual_seed(7)
    model = vit(d_model=16, heads=2, blocks=1, d_mlp=16)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"image_size \(28\) must be divisible by patch \(5\)"):
        vit(patch=5)
    with pytest.raises(ValueError, match="unknown readout 'last'"):
        vit(readout="last")
    with pytest.raises(ValueError, match="channels must be a positive integer"):
        vit(channels=0)
    with pytest.raises(ValueError, match="unknown attention"):
        vit(attention="linear")
