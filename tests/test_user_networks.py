"""Networks as users write them, beyond one op per rule (found by probing estimators on common idioms):

- ops that a linearizing rule refuses (a mask that moves with the parameters, ``detach``, ``torch.logaddexp``)
  still run exactly where the real networks are run: ``laftr`` with ``gates="none"`` and the layer taps of
  K-FAC and the diagonal Fisher;
- a per-example gradient whose ``torch.func.vmap`` fails (PyTorch's prelu) is computed one example at a time;
- tensors computed by a parametrization (``weight_norm``, ``spectral_norm``) are computed in each stream from
  its own originals;
- a network that returns a tuple or a dict is refused by name, and :class:`laftr.SelectOutput` picks the
  output to compare;
- ``nn.GLU`` / ``F.glu`` and ``nn.Softmin`` / ``F.softmin`` are traced as their parts; ``logsumexp`` is
  linearized as ``log_softmax`` is;
- divisions by data, ``var`` / ``std``, norms and cosine similarities are linearized at theta0's stream (as
  products of data are): the Annotated Transformer's LayerNorm works;
- ``torch.compile(model)`` stands for its module;
- ``linearize="activations"`` linearizes the activations only and runs every other op exactly.
"""

from __future__ import annotations

import copy
import math
import operator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from cases import perturbed
from torch import fx, nn

import laftr
from laftr._util import param_dict
from laftr.graph import OwnMode, TracedNet
from laftr.summary import fit_summary

pytestmark = pytest.mark.usefixtures("float64")

D_IN, H, D_OUT, N = 5, 8, 3, 30


