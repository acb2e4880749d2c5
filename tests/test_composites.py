"""torch.nn's transformer modules (laftr.composites): traced through their parts, they compute what the modules
compute, and every estimator gives on them what it gives on the same network written by hand with
nn.MultiheadAttention, nn.Linear and nn.LayerNorm (equal weights, equal parameter names)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import perturbed
from torch import nn

import laftr
from laftr._util import param_dict
from laftr.errors import UnsupportedOpError
from laftr.graph import ForwardMode, TracedNet

pytestmark = pytest.mark.usefixtures("float64")

V, T, D, HEADS, FF, OUT, PAD = 7, 5, 8, 2, 16, 3, 0


# ------------------------------------------------------------------------------------ the same layers by hand
class HandEncoderLayer(nn.Module):
    """What nn.TransformerEncoderLayer computes, written out (same submodule names)."""

    def __init__(self, norm_first: bool, activation, batch_first: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(D, HEADS, dropout=0.1, batch_first=batch_first)
        self.linear1, self.linear2 = nn.Linear(D, FF), nn.Linear(FF, D)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(0.1), nn.Dropout(0.1), nn.Dropout(0.1)
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.norm_first, self.activation = norm_first, activation

    def attend(self, h, mask, padding):
        return self.dropout1(self.self_attn(h, h, h, attn_mask=mask, key_padding_mask=padding,
                                            need_weights=False)[0])

    def mlp(self, h):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(h)))))

    def forward(self, h, src_mask=None, src_key_padding_mask=None):
        if self.norm_first:
            h = h + self.attend(self.norm1(h), src_mask, src_key_padding_mask)
            return h + self.mlp(self.norm2(h))
        h = self.norm1(h + self.attend(h, src_mask, src_key_padding_mask))
        return self.norm2(h + self.mlp(h))


class HandDecoderLayer(nn.Module):
    """What nn.TransformerDecoderLayer computes, written out (same submodule names)."""

    def __init__(self, norm_first: bool, activation, batch_first: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(D, HEADS, batch_first=batch_first)
        self.multihead_attn = nn.MultiheadAttention(D, HEADS, batch_first=batch_first)
        self.linear1, self.linear2 = nn.Linear(D, FF), nn.Linear(FF, D)
        self.dropout, self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(0.1) for _ in range(4))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.norm_first, self.activation = norm_first, activation

    def forward(self, h, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None):
        def sa(x):
            return self.dropout1(self.self_attn(x, x, x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                                                need_weights=False)[0])

        def ca(x):
            return self.dropout2(self.multihead_attn(x, memory, memory, attn_mask=memory_mask,
                                                     key_padding_mask=memory_key_padding_mask,
                                                     need_weights=False)[0])

        def mlp(x):
            return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

        if self.norm_first:
            h = h + sa(self.norm1(h))
            h = h + ca(self.norm2(h))
            return h + mlp(self.norm3(h))
        h = self.norm1(h + sa(h))
        h = self.norm2(h + ca(h))
        return self.norm3(h + mlp(h))


class HandStack(nn.Module):
    """nn.TransformerEncoder / nn.TransformerDecoder written out: ``layers`` in turn, then ``norm``."""

    def __init__(self, layers: list[nn.Module], norm: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(D) if norm else None

    def forward(self, h, *memory, **masks):
        for layer in self.layers:
            h = layer(h, *memory, **masks)
        return h if self.norm is None else self.norm(h)


class HandTransformer(nn.Module):
    """nn.Transformer written out: ``encoder`` then ``decoder``."""

    def __init__(self, encoder: HandStack, decoder: HandStack) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, src_key_padding_mask=None,
                tgt_key_padding_mask=None, memory_key_padding_mask=None):
        memory = self.encoder(src, src_mask=src_mask, src_key_padding_mask=src_key_padding_mask)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask)


# ------------------------------------------------------------------------------------ the network around them
ACTIVATIONS = {"gelu": ("gelu", F.gelu), "relu": ("relu", F.relu), "module": (nn.GELU(), nn.GELU())}


class Net(nn.Module):
    """Tokens -> embedding + learned positions -> a torch.nn transformer (or the same by hand) -> mean -> head.

    kind: ``layer`` (one encoder layer), ``encoder`` (two layers and a final norm), ``decoder`` (an encoder
    layer's output as the memory of a two-layer decoder) or ``transformer`` (nn.Transformer, source and target
    both the embedded tokens). ``causal``: a causal mask buffer on the self-attention; ``padding``: a key
    padding mask ``tokens == PAD`` computed in the forward.
    """

    def __init__(self, kind="encoder", hand=False, norm_first=True, activation="gelu", batch_first=True,
                 causal=False, padding=False, nested=False) -> None:
        super().__init__()
        self.kind, self.batch_first, self.causal, self.padding = kind, batch_first, causal, padding
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Parameter(0.3 * torch.randn(T, D))
        name, fn = ACTIVATIONS[activation]

        def enc_layer():
            if hand:
                return HandEncoderLayer(norm_first, fn, batch_first)
            return nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.1, activation=name, batch_first=batch_first,
                                              norm_first=norm_first)

        def dec_layer():
            if hand:
                return HandDecoderLayer(norm_first, fn, batch_first)
            return nn.TransformerDecoderLayer(D, HEADS, FF, dropout=0.1, activation=name, batch_first=batch_first,
                                              norm_first=norm_first)

        def stack(make, n, norm, encoder=True):
            if hand:
                return HandStack([make() for _ in range(n)], norm)
            cls = nn.TransformerEncoder if encoder else nn.TransformerDecoder
            kw = {"enable_nested_tensor": nested} if encoder else {}
            return cls(make(), n, norm=nn.LayerNorm(D) if norm else None, **kw)

        if kind == "layer":
            self.body = enc_layer()
        elif kind == "encoder":
            self.body = stack(enc_layer, 2, True)
        elif kind == "decoder":
            self.memory = enc_layer()
            self.body = stack(dec_layer, 2, False, encoder=False)
        else:
            enc, dec = stack(enc_layer, 1, True), stack(dec_layer, 1, True, encoder=False)
            self.body = HandTransformer(enc, dec) if hand else nn.Transformer(
                D, HEADS, 1, 1, FF, dropout=0.1, activation=name, batch_first=batch_first, norm_first=norm_first,
                custom_encoder=enc, custom_decoder=dec)
        if causal:
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T))
        self.head = nn.Linear(D, OUT)

    def forward(self, x):
        h = self.emb(x) + self.pos
        if not self.batch_first:
            h = h.transpose(0, 1)
        mask = self.mask if self.causal else None
        pad = (x == PAD) if self.padding else None
        if self.kind == "layer":
            h = self.body(h, src_mask=mask, src_key_padding_mask=pad)
        elif self.kind == "encoder":
            h = self.body(h, mask, pad)  # nn.TransformerEncoder's positional order (mask, src_key_padding_mask)
        elif self.kind == "decoder":
            memory = self.memory(h, src_key_padding_mask=pad)
            h = self.body(h, memory, tgt_mask=mask, tgt_key_padding_mask=pad, memory_key_padding_mask=pad)
        else:
            h = self.body(h, h, src_key_padding_mask=pad, tgt_mask=mask, tgt_key_padding_mask=pad,
                          memory_key_padding_mask=pad)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


def _tokens(n=60, seed=0, padded=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, V, (n, T), generator=g)
    if padded:  # the last 0-2 positions padded, never the first
        lengths = torch.randint(T - 2, T + 1, (n,), generator=g)
        x[torch.arange(T)[None, :] >= lengths[:, None]] = PAD
    return x


def _pair(seed=0, **kw):
    """The network with torch.nn's modules and the same by hand, with equal weights (eval mode)."""
    torch.manual_seed(seed)
    builtin = Net(**kw).eval()
    with torch.no_grad():  # no parameter at its initial value (LayerNorms would all be the identity)
        for p in builtin.parameters():
            p.add_(0.2 * torch.randn_like(p))
    hand = Net(hand=True, **kw).eval()
    hand.load_state_dict(builtin.state_dict())
    return builtin, hand


