"""Attention masks in laftr.rules.attention: finite fills hide keys as -inf does, is_causal is a hint that must be
right, and a row with no visible key (a sequence drawn all padding) attends to nothing instead of giving NaN."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from cases import perturbed
from torch import nn

import laftr
from laftr.errors import UnsupportedOpError
from laftr.rules.attention import hidden_keys, softmax_or_zero

pytestmark = pytest.mark.usefixtures("float64")

V, T, PAD, D = 11, 6, 0, 8
FILLS = ("bool", "-inf", "-1e9", "finfo.min")  # the same padding mask, as a boolean mask or filled with a value


def padded(n: int = 40, seed: int = 3) -> torch.Tensor:
    """Right-padded token sequences of lengths 2..T (no sequence is all padding)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, V, (n, T), generator=g)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    return x.masked_fill(torch.arange(T) >= lengths[:, None], PAD)


def fill_value(fill: str) -> float:
    return {"-inf": -math.inf, "-1e9": -1e9, "finfo.min": torch.finfo(torch.float64).min}[fill]


class MhaPadded(nn.Module):
    """nn.MultiheadAttention with the padding as a key_padding_mask: boolean, or additive with a fill."""

    def __init__(self, fill: str) -> None:
        super().__init__()
        self.fill = fill
        self.emb = nn.Embedding(V, D)
        self.att = nn.MultiheadAttention(D, 2, batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        pad = x == PAD
        kpm = pad if self.fill == "bool" else torch.zeros(x.shape, dtype=h.dtype).masked_fill(pad, fill_value(self.fill))
        o = self.att(h, h, h, key_padding_mask=kpm)[0]
        return self.head(torch.tanh(o).mean(1))


class HandPadded(nn.Module):
    """Attention by hand, the padding hidden by an additive -inf mask ("bool") or by masked_fill with a fill."""

    def __init__(self, fill: str) -> None:
        super().__init__()
        self.fill = fill
        self.emb = nn.Embedding(V, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        q, k, v = self.qkv(h).chunk(3, -1)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        pad = (x == PAD).unsqueeze(1)
        if self.fill == "bool":
            s = s + torch.zeros(pad.shape, dtype=s.dtype).masked_fill(pad, -math.inf)
        else:
            s = s.masked_fill(pad, fill_value(self.fill))
        return self.head(torch.tanh(torch.softmax(s, -1) @ v).mean(1))


ESTIMATORS = {
    "laftr-coreset": ("laftr", {"input_model": "coreset", "coreset_size": 40, "num_samples": 80}),
    "laftr-tokens": ("laftr", {"input_model": "tokens", "num_samples": 64}),
    "liftr-tokens": ("liftr", {"input_model": "tokens", "num_samples": 64}),
}


@pytest.mark.parametrize("net", [MhaPadded, HandPadded])
@pytest.mark.parametrize("spec", list(ESTIMATORS))
def test_finite_mask_fills_give_the_boolean_masks_estimates_draw_for_draw(net: type[nn.Module], spec: str) -> None:
    """A padding mask filled with -1e9 or finfo.min (Hugging Face's idiom, a float key_padding_mask) hides the
    keys -inf hides: the sampled patterns respected only -inf, and the estimates of one network differed with
    the spelling of its mask (MHA, laftr coreset: 0.0160 and 0.0168 vs 0.0170; liftr too); now equal draw for
    draw, and gates="none" equals the exact FSD with every spelling."""
    x = padded()
    name, kw = ESTIMATORS[spec]
    values, exact = {}, {}
    for fill in FILLS:
        torch.manual_seed(0)
        model = net(fill).eval()
        other = perturbed(model, 0.1)
        exact[fill] = laftr.exact_fsd(model, other, x).item()
        values[fill] = laftr.make_estimator(name, seed=5, **kw).fit(model, x)(other).item()
        if spec == "laftr-coreset":
            none = laftr.make_estimator("laftr", gates="none", input_model="coreset", coreset_size=40,
                                        num_samples=80).fit(model, x)(other).item()
            assert none == pytest.approx(exact[fill], rel=1e-12, abs=0)
    assert math.isfinite(values["bool"]) and values["bool"] > 0
    for fill in FILLS[1:]:
        assert exact[fill] == pytest.approx(exact["bool"], rel=1e-12, abs=0)
        assert values[fill] == pytest.approx(values["bool"], rel=1e-12, abs=0), (fill, values)


def test_hidden_keys_are_the_keys_whose_weight_is_exactly_zero() -> None:
    """-inf and finite fills far below the row's largest logit are hidden; an unmasked sharp logit is not (a gap
    of 700 still has a positive float64 weight), and a row of equal finite fills hides nothing (torch gives it
    the uniform pattern)."""
    big = torch.finfo(torch.float64).min
    l0 = torch.tensor([[0.5, -math.inf, 1.0, -1e9, big, -1e4],
                       [0.0, -700.0, 3.0, 2.0, 1.0, 0.0],
                       [-1e9, -1e9, -1e9, -1e9, -1e9, -1e9],
                       [-math.inf] * 6])
    want = torch.tensor([[False, True, False, True, True, True],
                         [False, False, False, False, False, False],
                         [False] * 6,
                         [True] * 6])
    assert torch.equal(hidden_keys(l0, -1), want)
    assert torch.equal(hidden_keys(l0, -1)[:2], torch.softmax(l0[:2], -1) == 0)


def test_softmax_or_zero_is_softmax_except_on_rows_with_no_visible_key() -> None:
    """Bit for bit torch.softmax where a row has a finite logit, zero on a row of -inf (as torch's SDPA gives it),
    and gradients without NaN."""
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(3, 4, 5, generator=g)
    lg[0, 1] = -math.inf
    lg[1, :, 2:] = -math.inf
    lg.requires_grad_(True)
    out = softmax_or_zero(lg, -1)
    ref = torch.softmax(lg, -1)
    assert torch.equal(out[0, 1], torch.zeros(5))
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[0, 1] = False
    assert torch.equal(out[keep], ref[keep])
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    assert lg.grad is not None and bool(torch.isfinite(lg.grad).all())
    assert torch.equal(lg.grad[0, 1], torch.zeros(5))
    torch.autograd.gradcheck(lambda t: softmax_or_zero(t, -1), (lg.detach().clone().requires_grad_(True),))


# ------------------------------------------------------------------------------------------------ is_causal
class CausalFlag(nn.Module):
    """is_causal=True given to a torch.nn transformer layer or to nn.MultiheadAttention, with or without a mask."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.emb = nn.Embedding(V, D)
        self.layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True), 1,
                                         enable_nested_tensor=False)
        self.att = nn.MultiheadAttention(D, 2, batch_first=True)
        self.head = nn.Linear(D, 3)
        after = torch.ones(T, T, dtype=torch.bool).triu(1)
        self.register_buffer("causal_bool", after)
        self.register_buffer("causal_float", torch.zeros(T, T).masked_fill(after, -math.inf))
        self.register_buffer("causal_fill", torch.zeros(T, T).masked_fill(after, -1e9))
        self.register_buffer("band", torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(2),
                                                                   -math.inf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        how = self.how
        if how == "layer, no mask":
            h = self.layer(h, is_causal=True)
        elif how == "encoder, no mask":
            h = self.enc(h, is_causal=True)
        elif how == "mha, no mask":
            h = self.att(h, h, h, is_causal=True, need_weights=False)[0]
        elif how in ("mha, band", "mha, bool band"):
            band = self.band if how == "mha, band" else torch.isinf(self.band)
            h = self.att(h, h, h, attn_mask=band, is_causal=True, need_weights=False)[0]
        elif how == "layer, band":
            h = self.layer(h, src_mask=self.band, is_causal=True)
        elif how == "mha, causal and padding from the input":
            B, L = x.shape
            after = torch.ones((L, L), dtype=torch.bool).triu(1)
            m = torch.zeros((B, L, L), dtype=h.dtype).masked_fill(after, -math.inf)
            m = m.masked_fill((x == PAD)[:, None, :], -math.inf)
            h = self.att(h, h, h, attn_mask=m.repeat_interleave(2, 0), is_causal=True,  # (B * heads, T, T)
                         need_weights=False)[0]
        elif how.startswith("mha, causal"):
            mask = {"mha, causal": self.causal_bool, "mha, causal float": self.causal_float,
                    "mha, causal fill": self.causal_fill}[how.removesuffix(" hint")]
            h = self.att(h, h, h, attn_mask=mask, is_causal=how.endswith("hint"), need_weights=False)[0]
        elif how.startswith("encoder, causal"):
            h = self.enc(h, mask=self.causal_float, is_causal=how.endswith("hint"))
        return self.head(h[:, 0] + h.mean(1))


@pytest.mark.parametrize("how", ["layer, no mask", "encoder, no mask", "mha, no mask"])
def test_is_causal_without_a_mask_is_refused(how: str) -> None:
    """torch refuses is_causal=True without a mask with gradients on and applies no mask with them off; laftr
    applied a causal mask (exact 0.0810, laftr gates="none" 0.0750). Refused by name, at fit, also where refused
    ops run through torch itself (gates="none", linearize="activations": torch's RuntimeError at the first use)."""
    x = padded()
    torch.manual_seed(0)
    model = CausalFlag(how).eval()
    for name, kw in (("laftr", {}), ("laftr", {"gates": "relu"}), ("liftr", {}), ("laftr", {"gates": "none"}),
                     ("laftr", {"linearize": "activations"})):
        with pytest.raises(UnsupportedOpError, match=r"self_attn|'att'") as err:
            laftr.make_estimator(name, input_model="tokens", num_samples=8, **kw).fit(model, x)
        msg = str(err.value)
        assert "is_causal=True without an attn_mask" in msg and "generate_square_subsequent_mask" in msg
        assert ("transformer layer" in msg) == how.startswith(("layer", "encoder"))


@pytest.mark.parametrize("how", ["mha, band", "mha, bool band", "layer, band", "mha, causal and padding from the input"])
def test_is_causal_with_a_mask_that_is_not_causal_is_refused(how: str) -> None:
    """is_causal=True is a hint that the mask is causal: torch uses the given mask on some paths and the causal
    mask on others; laftr used the given mask. Refused, for a constant mask and for one computed from the input
    (checked on its values). (Where torch's two grad modes disagree -- a boolean mask, a layer's fast path --
    the check of the network's grad modes refuses it first.)"""
    why = "is_causal=True with an attn_mask that is not the causal mask"
    if how in ("mha, bool band", "layer, band"):
        why += "|other outputs with gradients on than with gradients off"
    x = padded()
    torch.manual_seed(0)
    model = CausalFlag(how).eval()
    other = perturbed(model, 0.1)
    for name, kw in (("laftr", {}), ("laftr", {"gates": "relu"}), ("liftr", {})):
        with pytest.raises(UnsupportedOpError, match=why):
            laftr.make_estimator(name, input_model="tokens", num_samples=8, **kw).fit(model, x)(other)


@pytest.mark.parametrize("how", ["mha, causal", "mha, causal float", "mha, causal fill", "encoder, causal"])
def test_is_causal_with_the_causal_mask_is_the_mask(how: str) -> None:
    """With the causal mask (boolean, -inf or a finite fill) every torch path agrees: is_causal=True changes
    nothing, draw for draw, and gates="none" is the exact FSD."""
    x = padded()
    values = {}
    for hint in ("", " hint"):
        torch.manual_seed(0)
        model = CausalFlag(how + hint).eval()
        other = perturbed(model, 0.1)
        exact = laftr.exact_fsd(model, other, x).item()
        none = laftr.make_estimator("laftr", gates="none", input_model="coreset", coreset_size=40,
                                    num_samples=40).fit(model, x)(other).item()
        assert none == pytest.approx(exact, rel=1e-12, abs=0)
        values[hint] = [laftr.make_estimator(name, input_model="tokens", seed=3, num_samples=32,
                                             **kw).fit(model, x)(other).item()
                        for name, kw in (("laftr", {}), ("laftr", {"gates": "relu"}), ("liftr", {}))]
    assert values[" hint"] == pytest.approx(values[""], rel=1e-12, abs=0)


# ------------------------------------------------------------------------------------- rows with no visible key
class MhaNet(nn.Module):
    """nn.MultiheadAttention with a boolean key_padding_mask (need_weights left True: torch's softmax)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.att = nn.MultiheadAttention(D, 2, batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        return self.head(self.att(h, h, h, key_padding_mask=x == PAD)[0].mean(1))


class SdpaNet(nn.Module):
    """MhaNet written with F.scaled_dot_product_attention (which gives a row with no visible key zero weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.inp, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        B, L, _ = h.shape
        q, k, v = self.inp(h).chunk(3, -1)
        q, k, v = (t.view(B, L, 2, D // 2).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=(x != PAD)[:, None, None, :])
        return self.head(self.out(o.transpose(1, 2).reshape(B, L, D)).mean(1))

    def copy_from(self, m: MhaNet) -> SdpaNet:
        with torch.no_grad():
            self.emb.weight.copy_(m.emb.weight)
            self.inp.weight.copy_(m.att.in_proj_weight)
            self.inp.bias.copy_(m.att.in_proj_bias)
            self.out.weight.copy_(m.att.out_proj.weight)
            self.out.bias.copy_(m.att.out_proj.bias)
            self.head.load_state_dict(m.head.state_dict())
        return self


def left_and_right_padded() -> torch.Tensor:
    """Sequences of 3 tokens, padded on the right, on the left and in the middle: none is all padding, but the
    tokens input model, drawing each position on its own, draws all-padding sequences."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, V, (40, 3), generator=g)
    x[:20, 2] = PAD
    x[20:, 0] = PAD
    x[::3, 1] = PAD
    assert not bool((x == PAD).all(1).any())
    return x


MODES = {"relu": {"gates": "relu"}, "none": {"gates": "none"}, "activations": {"linearize": "activations"},
         "bernoulli": {}}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_drawn_sequence_of_padding_attends_to_nothing(mode: str) -> None:
    """laftr[input_model="tokens"] with gates="relu", "none" or linearize="activations" returned NaN when the
    input model drew an all-padding sequence (torch's softmax of a row of -inf). Such a row attends to nothing
    (zero weights, as torch's SDPA gives it): nn.MultiheadAttention's estimate is then that of the same network
    written with F.scaled_dot_product_attention, draw for draw, and finite."""
    x = left_and_right_padded()
    torch.manual_seed(0)
    mha = MhaNet().eval()
    sdpa = SdpaNet().eval().copy_from(mha)
    mha_other = perturbed(mha, 0.1)
    sdpa_other = SdpaNet().eval().copy_from(mha_other)
    drawn = torch.tensor([[PAD, PAD, PAD]])
    assert bool(torch.isnan(mha(drawn)).all()) and bool(torch.isfinite(sdpa(drawn)).all())  # torch itself
    torch.testing.assert_close(mha(x), sdpa(x), rtol=1e-12, atol=1e-12)
    kw = {"input_model": "tokens", "num_samples": 256, "seed": 1, **MODES[mode]}
    est = laftr.make_estimator("laftr", **kw).fit(mha, x)
    estimate = est(mha_other)
    estimate.backward()
    value = estimate.item()
    assert math.isfinite(value) and value > 0
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in mha_other.parameters())
    exact = laftr.exact_fsd(mha, mha_other, x).item()
    assert 0.3 * exact < value < 3 * exact
    if mode != "bernoulli":  # (the two networks' sites draw alike only where nothing is drawn but the inputs)
        twin = laftr.make_estimator("laftr", **kw).fit(sdpa, x)(sdpa_other).item()
        assert value == pytest.approx(twin, rel=1e-10, abs=0)


def test_sdpa_on_data_with_an_all_padding_sequence_is_what_torch_computes() -> None:
    """F.scaled_dot_product_attention gives a row with no visible key zero weights (in both grad modes), so the
    network and its exact FSD are finite on data holding an all-padding sequence; laftr's real networks
    (gates="none") gave NaN there, and now the exact FSD, and its other estimates are finite."""
    x = padded()
    x[::7] = PAD
    torch.manual_seed(0)
    model = SdpaNet().eval()
    other = perturbed(model, 0.1)
    exact = laftr.exact_fsd(model, other, x).item()
    assert math.isfinite(exact) and exact > 0
    none = laftr.make_estimator("laftr", gates="none", input_model="coreset", coreset_size=40,
                                num_samples=40).fit(model, x)(other).item()
    assert none == pytest.approx(exact, rel=1e-12, abs=0)
    for kw in ({"gates": "relu"}, {}, {"linearize": "activations"}):
        value = laftr.make_estimator("laftr", input_model="coreset", coreset_size=40, num_samples=80,
                                     **kw).fit(model, x)(other).item()
        assert math.isfinite(value) and 0.3 * exact < value < 3 * exact, (kw, value, exact)


class BufferMasked(HandPadded):
    """HandPadded ("bool") hiding the padding and key 1 too: by a boolean buffer or'ed with the padding mask
    (``self.hidden | (x == PAD)``, an op of the input and a buffer), or the same mask spelled from the input alone."""

    def __init__(self, spelling: str) -> None:
        super().__init__("bool")
        self.spelling = spelling
        self.register_buffer("hidden", torch.arange(T) == 1)
        self.register_buffer("steps", torch.arange(T))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        q, k, v = self.qkv(h).chunk(3, -1)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        if self.spelling == "buffer | input":
            pad = self.hidden | (x == PAD)
        elif self.spelling == "logical_or(input, buffer)":
            pad = torch.logical_or(x == PAD, self.hidden)
        elif self.spelling == "integer buffer":
            pad = (self.steps == 1) | (x == PAD)
        else:  # the input alone
            pad = (x == PAD) | (torch.zeros_like(x) + torch.arange(T) == 1)
        s = s.masked_fill(pad.unsqueeze(1), -math.inf)
        return self.head(torch.tanh(torch.softmax(s, -1) @ v).mean(1))


@pytest.mark.parametrize("spelling", ["buffer | input", "logical_or(input, buffer)", "integer buffer"])
@pytest.mark.parametrize("spec", ["laftr-coreset", "laftr-tokens", "laftr-tokens-relu"])
def test_a_mask_of_the_input_and_a_boolean_buffer_is_evaluated_exactly(spelling: str, spec: str) -> None:
    """``self.hidden | (ids == pad)`` (a fixed mask buffer with the padding) had no rule (Tensor.__or__, refused):
    a boolean or integer buffer moves with no weight, so the op is evaluated exactly like an op of the input
    alone; the estimates equal those of the same mask spelled from the input alone, draw for draw."""
    x = padded()
    name, kw = ESTIMATORS.get(spec, ("laftr", {"input_model": "tokens", "num_samples": 64, "gates": "relu"}))
    values = {}
    for sp in (spelling, "input alone"):
        torch.manual_seed(0)
        model = BufferMasked(sp).eval()
        other = perturbed(model, 0.1)
        values[sp] = laftr.make_estimator(name, seed=5, **kw).fit(model, x)(other).item()
        if sp == spelling:
            assert laftr.make_estimator(name, seed=5, **kw).fit(model, x)(model).item() == 0.0
    assert math.isfinite(values[spelling]) and values[spelling] > 0
    assert values[spelling] == pytest.approx(values["input alone"], rel=1e-12, abs=0), values


class Upcast(nn.Module):
    """Hugging Face's upcast softmax in a float64 network: ``F.softmax(s, -1, dtype=torch.float32).to(s.dtype)``."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.spelling = spelling
        self.qk, self.head = nn.Linear(D, 2 * D), nn.Linear(T * T, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.qk(x).chunk(2, -1)
        s = q @ k.transpose(-2, -1)
        if self.spelling == "F.softmax":
            a = F.softmax(s, -1, dtype=torch.float32)
        elif self.spelling == "torch.softmax":
            a = torch.softmax(s, -1, torch.float32)
        else:
            a = s.softmax(-1, dtype=torch.float32)
        return self.head(a.to(s.dtype).flatten(1))


@pytest.mark.parametrize("spelling", ["F.softmax", "torch.softmax", "method"])
def test_a_softmax_dtype_argument_is_applied(spelling: str) -> None:
    """The softmax's ``dtype=`` (the logits cast before the op) was dropped: the real networks on a coreset of all
    the data were 2.6e-8 off the exact FSD (float64 logits where the model has float32); equal to rounding now."""
    x = torch.randn(24, T, D, generator=torch.Generator().manual_seed(0))
    model = Upcast(spelling)
    theta = perturbed(model, 0.1)
    exact = laftr.exact_fsd(model, theta, x).item()
    est = laftr.make_estimator("laftr", gates="none", input_model="coreset", coreset_size=24, num_samples=24)
    assert est.fit(model, x)(theta).item() == pytest.approx(exact, rel=1e-13)


class HfIdioms(HandPadded):
    """Attention with Hugging Face's mask idioms: the padding mask cast to bool (``_expand_mask``), a causal mask
    filled in place (``_make_causal_mask``), and ``Tensor.type(dtype)`` (GPT-2's eager attention)."""

    def __init__(self, kind: str) -> None:
        super().__init__("bool")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        q, k, v = self.qkv(h).chunk(3, -1)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        if self.kind == "bool-cast":
            inv = 1.0 - (x != PAD)[:, None, :].to(s.dtype)
            s = s + inv.masked_fill(inv.to(torch.bool), -1e9)
        elif self.kind == "in-place":
            n = x.shape[1]  # (sizes read from the input: the mask is made in the graph, as Hugging Face's is)
            full = torch.full((n, n), -1e9)
            full.masked_fill_(torch.arange(n) <= torch.arange(n).view(n, 1), 0)
            s = s + full.to(s.dtype)
        elif self.kind == "expand_as":  # DistilBERT's mask broadcast (reads only the scores' shape)
            s = s.masked_fill((x == PAD).unsqueeze(1).expand_as(s), -math.inf)
        else:
            s = s.masked_fill((x == PAD).unsqueeze(1), -math.inf).type(s.dtype)
        return self.head(torch.tanh(torch.softmax(s, -1) @ v).mean(1))


@pytest.mark.parametrize("kind", ["bool-cast", "in-place", "type", "expand_as"])
def test_hugging_face_mask_idioms_run(kind: str) -> None:
    """Each was refused by every traced estimator (the cast of data to bool, 'masked_fill_ changes full in place,
    and to reads it after that', Tensor.type without a rule) or by the linearizing ones (a mask expanded as the
    scores: 'its mask depends on the network's parameters'): the cast computes from the input alone and runs
    exactly; the in-place fill of a tensor made in the forward is read as its result; .type is a cast;
    expand_as reads only the scores' shape. The real networks on a coreset of all the data give the exact FSD;
    theta0's own linearization tends to it."""
    x = padded()
    torch.manual_seed(0)
    model = HfIdioms(kind).eval()
    other = perturbed(model, 0.1)
    exact = laftr.exact_fsd(model, other, x).item()
    none = laftr.make_estimator("laftr", gates="none", input_model="coreset", coreset_size=40, num_samples=40)
    assert none.fit(model, x)(other).item() == pytest.approx(exact, rel=1e-12)
    est = laftr.make_estimator("laftr", input_model="tokens", num_samples=16).fit(model, x)
    assert est(model).item() == 0.0 and math.isfinite(est(other).item())
    own = laftr.make_estimator("laftr", gates="relu", input_model="coreset", coreset_size=40, num_samples=40)
    own.fit(model, x)
    near = perturbed(model, 1e-4)
    assert own(near).item() / laftr.exact_fsd(model, near, x).item() == pytest.approx(1.0, abs=2e-3)


class ViewChanged(HandPadded):
    """An in-place change of a view whose base is read after it (``g[:, 0].mul_(2)`` changes ``g``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.emb(x) * 1.0
        g[:, 0].mul_(2.0)
        return self.head(torch.tanh(g).mean(1))


def test_an_in_place_change_seen_through_another_value_is_refused() -> None:
    """laftr runs the change out of place: the base read after it would lack it (PyTorch's network has it)."""
    with pytest.raises(UnsupportedOpError, match="changes .* in place"):
        laftr.make_estimator("laftr", input_model="tokens").fit(ViewChanged("bool"), padded())


class LastTokenPooled(nn.Module):
    """The sequence-classification heads' pooling: each sequence's last non-padding position,
    ``h[torch.arange(B), last]``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.lin = nn.Embedding(V, D), nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(torch.tanh(self.emb(x)))
        last = (x != PAD).sum(-1) - 1
        return h[torch.arange(x.shape[0], device=x.device), last]


def test_each_example_picking_its_own_row_does_not_mix_them() -> None:
    """``torch.arange(B)`` as the first index (each example picks its own row) was refused by every estimator
    as 'mixes the examples of a batch' (its value depends on the batch size); the network is per example, and
    the estimators give the exact FSD where they must."""
    x = padded()
    model = LastTokenPooled()
    other = perturbed(model, 0.1)
    exact = laftr.exact_fsd(model, other, x).item()
    assert laftr.make_estimator("subset", coreset_size=40).fit(model, x)(other).item() == pytest.approx(exact, rel=1e-12)
    none = laftr.make_estimator("laftr", gates="none", input_model="coreset", coreset_size=40, num_samples=40)
    assert none.fit(model, x)(other).item() == pytest.approx(exact, rel=1e-12)
    est = laftr.make_estimator("laftr", input_model="tokens", num_samples=16).fit(model, x)
    assert est(model).item() == 0.0 and est(other).item() > 0
    own = laftr.make_estimator("laftr", gates="relu", input_model="coreset", coreset_size=40, num_samples=40)
    near = perturbed(model, 1e-4)
    assert own.fit(model, x)(near).item() / laftr.exact_fsd(model, near, x).item() == pytest.approx(1.0, abs=1e-3)

    class ByPosition(LastTokenPooled):  # the position used as a value: the examples are mixed, refused
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(torch.tanh(self.emb(x)))[:, -1] + torch.arange(x.shape[0], device=x.device)[:, None]

    with pytest.raises(UnsupportedOpError, match="mixes the examples"):
        laftr.make_estimator("subset", coreset_size=40).fit(ByPosition(), x)


# ------------------------------------------------------------------------- masks and biases of the parameters
class LearnedBias(nn.Module):
    """A learned attention bias (T5's position bias, learned ALiBi) given to SDPA or nn.MultiheadAttention as a
    float ``attn_mask``; ``kind="bool"``: a learned boolean pattern ``self.bias > 0`` (a diagonal kept);
    ``kind="fill"``: the same pattern as a float mask with -1e9 fills; ``kind="masked_fill"`` / ``"where"``: the
    pattern applied to scores written by hand."""

    T, D, H = 6, 8, 2

    def __init__(self, kind: str = "float", use_mha: bool = False) -> None:
        super().__init__()
        T, D, H = self.T, self.D, self.H
        self.kind, self.use_mha = kind, use_mha
        self.emb, self.qkv, self.head = nn.Embedding(11, D), nn.Linear(D, 3 * D), nn.Linear(D, 3)
        self.bias = nn.Parameter(torch.randn(H, T, T))
        self.mha = nn.MultiheadAttention(D, H, batch_first=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T, D, H = self.T, self.D, self.H
        x = self.emb(ids)
        keep = (self.bias > 0) | torch.eye(T, dtype=torch.bool)
        if self.kind in ("masked_fill", "where"):
            q, k, v = self.qkv(x).chunk(3, -1)
            s = q @ k.transpose(-2, -1)
            s = s.masked_fill(~keep[0], -1e9) if self.kind == "masked_fill" else torch.where(keep[0], s, -1e9)
            return self.head((s.softmax(-1) @ v).mean(1))
        mask = {"float": self.bias, "bool": keep, "fill": torch.zeros(H, T, T).masked_fill(~keep, -1e9)}[self.kind]
        if self.use_mha:
            a = self.mha(x, x, x, attn_mask=~mask[0] if self.kind == "bool" else mask.repeat(x.shape[0], 1, 1),
                         need_weights=False)[0]
        else:
            q, k, v = self.qkv(x).view(-1, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(-1, T, D)
        return self.head(a.mean(1))


def _moved_bias(model: nn.Module, step: float, seed: int = 5) -> nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.bias.add_(step * torch.randn(other.bias.shape, generator=torch.Generator().manual_seed(seed)))
    return other


def _coreset(**kw):
    return laftr.make_estimator("laftr", metric="l2", input_model="coreset", coreset_size=48, num_samples=48,
                                seed=0, **kw)


@pytest.mark.parametrize("use_mha", [False, True])
def test_a_learned_attention_bias_is_each_streams_own(use_mha: bool) -> None:
    """A float ``attn_mask`` computed from parameters was theta0's in every stream: every estimate was 0 with
    only the bias moved (exact 1.1e-3) and no gradient reached it. Each stream adds its own now: the real
    networks on every example are the exact FSD, gradients included; theta0's linearization tends to it."""
    torch.manual_seed(0)
    model, ids = LearnedBias("float", use_mha).eval(), torch.randint(0, 11, (48, 6))
    other = _moved_bias(model, 0.5)
    exact = laftr.exact_fsd(model, other, ids, metric="l2", grad=True)
    want = torch.autograd.grad(exact, other.bias)[0]
    assert exact.item() > 1e-5
    for kw in ({"gates": "none"}, {"gates": "relu", "linearize": "activations"}):
        got = _coreset(**kw).fit(model, ids)(other)
        torch.testing.assert_close(got, exact, rtol=1e-10, atol=0)
        torch.testing.assert_close(torch.autograd.grad(got, other.bias)[0], want, rtol=1e-8, atol=1e-14)
    near = _moved_bias(model, 1e-4)
    ratio = _coreset(gates="relu").fit(model, ids)(near) / laftr.exact_fsd(model, near, ids, metric="l2")
    assert abs(ratio.item() - 1) < 1e-3, ratio
    value = laftr.make_estimator("laftr", metric="l2", input_model="tokens", seed=0).fit(model, ids)(other)
    assert value.item() > 0 and torch.autograd.grad(value, other.bias)[0].abs().sum() > 0


@pytest.mark.parametrize(("kind", "use_mha"), [("masked_fill", False), ("where", False), ("bool", False),
                                               ("bool", True)])
def test_a_learned_boolean_mask_is_each_streams_own(kind: str, use_mha: bool) -> None:
    """A boolean mask of the parameters alone (``self.bias > 0``) that hides one more key in theta fed theta's
    -1e9 fills into the softmax linearized at theta0's logits: 5e14 x the exact FSD, silently. The real networks
    read each their own (exact); the linearizing modes refuse logits whose hidden keys differ from theta0's;
    where the mask does not move, every other parameter's change is seen as before."""
    torch.manual_seed(0)
    model, ids = LearnedBias(kind, use_mha).eval(), torch.randint(0, 11, (48, 6))
    other = copy.deepcopy(model)
    with torch.no_grad():  # theta hides one key theta0 shows (first head); nothing else moves
        i, j = next((i, j) for i in range(6) for j in range(6) if i != j and model.bias[0, i, j] > 0)
        other.bias[:, i, j] = -other.bias[:, i, j]
    exact = laftr.exact_fsd(model, other, ids, metric="l2")
    assert exact.item() > 1e-6
    torch.testing.assert_close(_coreset(gates="none").fit(model, ids)(other), exact, rtol=1e-10, atol=0)
    for est in (_coreset(gates="relu"), laftr.make_estimator("laftr", input_model="tokens", seed=0),
                laftr.make_estimator("liftr", input_model="tokens", seed=0)):
        with pytest.raises(UnsupportedOpError, match="hide other keys than theta0's"):
            est.fit(model, ids)(other)
    moved = perturbed(model, 1e-4)
    ratio = _coreset(gates="relu").fit(model, ids)(moved) / laftr.exact_fsd(model, moved, ids, metric="l2")
    assert abs(ratio.item() - 1) < 1e-3, ratio


class MaskedBy(nn.Module):
    """A Linear -> a selection by a boolean mask -> a Linear; the mask a learned pattern or a boolean buffer,
    applied by ``masked_fill`` with a zero fill or as a product with the mask's floats."""

    def __init__(self, learned: bool, spelling: str) -> None:
        super().__init__()
        self.a, self.b, self.spelling = nn.Linear(4, 6), nn.Linear(6, 3), spelling
        if learned:
            self.g = nn.Parameter(torch.randn(6))
        else:
            self.register_buffer("keep", torch.tensor([True, False, True, True, False, True]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        keep = self.g > 0 if hasattr(self, "g") else self.keep
        return self.b(h.masked_fill(~keep, 0.0) if self.spelling == "fill" else h * keep.to(h.dtype))


def test_a_mask_of_the_parameters_or_a_buffer_is_each_streams_own() -> None:
    """The same selection written as a zero fill or a product gives the same estimates, with each network's own
    mask: a boolean buffer changed in theta (a pruning mask) or a learned pattern that moved (a first version
    of this session's change took theta0's there: every estimate 1e-4 x the exact FSD)."""
    torch.manual_seed(0)
    X = torch.randn(48, 4)
    for learned in (True, False):
        model = MaskedBy(learned, "fill")
        other = perturbed(model, 0.01)
        with torch.no_grad():
            if learned:
                other.g[0] = -other.g[0]
            else:
                other.keep[1] = True
        exact = laftr.exact_fsd(model, other, X, metric="l2")
        values = []
        for spelling in ("fill", "product"):
            m, o = copy.deepcopy(model), copy.deepcopy(other)
            m.spelling = o.spelling = spelling
            torch.testing.assert_close(laftr.exact_fsd(m, o, X, metric="l2"), exact, rtol=1e-12, atol=0)
            value = _coreset(gates="relu").fit(m, X)(o)
            torch.testing.assert_close(value, exact, rtol=1e-10, atol=0)  # (no gate: linear in the data)
            values.append(laftr.make_estimator("laftr", seed=0).fit(m, X)(o))
        torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=0)


def test_a_learned_float_mask_that_hides_other_keys_is_refused_where_linearized() -> None:
    """A float mask of the parameters that hides other keys in theta than in theta0 (-1e9 fills moved by a
    learned pattern) is a gate no law decides: refused by the linearizing modes, exact in the real networks."""
    torch.manual_seed(0)
    model, ids = LearnedBias("fill").eval(), torch.randint(0, 11, (48, 6))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.bias[:, 0, 1] = -other.bias[:, 0, 1]
    exact = laftr.exact_fsd(model, other, ids, metric="l2")
    torch.testing.assert_close(_coreset(gates="none").fit(model, ids)(other), exact, rtol=1e-10, atol=0)
    with pytest.raises(UnsupportedOpError, match="hide other keys than theta0's"):
        _coreset(gates="relu").fit(model, ids)(other)
    assert _coreset(gates="relu").fit(model, ids)(model).item() == 0.0


class MhaExtraKeys(nn.Module):
    """nn.MultiheadAttention with the keys torch appends (``add_bias_kv``, ``add_zero_attn``), a padding mask,
    and a causal mask, sequence-first or batch-first."""

    def __init__(self, bias_kv: bool, zero_attn: bool, batch_first: bool) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(V, D), nn.Linear(D, 3)
        self.att = nn.MultiheadAttention(D, 2, add_bias_kv=bias_kv, add_zero_attn=zero_attn,
                                         batch_first=batch_first)
        if bias_kv:
            with torch.no_grad():
                self.att.bias_k.normal_()
                self.att.bias_v.normal_()
        self.register_buffer("causal", torch.ones(T, T, dtype=torch.bool).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        if not self.att.batch_first:
            h = h.transpose(0, 1)
        o = self.att(h, h, h, key_padding_mask=x == PAD, attn_mask=self.causal, need_weights=False)[0]
        if not self.att.batch_first:
            o = o.transpose(0, 1)
        return self.head(torch.tanh(o).mean(1))


@pytest.mark.parametrize(("bias_kv", "zero_attn", "batch_first"), [(True, False, True), (False, True, True),
                                                                   (True, True, False)])
def test_the_keys_multihead_attention_appends(bias_kv: bool, zero_attn: bool, batch_first: bool,
                                             tmp_path) -> None:
    """``add_bias_kv`` / ``add_zero_attn`` were refused by name: the appended keys (the learned bias_k / bias_v,
    a zero key and value) are each stream's own, seen by every query whatever the masks. The real networks
    on every example are the exact FSD; theta0's linearization tends to it; the bias gets its gradient."""
    torch.manual_seed(0)
    model, ids = MhaExtraKeys(bias_kv, zero_attn, batch_first).eval(), padded(48)
    other = perturbed(model, 0.2)
    exact = laftr.exact_fsd(model, other, ids, metric="l2")
    none = laftr.make_estimator("laftr", gates="none", input_model="coreset", coreset_size=48, num_samples=48,
                                metric="l2")
    torch.testing.assert_close(none.fit(model, ids)(other), exact, rtol=1e-10, atol=0)
    near = perturbed(model, 1e-4)
    own = laftr.make_estimator("laftr", gates="relu", input_model="coreset", coreset_size=48, num_samples=48)
    ratio = own.fit(model, ids)(near).item() / laftr.exact_fsd(model, near, ids).item()
    assert abs(ratio - 1) < 1e-3, ratio
    est = laftr.make_estimator("laftr", input_model="tokens", seed=0, fixed_noise=True).fit(model, ids)
    assert est(model).item() == 0.0
    value = est(other)
    back = laftr.load(laftr.save(est, tmp_path / "extra.laftr"))
    torch.testing.assert_close(back(other), value, rtol=1e-12, atol=0)
    if bias_kv:
        assert torch.autograd.grad(value, other.att.bias_k)[0].abs().sum() > 0
    assert laftr.make_estimator("kfac", unsupported="diag").fit(model, ids)(other).item() > 0