def _inputs(n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


class Net(nn.Module):
    """Linear, an op written by hand (``kind``), Linear."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Linear(D_IN, H), nn.Linear(H, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.kind == "where":  # a leaky ReLU written with a mask that depends on the parameters
            h = torch.where(h > 0, h, 0.1 * h)
        elif self.kind == "leaky":
            h = F.leaky_relu(h, 0.1)
        elif self.kind == "layernorm":  # a LayerNorm written by hand: var and a division by data
            h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, keepdim=True, unbiased=False) + 1e-5)
        elif self.kind == "logaddexp":  # no rule (torch.maximum has one: laftr.composites)
            h = torch.logaddexp(h, torch.zeros_like(h)) + h.detach().tanh()
        return self.b(h)


def _coreset_none(model: nn.Module, X: torch.Tensor, metric: str = "l2"):
    return laftr.make_estimator("laftr", gates="none", input_model="coreset", coreset_size=len(X),
                                num_samples=len(X), metric=metric).fit(model, X)


def _assert_exact_with_grads(model: nn.Module, other: nn.Module, X: torch.Tensor, metric: str = "l2") -> None:
    """``gates="none"`` on a coreset of every input is the exact FSD, values and gradients."""
    got = _coreset_none(model, X, metric)(other)
    want = laftr.exact_fsd(model, other, X, metric=metric, grad=True)
    assert float(want.detach()) > 1e-6
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    params = [p for p in other.parameters() if p.requires_grad]
    for g, w in zip(torch.autograd.grad(got, params, allow_unused=True),
                    torch.autograd.grad(want, params, allow_unused=True), strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", ["where", "layernorm", "logaddexp"])
def test_ops_a_linearization_refuses_run_exactly_in_the_real_networks(kind):
    torch.manual_seed(0)
    model, X = Net(kind), _inputs()
    _assert_exact_with_grads(model, perturbed(model, 0.2), X, "kl")
    if kind == "logaddexp":  # (var and a division by data are linearized at theta0, tested below; the
        # comparison of "where" is a gate decided by theta0: test_a_gate_written_with_a_comparison_...)
        with pytest.raises(laftr.UnsupportedOpError, match=r"node 'logaddexp"):
            laftr.make_estimator("laftr").fit(model, X)
    for name in ("kfac", "diag-fisher"):
        est = laftr.make_estimator(name).fit(model, X)
        assert abs(float(est(model))) < 1e-12 and float(est(perturbed(model, 0.2))) > 0


class Unruled(nn.Module):
    """A linear map per position, a LocalResponseNorm across its channels (no rule), mean pooling, a head."""

    def __init__(self, act: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(3, H)
        self.norm = nn.LocalResponseNorm(2)
        self.head = nn.Sequential(nn.Linear(H, H), nn.ReLU() if act else nn.Identity(), nn.Linear(H, D_OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.inp(x).transpose(1, 2)).mean(-1))


def test_linearize_activations_runs_ops_without_a_rule_exactly():
    """``linearize="activations"`` runs every op but the activations exactly, so an op no rule covers
    (LocalResponseNorm, ``torch.logaddexp``, ``detach``) runs there too: with no activation outside it, it is
    the real networks (``gates="none"``, same draws); the activations around it are linearized (zero at
    theta0, gradients reach the first layer); ``linearize="all"`` still refuses it by name."""
    torch.manual_seed(0)
    X = torch.randn(48, 5, 3, dtype=torch.float64)
    plain = Unruled(act=False).double()
    other = perturbed(plain, 0.1)
    for gates in ("bernoulli", "relu"):
        a = laftr.make_estimator("laftr", gates=gates, linearize="activations", seed=4).fit(plain, X)
        b = laftr.make_estimator("laftr", gates="none", seed=4).fit(plain, X)
        torch.testing.assert_close(a(other), b(other), rtol=1e-10, atol=1e-14)
    for model, data in ((Unruled().double(), X), (Net("logaddexp").double(), _inputs().double())):
        with pytest.raises(laftr.UnsupportedOpError, match=r"node '(norm|logaddexp).*linearize='activations'"):
            laftr.make_estimator("laftr").fit(model, data)
        far = perturbed(model, 0.1)
        for gates in ("bernoulli", "relu"):
            est = laftr.make_estimator("laftr", gates=gates, linearize="activations", seed=4).fit(model, data)
            assert float(est(model)) == 0.0
            value = est(far)
            assert float(value) > 0
            grads = torch.autograd.grad(value, list(far.parameters()), allow_unused=True)
            assert all(g is not None and bool(g.abs().sum() > 0) for g in grads[:2])  # the first layer's


@pytest.mark.parametrize("name", ["kfac", "diag-fisher"])
def test_taps_through_an_exactly_run_op_equal_the_twin_with_a_rule(name):
    """K-FAC and the diagonal Fisher read the network only through its layers' inputs and output gradients at
    theta0: a leaky ReLU written with ``torch.where`` gives exactly what ``F.leaky_relu`` gives."""
    torch.manual_seed(0)
    model, X = Net("where"), _inputs()
    twin = Net("leaky")
    twin.load_state_dict(model.state_dict())
    other = perturbed(model, 0.2)
    other_twin = Net("leaky")
    other_twin.load_state_dict(other.state_dict())
    a = laftr.make_estimator(name, seed=3).fit(model, X)(other)
    b = laftr.make_estimator(name, seed=3).fit(twin, X)(other_twin)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


class HandPReLU(nn.Module):
    """PReLU with one slope, written with ``torch.where`` (vmap has no trouble with it)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([0.25]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, x, self.weight * x)


def test_per_example_gradients_fall_back_to_one_example_at_a_time(monkeypatch, caplog):
    """Where ``torch.func.vmap`` fails (forced here), the diagonal Fisher takes each example's gradient on its
    own: the same values."""
    import laftr.estimators.curvature as curvature

    torch.manual_seed(0)
    # LayerNorm's parameters are not tapped: their squared gradients are taken per example by vmap
    model, X = nn.Sequential(nn.Linear(D_IN, H), nn.LayerNorm(H), nn.Tanh(), nn.Linear(H, D_OUT)), _inputs()
    other = perturbed(model, 0.2)
    want = laftr.make_estimator("diag-fisher", fisher="exact").fit(model, X)(other)

    def failing_vmap(fn, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("batching rule not implemented (forced by the test)")
        return call

    monkeypatch.setattr(curvature, "vmap", failing_vmap)
    with caplog.at_level("INFO", logger="laftr.estimators.curvature"):
        got = laftr.make_estimator("diag-fisher", fisher="exact").fit(model, X)(other)
    assert "one example at a time" in caplog.text
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_prelu_gets_its_diagonal_fisher():
    """PyTorch 2.13's batching rule of prelu fails under vmap of jacrev (a crash before); the diagonal Fisher
    equals the Fisher of the same network written with ``torch.where``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, H), nn.PReLU(), nn.Linear(H, D_OUT))
    twin = nn.Sequential(nn.Linear(D_IN, H), HandPReLU(), nn.Linear(H, D_OUT))
    twin.load_state_dict(model.state_dict())
    X = _inputs()
    a = laftr.make_estimator("diag-fisher", fisher="exact").fit(model, X)
    b = laftr.make_estimator("diag-fisher", fisher="exact").fit(twin, X)
    other = perturbed(model, 0.2)
    other_twin = copy.deepcopy(twin)
    other_twin.load_state_dict(other.state_dict())
    torch.testing.assert_close(a(other), b(other_twin), rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------- parametrizations
def _parametrized(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    first = nn.Linear(D_IN, H)
    first = (nn.utils.parametrizations.weight_norm(first) if kind == "weight_norm"
             else nn.utils.parametrizations.spectral_norm(first))
    return nn.Sequential(first, nn.Tanh(), nn.Linear(H, D_OUT)).eval()


def _plain_twin(model: nn.Module) -> nn.Module:
    """The same network with the computed weight stored as a plain parameter."""
    twin = nn.Sequential(nn.Linear(D_IN, H), nn.Tanh(), nn.Linear(H, D_OUT))
    with torch.no_grad():
        twin[0].weight.copy_(model[0].weight)
        twin[0].bias.copy_(model[0].bias)
        twin[2].load_state_dict(model[2].state_dict())
    return twin


def _moved(model: nn.Module, scale: float, seed: int = 1) -> nn.Module:
    """A copy with every parameter (the parametrization's originals included) moved."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_parametrized_weights_are_computed_in_each_stream(kind, tmp_path):
    model, X = _parametrized(kind), _inputs()
    other = _moved(model, 0.2)
    _assert_exact_with_grads(model, other, X)
    est = laftr.make_estimator("laftr", fixed_noise=True, seed=2).fit(model, X)
    torch.testing.assert_close(laftr.load(laftr.save(est, tmp_path / "s.laftr"))(other), est(other))
    # every estimator equals its value on the plain twin that stores the computed weights
    for name, opts in (("laftr", {"fixed_noise": True, "seed": 2}), ("liftr", {"fixed_noise": True, "seed": 2}),
                       ("laftr", {"gates": "relu", "input_model": "coreset", "coreset_size": N, "num_samples": N}),
                       ("laftr-exact", {})):
        a = laftr.make_estimator(name, **opts).fit(model, X)(other)
        b = laftr.make_estimator(name, **opts).fit(_plain_twin(model), X)(_plain_twin(other))
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14, msg=lambda m, n=name: f"{n}: {m}")
    # theta0's own linearization tends to the exact FSD
    est = laftr.make_estimator("laftr", gates="relu", input_model="coreset", coreset_size=N,
                               num_samples=N).fit(model, X)
    near = _moved(model, 1e-4, seed=3)
    assert abs(float(est(near)) / float(laftr.exact_fsd(model, near, X)) - 1) < 1e-3


def test_a_spectral_norm_in_training_mode_keeps_its_buffers():
    """Evaluating an estimate runs the parametrization in eval mode: no power iteration on theta's buffers."""
    model, X = _parametrized("spectral_norm"), _inputs()
    est = laftr.make_estimator("laftr").fit(model, X)
    other = _moved(model, 0.2).train()
    before = {n: b.clone() for n, b in other.named_buffers()}
    est(other)
    assert other.training and other[0].parametrizations.weight.training
    for n, b in other.named_buffers():
        torch.testing.assert_close(b, before[n], rtol=0, atol=0)


def test_kfac_names_the_parametrization():
    model, X = _parametrized("weight_norm"), _inputs()
    with pytest.raises(laftr.UnsupportedOpError, match="parametrization"):
        laftr.make_estimator("kfac").fit(model, X)
    est = laftr.make_estimator("kfac", unsupported="diag").fit(model, X)
    assert abs(float(est(model))) < 1e-12 and float(est(_moved(model, 0.2))) > 0


# ---------------------------------------------------------------------------------------------- outputs
class Several(nn.Module):
    """Returns a tuple, a dict or a tensor of its logits and features."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.b = nn.Linear(D_IN, H), nn.Linear(H, D_OUT)

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.a(x))
        z = self.b(h)
        return {"tuple": (z, h), "dict": {"logits": z, "features": h}, "tensor": z}[self.form]


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_several_outputs_are_refused_by_name_and_selected(form):
    torch.manual_seed(0)
    model, X = Several(form), _inputs()
    with pytest.raises(laftr.UsageError, match=f"returned a {form}.*SelectOutput"):
        laftr.exact_fsd(model, model, X)
    for name in ("laftr", "liftr", "kfac", "diag-fisher", "ntk", "subset"):
        with pytest.raises(laftr.UsageError, match=f"returned a {form}.*SelectOutput"):
            laftr.make_estimator(name).fit(model, X)(model)
    key = 0 if form == "tuple" else "logits"
    wrapped, other = laftr.SelectOutput(model, key), perturbed(laftr.SelectOutput(model, key), 0.2)
    plain = Several("tensor")
    plain.load_state_dict(model.state_dict())
    plain_other = Several("tensor")
    plain_other.load_state_dict(other.model.state_dict())
    for name in ("laftr", "kfac", "ntk"):
        a = laftr.make_estimator(name, seed=1).fit(wrapped, X)(other)
        b = laftr.make_estimator(name, seed=1).fit(plain, X)(plain_other)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    with pytest.raises(TypeError, match="int or a str"):
        laftr.SelectOutput(model, 1.5)


# ---------------------------------------------------------------------------------------------- several inputs
PAD, VOCAB, T = 0, 7, 5


class Tokens(nn.Module):
    """Embedding, self-attention with a padding mask (a second input), masked mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        keep = (~padding).unsqueeze(-1).to(h.dtype)
        return self.out((h * keep).sum(1) / keep.sum(1))


class TokensInside(Tokens):
    """The same network computing its padding mask from the ids."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(ids, ids == PAD)


class TwoInputs(nn.Module):
    """An image and a feature vector."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.a, self.b = nn.Linear(2 * 6 * 6 + 4, 8), nn.Linear(8, 3)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(torch.cat([torch.relu(self.conv(image)).flatten(1), features], 1))))


def test_several_inputs_are_refused_by_name_and_bound():
    """A network of two inputs is refused with the fix; ``laftr.WithInputs`` computes the second from the one
    laftr models (a padding mask from the token ids: every estimator equals the network that computes it
    inside) or splits a packed tensor (equal to calling the network on the parts)."""
    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (40, T), generator=torch.Generator().manual_seed(1))
    ids[::3, -2:] = PAD  # some sequences padded at the end
    separate = Tokens().double()
    for run in (lambda: laftr.make_estimator("laftr", input_model="tokens").fit(separate, ids),
                lambda: laftr.make_estimator("subset").fit(separate, ids), lambda: laftr.exact_fsd(separate, separate, ids)):
        with pytest.raises(laftr.UsageError, match=r"more than one required input \('padding'\).*WithInputs"):
            run()
    with pytest.raises(laftr.UnsupportedOpError, match=r"more than one required input.*WithInputs"):
        TracedNet(separate)
    wrapped = laftr.WithInputs(separate, padding=lambda x: x == PAD)
    other = perturbed(wrapped, 0.2)
    inside, inside_other = TokensInside().double(), TokensInside().double()
    inside.load_state_dict(separate.state_dict())
    inside_other.load_state_dict(other.model.state_dict())
    want = laftr.exact_fsd(inside, inside_other, ids)
    assert float(want) > 1e-6
    torch.testing.assert_close(laftr.exact_fsd(wrapped, other, ids), want, rtol=1e-12, atol=0)
    for name, opts in (("laftr", {"input_model": "tokens"}), ("laftr", {"input_model": "tokens", "gates": "relu"}),
                       ("liftr", {"input_model": "tokens"}), ("kfac", {"unsupported": "diag"}),
                       ("diag-fisher", {}), ("ntk", {"coreset_size": 8}), ("subset", {"coreset_size": 8})):
        a = laftr.make_estimator(name, seed=2, **opts).fit(wrapped, ids)(other)
        b = laftr.make_estimator(name, seed=2, **opts).fit(inside, ids)(inside_other)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    two = TwoInputs().double()
    packed = laftr.WithInputs(two, lambda x: x[:, :64].view(-1, 1, 8, 8), lambda x: x[:, 64:])
    images, features = torch.randn(30, 1, 8, 8, dtype=torch.float64), torch.randn(30, 4, dtype=torch.float64)
    X = torch.cat([images.flatten(1), features], 1)
    torch.testing.assert_close(packed(X), two(images, features), rtol=0, atol=0)
    far = perturbed(packed, 0.2)
    torch.testing.assert_close(laftr.exact_fsd(packed, far, X),
                               laftr.discrepancy(two(images, features), far.model(images, features)).mean())
    est = laftr.make_estimator("laftr", seed=2).fit(packed, X)  # a Gaussian over both parts, jointly
    assert float(est(packed)) == 0.0 and float(est(far)) > 0
    with pytest.raises(TypeError, match="function of the input tensor"):
        laftr.WithInputs(two, padding=3)


# ---------------------------------------------------------------------------------------------- GLU, softmin
class Gated(nn.Module):
    """GLU and softmin as modules, functions, or written by hand."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.b = nn.Linear(D_IN, 2 * H), nn.Linear(H, D_OUT)
        self.glu, self.softmin = nn.GLU(dim=-1), nn.Softmin(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.a(x)
        if self.form == "module":
            return self.softmin(self.b(self.glu(s)))
        if self.form == "function":
            return F.softmin(self.b(F.glu(s, -1)), dim=-1)
        u, v = s.chunk(2, dim=-1)
        return torch.softmax(-self.b(u * torch.sigmoid(v)), dim=-1)


@pytest.mark.parametrize("form", ["module", "function"])
def test_glu_and_softmin_are_traced_as_their_parts(form):
    torch.manual_seed(0)
    model, X = Gated(form), _inputs()
    hand = Gated("hand")
    hand.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(TracedNet(model).forward(X, dict(model.named_parameters())), model(X))
    targets = {n.target for n in TracedNet(model).gm.graph.nodes}
    assert torch.sigmoid in targets and F.glu not in targets and F.softmin not in targets
    other = perturbed(model, 0.2)
    other_hand = Gated("hand")
    other_hand.load_state_dict(other.state_dict())
    for name, opts in (("laftr", {"fixed_noise": True, "seed": 1}), ("liftr", {"fixed_noise": True, "seed": 1}),
                       ("kfac", {})):
        a = laftr.make_estimator(name, **opts).fit(model, X)(other)
        b = laftr.make_estimator(name, **opts).fit(hand, X)(other_hand)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    _assert_exact_with_grads(model, other, X, "kl")


# ---------------------------------------------------------------------------------------------- logsumexp
class LogProbs(nn.Module):
    """Log-probabilities as ``log_softmax``, or written by hand with ``logsumexp`` (function or method)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.b = nn.Linear(D_IN, H), nn.Linear(H, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.b(torch.tanh(self.a(x)))
        if self.form == "log_softmax":
            return F.log_softmax(z, dim=-1)
        if self.form == "function":
            return z - torch.logsumexp(z, dim=-1, keepdim=True)
        return z - z.logsumexp(1).unsqueeze(1)


@pytest.mark.parametrize("form", ["function", "method"])
def test_logsumexp_is_linearized_as_log_softmax_is(form, tmp_path):
    """``z - logsumexp(z)`` is ``log_softmax(z)``: every mode gives the same estimate (same draws) and stores
    as many floats, also after saving and loading; theta0's own linearization tends to the exact FSD and keeps
    theta0's output; no closed form."""
    torch.manual_seed(0)
    model, X = LogProbs(form), _inputs(50)
    ref = LogProbs("log_softmax")
    ref.load_state_dict(model.state_dict())
    other = perturbed(model, 0.2)
    other_ref = LogProbs("log_softmax")
    other_ref.load_state_dict(other.state_dict())
    for gates in ("bernoulli", "relu", "none"):
        for name in ("laftr", "liftr") if gates == "bernoulli" else ("laftr",):
            opts = {"gates": gates} if name == "laftr" else {}
            a = laftr.make_estimator(name, metric="l2", num_samples=16, seed=2, **opts).fit(model, X)
            b = laftr.make_estimator(name, metric="l2", num_samples=16, seed=2, **opts).fit(ref, X)
            torch.testing.assert_close(a(other), b(other_ref), rtol=1e-10, atol=1e-13)
            assert float(a(model)) == 0.0
            assert a.stored_floats() == b.stored_floats()
    saved = laftr.make_estimator("laftr", metric="l2", fixed_noise=True, seed=2).fit(model, X)
    back = laftr.load(laftr.save(saved, tmp_path / "lse.laftr"))
    torch.testing.assert_close(back(other), saved(other), rtol=1e-10, atol=1e-13)
    assert back.stored_floats() == saved.stored_floats() > 0
    est = laftr.make_estimator("laftr", gates="relu", input_model="coreset", coreset_size=50,
                               num_samples=50).fit(model, X)
    near = perturbed(model, 1e-4, seed=3)
    assert abs(float(est(near)) / float(laftr.exact_fsd(model, near, X)) - 1) < 1e-3
    with pytest.raises(laftr.UnsupportedOpError, match="closed form"):
        laftr.make_estimator("laftr-exact").fit(model, X)(other)


def test_logsumexp_over_several_axes_is_refused():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(D_IN, 6)

        def forward(self, x):
            return torch.logsumexp(self.a(x).view(-1, 2, 3), dim=(1, 2)).unsqueeze(1)

    with pytest.raises(laftr.UnsupportedOpError, match="several axes"):
        laftr.make_estimator("laftr").fit(Two(), _inputs())


# ---------------------------------------------------------------------------------------------- smooth ops of data
class AnnotatedLayerNorm(nn.Module):
    """The Annotated Transformer's LayerNorm: ``a * (x - mean) / (std + eps) + b`` (``std`` unbiased)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.a_2, self.b_2, self.eps = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.a_2 * (x - mean) / (std + self.eps) + self.b_2


class SmoothOps(nn.Module):
    """A normalization written by hand, ``var``, a norm and a cosine similarity of data."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.c = nn.Linear(D_IN, H), nn.Linear(D_IN, H)
        self.norm = AnnotatedLayerNorm(H)
        self.b = nn.Linear(H, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.kind == "annotated":
            return self.b(torch.tanh(self.norm(h)))
        if self.kind == "var":
            return self.b(h * torch.rsqrt(torch.var(h, dim=-1, keepdim=True, correction=0) + 1e-5))
        if self.kind == "norm":  # a cosine classifier: normalized features against normalized class weights
            w = self.b.weight
            return (h / h.norm(dim=-1, keepdim=True)) @ (w / torch.linalg.vector_norm(w, dim=1, keepdim=True)).T
        return torch.stack([F.cosine_similarity(h, self.c(x), dim=-1), torch.tanh(h).sum(-1)], 1)


@pytest.mark.parametrize("kind", ["annotated", "var", "norm", "cosine"])
def test_smooth_ops_of_data_are_linearized_at_theta0(kind):
    """var/std, norms, cosine similarity and divisions by data are linearized at theta0's stream: theta0's own
    linearization keeps theta0's output and tends to the exact FSD, the real networks are exact, Monte Carlo is
    zero at theta0 and its gradient reaches every parameter; the closed form refuses by name."""
    torch.manual_seed(0)
    model, X = SmoothOps(kind), _inputs()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    net = TracedNet(model)
    (z0,) = net.run((X,), OwnMode([dict(model.named_parameters())]))
    torch.testing.assert_close(z0, model(X), rtol=1e-12, atol=1e-12)
    est = laftr.make_estimator("laftr", gates="relu", input_model="coreset", coreset_size=N,
                               num_samples=N).fit(model, X)
    errors = []
    for step in (1e-2, 1e-3, 1e-4):
        near = perturbed(model, step, seed=2)
        errors.append(abs(float(est(near)) / float(laftr.exact_fsd(model, near, X)) - 1))
    assert errors[-1] < 1e-3 and errors[-1] < errors[0], errors
    other = perturbed(model, 0.2)
    _assert_exact_with_grads(model, other, X)
    params = list(other.parameters())
    used = [g is not None for g in torch.autograd.grad(laftr.exact_fsd(model, other, X, grad=True), params,
                                                       allow_unused=True)]
    for name in ("laftr", "liftr"):
        mc = laftr.make_estimator(name, fixed_noise=True, seed=1).fit(model, X)
        assert float(mc(model)) == 0.0
        grads = torch.autograd.grad(mc(other), params, allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g, u in zip(grads, used, strict=True) if u), name
    with pytest.raises(laftr.UnsupportedOpError, match="closed form"):
        laftr.make_estimator("laftr-exact").fit(model, X)(other)


def test_smooth_ops_refuse_the_batch_axis_and_non_finite_tangents():
    class Bad(nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.kind, self.a = kind, nn.Linear(D_IN, H)

        def forward(self, x):
            h = self.a(x)
            if self.kind == "batch":
                return h / h.std(0, keepdim=True)
            if self.kind == "all":
                return h / h.norm()
            if self.kind == "sqrt":
                return h + torch.sqrt(h * 0.0)  # finite outputs, an infinite slope at every input
            return h / (h * 0.0).std(-1, keepdim=True)  # the std of a constant row: infinite outputs

    X = _inputs()
    with pytest.raises(laftr.UnsupportedOpError, match="batch axis"):
        laftr.make_estimator("laftr").fit(Bad("batch"), X)
    with pytest.raises(laftr.UnsupportedOpError, match="norm.*mixes the examples of a batch"):
        laftr.make_estimator("laftr").fit(Bad("all"), X)
    # the network's own outputs are infinite at theta0: refused at fit (was: at the first evaluation)
    with pytest.raises(laftr.DataError, match="NaN or infinite outputs at theta0"):
        laftr.make_estimator("laftr", gates="relu").fit(Bad("zero"), X)
    # finite outputs, an infinite slope: the stored law refuses it at fit; theta0's own slopes, taken at every
    # sampled input, gave a NaN estimate, now refused at the evaluation
    with pytest.raises(laftr.UnsupportedOpError, match="node 'sqrt'.*not finite"):
        laftr.make_estimator("laftr").fit(Bad("sqrt"), X)
    with pytest.raises(laftr.UnsupportedOpError, match="the estimate is NaN though the network's parameters"):
        laftr.make_estimator("laftr", gates="relu").fit(Bad("sqrt"), X)(Bad("sqrt"))


def test_a_compiled_model_is_its_module():
    """``torch.compile(model)`` wraps the module (parameters ``_orig_mod.*``, the same tensors): fitting on the
    wrapper or evaluating it is fitting on / evaluating the module, and the gradient reaches its parameters.
    (The compiled code is never run: laftr traces the module.)"""
    torch.manual_seed(0)
    model, X = Net("leaky"), _inputs()
    other = perturbed(model, 0.2)
    for name, opts in (("laftr", {"fixed_noise": True, "seed": 1}), ("kfac", {}), ("subset", {})):
        want = laftr.make_estimator(name, **opts).fit(model, X)(other)
        est = laftr.make_estimator(name, **opts).fit(torch.compile(model), X)
        got = est(torch.compile(other))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    (g,) = torch.autograd.grad(got, [other.a.weight])
    assert g.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- linearize
def _small_vit(mlp_act: bool = True) -> nn.Module:
    from laftr.models import vit

    torch.manual_seed(0)
    model = vit(image_size=8, patch=4, d_model=16, heads=2, blocks=1, d_mlp=32, out_features=3).eval()
    if not mlp_act:  # no activation function left: LayerNorm, attention and linear maps only
        for m in model.modules():
            for name, child in m.named_children():
                if isinstance(child, nn.GELU):
                    setattr(m, name, nn.Identity())
    return model


def _images(n: int = 40) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_linearize_activations_runs_every_other_op_exactly():
    """``linearize="activations"``: with no activation in the network it is the real networks
    (``gates="none"``), on an MLP it is LAFTR itself; with both, theta0's own linearization of the GELUs
    keeps theta0's output and tends to the exact FSD, and only the activations' laws are stored."""
    X = _images()
    plain = _small_vit(mlp_act=False)
    other = perturbed(plain, 0.3)
    a = laftr.make_estimator("laftr", linearize="activations", seed=4).fit(plain, X)
    b = laftr.make_estimator("laftr", gates="none", seed=4).fit(plain, X)
    torch.testing.assert_close(a(other), b(other), rtol=1e-10, atol=1e-14)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(D_IN, H), nn.GELU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, D_OUT))
    X2, mlp_other = _inputs(), perturbed(mlp, 0.3)
    for gates in ("bernoulli", "relu"):
        a = laftr.make_estimator("laftr", gates=gates, linearize="activations", seed=4).fit(mlp, X2)
        b = laftr.make_estimator("laftr", gates=gates, seed=4).fit(mlp, X2)
        torch.testing.assert_close(a(mlp_other), b(mlp_other), rtol=1e-10, atol=1e-14)
    model = _small_vit()
    est = laftr.make_estimator("laftr", gates="relu", linearize="activations", input_model="coreset",
                               coreset_size=len(X), num_samples=len(X)).fit(model, X)
    assert float(est(model)) == 0.0
    errors = []
    for step in (1e-2, 1e-3, 1e-4):
        near = perturbed(model, step, seed=2)
        errors.append(abs(float(est(near)) / float(laftr.exact_fsd(model, near, X)) - 1))
    assert errors[-1] < 1e-3 and errors[-1] < errors[0], errors
    full = laftr.make_estimator("laftr").fit(model, X)
    act = laftr.make_estimator("laftr", linearize="activations").fit(model, X)
    sites = TracedNet(model).sites
    assert {sites[s].family for s in full.summary.site_sums} > {"gelu"}  # norms and attention patterns too
    assert {sites[s].family for s in act.summary.site_sums} == {"gelu"}
    assert full.stored_floats() > act.stored_floats()
    for s, sums in act.summary.site_sums.items():  # the same statistics as the full fit's
        for k, v in sums.items():
            torch.testing.assert_close(v, full.summary.site_sums[s][k], rtol=0, atol=0)
    # the fit itself runs the other ops exactly: they record nothing (not recorded, then dropped)
    net = TracedNet(model)
    fitted = fit_summary(net, param_dict(model, detach=True), X, "gaussian", exact=act._exact_ops())
    assert {sites[s].family for s in fitted.site_sums} == {"gelu"}


class _LibraryAttention(nn.Module):
    """nn.MultiheadAttention (inside nn.TransformerEncoderLayer, and alone) and F.scaled_dot_product_attention,
    with ``act``: a GELU MLP, else no activation function at all."""

    def __init__(self, act: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True,
                                                activation="gelu" if act else nn.Identity())
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(self.emb(x))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        q, k, v = self.qkv(h).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        h = h + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        return self.head(h[:, -1])


def test_linearize_activations_runs_library_attention_exactly():
    """nn.MultiheadAttention and scaled_dot_product_attention run exactly under ``linearize="activations"``
    (they drew a pattern from a law the fit had not stored: 'the summary has no statistic')."""
    X = torch.randint(0, 7, (30, 5), generator=torch.Generator().manual_seed(0))
    for act in (False, True):
        torch.manual_seed(0)
        model = _LibraryAttention(act).double().eval()
        other = perturbed(model, 0.2)
        est = laftr.make_estimator("laftr", linearize="activations", input_model="tokens", seed=4).fit(model, X)
        if not act:  # nothing left to linearize: the real networks on the same draws
            ref = laftr.make_estimator("laftr", gates="none", input_model="tokens", seed=4).fit(model, X)
            torch.testing.assert_close(est(other), ref(other), rtol=1e-10, atol=1e-14)
            assert est.summary.site_sums == {}
        else:
            assert {TracedNet(model).sites[s].family for s in est.summary.site_sums} == {"gelu"}
            assert float(est(other).detach()) > 0


def test_linearize_activations_keeps_its_draws_and_files(tmp_path):
    """Fixed noise and the sample pool run theta's stream alone (the exactly-run ops are each stream's own);
    the setting is saved and loaded; bad values are refused."""
    model, X = _small_vit(), _images()
    other = perturbed(model, 0.3)
    est = laftr.make_estimator("laftr", linearize="activations", fixed_noise=True, seed=1).fit(model, X)
    first = est(other)
    torch.testing.assert_close(est(other), first, rtol=0, atol=0)
    torch.testing.assert_close(laftr.load(laftr.save(est, tmp_path / "a.laftr"))(other), first)
    pool = laftr.make_estimator("laftr", linearize="activations", sample_pool=128, seed=1).fit(model, X)
    assert float(pool(model)) == 0.0 and float(pool(other)) > 0
    with pytest.raises(laftr.UsageError, match="linearize"):
        laftr.make_estimator("laftr", linearize="softmax")
    with pytest.raises(laftr.UsageError, match="linearizes nothing"):
        laftr.make_estimator("laftr", gates="none", linearize="activations")


# ------------------------------------------------------------------ normalizations written by hand
class _HandRMSNorm(nn.Module):
    """RMSNorm as LLaMA-style code writes it, in three spellings."""

    def __init__(self, d: int, spelling: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.spelling = spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spelling == "x*x":
            return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * self.weight
        if self.spelling == "pow":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight  # "div"


def _normed(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), norm, nn.GELU(), nn.Linear(8, 3)).double()


def _rms_twins(spelling: str) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module, torch.Tensor]:
    """theta0 and theta with nn.RMSNorm, and the same weights with the hand-written norm; data."""
    torch.manual_seed(0)
    ref = _normed(nn.RMSNorm(8, eps=1e-5))
    with torch.no_grad():
        ref[1].weight.add_(0.1 * torch.randn(8))
    theta = _moved(ref, 0.05)
    hand0, hand1 = _normed(_HandRMSNorm(8, spelling)), _normed(_HandRMSNorm(8, spelling))
    hand0.load_state_dict(ref.state_dict())
    hand1.load_state_dict(theta.state_dict())
    return ref, theta, hand0, hand1, torch.randn(200, 6, dtype=torch.float64, generator=torch.Generator()
                                                 .manual_seed(5))


def test_hand_written_rms_norm_is_estimated_as_nn_rms_norm(tmp_path):
    """Its rsqrt / sqrt of a mean is a normalizer, a positive scale decided by theta0 (as nn.RMSNorm's).

    Before, the rsqrt drew a random tangent, which can cross zero: estimates 10^3 to 10^9 times the exact
    FSD (found on a GPT block), and under linearize="activations" the norm was linearized too.
    """
    ref, theta, hand0, hand1, X = _rms_twins("x*x")
    net = TracedNet(hand0)
    assert [r.normalizer for r in net.rules.values() if r.family == "elementwise"] == [True]
    # the x*x spelling draws nothing else: the same draws as nn.RMSNorm's rule, so the same estimates
    for metric in ("l2", "kl"):
        a = laftr.make_estimator("laftr", metric=metric, seed=3).fit(ref, X)(theta)
        b = laftr.make_estimator("laftr", metric=metric, seed=3).fit(hand0, X)(hand1)
        torch.testing.assert_close(b, a, rtol=1e-12, atol=0)
    for spelling in ("pow", "div"):
        ref, theta, hand0, hand1, X = _rms_twins(spelling)
        # linearize="activations": the norm runs exactly, like nn.RMSNorm (before: 10^6 x the exact FSD)
        a = laftr.make_estimator("laftr", linearize="activations", seed=3).fit(ref, X)(theta)
        b = laftr.make_estimator("laftr", linearize="activations", seed=3).fit(hand0, X)(hand1)
        torch.testing.assert_close(b, a, rtol=1e-10, atol=0)
        # sampled laws: the power draws a tangent first, so the draws differ; the expectation is the same
        ests = [laftr.make_estimator("laftr", seed=0, num_samples=256).fit(m, X) for m in (ref, hand0)]
        vals = [torch.tensor([float(e(m).detach()) for _ in range(30)]) for e, m in zip(ests, (theta, hand1),
                                                                                        strict=True)]
        se = math.sqrt(sum(float(v.var()) / len(v) for v in vals))
        assert abs(float(vals[0].mean() - vals[1].mean())) < 4 * se, (vals[0].mean(), vals[1].mean(), se)
    # saved and loaded: the normalizer is part of the site's signature
    est = laftr.make_estimator("laftr", seed=3).fit(hand0, X)
    path = laftr.save(est, tmp_path / "hand-rms.laftr")
    torch.testing.assert_close(laftr.load(path)(hand1), est(hand1), rtol=0, atol=0)


def test_hand_written_layer_norm_divided_by_its_deviation_is_estimated_as_nn_layer_norm():
    """``(h - mu) / torch.sqrt(var + eps)``: the sqrt divides, so its law is kept for 1 / sqrt (the scale the
    norm applies), as nn.LayerNorm keeps it: the same draws, the same estimates (a vision audit found 18 %
    apart when the law was of the divisor)."""

    class HandLN(nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            mu = h.mean(-1, keepdim=True)
            return (h - mu) / torch.sqrt(h.var(-1, keepdim=True, unbiased=False) + 1e-5)

    torch.manual_seed(0)
    ref = _normed(nn.LayerNorm(8, elementwise_affine=False))
    theta = _moved(ref, 0.05)
    hand0, hand1 = _normed(HandLN()), _normed(HandLN())
    hand0.load_state_dict(ref.state_dict())
    hand1.load_state_dict(theta.state_dict())
    X = torch.randn(200, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert [r.divisor for r in TracedNet(hand0).rules.values() if r.family == "elementwise"] == [True]
    for metric in ("l2", "kl"):
        a = laftr.make_estimator("laftr", metric=metric, seed=3).fit(ref, X)(theta)
        b = laftr.make_estimator("laftr", metric=metric, seed=3).fit(hand0, X)(hand1)
        torch.testing.assert_close(b, a, rtol=1e-10, atol=0)


def test_only_a_scale_of_a_reduction_is_a_normalizer_and_it_must_be_positive():
    class Ops(nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.kind = kind

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            if self.kind == "activation":  # an elementwise sqrt of the data: a smooth gate with a tangent law
                return torch.sqrt(F.softplus(h) + 1.0)
            if self.kind == "power":  # a power of a mean in the normalizer range, through a shift and a scale
                return h * (2.0 * (h * h).mean(-1, keepdim=True) + 1e-3) ** -0.5
            if self.kind == "feature":  # the norm of h as a feature: its change must reach the output
                return h + (h * h).sum(-1, keepdim=True).sqrt()
            if self.kind == "scaled feature":  # the same times a parameter, still added, not multiplied in
                return h + torch.rsqrt((h * h).sum(-1, keepdim=True) + 1.0) * self.lin.bias
            if self.kind == "through a weight":  # rsqrt(...) * weight * h: a normalizer
                return torch.rsqrt((h * h).mean(-1, keepdim=True) + 1e-5) * self.lin.bias * h
            return h * torch.reciprocal(h.sum(-1, keepdim=True))  # a sum of either sign

    X = _inputs().double()[:, :4]
    flags = {k: [r.normalizer for r in TracedNet(Ops(k).double()).rules.values() if hasattr(r, "normalizer")]
             for k in ("activation", "power", "feature", "scaled feature", "through a weight", "signed")}
    assert flags == {"activation": [False], "power": [True], "feature": [False], "scaled feature": [False],
                     "through a weight": [True], "signed": [True]}
    with pytest.raises(ValueError, match="not finite and positive"):
        laftr.make_estimator("laftr").fit(Ops("signed").double(), X)
    est = laftr.make_estimator("laftr").fit(Ops("power").double(), X)
    assert float(est(Ops("power").double()).detach()) > 0


def test_softmax_metrics_refuse_outputs_with_more_than_one_axis_per_example():
    """Logits at every position, (B, T, V): kl / l2-probs would take one softmax over all T * V values."""

    class PerPosition(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(10, 8), nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.emb(x)))

    torch.manual_seed(0)
    model, X = PerPosition().double(), torch.randint(0, 10, (30, 4))
    for metric in ("kl", "l2-probs"):
        with pytest.raises(laftr.DataError, match=r"shape \(30, 4, 10\).*one softmax over all"):
            laftr.exact_fsd(model, model, X, metric=metric)
        for name, cfg in (("kfac", {}), ("diag-fisher", {}), ("laftr", {"input_model": "tokens"}),
                          ("liftr", {"input_model": "tokens"}), ("subset", {}), ("ntk", {})):
            with pytest.raises(laftr.DataError, match="one distribution"):  # at fit, before any pass
                laftr.make_estimator(name, metric=metric, **cfg).fit(model, X)
        z = model(X)
        with pytest.raises(laftr.DataError, match="one distribution"):  # and wherever outputs are compared
            laftr.metrics.discrepancy(z, z, metric)
    # l2 sums the squares over every axis, as before
    assert float(laftr.make_estimator("laftr", input_model="tokens").fit(model, X)(model).detach()) == 0.0


def test_softmax_metrics_refuse_a_softmax_over_one_unit():
    """One output unit (a sigmoid classifier's logit, a regression head) or outputs=[k]: a softmax over one unit
    is 1 whatever the network does; every kl / l2-probs distance was 0, silently (audit)."""
    torch.manual_seed(0)
    one, X = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).double(), torch.randn(40, 8)
    many = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5)).double()
    for metric in ("kl", "l2-probs"):
        with pytest.raises(laftr.DataError, match="softmax over one unit"):
            laftr.exact_fsd(one, one, X, metric=metric)
        with pytest.raises(laftr.DataError, match=r"outputs=\[3\] gives a softmax over one unit"):
            laftr.exact_fsd(many, many, X, metric=metric, outputs=[3])
        for name in ("laftr", "kfac", "diag-fisher", "subset", "ntk", "laftr-exact" if metric == "l2" else "liftr"):
            with pytest.raises(laftr.DataError, match="softmax over one unit"):  # at fit
                laftr.make_estimator(name, metric=metric).fit(one, X)
            with pytest.raises(laftr.DataError, match="softmax over one unit"):
                laftr.make_estimator(name, metric=metric).fit(many, X, outputs=[3])
    assert float(laftr.exact_fsd(one, perturbed(one, 0.5), X, metric="l2")) > 0  # l2 reads one unit as it is
    laftr.make_estimator("laftr", metric="kl").fit(many, X, outputs=[3, 4])  # two units: a distribution


