"""laftr-exact's block state and theta0 cache (laftr.moments) against the dense state it replaced.

``dense_moments.py`` holds the former implementation verbatim: one dense matrix M, everything recomputed on
every call. Both must give the same values and gradients (1e-10 relative in float64) for every input model,
metric and op with a closed form, on the first evaluation (which fills the cache of theta0's moments) and on
later ones (which read it), also at other parameters than the ones the cache was filled at.
"""

from __future__ import annotations

import copy

import dense_moments
import pytest
import torch
from cases import FunctionalNet, SmallCNN, TinyResNet, mlp, perturbed, randomize_bn
from op_examples import AFFINE
from test_rules import OPS, _name, _op_net
from torch import nn

import laftr
import laftr.estimators.laftr as laftr_module
from laftr.errors import UnsupportedOpError
from laftr.moments import Theta0Cache

DT = torch.float64
RTOL = 1e-10

pytestmark = pytest.mark.usefixtures("float64")


def _data(n=90, shape=(5,), classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g)


def _cnn():
    model = SmallCNN(maxpool=False)
    randomize_bn(model, torch.Generator().manual_seed(3))
    return model.to(DT)


MODELS = {
    "mlp": (lambda: mlp(5, (8, 6), 3).to(DT), (5,)),
    "cnn": (_cnn, (1, 6, 6)),
    "leaky-mlp": (lambda: mlp(5, (7, 6), 3, leaky=0.1).to(DT), (5,)),
    "resnet": (lambda: TinyResNet().to(DT), (1, 5, 5)),
    "functional": (lambda: FunctionalNet().to(DT), (5,)),
}

INPUT_MODELS = {
    "gaussian": {},
    "diag": {},
    "lowrank": {"rank": 3},
    "classwise": {},
    "classwise-diag": {"input_model": "classwise", "component_cov": "diag"},
    "mixture": {"components": 2, "mixture_sample": 64},
    "coreset": {"coreset_size": 12},
}


def _options(input_model: str) -> dict:
    opts = dict(INPUT_MODELS[input_model])
    opts.setdefault("input_model", input_model)
    return opts


def _value_and_grads(est, model):
    params = [p for p in model.parameters() if p.requires_grad]
    d = est(model)
    return d.detach(), [g.detach() for g in torch.autograd.grad(d, params)]


def _dense(est, model, monkeypatch):
    """``est``'s value and gradients at ``model`` with the dense reference state."""
    with monkeypatch.context() as m:
        m.setattr(laftr_module, "JointMoments", dense_moments.JointMoments)
        return _value_and_grads(est, model)


def _assert_same(got, want, what=""):
    (d, grads), (d_ref, grads_ref) = got, want
    torch.testing.assert_close(d, d_ref, rtol=RTOL, atol=0, msg=lambda m: f"{what} value: {m}")
    for g, g_ref in zip(grads, grads_ref):
        scale = float(g_ref.abs().max()) if g_ref.numel() else 0.0
        torch.testing.assert_close(g, g_ref, rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"{what} gradient: {m}")


def _check_calls(est, model, monkeypatch, what=""):
    """First call (fills the cache), second call (reads it), then at other parameters: all equal the dense state."""
    want = _dense(est, model, monkeypatch)
    est._moment_caches.clear()  # the fit's pass at theta0 filled it: the first call here fills it again
    _assert_same(_value_and_grads(est, model), want, f"{what} first call")
    _assert_same(_value_and_grads(est, model), want, f"{what} cached call")
    assert est._moment_caches and all(c.complete for c in est._moment_caches.values())
    other = perturbed(model, 0.2, seed=7)
    _assert_same(_value_and_grads(est, other), _dense(est, other, monkeypatch), f"{what} other parameters")