CONFIGS = {
    "encoder-pre-gelu": {},
    "encoder-post-relu": {"norm_first": False, "activation": "relu"},
    "encoder-seq-first-causal": {"batch_first": False, "causal": True},
    "encoder-padding": {"padding": True, "activation": "module"},
    "layer-post-causal": {"kind": "layer", "norm_first": False, "causal": True},
    "decoder-causal-padding": {"kind": "decoder", "causal": True, "padding": True},
    "decoder-post-seq-first": {"kind": "decoder", "norm_first": False, "batch_first": False},
    "transformer": {"kind": "transformer", "causal": True},
    "transformer-post-padding": {"kind": "transformer", "norm_first": False, "padding": True},
}


def _traced(model, x):
    (z,) = TracedNet(model).run((x,), ForwardMode([param_dict(model)]))
    return z


@pytest.mark.parametrize("config", list(CONFIGS))
def test_traced_module_computes_what_the_module_computes(config):
    kw = CONFIGS[config]
    builtin, hand = _pair(**kw)
    x = _tokens(padded=kw.get("padding", False))
    want = builtin(x)
    torch.testing.assert_close(_traced(builtin, x), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hand(x), want, rtol=1e-10, atol=1e-12)  # the hand-written twin is the same net
    with torch.no_grad():  # PyTorch's inference fast path, where it applies, computes the same
        torch.testing.assert_close(builtin(x), want.detach(), rtol=1e-8, atol=1e-10)
    graph_targets = {str(n.target) for n in TracedNet(builtin).gm.graph.nodes if n.op == "call_module"}
    assert not any("TransformerEncoder" in t or t == "body" for t in graph_targets)
    assert any(t.endswith("self_attn") for t in graph_targets)