# ------------------------------------------------------------------ casts (Hugging Face's softmax upcast)
class _CastAttention(nn.Module):
    def __init__(self, cast: str) -> None:
        super().__init__()
        self.emb, self.qkv, self.head = nn.Embedding(12, 16), nn.Linear(16, 48), nn.Linear(16, 5)
        self.cast = cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.emb(x)).chunk(3, -1)
        scores = q @ k.transpose(-2, -1) / 4.0
        if self.cast == "none":
            a = F.softmax(scores, -1)
        elif self.cast == "no-op":  # float64 to float64
            a = F.softmax(scores, -1, dtype=torch.float64).to(q.dtype)
        else:  # through float32 and back
            a = F.softmax(scores.float(), -1).type_as(q)
        return self.head(F.gelu(a @ v).mean(1))


@pytest.mark.parametrize("cast", ["no-op", "float32"])
def test_a_cast_of_data_runs_in_each_stream(cast):
    torch.manual_seed(0)
    X = torch.randint(0, 12, (60, 5))
    ref = _CastAttention("none").double()
    theta = _moved(ref, 0.02)
    cast0, cast1 = _CastAttention(cast).double(), _CastAttention(cast).double()
    cast0.load_state_dict(ref.state_dict())
    cast1.load_state_dict(theta.state_dict())
    rtol = 1e-12 if cast == "no-op" else 1e-6  # float32 rounding of the attention weights
    for name, cfg in (("laftr", {"input_model": "tokens"}), ("laftr", {"input_model": "tokens", "gates": "relu"}),
                      ("laftr", {"input_model": "tokens", "linearize": "activations"}),
                      ("liftr", {"input_model": "tokens"}), ("kfac", {"unsupported": "diag"}), ("diag-fisher", {})):
        a = laftr.make_estimator(name, seed=1, **cfg).fit(ref, X)(theta)
        b = laftr.make_estimator(name, seed=1, **cfg).fit(cast0, X)(cast1)
        torch.testing.assert_close(b, a, rtol=rtol, atol=0, msg=f"{name} {cfg}")