@pytest.mark.parametrize("metric", ["l2", "mse"])
@pytest.mark.parametrize("input_model", list(INPUT_MODELS))
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_block_state_equals_dense_state(arch, input_model, metric, monkeypatch):
    factory, shape = MODELS[arch]
    model = factory()
    X, Y = _data(shape=shape)
    est = laftr.make_estimator("laftr-exact", metric=metric, **_options(input_model)).fit(model, (X, Y))
    _check_calls(est, perturbed(model, 0.3), monkeypatch, f"{arch}/{input_model}/{metric}")


@pytest.mark.parametrize("input_model", ["gaussian", "classwise", "diag"])
@pytest.mark.parametrize("arch", ["leaky-mlp", "resnet", "functional"])
def test_block_state_equals_dense_state_on_other_networks(arch, input_model, monkeypatch):
    factory, shape = MODELS[arch]
    model = factory()
    X, Y = _data(shape=shape)
    est = laftr.make_estimator("laftr-exact", **_options(input_model)).fit(model, (X, Y))
    _check_calls(est, perturbed(model, 0.3), monkeypatch, arch)


@pytest.mark.parametrize("target", OPS, ids=_name)
def test_block_state_equals_dense_state_for_every_gate_and_norm(target, monkeypatch):
    """Piecewise gates (PReLU: a different slope per stream), smooth gates (intercepts), normalizers (units
    sharing their draw)."""
    model = _op_net(target)
    X, Y = _data()
    for im in ("gaussian", "classwise"):
        est = laftr.make_estimator("laftr-exact", input_model=im).fit(model, (X, Y))
        _check_calls(est, perturbed(model, 0.2), monkeypatch, f"{_name(target)}/{im}")


def _affine_net(factory, shape):
    """The op applied to the input (both streams share it) and to a hidden layer (the streams differ)."""
    first = nn.Sequential(nn.Linear(shape[-1], shape[-1]), nn.ReLU())
    op1, op2 = factory(), factory()
    with torch.no_grad():
        n = nn.Sequential(op1, nn.Flatten())(torch.zeros(2, *shape)).shape[1]
    head = nn.Sequential(nn.Flatten(), nn.Linear(n, 4), nn.ReLU(), nn.Linear(4, 3))
    other = nn.Sequential(nn.Flatten(), nn.Linear(n, 3))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.op1, self.op2, self.head, self.other = first, op1, op2, head, other

        def forward(self, x):
            return self.head(self.op1(self.first(x))) + self.other(self.op2(x))

    return Net().to(DT)


#: Examples that move the batch axis (they check affinity on a batch, not a per-example network).
_BATCH_AXIS = {torch.t, "t", torch.stack}
#: Affine ops the closed form refuses for a reason of their own (else: returning several tensors)
_NO_CLOSED_FORM = {torch.view_as_complex: "real moments only", torch.view_as_real: "real moments only",
                   **dict.fromkeys((torch.gather, torch.take_along_dim, "gather", "take_along_dim"),
                                   "no rule for a gather")}


@pytest.mark.parametrize("target", [t for t in AFFINE if t not in _BATCH_AXIS], ids=_name)
def test_block_state_equals_dense_state_for_every_affine_op(target, monkeypatch):
    factory, shape = AFFINE[target]
    model = _affine_net(factory, shape)
    X, Y = _data(40, shape)

    def fit():  # the fit runs one closed-form pass at theta0: an op without a closed form is refused there
        return laftr.make_estimator("laftr-exact", input_model="diag").fit(model, (X, Y))

    try:
        with monkeypatch.context() as m:
            m.setattr(laftr_module, "JointMoments", dense_moments.JointMoments)
            fit()
    except UnsupportedOpError as e:  # ops returning several tensors (chunk, split, unbind): refused by both
        why = _NO_CLOSED_FORM.get(target, "one tensor")
        with pytest.raises(UnsupportedOpError, match=why):
            fit()
        assert why in str(e)
        return
    _check_calls(fit(), perturbed(model, 0.2), monkeypatch, _name(target))


