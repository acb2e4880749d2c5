"""Idioms of networks as people write them (nanoGPT, Hugging Face-style classifiers), beyond single ops:

- sizes read from the data (``B, T, C = x.size()``, ``C // n_head``, ``torch.arange(T)``, ``zeros_like``) are plain
  values, the same in every stream, not data;
- a buffer sliced by such a size (nanoGPT's causal mask ``bias[:, :, :T, :T]``);
- tied weights (``lm_head.weight = wte.weight``): one parameter read by two modules;
- values computed from the input alone used as constants: a float mask from ``(x != pad).to(h.dtype)`` and a
  division by the number of unpadded tokens (masked mean pooling).

Each network is checked where the answer is exact: ``laftr`` with ``gates="none"`` on a coreset of every input is
the exact FSD (values and gradients), ``gates="relu"`` tends to it as theta -> theta0, and every estimator runs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from cases import perturbed
from torch import nn

import laftr
from laftr._util import param_dict
from laftr.graph import OwnMode, TracedNet

pytestmark = pytest.mark.usefixtures("float64")

V, T, D, H, PAD = 9, 5, 8, 2, 0


class Block(nn.Module):
    """nanoGPT's block: sizes from the input, a causal-mask buffer sliced by them, attention by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, x):
        B, L, C = x.size()
        q, k, v = self.c_attn(self.ln1(x)).split(D, dim=2)
        q = q.view(B, L, H, C // H).transpose(1, 2)
        k = k.view(B, L, H, C // H).transpose(1, 2)
        v = v.view(B, L, H, C // H).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :L, :L] == 0, float("-inf"))
        y = (F.softmax(att, dim=-1) @ v).transpose(1, 2).contiguous().view(B, L, C)
        x = x + self.c_proj(y)
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token and position embeddings (positions from ``torch.arange`` of the input's length), two blocks, and a
    head whose weight is the token embedding's (tied), read at the last position."""

    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(T, D)
        self.h = nn.ModuleList([Block(), Block()])
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x)[:, -1, :])


class Pooled(nn.Module):
    """A classifier over padded token sequences: positions ``arange(T).expand_as(x)``, a padding mask from the
    tokens, and the mean over the unpadded positions (a float mask from ``.to(h.dtype)``, divided by its sum)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(V, D, padding_idx=PAD), nn.Embedding(T, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0).expand_as(x)
        h = torch.tanh(self.mix(self.emb(x) + self.pos(pos)))
        m = (x != PAD).unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(pooled + torch.zeros_like(pooled))


def _tokens(n=40, padded=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, V, (n, T), generator=g)
    if padded:
        lengths = torch.randint(2, T + 1, (n,), generator=g)
        x[torch.arange(T)[None, :] >= lengths[:, None]] = PAD
    return x


MODELS = {"gpt": (GPT, False), "pooled": (Pooled, True)}


def _model(name, seed=0):
    torch.manual_seed(seed)
    cls, padded = MODELS[name]
    model = cls().eval()
    with torch.no_grad():  # no LayerNorm at the identity
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model, _tokens(padded=padded)


@pytest.mark.parametrize("name", list(MODELS))
def test_no_linearization_on_every_input_is_the_exact_fsd(name):
    model, X = _model(name)
    other = perturbed(model, 0.1)
    est = laftr.make_estimator("laftr", gates="none", input_model="coreset", coreset_size=len(X),
                               num_samples=len(X), metric="kl").fit(model, X)
    got = est(other)
    want = laftr.exact_fsd(model, other, X, metric="kl")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    params = list(other.parameters())
    with torch.no_grad():
        z0 = model(X)
    direct = laftr.discrepancy(z0, other(X), "kl").mean()  # the exact FSD by autograd of the real network
    torch.testing.assert_close(direct, want, rtol=1e-10, atol=1e-14)
    for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(direct, params), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
def test_own_linearization_tends_to_the_exact_fsd(name):
    model, X = _model(name)
    est = laftr.make_estimator("laftr", gates="relu", input_model="coreset", coreset_size=len(X),
                               num_samples=len(X), metric="l2").fit(model, X)
    errors = []
    for step in (0.1, 0.01, 0.001):
        near = perturbed(model, step, seed=2)
        errors.append(abs(float(est(near)) / float(laftr.exact_fsd(model, near, X, metric="l2")) - 1))
    assert errors[-1] < 1e-2 and errors[-1] < errors[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_estimator_runs(name):
    model, X = _model(name)
    other = perturbed(model, 0.1)
    options = {"laftr": {"input_model": "tokens"}, "liftr": {"input_model": "tokens"},
               "kfac": {"unsupported": "diag"}, "ntk": {"coreset_size": 8}, "subset": {"coreset_size": 8}}
    for est_name in laftr.available_estimators():
        if est_name.endswith("-exact"):
            continue  # attention (gpt) and masks from the input (pooled) have no closed form
        est = laftr.make_estimator(est_name, **options.get(est_name, {})).fit(model, X)
        assert abs(float(est(model))) < 1e-12, est_name
        assert float(est(other)) > 0, est_name


def test_sizes_read_from_the_data_are_not_data_and_a_fixed_mask_records_no_law():
    net = TracedNet(_model("gpt")[0])
    assert {"size", "floordiv", "arange"} <= {n.split("_")[0] for n in net.shape_nodes} | {
        n for n in net.rules if n.startswith(("floordiv", "arange")) and n not in net.data_nodes}
    assert not any(n.startswith(("floordiv", "arange", "getitem")) and n in net.sites for n in net.rules)
    pooled = TracedNet(_model("pooled")[0])
    # clamp_min of the mask's sum is a gate evaluated exactly from the input: it is no site
    assert [n for n in pooled.sites] == ["tanh"]


def test_tied_weights_are_one_parameter():
    """The tied model's head reads the token embedding: its estimate equals that of the untied twin whose head
    holds a copy, when theta moves both copies alike; its gradient is one tensor, the sum of both uses'."""
    tied, X = _model("gpt")
    twin = GPT(tied=False).eval()
    state = {k: v for k, v in tied.state_dict().items()}
    state["lm_head.weight"] = state["wte.weight"].clone()
    twin.load_state_dict(state)
    moved_tied, moved_twin = perturbed(tied, 0.1), None
    moved_twin = GPT(tied=False).eval()
    state = {k: v for k, v in moved_tied.state_dict().items()}
    state["lm_head.weight"] = state["wte.weight"].clone()
    moved_twin.load_state_dict(state)
    for name, opts in (("laftr", {"input_model": "tokens", "fixed_noise": True, "seed": 1}),
                       ("kfac", {"unsupported": "diag"})):
        a = laftr.make_estimator(name, **opts).fit(tied, X)(moved_tied)
        b = laftr.make_estimator(name, **opts).fit(twin, X)(moved_twin)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14, msg=lambda m, n=name: f"{n}: {m}")
    est = laftr.make_estimator("laftr", input_model="tokens", fixed_noise=True, seed=1).fit(tied, X)
    (g,) = torch.autograd.grad(est(moved_tied), [moved_tied.wte.weight])
    est2 = laftr.make_estimator("laftr", input_model="tokens", fixed_noise=True, seed=1).fit(twin, X)
    ga, gb = torch.autograd.grad(est2(moved_twin), [moved_twin.wte.weight, moved_twin.lm_head.weight])
    torch.testing.assert_close(g, ga + gb, rtol=1e-9, atol=1e-13)
    kfac = laftr.make_estimator("kfac", unsupported="diag").fit(tied, X)
    with pytest.raises(NotImplementedError, match=r"wte.weight.*tied"):
        kfac.damped_solve({n: torch.ones_like(p) for n, p in tied.named_parameters()}, 1.0)


def test_a_divisor_that_moves_with_the_parameters_is_linearized_at_theta0():
    """A division by data is a smooth op of two data tensors: linearized at theta0's stream (as products are),
    so theta0's own linearization tends to the exact FSD; the closed form refuses it by name."""
    class Ratio(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.a(x) / (self.b(x).pow(2) + 1.0)

    torch.manual_seed(0)
    model, X = Ratio(), torch.randn(30, 4)
    assert type(TracedNet(model).rules["truediv"]).__name__ == "QuotientRule"
    est = laftr.make_estimator("laftr", gates="relu", input_model="coreset", coreset_size=30,
                               num_samples=30).fit(model, X)
    errors = []
    for step in (0.1, 0.01, 0.001):
        near = perturbed(model, step, seed=2)
        errors.append(abs(float(est(near)) / float(laftr.exact_fsd(model, near, X)) - 1))
    assert errors[-1] < 1e-2 and errors[-1] < errors[0]
    mc = laftr.make_estimator("laftr").fit(model, X)
    assert float(mc(model)) == 0.0 and float(mc(perturbed(model, 0.1))) > 0
    with pytest.raises(laftr.UnsupportedOpError, match="truediv.*closed form"):
        laftr.make_estimator("laftr-exact").fit(model, X)(model)


@pytest.mark.parametrize("gates", ["bernoulli", "relu", "none"])
def test_a_module_applied_to_a_constant_reads_each_streams_parameters(gates):
    """``self.pos(torch.arange(T))`` with a literal T: the embedding's input is a constant, but its table is a
    parameter of each stream (this once read theta0's table in every stream, so moving it changed nothing).
    The network is affine in its data, so every linearization is exact on a coreset of every input."""
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pos, self.head = nn.Embedding(V, D), nn.Embedding(T, D), nn.Linear(D, 3)

        def forward(self, x):
            return self.head((self.emb(x) + self.pos(torch.arange(T))).mean(1))

    torch.manual_seed(0)
    model, X = Positions(), _tokens()
    other = perturbed(model, 0.3, only="pos")
    est = laftr.make_estimator("laftr", gates=gates, input_model="coreset", coreset_size=len(X),
                               num_samples=len(X), metric="kl").fit(model, X)
    want = laftr.exact_fsd(model, other, X, metric="kl")
    assert float(want) > 1e-4
    torch.testing.assert_close(est(other), want, rtol=1e-10, atol=1e-14)


class _LogProbs(nn.Module):
    """An MLP classifier that returns log-probabilities (``F.log_softmax``, for NLLLoss), or its logits."""

    def __init__(self, log_softmax: bool = True, module: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 4)
        self.out = (nn.LogSoftmax(dim=1) if module else (lambda z: F.log_softmax(z, dim=-1))) if log_softmax \
            else (lambda z: z)

    def forward(self, x):
        return self.out(self.b(torch.tanh(self.a(x))))


@pytest.mark.parametrize("module", [False, True])
def test_log_softmax_outputs(module):
    """log_softmax is each stream's logits shifted per row: the metrics on probabilities give exactly what the
    logits give (every mode, the same draws); on l2, theta0's own linearization tends to the exact FSD."""
    torch.manual_seed(0)
    model = _LogProbs(module=module)
    logits = _LogProbs(log_softmax=False)
    logits.load_state_dict(model.state_dict())
    other = perturbed(model, 0.2)
    other_logits = _LogProbs(log_softmax=False)
    other_logits.load_state_dict(other.state_dict())
    X = torch.randn(50, 5, generator=torch.Generator().manual_seed(1))
    for gates in ("bernoulli", "relu", "none"):
        opts = {"gates": gates, "metric": "kl", "num_samples": 16, "seed": 2}
        a = laftr.make_estimator("laftr", **opts).fit(model, X)
        b = laftr.make_estimator("laftr", **opts).fit(logits, X)
        torch.testing.assert_close(a(other), b(other_logits), rtol=1e-10, atol=1e-14)
        assert float(a(model)) == 0.0
    est = laftr.make_estimator("laftr", gates="relu", metric="l2", input_model="coreset", coreset_size=50,
                               num_samples=50).fit(model, X)
    errors = []
    for step in (0.1, 0.01, 0.001):
        near = perturbed(model, step, seed=3)
        errors.append(abs(float(est(near)) / float(laftr.exact_fsd(model, near, X, metric="l2")) - 1))
    assert errors[-1] < 1e-2 and errors[-1] < errors[0]
    sampled = laftr.make_estimator("laftr", metric="l2", num_samples=16).fit(model, X)
    grads = torch.autograd.grad(sampled(other), list(other.parameters()))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    with pytest.raises(laftr.UnsupportedOpError, match="closed form"):
        laftr.make_estimator("laftr-exact").fit(model, X)(other)
    # theta0's stream through its own linearization is theta0's output itself (the entropy term included)
    (z0,) = TracedNet(model).run((X,), OwnMode([param_dict(model)]))
    torch.testing.assert_close(z0, model(X), rtol=1e-12, atol=1e-12)


def test_a_parameter_shaped_by_the_data_is_each_streams_own():
    """``self.pos.expand_as(h)`` (a learned positional table shaped like the data) and ``zeros_like``: values
    that read the data's shape only, and each stream's own parameters. Only the table moves; the network is
    affine in its data, so LAFTR on every input is exact."""
    class Shaped(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(V, D), nn.Linear(D, 3)
            self.pos = nn.Parameter(torch.randn(T, D))

        def forward(self, x):
            h = self.emb(x)
            h = h + self.pos.expand_as(h) + torch.zeros_like(h)
            return self.head(h.mean(1))

    torch.manual_seed(0)
    model, X = Shaped(), _tokens()
    other = perturbed(model, 0.3, only="pos")
    for gates in ("bernoulli", "none"):
        est = laftr.make_estimator("laftr", gates=gates, input_model="coreset", coreset_size=len(X),
                                   num_samples=len(X), metric="kl").fit(model, X)
        want = laftr.exact_fsd(model, other, X, metric="kl")
        assert float(want) > 1e-4
        torch.testing.assert_close(est(other), want, rtol=1e-10, atol=1e-14)
    exact = laftr.make_estimator("laftr-exact", input_model="tokens").fit(model, X)
    assert float(exact(other)) > 0 and float(exact(model)) == pytest.approx(0.0, abs=1e-12)


def test_a_cast_of_the_input_is_the_input():
    """``x = x.double() / 255`` at the start of the forward (images stored as bytes): a cast of the floating input
    to a floating type is the input itself, the same in every stream; an integer cast of it stays refused."""
    class Scaled(nn.Module):
        def __init__(self, cast):
            super().__init__()
            self.cast, self.a, self.b = cast, nn.Linear(5, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(self.cast(x) / 255.0)))

    X = 255 * torch.rand(40, 5, generator=torch.Generator().manual_seed(0))
    for cast in (lambda x: x.double(), lambda x: x.to(torch.float64), lambda x: x.type_as(x)):
        torch.manual_seed(0)
        model = Scaled(cast)
        other = perturbed(model, 0.1)
        est = laftr.make_estimator("laftr", gates="none", input_model="coreset", coreset_size=40, num_samples=40,
                                   metric="kl").fit(model, X)
        torch.testing.assert_close(est(other), laftr.exact_fsd(model, other, X, metric="kl"), rtol=1e-10, atol=1e-14)
        assert float(laftr.make_estimator("laftr").fit(model, X)(other)) > 0
    with pytest.raises(laftr.UnsupportedOpError, match="turns the floating network input"):
        laftr.make_estimator("laftr").fit(Scaled(lambda x: x.long().double()), X)


class _Bag(nn.Module):
    """A fastText-style classifier: ``nn.EmbeddingBag`` over the tokens, then a linear head."""

    def __init__(self, mode: str = "mean", padding_idx: int | None = None, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.bag = nn.EmbeddingBag(V, D, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        if self.functional:
            return self.head(F.embedding_bag(x, self.bag.weight, mode=self.bag.mode))
        return self.head(self.bag(x))


@pytest.mark.parametrize("mode,padding,functional", [("mean", None, False), ("sum", None, False),
                                                     ("mean", PAD, False), ("sum", None, True)])
def test_embedding_bag(mode, padding, functional):
    """EmbeddingBag is linear in the one-hot tokens: with a linear head every LAFTR mode is exact on every
    input, and the closed form equals the exact FSD on a coreset (refused with a padding_idx, whose mean
    divides by a count of the tokens)."""
    torch.manual_seed(0)
    model = _Bag(mode, padding, functional)
    X = _tokens(padded=padding is not None)
    other = perturbed(model, 0.3)
    want = laftr.exact_fsd(model, other, X, metric="l2")
    for gates in ("bernoulli", "relu", "none"):
        est = laftr.make_estimator("laftr", gates=gates, input_model="coreset", coreset_size=len(X),
                                   num_samples=len(X), metric="l2").fit(model, X)
        torch.testing.assert_close(est(other), want, rtol=1e-10, atol=1e-14)
    exact = laftr.make_estimator("laftr-exact", input_model="coreset", coreset_size=len(X))
    if padding is None:
        torch.testing.assert_close(exact.fit(model, X)(other), want, rtol=1e-9, atol=1e-14)
    else:
        with pytest.raises(laftr.UnsupportedOpError, match="padding_idx"):
            exact.fit(model, X)(other)
    assert float(laftr.make_estimator("laftr", input_model="tokens").fit(model, X)(other)) > 0
    assert float(laftr.make_estimator("kfac", unsupported="diag").fit(model, X)(other)) > 0


def test_embedding_bag_refuses_max_and_offsets():
    with pytest.raises(laftr.UnsupportedOpError, match="mode='max'"):
        laftr.make_estimator("laftr", input_model="tokens").fit(_Bag("max"), _tokens())

    class Offsets(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag, self.head = nn.EmbeddingBag(V, D), nn.Linear(D, 3)
            self.register_buffer("offsets", torch.tensor([0]))

        def forward(self, x):
            return self.head(self.bag(x.flatten(), self.offsets).expand(x.shape[0], -1))

    # one bag over the whole batch: caught as a batch-mixing op (or, per example, by its offsets)
    with pytest.raises(laftr.UnsupportedOpError, match=r"node 'bag'.*(offsets|mixes the examples)"):
        laftr.make_estimator("laftr", input_model="tokens").fit(Offsets(), _tokens())


def test_an_in_place_change_read_again_later_is_refused():
    """laftr runs every op out of place: ``e = h.exp(); h.add_(1); b(e + h)`` read the old h (0.2-0.5 off
    the network's own output, silently; a review). The later read takes the changed value now (the network's
    own output, to rounding); a change seen through a view (``h[:, :2].add_(1)`` and then ``h``) is refused by
    name; in-place ops whose input nothing reads again (``h += 1``, ``nn.ReLU(inplace=True)``, ``out +=
    identity``) keep working."""
    from torch import nn

    import laftr

    class Observed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = self.a(x)
            e = h.exp()
            h.add_(1)
            return self.b(e + h)

    class Fine(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu = nn.Linear(4, 5), nn.Linear(5, 2), nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.a(x)
            h += 1
            out = self.b(self.relu(h))
            out += 1
            return out

    class ThroughView(Observed):
        def forward(self, x):
            h = self.a(x)
            h[:, :2].add_(1)
            return self.b(h)

    X = torch.randn(20, 4)
    from laftr._util import param_dict as params
    from laftr.graph import TracedNet as Traced

    observed = Observed()
    torch.testing.assert_close(Traced(observed).forward(X, params(observed)), observed(X))
    with pytest.raises(laftr.UnsupportedOpError, match="changes 'getitem' in place, and 'b' reads it after"):
        laftr.make_estimator("laftr").fit(ThroughView(), X)
    model = Fine()
    from laftr._util import param_dict
    from laftr.graph import TracedNet

    torch.testing.assert_close(TracedNet(model).forward(X, param_dict(model)), model(X))
    assert laftr.make_estimator("laftr").fit(model, X)(model).item() == 0.0