def test_a_cast_in_the_closed_form_and_a_cast_to_integers():
    class Mlp(nn.Module):
        def __init__(self, to: Any) -> None:
            super().__init__()
            self.a, self.b, self.to_ = nn.Linear(6, 8), nn.Linear(8, 3), to

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            return self.b(h if self.to_ is None else h.to(self.to_).double())

    torch.manual_seed(0)
    X = torch.randn(60, 6, dtype=torch.float64)
    plain = Mlp(None).double()
    theta = _moved(plain, 0.05)
    casted, casted1 = Mlp(torch.float32).double(), Mlp(torch.float32).double()
    casted.load_state_dict(plain.state_dict())
    casted1.load_state_dict(theta.state_dict())
    a = laftr.make_estimator("laftr-exact").fit(plain, X)(theta)
    b = laftr.make_estimator("laftr-exact").fit(casted, X)(casted1)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=0)  # the closed form keeps the block in its own dtype
    ints = Mlp(torch.long).double()
    with pytest.raises(laftr.UnsupportedOpError, match="casts data to torch.int64"):
        laftr.make_estimator("laftr").fit(ints, X)


# ------------------------------------------------------------------ gates written with comparisons
class _Gated(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)
        self.kind, self.leaky, self.relu = kind, nn.LeakyReLU(0.1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = {"leaky": lambda: self.leaky(h), "where": lambda: torch.where(h > 0, h, 0.1 * h),
             "relu": lambda: self.relu(h), "mask": lambda: h * (h > 0),
             "float mask": lambda: h * (0 < h).float(), "ge": lambda: h * torch.ge(h, 0.0)}[self.kind]()
        return self.b(h)


@pytest.mark.parametrize("module,by_hand", [("leaky", "where"), ("relu", "mask"), ("relu", "float mask"),
                                            ("relu", "ge")])
def test_a_gate_written_with_a_comparison_equals_the_activation(module, by_hand, tmp_path):
    """``torch.where(h > 0, h, 0.1 * h)`` is a LeakyReLU and ``h * (h > 0)`` a ReLU: the comparison is a gate
    decided by theta0 (its law the frequency of True), so every estimate equals the module's, draw for draw
    (it was refused at the comparison)."""
    torch.manual_seed(0)
    X = torch.randn(200, 5, dtype=torch.float64)
    ref = _Gated(module).double()
    theta = _moved(ref, 0.05)
    hand0, hand1 = _Gated(by_hand).double(), _Gated(by_hand).double()
    hand0.load_state_dict(ref.state_dict())
    hand1.load_state_dict(theta.state_dict())
    for name, cfg in (("laftr", {}), ("laftr", {"gates": "relu"}), ("laftr", {"metric": "kl"}),
                      ("laftr", {"gates": "none"}), ("laftr", {"shared_masks": True}), ("liftr", {}),
                      ("kfac", {}), ("ntk", {})):
        a = laftr.make_estimator(name, seed=4, **cfg).fit(ref, X)(theta)
        b = laftr.make_estimator(name, seed=4, **cfg).fit(hand0, X)(hand1)
        torch.testing.assert_close(b, a, rtol=1e-12, atol=0, msg=f"{name} {cfg}")
    # a comparison is no activation function: linearize="activations" evaluates it exactly in each stream,
    # so with no other activation the estimate is that of the real networks on the same samples
    a = laftr.make_estimator("laftr", seed=4, gates="none").fit(ref, X)(theta)
    b = laftr.make_estimator("laftr", seed=4, linearize="activations").fit(hand0, X)(hand1)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=0)
    with pytest.raises(laftr.UnsupportedOpError, match="no closed form for a comparison of data"):
        laftr.make_estimator("laftr-exact").fit(hand0, X)(hand1)
    # saved and loaded; the comparison stores what the activation's piece law stores
    est = laftr.make_estimator("laftr", fixed_noise=True, seed=4).fit(hand0, X)
    back = laftr.load(laftr.save(est, tmp_path / "gate.laftr"))
    torch.testing.assert_close(back(hand1), est(hand1), rtol=0, atol=0)
    assert back.stored_floats() == est.stored_floats() == laftr.make_estimator("laftr").fit(ref, X).stored_floats()


