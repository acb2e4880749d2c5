"""Attention, softmax and products of two data tensors (laftr.rules.attention): each checked against an exact
computation where the linearization must be exact, for convergence to the exact FSD as theta -> theta0, and for
equality of the three ways of writing attention (by hand, SDPA, nn.MultiheadAttention) on equal weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from cases import EstimateCall
from torch import nn

import laftr
from laftr._util import param_dict
from laftr.errors import UnsupportedOpError
from laftr.graph import TracedNet
from laftr.rules.attention import PatternLaw, gamma_draw

pytestmark = pytest.mark.usefixtures("float64")


MANUAL = ("manual", "masked_fill", "where")  # attention by hand; the causal mask added, filled in, or selected


class Attn(nn.Module):
    """in-projection -> one attention block (manual / sdpa / mha, causal or not) -> [GELU] -> mean -> head."""

    def __init__(self, kind: str = "manual", d: int = 8, heads: int = 2, T: int = 5, causal: bool = True,
                 act: bool = True, batch_first: bool = True) -> None:
        super().__init__()
        self.kind, self.d, self.h, self.causal, self.act, self.batch_first = kind, d, heads, causal, act, batch_first
        self.inp = nn.Linear(3, d)
        if kind == "mha":
            self.mha = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        else:
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.register_buffer("bias", torch.full((T, T), -math.inf).triu(1), persistent=False)
        self.register_buffer("blocked", torch.ones(T, T, dtype=torch.bool).triu(1), persistent=False)
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        B, T, _ = h.shape
        if self.kind == "mha":
            hh = h if self.batch_first else h.transpose(0, 1)
            a = self.mha(hh, hh, hh, attn_mask=self.blocked if self.causal else None, need_weights=False)[0]
            a = a if self.batch_first else a.transpose(0, 1)
        else:
            q, k, v = (m(h).view(B, T, self.h, self.d // self.h).transpose(1, 2) for m in (self.q, self.k, self.v))
            if self.kind in MANUAL:
                s = q @ k.transpose(-2, -1) / math.sqrt(self.d // self.h)
                if self.causal and self.kind == "manual":
                    s = s + self.bias
                elif self.causal and self.kind == "masked_fill":  # nanoGPT's way
                    s = s.masked_fill(self.blocked, float("-inf"))
                elif self.causal:
                    s = torch.where(self.blocked, -math.inf, s)
                o = torch.softmax(s, dim=-1) @ v
            else:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            a = self.o(o.transpose(1, 2).reshape(B, T, self.d))
        h = h + a
        if self.act:
            h = F.gelu(h)
        return self.head(h.mean(1))


def copy_weights(src: Attn, dst: Attn) -> None:
    """``src`` (manual/sdpa) -> ``dst`` (any kind), equal functions."""
    with torch.no_grad():
        dst.inp.load_state_dict(src.inp.state_dict())
        dst.head.load_state_dict(src.head.state_dict())
        if dst.kind == "mha":
            dst.mha.in_proj_weight.copy_(torch.cat([src.q.weight, src.k.weight, src.v.weight]))
            dst.mha.in_proj_bias.copy_(torch.cat([src.q.bias, src.k.bias, src.v.bias]))
            dst.mha.out_proj.weight.copy_(src.o.weight)
            dst.mha.out_proj.bias.copy_(src.o.bias)
        else:
            for n in "qkvo":
                getattr(dst, n).load_state_dict(getattr(src, n).state_dict())


def perturbed(model: nn.Module, step: float, seed: int = 3, only: tuple[str, ...] | None = None) -> nn.Module:
    import copy

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            d = torch.randn(p.shape, generator=g)
            if only is None or n.split(".")[0] in only:
                p.add_(step * d)
    return m


def _data(n: int = 40, T: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, T, 3, generator=torch.Generator().manual_seed(seed))


KINDS = ["manual", "sdpa", "mha"]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_interpreter_reproduces_every_kind_of_attention(kind, causal):
    torch.manual_seed(0)
    ref = Attn("manual", causal=causal)
    m = Attn(kind, causal=causal)
    copy_weights(ref, m)
    X = _data()
    torch.testing.assert_close(TracedNet(m).forward(X, param_dict(m)), m(X), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(X), ref(X), rtol=1e-12, atol=1e-12)


def test_multihead_attention_sequence_first():
    torch.manual_seed(0)
    ref = Attn("manual")
    m = Attn("mha", batch_first=False)
    copy_weights(ref, m)
    X = _data()
    torch.testing.assert_close(TracedNet(m).forward(X, param_dict(m)), ref(X), rtol=1e-12, atol=1e-12)
    est_a = laftr.make_estimator("laftr", metric="kl", num_samples=16).fit(ref, X)
    est_b = laftr.make_estimator("laftr", metric="kl", num_samples=16).fit(m, X)
    other = perturbed(ref, 0.1)
    other_b = Attn("mha", batch_first=False)
    copy_weights(other, other_b)
    torch.testing.assert_close(est_b(other_b), est_a(other), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_own_linearization_tends_to_the_exact_fsd(kind):
    """gates='relu' on a coreset holding every input: estimate / exact -> 1 as theta -> theta0, the error
    shrinking with the step (first order)."""
    torch.manual_seed(0)
    ref = Attn("manual")
    X = _data()
    errors = []
    for step in (1e-1, 1e-2, 1e-3):
        m0, m1 = Attn(kind), Attn(kind)
        copy_weights(ref, m0)
        copy_weights(perturbed(ref, step), m1)
        est = laftr.make_estimator("laftr", metric="l2", input_model="coreset", coreset_size=40, num_samples=40,
                                   gates="relu").fit(m0, X)
        errors.append(abs(float(est(m1)) / float(laftr.exact_fsd(m0, m1, X, metric="l2")) - 1))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 2e-3 and errors[1] < 2e-2


@pytest.mark.parametrize("kind", KINDS)
def test_no_linearization_on_every_input_is_the_exact_fsd(kind):
    """gates='none' on a coreset holding every input: the exact FSD for a theta moved everywhere (q, k included),
    values and gradients, for every way of writing attention."""
    torch.manual_seed(0)
    ref = Attn("manual")
    X = _data()
    m0, m1 = Attn(kind), Attn(kind)
    copy_weights(ref, m0)
    copy_weights(perturbed(ref, 0.3), m1)
    for metric in ("l2", "kl"):
        est = laftr.make_estimator("laftr", metric=metric, input_model="coreset", coreset_size=40, num_samples=40,
                                   gates="none").fit(m0, X)
        value, truth = est(m1), laftr.exact_fsd(m0, m1, X, metric=metric, grad=True)
        torch.testing.assert_close(value, truth, rtol=1e-10, atol=1e-14)
        params = list(m1.parameters())
        for g, g_ref in zip(torch.autograd.grad(value, params), torch.autograd.grad(truth, params), strict=True):
            torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_when_only_the_value_path_changes(kind):
    """With q and k unchanged the attention pattern is theta0's, and without a nonlinearity after it the network
    is affine in the change: theta0's own linearization on every input IS the exact FSD."""
    torch.manual_seed(0)
    ref = Attn("manual", act=False)
    X = _data()
    m0, m1 = Attn(kind, act=False), Attn(kind, act=False)
    copy_weights(ref, m0)
    copy_weights(perturbed(ref, 0.3, only=("v", "o", "head")), m1)
    for metric in ("l2", "kl"):
        est = laftr.make_estimator("laftr", metric=metric, input_model="coreset", coreset_size=40, num_samples=40,
                                   gates="relu").fit(m0, X)
        torch.testing.assert_close(est(m1), laftr.exact_fsd(m0, m1, X, metric=metric), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_pattern_of_one_example_is_theta0s_own(kind):
    """Fitted on one example, every stored law is a point mass (the pattern's rows have zero spread), so LAFTR's
    sampled linearization equals theta0's own on that example."""
    torch.manual_seed(0)
    ref = Attn("manual", act=False)
    X = _data(1)
    m0, m1 = Attn(kind, act=False), Attn(kind, act=False)
    copy_weights(ref, m0)
    copy_weights(perturbed(ref, 0.2), m1)
    opts = {"metric": "kl", "input_model": "coreset", "coreset_size": 1, "num_samples": 4}
    own = laftr.make_estimator("laftr", gates="relu", **opts).fit(m0, X)
    sampled = laftr.make_estimator("laftr", **opts).fit(m0, X)
    torch.testing.assert_close(sampled(m1), own(m1), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("gates", ["bernoulli", "relu", "none"])
def test_three_ways_of_writing_attention_give_the_same_estimate(gates):
    torch.manual_seed(0)
    ref = Attn("manual")
    other = perturbed(ref, 0.1)
    X = _data()
    values = []
    for kind in KINDS:
        m0, m1 = Attn(kind), Attn(kind)
        copy_weights(ref, m0)
        copy_weights(other, m1)
        est = laftr.make_estimator("laftr", metric="kl", num_samples=32, gates=gates).fit(m0, X)
        values.append(est(m1))
        assert float(est(m0)) == 0.0
    torch.testing.assert_close(values[1], values[0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(values[2], values[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("gates", ["bernoulli", "relu"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter_and_pass_gradcheck(kind, gates):
    torch.manual_seed(0)
    m0 = Attn(kind, d=4, T=3)
    X = torch.randn(12, 3, 3, generator=torch.Generator().manual_seed(1))
    est = laftr.make_estimator("laftr", metric="kl", num_samples=4, fixed_noise=True, gates=gates).fit(m0, X)
    m1 = perturbed(m0, 0.1)
    est(m1).backward()
    for n, p in m1.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    names = [n for n, _ in m1.named_parameters()]
    call = EstimateCall(m1, est)

    def f(*ts):
        return torch.func.functional_call(call, {f"inner.{n}": t for n, t in zip(names, ts)}, ())

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in m1.parameters())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_product_of_two_data_tensors_tends_to_the_exact_fsd():
    """A gated MLP (``a(x) * b(x)``, SwiGLU-like): the bilinear product linearized at theta0."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(F.silu(self.a(x)) * self.b(x))

    torch.manual_seed(0)
    m0 = Gated()
    X = torch.randn(30, 4, generator=torch.Generator().manual_seed(2))
    est = laftr.make_estimator("laftr", metric="l2", input_model="coreset", coreset_size=30, num_samples=30,
                               gates="relu").fit(m0, X)
    errs = []
    for step in (1e-1, 1e-2, 1e-3):
        m1 = perturbed(m0, step)
        errs.append(abs(float(est(m1)) / float(laftr.exact_fsd(m0, m1, X, metric="l2")) - 1))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 2e-3
    # the same network with one factor fixed (b frozen) is exact under theta0's own linearization when only the
    # output layer changes
    m1 = perturbed(m0, 0.5, only=("out",))
    torch.testing.assert_close(est(m1), laftr.exact_fsd(m0, m1, X, metric="l2"), rtol=1e-10, atol=1e-14)


def test_save_and_load_keep_the_pattern_law(tmp_path):
    torch.manual_seed(0)
    m0 = Attn("mha")
    X = _data()
    est = laftr.make_estimator("laftr", metric="kl", num_samples=16).fit(m0, X)
    m1 = perturbed(m0, 0.1)
    path = tmp_path / "att.laftr"
    laftr.save(est, path)
    back = laftr.load(path)
    torch.testing.assert_close(back(m1), est(m1), rtol=1e-12, atol=1e-15)
    sites = {s[0]: s[1] for s in est.site_signature}
    assert "multihead_attention" in sites.values()
    # the pattern law's floats are counted: heads x T x T means + heads x T squared norms, per site
    per_site = 2 * 5 * 5 + 2 * 5
    gates = 5 * 8  # the GELU after the block: 5 moments... counted by the gate itself
    assert est.stored_floats() >= per_site + gates


# ---------------------------------------------------------------------------------------------- the laws
def test_gamma_draws_have_the_right_moments_and_follow_the_generator():
    a = torch.tensor([0.3, 1.0, 2.5, 7.0]).repeat(20000, 1)
    g = gamma_draw(a, torch.Generator().manual_seed(0))
    torch.testing.assert_close(g.mean(0), a[0], rtol=3e-2, atol=0)
    torch.testing.assert_close(g.var(0), a[0], rtol=6e-2, atol=0)
    again = gamma_draw(a, torch.Generator().manual_seed(0))
    assert torch.equal(g, again)
    assert (gamma_draw(torch.zeros(5), torch.Generator()) == 0).all()


def _law_from(patterns: torch.Tensor) -> PatternLaw:
    sums = {"a": patterns.sum(0, keepdim=True), "a2": (patterns * patterns).sum(-1).sum(0, keepdim=True)}
    return PatternLaw(sums, torch.tensor([float(len(patterns))]), patterns.ndim - 2, torch.device("cpu"),
                      torch.float64)


def test_pattern_law_matches_the_stored_moments():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 2, 4, 6, generator=g) * 1.5
    logits[..., 0, 1:] = -math.inf  # a causal-like row: all mass on one position
    A = torch.softmax(logits, -1)
    law = _law_from(A)
    draws = law.draw(torch.zeros(40000, dtype=torch.long), torch.Generator().manual_seed(1), False, A)
    torch.testing.assert_close(draws.sum(-1), torch.ones(draws.shape[:-1]), rtol=1e-12, atol=1e-12)
    assert (draws[..., 0, 1:] == 0).all() and (draws[..., 0, 0] == 1).all()
    torch.testing.assert_close(draws.mean(0), A.mean(0), rtol=0, atol=1e-2)
    torch.testing.assert_close((draws * draws).sum(-1).mean(0), (A * A).sum(-1).mean(0), rtol=0, atol=1e-2)


def test_pattern_law_of_one_hot_rows_draws_one_hot_rows():
    idx = torch.randint(0, 5, (300, 3), generator=torch.Generator().manual_seed(0))
    A = F.one_hot(idx, 5).double()  # theta0 attends to one position, varying with the input
    law = _law_from(A)
    draws = law.draw(torch.zeros(20000, dtype=torch.long), torch.Generator().manual_seed(2), False, A)
    assert ((draws == 0) | (draws == 1)).all() and (draws.sum(-1) == 1).all()
    torch.testing.assert_close(draws.mean(0), A.mean(0), rtol=0, atol=1.5e-2)


# ---------------------------------------------------------------------------------------------- refusals
def test_laftr_exact_refuses_attention_with_a_message():
    m0 = Attn("manual", act=False)
    with pytest.raises(UnsupportedOpError, match="no closed form"):
        laftr.make_estimator("laftr-exact", metric="l2").fit(m0, _data())(perturbed(m0, 0.1))


@pytest.mark.parametrize("spelling", ["index", "unpack"])
def test_default_need_weights_is_fine_when_the_weights_are_dropped(spelling):
    """``attn(x, x, x)[0]`` and ``out, _ = attn(x, x, x)`` (need_weights=True, the default, weights unused) give
    what ``need_weights=False`` gives, for every mode."""
    class Default(nn.Module):
        def __init__(self, need: bool | None) -> None:
            super().__init__()
            self.need = need
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            if self.need is False:
                out = self.mha(x, x, x, need_weights=False)[0]
            elif spelling == "index":
                out = self.mha(x, x, x)[0]
            else:
                out, _ = self.mha(x, x, x)
            return self.head(torch.tanh(out).mean(1))

    torch.manual_seed(0)
    default, explicit = Default(None), Default(False)
    explicit.load_state_dict(default.state_dict())
    X = torch.randn(30, 5, 4, generator=torch.Generator().manual_seed(1))
    moved_d, moved_e = perturbed(default, 0.1), perturbed(explicit, 0.1)
    for gates in ("bernoulli", "relu", "none"):
        a = laftr.make_estimator("laftr", gates=gates, metric="kl", num_samples=16, seed=3).fit(default, X)
        b = laftr.make_estimator("laftr", gates=gates, metric="kl", num_samples=16, seed=3).fit(explicit, X)
        torch.testing.assert_close(a(moved_d), b(moved_e), rtol=1e-10, atol=1e-14)
    # LIFTR, on attention that reads the network input directly: its output projection's input is behind the
    # attention, so its law is recorded even though the layer's own input is the input model's (this failed
    # with "no moments for the input of out_proj")
    a = laftr.make_estimator("liftr", metric="kl", num_samples=16, seed=3).fit(default, X)
    b = laftr.make_estimator("liftr", metric="kl", num_samples=16, seed=3).fit(explicit, X)
    torch.testing.assert_close(a(moved_d), b(moved_e), rtol=1e-10, atol=1e-14)
    assert float(a(moved_d)) > 0 and float(a(default)) == 0.0


def test_bad_attention_calls_are_named():
    class NeedWeights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            out, weights = self.mha(x, x, x)  # need_weights=True, the default
            return out.mean(1) + weights.sum((1, 2))[:, None]

    with pytest.raises(UnsupportedOpError, match="reads its attention weights.*need_weights=False"):
        TracedNet(NeedWeights())

    class DataMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            q = self.lin(x).unsqueeze(1)
            return F.scaled_dot_product_attention(q, q, q, attn_mask=q @ q.transpose(-2, -1) > 0).mean((1, 2))

    # a mask computed from data with parameters on the way is a comparison gate: decided by theta0 (it was
    # refused before such gates had a rule); the closed form refuses it by name
    net = TracedNet(DataMask())
    assert [r.family for r in net.sites.values() if r.name == "gt"] == ["compare"]
    m = DataMask().double()
    assert float(laftr.make_estimator("laftr").fit(m, torch.randn(10, 4, dtype=torch.float64))(m).detach()) == 0

    class BatchSoftmax(nn.Module):
        def forward(self, x):
            return torch.softmax(x, dim=0)

    with pytest.raises(UnsupportedOpError, match="batch axis"):
        TracedNet(BatchSoftmax()).forward(torch.randn(3, 4), {})

    class FloatTokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 3)

        def forward(self, x):
            return self.emb(x.long()).sum(1)

    # ids computed from float data are refused at the embedding (x.long() has no rule: not differentiable data)
    with pytest.raises(UnsupportedOpError):
        TracedNet(FloatTokens()).forward(torch.randn(3, 4), {"emb.weight": torch.randn(5, 3)})


# ---------------------------------------------------------------------------------------------- token networks
def _token_mlp() -> nn.Module:
    return nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("input_model", ["tokens", "tokens-classwise", "coreset"])
def test_embedding_closed_form_equals_monte_carlo(input_model):
    """The closed form propagates the one-hot tokens' moments through ``onehot @ W``: it equals Monte Carlo as the
    sample count grows (the inputs are drawn from the same categorical laws)."""
    torch.manual_seed(0)
    m0 = _token_mlp()
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randint(0, 6, (200, 3), generator=g), torch.randint(0, 3, (200,), generator=g)
    m1 = perturbed(m0, 0.3)
    exact = laftr.make_estimator("laftr-exact", input_model=input_model).fit(m0, (X, Y))
    mc = laftr.make_estimator("laftr", input_model=input_model, num_samples=100000).fit(m0, (X, Y))
    torch.testing.assert_close(mc(m1), exact(m1), rtol=1.5e-2, atol=0)
    assert float(exact(m0)) == pytest.approx(0.0, abs=1e-12)


def _arith_models(p: int = 7):
    from laftr.data import load_arithmetic
    from laftr.models import copy_attention_weights, transformer

    ds = load_arithmetic("add", p=p)
    V = ds.meta["vocab_size"]
    torch.manual_seed(0)
    ref = transformer(V, 4, p, d_model=8, heads=2, blocks=1, d_mlp=16, attention="manual")
    other = perturbed(ref, 0.05)
    out = {}
    for kind in ("manual", "sdpa", "mha"):
        a, b = (transformer(V, 4, p, d_model=8, heads=2, blocks=1, d_mlp=16, attention=kind) for _ in range(2))
        copy_attention_weights(ref, a)
        copy_attention_weights(other, b)
        out[kind] = (a.eval(), b.eval())
    return ds, out


def test_transformer_on_tokens_end_to_end(tmp_path):
    """A pre-LN transformer on modular arithmetic: the three attention implementations give the same LAFTR
    estimate on equal weights, gradients reach the embeddings, and the summary saves and loads."""
    ds, models = _arith_models()
    values = {}
    for kind, (m0, m1) in models.items():
        est = laftr.make_estimator("laftr", metric="kl", input_model="tokens", num_samples=32).fit(m0, ds.x_train)
        values[kind] = est(m1)
        assert float(est(m0)) == 0.0
    torch.testing.assert_close(values["sdpa"], values["manual"], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(values["mha"], values["manual"], rtol=1e-10, atol=1e-14)
    m0, m1 = models["mha"]
    est = laftr.make_estimator("laftr", metric="kl", input_model="tokens-mixture", components=3,
                               num_samples=16, fixed_noise=True).fit(m0, ds.x_train)
    est(m1).backward()
    grads = {n: p.grad for n, p in m1.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items()
                                                                              if g is None or g.abs().sum() == 0]
    path = laftr.save(est, tmp_path / "tf.laftr")
    torch.testing.assert_close(laftr.load(path)(m1), est(m1), rtol=1e-12, atol=1e-15)


def test_transformer_own_linearization_tends_to_the_exact_fsd():
    ds, models = _arith_models()
    m0, _ = models["manual"]
    # 34 sequences, each sampled once; the embeddings start at std 0.02, so LayerNorm's curvature (1 / sigma) is
    # large: smaller steps are needed
    errs = _own_linearization_errors(m0, ds.x_train, (1e-2, 1e-3, 1e-4))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 2e-2


def _own_linearization_errors(m0: nn.Module, X: torch.Tensor, steps: tuple[float, ...]) -> list[float]:
    """|estimate / exact - 1| of theta0's own linearization on every sequence of X (each used once), per step."""
    est = laftr.make_estimator("laftr", metric="kl", input_model="coreset", coreset_size=len(X), num_samples=len(X),
                               gates="relu").fit(m0, X)
    errs = []
    for step in steps:
        m1 = perturbed(m0, step)
        errs.append(abs(float(est(m1)) / float(laftr.exact_fsd(m0, m1, X, metric="kl")) - 1))
    return errs


class Masked(nn.Module):
    """Attention with an additive float mask whose last two key columns are -inf (padding): nn.MultiheadAttention
    or SDPA by hand. (Masks computed from the tokens are tested with :class:`PaddedLM`.)"""

    def __init__(self, kind: str, d: int = 8, heads: int = 2, T: int = 5) -> None:
        super().__init__()
        self.kind, self.d, self.h = kind, d, heads
        self.inp = nn.Linear(3, d)
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        fmask = torch.randn(T, T, generator=torch.Generator().manual_seed(5))
        fmask[:, -2:] = -math.inf
        self.register_buffer("fmask", fmask, persistent=False)
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        B, T, _ = h.shape
        if self.kind == "mha":
            a = self.mha(h, h, h, attn_mask=self.fmask, need_weights=False)[0]
        else:
            w, b = self.mha.in_proj_weight, self.mha.in_proj_bias
            q, k, v = (F.linear(h, w[i * self.d:(i + 1) * self.d], b[i * self.d:(i + 1) * self.d])
                       .view(B, T, self.h, self.d // self.h).transpose(1, 2) for i in range(3))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.fmask)
            a = self.mha.out_proj(o.transpose(1, 2).reshape(B, T, self.d))
        return self.head(F.gelu(h + a).mean(1))


@pytest.mark.parametrize("gates", ["bernoulli", "relu"])
def test_float_masks_with_padding(gates):
    """nn.MultiheadAttention with a float attn_mask equals SDPA with the same additive mask: in the network, in
    the interpreter and in the estimates; masked keys get no attention in the stored law."""
    torch.manual_seed(0)
    a, b = Masked("mha"), Masked("sdpa")
    b.load_state_dict(a.state_dict())
    X = _data()
    torch.testing.assert_close(a(X), b(X), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(TracedNet(a).forward(X, param_dict(a)), a(X), rtol=1e-12, atol=1e-12)
    a1 = perturbed(a, 0.1)
    b1 = Masked("sdpa")
    b1.load_state_dict(a1.state_dict())
    ea = laftr.make_estimator("laftr", metric="kl", num_samples=16, gates=gates).fit(a, X)
    eb = laftr.make_estimator("laftr", metric="kl", num_samples=16, gates=gates).fit(b, X)
    torch.testing.assert_close(ea(a1), eb(b1), rtol=1e-10, atol=1e-14)
    assert float(ea(a)) == 0.0
    if gates == "relu":  # theta0's own linearization reads no stored law, so none is kept
        assert ea.summary.site_sums == {}
        return
    pattern = ea.summary.site_sums["mha"]["a"]
    assert (pattern[..., -2:] == 0).all() and (pattern.sum(-1) > 0).all()


def test_every_estimator_fits_saves_and_loads_on_a_transformer(tmp_path):
    """Every registered estimator on the same small transformer: fitted on token sequences, zero at theta0, saved
    and loaded to the same value; the closed forms refuse attention with a message."""
    from laftr.estimators.base import available_estimators

    ds, models = _arith_models()
    m0, m1 = models["mha"]
    options = {"laftr": {"input_model": "tokens", "fixed_noise": True, "num_samples": 8},
               "liftr": {"input_model": "tokens", "fixed_noise": True, "num_samples": 8},
               "kfac": {"unsupported": "diag"}, "diag-fisher": {"fisher": "exact"},
               "subset": {"coreset_size": 10}, "ntk": {"coreset_size": 10}}
    closed = {"laftr-exact", "liftr-exact"}
    for name in available_estimators():
        opts = {"metric": "l2" if name in closed else "kl", **options.get(name, {})}
        est = laftr.make_estimator(name, **opts)
        if name in closed:  # refused at fit (its closed-form pass at theta0), not at the first use
            with pytest.raises(UnsupportedOpError, match="no closed form"):
                laftr.make_estimator(name, input_model="tokens", metric="l2").fit(m0, ds.x_train)
            continue
        est.fit(m0, ds.x_train)
        assert abs(float(est(m0))) < 1e-12, name
        value = est(m1)
        assert torch.isfinite(value) and float(value) > 0, name
        back = laftr.load(laftr.save(est, tmp_path / f"{name}.laftr"))
        torch.testing.assert_close(back(m1), value, rtol=1e-10, atol=1e-15, msg=lambda m, n=name: f"{n}: {m}")


def test_ntk_through_multihead_attention_equals_the_manual_network():
    """nn.MultiheadAttention's fused eval kernel has no forward-mode AD; ntk then differentiates the traced
    network instead, which must give what the same network written by hand gives."""
    ds, models = _arith_models()
    values = []
    for kind in ("manual", "mha"):
        m0, m1 = models[kind]
        est = laftr.make_estimator("ntk", metric="kl", coreset_size=12).fit(m0, ds.x_train)
        values.append(est(m1))
    torch.testing.assert_close(values[1], values[0], rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------------------------------------- masks from the input
PAD = 0


class PaddedLM(nn.Module):
    """Token sequences padded with PAD at the end: attention hides the padding through a mask computed from the
    tokens inside the network -- ``key_padding_mask = tokens == PAD`` for nn.MultiheadAttention, or a boolean
    ``attn_mask = tokens != PAD`` for SDPA by hand; mean pooling over the sequence."""

    def __init__(self, kind: str, vocab: int = 6, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.kind, self.d, self.h = kind, d, heads
        self.emb = nn.Embedding(vocab, d)
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        B, T, _ = h.shape
        if self.kind == "mha":
            a = self.mha(h, h, h, key_padding_mask=x == PAD, need_weights=False)[0]
        else:
            w, b = self.mha.in_proj_weight, self.mha.in_proj_bias
            q, k, v = (F.linear(h, w[i * self.d:(i + 1) * self.d], b[i * self.d:(i + 1) * self.d])
                       .view(B, T, self.h, self.d // self.h).transpose(1, 2) for i in range(3))
            if self.kind == "masked_fill":  # by hand: the scores of padded keys filled with -inf
                s = (q @ k.transpose(-2, -1) / math.sqrt(self.d // self.h)).masked_fill(
                    (x == PAD)[:, None, None, :], float("-inf"))
                o = torch.softmax(s, dim=-1) @ v
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=(x != PAD)[:, None, None, :])
            a = self.mha.out_proj(o.transpose(1, 2).reshape(B, T, self.d))
        return self.head(F.gelu(h + a).mean(1))


def _padded_tokens(n: int = 60, T: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 6, (n, T), generator=g)
    lengths = torch.randint(1, T + 1, (n,), generator=g)  # the first token is never padding
    return x.masked_fill(torch.arange(T)[None, :] >= lengths[:, None], PAD)


def _padded_models():
    torch.manual_seed(0)
    a = PaddedLM("mha").double()
    b = PaddedLM("sdpa").double()
    b.load_state_dict(a.state_dict())
    a1 = perturbed(a, 0.1)
    b1 = PaddedLM("sdpa").double()
    b1.load_state_dict(a1.state_dict())
    return a, b, a1, b1


@pytest.mark.parametrize("gates", ["bernoulli", "relu"])
def test_padding_masks_computed_from_the_tokens(gates):
    """A mask computed from the input alone is exact (the same in every stream): nn.MultiheadAttention with
    key_padding_mask = tokens == PAD and SDPA with the complementary boolean mask agree in the network, in the
    interpreter and in LAFTR's and LIFTR's estimates; the estimates are zero at theta0 and differentiable."""
    X = _padded_tokens()
    a, b, a1, b1 = _padded_models()
    torch.testing.assert_close(a(X), b(X), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(TracedNet(a).forward(X, param_dict(a)), a(X), rtol=1e-12, atol=1e-12)
    for name in ("laftr", "liftr"):
        kw = {"metric": "kl", "input_model": "tokens", "num_samples": 32, "fixed_noise": True}
        if name == "laftr":
            kw["gates"] = gates
        ea = laftr.make_estimator(name, **kw).fit(a, X)
        eb = laftr.make_estimator(name, **kw).fit(b, X)
        da = ea(a1)
        torch.testing.assert_close(da, eb(b1), rtol=1e-10, atol=1e-14)
        assert torch.isfinite(da) and float(da) > 0 and float(ea(a)) == 0.0
        da.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a1.parameters())
        a1.zero_grad()


def test_padding_mask_own_linearization_tends_to_the_exact_fsd():
    """theta0's own linearization on every stored sequence, each used once: its estimate / exact -> 1 as theta ->
    theta0, with the padding hidden exactly as the network hides it."""
    a, _, _, _ = _padded_models()
    errs = _own_linearization_errors(a, _padded_tokens(40), (1e-1, 1e-2, 1e-3))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-2, errs


def test_masks_from_the_input_are_refused_where_they_cannot_be_evaluated():
    X = _padded_tokens()
    a, _, a1, _ = _padded_models()
    with pytest.raises(UnsupportedOpError, match="computed from the network input"):
        laftr.make_estimator("liftr-exact", metric="l2", input_model="tokens").fit(a, X)(a1)

    class FromLayer(nn.Module):  # a mask that depends on parameters is still refused, naming the node
        def __init__(self) -> None:
            super().__init__()
            self.inner = PaddedLM("mha")

        def forward(self, x):
            h = self.inner.emb(x)
            return self.inner.mha(h, h, h, key_padding_mask=h.sum(-1) > 0, need_weights=False)[0].mean(1)

    # now a comparison gate (theta0's mask, drawn from its law), no longer refused; zero at theta0
    model = FromLayer().double()
    assert any(r.family == "compare" for r in TracedNet(model).sites.values())
    assert float(laftr.make_estimator("laftr", input_model="tokens").fit(model, X)(model).detach()) == 0.0


def test_drawn_patterns_stay_within_each_example_mask():
    from laftr.rules.attention import _within_mask

    l0 = torch.tensor([[0.0, 0.0, -math.inf], [0.0, -math.inf, -math.inf], [0.0, 1.0, 2.0]])
    drawn = torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.4, 0.6], [0.1, 0.2, 0.7]])
    got = _within_mask(drawn, l0, -1)
    torch.testing.assert_close(got, torch.tensor([[0.4, 0.6, 0.0], [1.0, 0.0, 0.0], [0.1, 0.2, 0.7]]))
    same = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.1, 0.2, 0.7]])
    assert _within_mask(same, l0, -1) is same  # nothing drawn on hidden keys: untouched, bit for bit


def test_every_estimator_runs_on_a_network_with_a_padding_mask():
    X = _padded_tokens()
    a, _, a1, _ = _padded_models()
    tokens = {"input_model": "tokens"}
    options = {"laftr": tokens, "liftr": tokens, "laftr-exact": tokens, "liftr-exact": tokens,
               "kfac": {"unsupported": "diag", "fisher": "exact"}, "diag-fisher": {"fisher": "exact"}}
    for name in laftr.available_estimators():
        est = laftr.make_estimator(name, metric="l2" if name.endswith("-exact") else "kl", **options.get(name, {}))
        if name.endswith("-exact"):
            with pytest.raises(UnsupportedOpError, match="node 'eq'.*computed from the network input"):
                est.fit(a, X)(a1)
            continue
        est.fit(a, X)
        d = est(a1)
        assert torch.isfinite(d) and float(d) > 0 and abs(float(est(a))) < 1e-12, name


# ---------------------------------------------------------------------------------------------- masked_fill, where
@pytest.mark.parametrize("gates", ["bernoulli", "relu"])
def test_causal_masks_filled_in_or_selected_equal_the_additive_mask(gates):
    """``scores.masked_fill(blocked, -inf)`` (nanoGPT) and ``torch.where(blocked, -inf, scores)`` with a buffer
    mask are the additive causal mask written another way: the network, LAFTR's and LIFTR's estimates agree on
    equal weights, vanish at theta0 and reach every parameter."""
    torch.manual_seed(0)
    ref = Attn("manual")
    other = perturbed(ref, 0.1)
    X = _data()
    names = ("laftr", "liftr") if gates == "bernoulli" else ("laftr",)
    want = {}
    for kind in MANUAL:
        m0, m1 = Attn(kind), Attn(kind)
        copy_weights(ref, m0)
        copy_weights(other, m1)
        torch.testing.assert_close(m0(X), ref(X), rtol=1e-12, atol=1e-12)
        for name in names:
            kw = {"gates": gates} if name == "laftr" else {}
            est = laftr.make_estimator(name, metric="kl", num_samples=16, fixed_noise=True, **kw).fit(m0, X)
            d = est(m1)
            assert float(est(m0)) == 0.0 and float(d) > 0
            if kind == "manual":
                want[name] = d.detach()
                continue
            torch.testing.assert_close(d.detach(), want[name], rtol=1e-10, atol=1e-14)
            d.backward()
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m1.parameters()), (kind, name)
            m1.zero_grad()


def test_padding_filled_in_from_the_tokens_equals_the_sdpa_mask():
    """A padding mask computed from the tokens and used by masked_fill is exact in every stream, as SDPA's."""
    X = _padded_tokens()
    a, _, a1, _ = _padded_models()
    b, b1 = PaddedLM("masked_fill").double(), PaddedLM("masked_fill").double()
    b.load_state_dict(a.state_dict())
    b1.load_state_dict(a1.state_dict())
    sd, sd1 = PaddedLM("sdpa").double(), PaddedLM("sdpa").double()
    sd.load_state_dict(a.state_dict())
    sd1.load_state_dict(a1.state_dict())
    torch.testing.assert_close(b(X), a(X), rtol=1e-12, atol=1e-12)
    for name in ("laftr", "liftr"):
        kw = {"metric": "kl", "input_model": "tokens", "num_samples": 32, "fixed_noise": True}
        want = laftr.make_estimator(name, **kw).fit(sd, X)(sd1)
        got = laftr.make_estimator(name, **kw).fit(b, X)(b1)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_select_ops_closed_form_equals_monte_carlo_and_refuses_infinite_fills():
    """An MLP with a fixed mask filled with a finite value (and a where between two data tensors): the closed form
    is the Monte Carlo estimator's expectation; an -inf fill is refused by name in the closed form only."""

    class Masked(nn.Module):
        def __init__(self, fill: float) -> None:
            super().__init__()
            self.fill = fill
            self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)
            self.register_buffer("m", torch.tensor([True, False, False, True, False, False]))

        def forward(self, x):
            h = torch.relu(self.a(x)).masked_fill(self.m, self.fill)
            # (-inf entries read through a ReLU: the network's outputs stay finite)
            return self.b(torch.where(self.m, 2 * h, h - 1) if math.isfinite(self.fill) else torch.relu(h))

    torch.manual_seed(0)
    model = Masked(0.4)
    other = perturbed(model, 0.15)
    g = torch.Generator().manual_seed(0)
    X = 1.5 * torch.randn(120, 5, generator=g)
    exact = laftr.make_estimator("laftr-exact").fit(model, X)(other).item()
    vals = torch.tensor([laftr.make_estimator("laftr", num_samples=3000, seed=10 + r).fit(model, X)(other).item()
                         for r in range(10)])
    mean, se = vals.mean().item(), vals.std().item() / math.sqrt(len(vals))
    assert se > 0 and abs(mean - exact) < 4.5 * se, (mean, exact, se)
    inf_model = Masked(-math.inf)
    with pytest.raises(UnsupportedOpError, match="node 'masked_fill'.*finite fill values"):
        laftr.make_estimator("laftr-exact").fit(inf_model, X)(perturbed(inf_model, 0.1))


def test_select_ops_with_masks_that_depend_on_the_parameters_are_gates():
    """``h.masked_fill(h < 0, 0)`` is a ReLU written as a selection (refused before comparisons had a rule):
    its mask is decided by theta0, so theta0's own linearization and the real networks give the ReLU's
    estimates exactly, and the sampled law (of h < 0, where the ReLU's is of h > 0) the same in expectation."""
    class Gate(nn.Module):
        def __init__(self, how: str) -> None:
            super().__init__()
            self.how = how
            self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = self.a(x)
            return self.b(h.masked_fill(h < 0, 0.0) if self.how == "masked_fill" else torch.relu(h))

    torch.manual_seed(0)
    X = torch.randn(200, 4, dtype=torch.float64)
    relu = Gate("relu").double()
    hand = Gate("masked_fill").double()
    hand.load_state_dict(relu.state_dict())
    step = {k: 0.05 * torch.randn_like(v) for k, v in relu.state_dict().items()}
    relu1, hand1 = Gate("relu").double(), Gate("masked_fill").double()
    relu1.load_state_dict({k: v + step[k] for k, v in relu.state_dict().items()})
    hand1.load_state_dict(relu1.state_dict())
    for cfg in ({"gates": "relu"}, {"gates": "none"}):
        a = laftr.make_estimator("laftr", **cfg).fit(relu, X)(relu1)
        torch.testing.assert_close(laftr.make_estimator("laftr", **cfg).fit(hand, X)(hand1), a, rtol=1e-12, atol=0)
    vals = [torch.tensor([float(e(m).detach()) for _ in range(30)]) for e, m in
            ((laftr.make_estimator("laftr", seed=s).fit(m0, X), m1) for s, m0, m1 in ((0, relu, relu1),
                                                                                     (1, hand, hand1)))]
    se = math.sqrt(sum(float(v.var()) / len(v) for v in vals))
    assert abs(float(vals[0].mean() - vals[1].mean())) < 4 * se


class _GroupedQuery(nn.Module):
    """4 query heads sharing 2 key/value heads: SDPA's enable_gqa, or the key/value heads repeated by hand."""

    def __init__(self, gqa: bool, kv_heads: int = 2) -> None:
        super().__init__()
        self.emb, self.q, self.head = nn.Embedding(12, 16), nn.Linear(16, 16), nn.Linear(16, 5)
        self.kv = nn.Linear(16, 8 * kv_heads)
        self.gqa, self.kv_heads = gqa, kv_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        B, T, _ = h.shape
        q = self.q(h).view(B, T, 4, 4).transpose(1, 2)
        k, v = self.kv(h).view(B, T, self.kv_heads, 8).transpose(1, 2).chunk(2, dim=-1)
        if self.gqa:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            r = 4 // self.kv_heads
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1),
                                               is_causal=True)
        return self.head(F.gelu(o.transpose(1, 2).reshape(B, T, 16)).mean(1))


def test_grouped_query_attention_equals_its_heads_repeated_by_hand(tmp_path):
    torch.manual_seed(0)
    X = torch.randint(0, 12, (60, 5))
    by_hand, by_hand1 = _GroupedQuery(False).double(), _GroupedQuery(False).double()
    with torch.no_grad():
        for p0, p1 in zip(by_hand.parameters(), by_hand1.parameters(), strict=True):
            p1.copy_(p0 + 0.02 * torch.randn_like(p0))
    gqa, gqa1 = _GroupedQuery(True).double(), _GroupedQuery(True).double()
    gqa.load_state_dict(by_hand.state_dict())
    gqa1.load_state_dict(by_hand1.state_dict())
    for name, cfg in (("laftr", {"input_model": "tokens"}), ("laftr", {"input_model": "tokens", "gates": "relu"}),
                      ("laftr", {"input_model": "tokens", "metric": "kl"}), ("liftr", {"input_model": "tokens"}),
                      ("ntk", {}), ("kfac", {"unsupported": "diag"})):
        a = laftr.make_estimator(name, seed=1, **cfg).fit(by_hand, X)(by_hand1)
        est = laftr.make_estimator(name, seed=1, **cfg).fit(gqa, X)
        torch.testing.assert_close(est(gqa1), a, rtol=1e-12, atol=0, msg=f"{name} {cfg}")
    back = laftr.load(laftr.save(est, tmp_path / "gqa.laftr"))
    torch.testing.assert_close(back(gqa1), est(gqa1), rtol=0, atol=0)
    with pytest.raises(UnsupportedOpError, match="4 query heads and 3 key"):
        m = _GroupedQuery(True, kv_heads=3).double()
        laftr.make_estimator("laftr", input_model="tokens").fit(m, X)