@pytest.mark.parametrize("input_model", ["tokens", "tokens-classwise"])
def test_block_state_equals_dense_state_on_tokens(input_model, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT)
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randint(0, 6, (80, 3), generator=g), torch.randint(0, 3, (80,), generator=g)
    est = laftr.make_estimator("laftr-exact", input_model=input_model).fit(model, (X, Y))
    _check_calls(est, perturbed(model, 0.3), monkeypatch, input_model)


@pytest.mark.parametrize("input_cov", ["diag", "full"])
def test_liftr_exact_block_state_equals_dense_state(input_cov, monkeypatch):
    """liftr-exact adds blocks independent of the state (its anchors) and mixes them with the streams."""
    model = mlp(5, (8, 6), 3).to(DT)
    X, Y = _data()
    est = laftr.make_estimator("liftr-exact", input_cov=input_cov).fit(model, (X, Y))
    _check_calls(est, perturbed(model, 0.3), monkeypatch, f"liftr/{input_cov}")


def test_biased_variant_and_output_subsets_equal_dense_state(monkeypatch):
    model = mlp(5, (8, 6), 4).to(DT)
    X, Y = _data()
    for kw in ({"mu_outer": True}, {}):
        est = laftr.make_estimator("laftr-exact", **kw).fit(model, X, outputs=[1, 3])
        _check_calls(est, perturbed(model, 0.3), monkeypatch, str(kw))


def test_float32_equals_dense_state_and_caches_per_dtype(monkeypatch):
    model64 = mlp(5, (8, 6), 3).to(DT)
    X, Y = _data()
    est = laftr.make_estimator("laftr-exact", input_model="classwise").fit(model64, (X, Y))
    other64 = perturbed(model64, 0.3)
    other32 = copy.deepcopy(other64).float()
    want64 = _dense(est, other64, monkeypatch)
    want32 = _dense(est, other32, monkeypatch)
    for _ in range(2):  # the float32 call must not read float64 cache entries, nor the reverse
        _assert_same(_value_and_grads(est, other64), want64, "float64")
        d, grads = _value_and_grads(est, other32)
        assert d.dtype == torch.float32
        torch.testing.assert_close(d, want32[0], rtol=1e-5, atol=0)
        for g, g_ref in zip(grads, want32[1]):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))
    assert {k[1] for k in est._moment_caches} == {torch.float32, torch.float64}


def test_theta0_cache_is_derived_data(tmp_path, monkeypatch):
    """The cache holds only theta0's pairs that the theta-dependent part reads; it is not saved, a loaded
    estimator rebuilds it, a refit drops it, and a cache that lacks a pair is rebuilt rather than trusted."""
    model = mlp(5, (8, 6), 3).to(DT)
    X, Y = _data()
    other = perturbed(model, 0.3)
    est = laftr.make_estimator("laftr-exact").fit(model, (X, Y))
    floats = est.stored_floats()
    want = _dense(est, other, monkeypatch)
    _value_and_grads(est, other)
    (cache,) = est._moment_caches.values()
    # E[s0 x^T] of the first layer (read by its theta stream) and the output's E[z0 z0^T]
    assert sorted(v.shape for v in cache.values.values()) == [(3, 3), (8, 5)]
    assert est.stored_floats() == floats
    path = tmp_path / "e.laftr"
    laftr.save(est, path)
    loaded = laftr.load(path)
    assert not loaded._moment_caches
    _assert_same(_value_and_grads(loaded, other), want, "loaded")
    _assert_same(_value_and_grads(loaded, other), want, "loaded, cached")
    # a complete cache that lacks a pair: rebuilt, same numbers
    (cache,) = loaded._moment_caches.values()
    cache.values.clear()
    _assert_same(_value_and_grads(loaded, other), want, "rebuilt")
    assert cache.complete and len(cache.values) == 2
    # refit on other data: the old cache is not used (the fit's pass at theta0 builds a new one)
    old = list(est._moment_caches.values())
    est.fit(model, _data(seed=5))
    assert est._moment_caches and all(c is not o for c in est._moment_caches.values() for o in old)
    _assert_same(_value_and_grads(est, other), _dense(est, other, monkeypatch), "refit")