def test_comparisons_that_are_not_gates():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return torch.where(h > h.mean(-1, keepdim=True), h, 0.0)  # two computed tensors

    with pytest.raises(laftr.UnsupportedOpError, match="comparison of two computed tensors"):
        laftr.make_estimator("laftr").fit(Two().double(), torch.randn(20, 5, dtype=torch.float64))
    # a comparison of the input alone (a mask from token ids) is no site: evaluated exactly, as before
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(10, 4), nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            keep = (ids > 0).unsqueeze(-1)
            return self.head((self.emb(ids) * keep).sum(1) / keep.sum(1).clamp_min(1))

    ids = torch.randint(0, 10, (40, 6), generator=torch.Generator().manual_seed(0))
    model = Masked().double()
    assert not any(r.family == "compare" for r in TracedNet(model).sites.values())
    est = laftr.make_estimator("laftr", input_model="tokens").fit(model, ids)
    assert float(est(model).detach()) == 0.0


# ------------------------------------------------------------------ graphs traced before (Hugging Face's tracer)
class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(torch.relu(h * (1.0 + torch.finfo(torch.float64).eps)))  # (the tests run in float64)


def _graph_module(model: _Plain, as_dict: bool = False) -> fx.GraphModule:
    """``model``'s computation as a graph that reads ``torch.finfo(h.dtype)``, as Hugging Face's tracer records
    it: torch.fx cannot trace it again (``torch.finfo`` of a traced dtype), its generated code runs."""
    g = fx.Graph()
    x = g.placeholder("x")
    h = g.call_module("a", (x,))
    eps = g.call_function(getattr, (g.call_function(torch.finfo, (g.call_function(getattr, (h, "dtype")),)), "eps"))
    scaled = g.call_function(operator.mul, (h, g.call_function(operator.add, (1.0, eps))))
    out = g.call_module("b", (g.call_function(torch.relu, (scaled,)),))
    g.output({"logits": out} if as_dict else out)
    return fx.GraphModule(model, g)


