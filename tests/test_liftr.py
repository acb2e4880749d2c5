"""LIFTR (laftr.estimators.liftr): exact where its step-wise linearization must be, equal on the three ways of
writing attention, zero at theta0, gradients, persistence, and bad input."""

from __future__ import annotations

import pytest
import torch
from test_attention import KINDS, Attn, _arith_models, _data, copy_weights, perturbed
from torch import nn

import laftr
from laftr.errors import UsageError

pytestmark = pytest.mark.usefixtures("float64")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _X(n: int = 300) -> torch.Tensor:
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(1))


def test_last_layer_change_is_exact_with_full_input_covariance():
    """When only the last layer moves, dz = dW a0 + db with a0 the last layer's theta0 input, and LIFTR draws a0
    from a Gaussian with a0's exact mean and covariance: E||dz||^2 / 2 is the exact FSD (Monte Carlo error only)."""
    m0 = _mlp()
    X = _X()
    m1 = perturbed(m0, 0.3, only=("4",))
    est = laftr.make_estimator("liftr", metric="l2", input_cov="full", num_samples=200000).fit(m0, X)
    torch.testing.assert_close(est(m1), laftr.exact_fsd(m0, m1, X), rtol=1e-2, atol=0)


def test_last_layer_change_with_diagonal_moments_is_the_diagonal_formula():
    """input_cov='diag': E||dW a + db||^2 / 2 with a ~ N(m, diag v) is (||dW m + db||^2 + sum_j v_j ||dW_j||^2)/2,
    computed from the stored sums themselves."""
    m0 = _mlp()
    X = _X()
    m1 = perturbed(m0, 0.3, only=("4",))
    est = laftr.make_estimator("liftr", metric="l2", input_cov="diag", num_samples=200000).fit(m0, X)
    sums = est.summary.site_sums["_4.in0"]
    n = est.summary.counts[0]
    mean, var = sums["m"][0] / n, sums["s"][0] / n - (sums["m"][0] / n) ** 2
    dW, db = m1[4].weight - m0[4].weight, m1[4].bias - m0[4].bias
    want = 0.5 * ((dW @ mean + db).pow(2).sum() + (var * dW.pow(2).sum(0)).sum())
    torch.testing.assert_close(est(m1), want.detach(), rtol=1e-2, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_one_example_equals_theta0s_own_linearization(kind):
    """Fitted on one example every stored law is a point mass at theta0's value on it (inputs of each layer,
    gates, attention pattern), so LIFTR's step-wise propagation is theta0's own linearization on that example."""
    torch.manual_seed(0)
    ref = Attn("manual")
    X = _data(1)
    m0, m1 = Attn(kind), Attn(kind)
    copy_weights(ref, m0)
    copy_weights(perturbed(ref, 0.2), m1)
    liftr = laftr.make_estimator("liftr", metric="kl", input_model="coreset", coreset_size=1, num_samples=4).fit(m0, X)
    own = laftr.make_estimator("laftr", metric="kl", input_model="coreset", coreset_size=1, num_samples=4,
                               gates="relu").fit(m0, X)
    torch.testing.assert_close(liftr(m1), own(m1), rtol=1e-9, atol=1e-14)


def test_three_ways_of_writing_attention_give_the_same_estimate():
    """The projections' inputs are drawn once per value (q, k, v read the same draw, as inside
    nn.MultiheadAttention), products of two data tensors are linearized at their theta0 factors, and the output
    projection of nn.MultiheadAttention is anchored like a Linear: one estimate, one memory."""
    torch.manual_seed(0)
    ref = Attn("manual")
    other = perturbed(ref, 0.1)
    X = _data()
    values, floats = [], []
    for kind in KINDS:
        m0, m1 = Attn(kind), Attn(kind)
        copy_weights(ref, m0)
        copy_weights(other, m1)
        est = laftr.make_estimator("liftr", metric="kl", num_samples=32).fit(m0, X)
        values.append(est(m1))
        floats.append(est.stored_floats())
        assert float(est(m0)) == 0.0
    torch.testing.assert_close(values[1], values[0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(values[2], values[0], rtol=1e-10, atol=1e-14)
    assert floats[0] == floats[1] == floats[2]


def test_transformer_gradients_persistence_and_memory(tmp_path):
    ds, models = _arith_models()
    m0, m1 = models["mha"]
    est = laftr.make_estimator("liftr", metric="kl", input_model="tokens", num_samples=16,
                               fixed_noise=True).fit(m0, ds.x_train)
    est(m1).backward()
    dead = [n for n, p in m1.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead
    path = laftr.save(est, tmp_path / "liftr.laftr")
    back = laftr.load(path)
    assert type(back).__name__ == "LiftrEstimator"
    torch.testing.assert_close(back(m1), est(m1), rtol=1e-12, atol=1e-15)
    # memory: the site laws, the token marginals and, per anchored input, mean and variance per position
    anchors = {k: v for k, v in est.summary.site_sums.items() if ".in" in k or k.endswith(".out_proj")}
    assert anchors and est.stored_floats() == sum(int(t[0].numel()) for d in est.summary.site_sums.values()
                                                  for t in d.values()) + est.summary.inputs.stored_floats()


def test_liftr_is_not_laftr():
    """Re-drawing theta0's input per layer changes the estimate (a check that the anchors are used at all)."""
    m0 = _mlp()
    X = _X()
    m1 = perturbed(m0, 0.3)
    a = laftr.make_estimator("liftr", metric="l2", num_samples=64, input_model="diag").fit(m0, X)
    b = laftr.make_estimator("laftr", metric="l2", num_samples=64, input_model="diag").fit(m0, X)
    assert abs(float(a(m1)) - float(b(m1))) > 1e-6


def test_bad_options_and_mismatched_summaries():
    with pytest.raises(UsageError, match="input_cov"):
        laftr.make_estimator("liftr", input_cov="low")
    with pytest.raises(UsageError, match="gates"):
        laftr.make_estimator("liftr", gates="relu")
    m0 = _mlp()
    est = laftr.make_estimator("liftr", num_samples=4).fit(m0, _X(40))
    del est.summary.site_sums["_2.in0"]
    est._forget_laws()  # (the fit's probe made the laws from the summary as it was)
    with pytest.raises(ValueError, match="no input moments"):
        est(perturbed(m0, 0.1))


# ---------------------------------------------------------------------------------------------- closed form
def test_closed_form_last_layer_change_is_the_exact_fsd():
    """liftr-exact with full covariances: for a change of the last layer only, E||dW a0 + db||^2 / 2 from a0's
    exact first and second moments IS the exact FSD (no sampling: float64 rounding only)."""
    m0 = _mlp()
    X = _X()
    m1 = perturbed(m0, 0.3, only=("4",))
    est = laftr.make_estimator("liftr-exact", input_cov="full").fit(m0, X)
    torch.testing.assert_close(est(m1), laftr.exact_fsd(m0, m1, X), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("input_model,cov", [("diag", "diag"), ("gaussian", "full"), ("classwise", "full")])
@pytest.mark.parametrize("arch", ["relu", "gelu-layernorm"])
def test_closed_form_equals_monte_carlo(arch, input_model, cov):
    torch.manual_seed(0)
    if arch == "relu":
        m0 = _mlp()
    else:
        m0 = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
    X = _X()
    Y = torch.randint(0, 3, (len(X),), generator=torch.Generator().manual_seed(2))
    m1 = perturbed(m0, 0.3)
    exact = laftr.make_estimator("liftr-exact", input_model=input_model, input_cov=cov).fit(m0, (X, Y))
    mc = laftr.make_estimator("liftr", metric="l2", input_model=input_model, input_cov=cov,
                              num_samples=100000).fit(m0, (X, Y))
    torch.testing.assert_close(mc(m1), exact(m1), rtol=1.5e-2, atol=0)
    assert abs(float(exact(m0))) < 1e-12
    assert exact.stored_floats() == mc.stored_floats()


def test_closed_form_saves_loads_and_refuses_attention(tmp_path):
    m0 = _mlp()
    X = _X(60)
    est = laftr.make_estimator("liftr-exact", input_cov="full").fit(m0, X)
    m1 = perturbed(m0, 0.2)
    back = laftr.load(laftr.save(est, tmp_path / "lx.laftr"))
    torch.testing.assert_close(back(m1), est(m1), rtol=1e-12, atol=0)
    from laftr.errors import UnsupportedOpError

    a = Attn("manual", act=False)
    with pytest.raises(UnsupportedOpError, match="no closed form"):
        laftr.make_estimator("liftr-exact").fit(a, _data())(perturbed(a, 0.1))