def test_theta0_cache_is_not_written_to_files(tmp_path):
    model = mlp(5, (8, 6), 3).to(DT)
    X, Y = _data()
    est = laftr.make_estimator("laftr-exact").fit(model, (X, Y))
    laftr.save(est, tmp_path / "before.laftr")
    est(perturbed(model, 0.3))
    assert est._moment_caches
    laftr.save(est, tmp_path / "after.laftr")
    from safetensors.torch import load_file

    before, after = load_file(str(tmp_path / "before.laftr")), load_file(str(tmp_path / "after.laftr"))
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cache_entries_do_not_depend_on_theta():
    """Filled during an evaluation with gradients: no entry may carry theta's autograd graph."""
    model = mlp(5, (8, 6), 3).to(DT)
    X, Y = _data()
    for name, kw in (("laftr-exact", {"input_model": "mixture", "components": 2}), ("liftr-exact", {})):
        est = laftr.make_estimator(name, **kw).fit(model, (X, Y))
        est(perturbed(model, 0.3)).backward()
        caches: list[Theta0Cache] = list(est._moment_caches.values())
        assert caches and all(not v.requires_grad for c in caches for v in c.values.values())


def test_second_derivatives_equal_dense_state(monkeypatch):
    """Hessian-vector products through the closed form (its symmetric product has its own backward pass)."""
    model = mlp(5, (8, 6), 3).to(DT)
    X, Y = _data()
    other = perturbed(model, 0.3)
    params = list(other.parameters())
    vec = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]

    def hvp(est):
        grads = torch.autograd.grad(est(other), params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vec))
        return [h.detach() for h in torch.autograd.grad(dot, params)]

    for im in ("gaussian", "diag"):
        est = laftr.make_estimator("laftr-exact", input_model=im).fit(model, (X, Y))
        with monkeypatch.context() as m:
            m.setattr(laftr_module, "JointMoments", dense_moments.JointMoments)
            want = hvp(est)
        for _ in range(2):  # filling the cache, then reading it
            for h, h_ref in zip(hvp(est), want):
                torch.testing.assert_close(h, h_ref, rtol=RTOL, atol=RTOL * float(h_ref.abs().max()))


@pytest.mark.parametrize("input_model", ["gaussian", "diag", "lowrank", "classwise-diag", "mixture", "coreset"])
def test_moment_factors_give_the_second_moment(input_model):
    X, Y = _data(shape=(6,))
    opts = _options(input_model)
    if input_model == "mixture":
        opts["component_cov"] = "diag"
    est = laftr.make_estimator("laftr-exact", **opts).fit(mlp(6, (4,), 3).to(DT), (X, Y))  # labels 0..2
    inputs = est.summary.inputs
    for g in range(inputs.num_groups):
        factors = inputs.moment_factors(g, torch.device("cpu"), DT)
        if input_model in ("gaussian", "coreset"):
            assert factors is None
            continue
        _, second = inputs.moments(g, torch.device("cpu"), DT)
        v, U = factors
        assert U.shape[1] == (4 if input_model == "lowrank" else 1)
        torch.testing.assert_close(torch.diag(v) + U @ U.T, second, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["laftr-exact", "liftr-exact"])
def test_closed_form_is_exactly_zero_at_theta0_in_float32(name):
    """At theta = theta0 (bitwise) the value and every gradient are exactly 0 in float32 too; the first move
    away from it is seen (a perturbation of one bias gives a nonzero value)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).float()
    X = torch.randn(100, 5)
    est = laftr.make_estimator(name).fit(net, X)
    for _ in range(2):  # before and after theta0's moments are cached
        v = est(net)
        assert v.dtype == torch.float32 and v.item() == 0.0
        net.zero_grad(set_to_none=True)
        v.backward()
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in net.parameters())
    moved = copy.deepcopy(net)
    with torch.no_grad():
        moved[0].bias[0] += 0.01
    assert est(moved).item() > 0