ESTIMATORS = {
    "laftr": {"input_model": "tokens", "num_samples": 16, "metric": "kl"},
    "laftr[gates=relu]": {"input_model": "tokens", "num_samples": 16, "gates": "relu", "metric": "kl"},
    "laftr[gates=none]": {"input_model": "tokens", "num_samples": 16, "gates": "none", "metric": "kl"},
    "liftr": {"input_model": "tokens", "num_samples": 16, "metric": "kl"},
    "kfac": {"unsupported": "diag", "metric": "kl"},
    "diag-fisher": {"fisher": "exact", "metric": "kl"},
    "ntk": {"coreset_size": 10, "metric": "kl"},
    "subset": {"coreset_size": 10, "metric": "kl"},
    "weight": {},
}


@pytest.mark.parametrize("config", ["encoder-post-relu", "encoder-padding", "decoder-causal-padding",
                                    "transformer"])
def test_every_estimator_gives_what_it_gives_on_the_network_written_by_hand(config):
    kw = CONFIGS[config]
    builtin, hand = _pair(**kw)
    b1, h1 = perturbed(builtin, 0.1), perturbed(hand, 0.1)
    x = _tokens(padded=kw.get("padding", False))
    for label, opts in ESTIMATORS.items():
        name = label.split("[")[0]
        eb = laftr.make_estimator(name, seed=3, **opts).fit(builtin, x)
        eh = laftr.make_estimator(name, seed=3, **opts).fit(hand, x)
        vb, vh = eb(b1), eh(h1)
        assert float(vb) > 0, label
        torch.testing.assert_close(vb, vh, rtol=1e-9, atol=1e-13, msg=lambda m, s=label: f"{s}: {m}")
        assert eb.stored_floats() == eh.stored_floats(), label


def test_estimators_are_zero_at_theta0_reach_every_parameter_and_save_and_load(tmp_path):
    builtin, _ = _pair(kind="transformer", causal=True)
    other = perturbed(builtin, 0.1)
    x = _tokens()
    for label in ("laftr", "liftr", "kfac"):
        fixed = {"fixed_noise": True} if label != "kfac" else {}  # the same samples at every call, and after load
        est = laftr.make_estimator(label, seed=1, **ESTIMATORS[label], **fixed).fit(builtin, x)
        assert abs(float(est(builtin))) < 1e-12, label
        other.zero_grad(set_to_none=True)
        value = est(other)
        value.backward()
        missing = [n for n, p in other.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, (label, missing)
        back = laftr.load(laftr.save(est, tmp_path / f"{label}.laftr"))
        torch.testing.assert_close(back(other), value.detach(), rtol=1e-10, atol=1e-15)


def test_own_linearization_tends_to_the_exact_fsd():
    """gates="relu" linearizes every op at theta0's values: its estimate over the exact FSD on the same inputs
    tends to 1 as theta -> theta0 (coreset of every input, so no input model is involved)."""
    builtin, _ = _pair(kind="encoder", norm_first=False, causal=True)
    x = _tokens(30)
    est = laftr.make_estimator("laftr", gates="relu", input_model="coreset", coreset_size=30, num_samples=30,
                               metric="l2").fit(builtin, x)
    errors = []
    for step in (0.1, 0.01, 0.001):
        other = perturbed(builtin, step)
        exact = laftr.exact_fsd(builtin, other, x, metric="l2")
        errors.append(abs(float(est(other)) / float(exact) - 1))
    assert errors[2] < 1e-2 and errors[2] < errors[1] < errors[0]


def test_nested_tensor_encoder_with_padding_is_refused_with_the_fix():
    """With enable_nested_tensor=True (PyTorch's default) and a key padding mask, PyTorch's inference path zeroes
    the padded positions and its training path does not: two functions, so laftr refuses and says what to do."""
    torch.manual_seed(0)
    model = Net(padding=True, nested=True, norm_first=False).eval()  # post-norm: PyTorch's nested path applies
    assert model.body.use_nested_tensor
    x = _tokens(padded=True)
    h = model.emb(x) + model.pos
    with torch.no_grad():
        fast = model.body(h, None, x == PAD)
    assert not torch.allclose(fast, model.body(h, None, x == PAD))  # why: the two paths differ
    with pytest.raises(UnsupportedOpError, match="enable_nested_tensor=False"):
        laftr.make_estimator("laftr", input_model="tokens").fit(model, x)
    assert isinstance(laftr.make_estimator("laftr", input_model="tokens", num_samples=4).fit(
        Net(nested=True, norm_first=False).eval(), _tokens()), laftr.FSDEstimator)  # no padding mask: nothing to refuse


def test_a_subclass_that_overrides_forward_is_traced_through_its_own_code():
    class Scaled(nn.TransformerEncoderLayer):
        def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
            return 2 * self.linear2(F.relu(self.linear1(src)))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = Scaled(D, HEADS, FF, batch_first=True)

        def forward(self, h):
            return self.layer(h).sum(-1)

    model = Outer().eval()
    h = torch.randn(4, T, D)
    torch.testing.assert_close(_traced(model, h), model(h), rtol=1e-12, atol=1e-12)
    targets = {str(n.target) for n in TracedNet(model).gm.graph.nodes if n.op == "call_module"}
    assert "layer.self_attn" not in targets and "layer.linear1" in targets