class _Logits(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)["logits"]


def test_a_graph_module_traced_before_is_replayed_not_traced_again():
    """A graph module (``transformers.utils.fx.symbolic_trace(model)``) is read node by node: its graph may hold
    calls that a second trace cannot make (``torch.finfo`` of a tensor's dtype: Hugging Face's attention
    masks). As the network itself or inside a module of the user's, it gives what the same network written
    as a module gives, draw for draw, and its parameters keep their names."""
    torch.manual_seed(0)
    plain, X = _Plain().double(), torch.randn(40, 5, dtype=torch.float64)
    other = perturbed(plain, 0.05)
    for wrap in (lambda m: _graph_module(m), lambda m: _Logits(_graph_module(m, as_dict=True))):
        gm, gm_other = wrap(plain), wrap(other)
        assert dict(gm.named_parameters()).keys() == {
            k if isinstance(gm, fx.GraphModule) else f"inner.{k}" for k in dict(plain.named_parameters())}
        torch.testing.assert_close(laftr.exact_fsd(gm, gm_other, X), laftr.exact_fsd(plain, other, X))
        for name, kw in (("laftr", {}), ("laftr", {"gates": "relu"}), ("laftr-exact", {}), ("kfac", {}),
                         ("ntk", {"coreset_size": 10})):
            want = laftr.make_estimator(name, seed=3, **kw).fit(plain, X)(other)
            got = laftr.make_estimator(name, seed=3, **kw).fit(gm, X)(gm_other)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15, msg=lambda m, n=name: f"{n}: {m}")


class _Viewed(nn.Module):
    """Token ids reshaped by sizes read from their shape before the embedding (Hugging Face's GPT-2)."""

    def __init__(self, view: bool) -> None:
        super().__init__()
        self.view = view
        self.emb, self.head = nn.Embedding(11, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.view:
            x = x.view(-1, x.size()[-1])
        return self.head(torch.tanh(self.emb(x)).mean(1))


def test_token_ids_reshaped_before_the_embedding_are_the_network_input_for_liftr():
    # liftr refused the view ("reads integer data inside the network"): the size read from the shape made it
    # look like a value computed from something else than the input
    torch.manual_seed(0)
    plain, X = _Viewed(False).double(), torch.randint(0, 11, (40, 5))
    viewed = _Viewed(True).double()
    viewed.load_state_dict(plain.state_dict())
    other_p, other_v = perturbed(plain, 0.1), _Viewed(True).double()
    other_v.load_state_dict(other_p.state_dict())
    for name in ("liftr", "laftr"):
        want = laftr.make_estimator(name, input_model="tokens", seed=2).fit(plain, X)(other_p)
        got = laftr.make_estimator(name, input_model="tokens", seed=2).fit(viewed, X)(other_v)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15, msg=lambda m, n=name: f"{n}: {m}")


def test_a_nan_estimate_of_a_diverged_network_stays_nan():
    """The refusal of a NaN estimate with finite parameters is for an op outside its domain: where NaN is a
    training loop's signal it is returned -- NaN running statistics (one bad batch in train mode), a float16
    network (an overflow)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, H), nn.BatchNorm1d(H), nn.ReLU(), nn.Linear(H, 3))
    X = _inputs()
    est = laftr.make_estimator("subset").fit(model, X)
    bad = copy.deepcopy(model)
    bad[1].running_mean.fill_(float("nan"))
    assert torch.isnan(est(bad))
    half = nn.Sequential(nn.Linear(D_IN, H), nn.ReLU(), nn.Linear(H, 3)).half()
    est = laftr.make_estimator("subset").fit(half, X.half())
    big = copy.deepcopy(half)
    with torch.no_grad():
        big[2].weight.mul_(6e4)  # outputs beyond float16's range: inf - inf
        big[2].bias.fill_(0)
    assert not torch.isfinite(est(big))
