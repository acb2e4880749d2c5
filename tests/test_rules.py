"""Every op rule against exact computations: affinity, the laws of gates and normalizers, closed form vs Monte
Carlo, theta0's own linearization vs the exact FSD as theta -> theta0, exactness where the pieces cannot change,
zero at theta0, gradients, and a user's own rule end to end."""

from __future__ import annotations

import copy
import math
import operator

import pytest
import torch
import torch.nn.functional as F
from cases import EstimateCall, perturbed
from op_examples import AFFINE, NORMS, PIECEWISE, POSITIVE, SMOOTH, Lambda, WithParam
from torch import nn

import laftr
from laftr._util import param_dict
from laftr.graph import TracedNet
from laftr.rules import GateRule, NormRule, PiecewiseLinearGate, SmoothGate, registered_targets
from laftr.rules.base import lookup
from laftr.rules.gates import CompareGate
from laftr.summary import fit_summary

DT = torch.float64


pytestmark = pytest.mark.usefixtures("float64")


def _targets(pred) -> dict:
    return {t: r for table in registered_targets().values() for t, r in table.items() if pred(r)}


def _name(t) -> str:
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _node_for(net: TracedNet, target, rule_cls) -> bool:
    """Whether the trace has a node made from ``target`` (its module type, function or method)."""
    for node in net.gm.graph.nodes:
        if node.op == "call_module" and isinstance(target, type):
            if isinstance(net.gm.get_submodule(str(node.target)), target) and lookup(node, net.gm) is rule_cls:
                return True
        elif node.op == "call_function" and node.target is target or node.op == "call_method" and node.target == target:
            return True
    return False


# ---------------------------------------------------------------------------------------------- the registry
def test_every_affine_op_has_an_example_and_is_affine_through_the_interpreter():
    targets = _targets(lambda r: r.affine)
    missing = [_name(t) for t in targets if t not in AFFINE]
    assert not missing, f"affine ops without an example in tests/op_examples.py: {missing}"
    g = torch.Generator().manual_seed(1)
    for t, (factory, shape) in AFFINE.items():
        model = nn.Sequential(factory()).to(DT)  # a root module would be traced into
        net = TracedNet(model)
        assert _node_for(net, t, _targets(lambda r: True)[t]), f"{_name(t)}: the example does not produce this op"
        params = param_dict(model)
        a, b = (torch.randn((3, *shape), generator=g) for _ in range(2))
        al, be = 0.7, -1.3

        def f(x, net=net, params=params):
            return net.forward(x, params)

        torch.testing.assert_close(f(al * a + be * b), al * f(a) + be * f(b) + (1 - al - be) * f(torch.zeros_like(a)),
                                   msg=lambda m, t=t: f"{_name(t)} is not affine: {m}")
        with torch.no_grad():
            torch.testing.assert_close(f(a), model(a.clone()), msg=lambda m, t=t: f"{_name(t)}: {m}")


def test_every_gate_and_norm_op_has_an_example():
    # (comparisons give masks, not activations: tested against the activations they spell in
    # test_user_networks.py)
    gates = _targets(lambda r: issubclass(r, GateRule) and r is not CompareGate)
    missing = [_name(t) for t in gates if t not in PIECEWISE and t not in SMOOTH]
    assert not missing, f"gates without an example: {missing}"
    norms = _targets(lambda r: issubclass(r, NormRule))
    assert not [_name(t) for t in norms if t not in NORMS]


def _gate_net(act: nn.Module, d_in: int = 5, h: int = 6, d_out: int = 3, positive: bool = False) -> nn.Module:
    model = nn.Sequential(nn.Linear(d_in, h), act, nn.Linear(h, d_out))
    if positive:
        _positive_inputs(model)
    return model


def _positive_inputs(model: nn.Sequential) -> None:
    """Pre-activations near 10 (every Linear followed by an op): for ops defined on positive inputs only."""
    with torch.no_grad():
        for lin, nxt in zip(model[:-1], model[1:]):
            if isinstance(lin, nn.Linear) and not isinstance(nxt, nn.Linear):
                lin.weight.mul_(0.2)
                lin.bias.fill_(10.0)


def _autograd_tangent(act: nn.Module, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phi'(s), phi(s) - phi'(s) s)`` elementwise, from autograd of the module itself."""
    t = s.detach().clone().requires_grad_(True)
    y = act(t.clone())
    (c,) = torch.autograd.grad(y.sum(), t)
    return c.detach(), (y - c * t).detach()


@pytest.mark.parametrize("target", list(PIECEWISE) + list(SMOOTH), ids=_name)
def test_gate_law_reproduces_the_op_on_its_data(target):
    """The stored law's moments are the data averages of the op's tangent (slope, intercept) at theta0, computed
    here independently by autograd; piecewise laws give the op itself per example; sampled laws have those
    moments."""
    factory = PIECEWISE[target][0] if target in PIECEWISE else SMOOTH[target]
    act = factory().to(DT)
    model = _gate_net(act, positive=target in POSITIVE)
    g = torch.Generator().manual_seed(2)
    X = 2 * torch.randn(400, 5, generator=g)
    net = TracedNet(model)
    (site, rule), = net.sites.items()
    assert _node_for(net, target, type(rule)), f"{_name(target)}: the example does not produce this op"
    summary = fit_summary(net, param_dict(model, detach=True), X, "gaussian")
    law = rule.law(summary.site_sums[site], summary.counts, torch.device("cpu"), DT)
    with torch.no_grad():
        s0 = model[0](X)
    c, r = _autograd_tangent(model[1], s0)
    with torch.no_grad():
        torch.testing.assert_close(c * s0 + r, model[1](s0.clone()))
    want = {"c": c.mean(0), "r": r.mean(0), "cc": (c * c).mean(0), "cr": (c * r).mean(0), "rr": (r * r).mean(0)}
    if isinstance(rule, PiecewiseLinearGate):
        pieces = rule.pieces(param_dict(model, detach=True), (None, *_prelu_weight(model)), 1)
        probs = law.piece_probs(0)
        cs = [p[0] for p in pieces]
        rs = [p[1] for p in pieces]
        got = {
            "c": sum(p * ck for p, ck in zip(probs, cs)), "r": sum(p * rk for p, rk in zip(probs, rs)),
            "cc": sum(p * ck * ck for p, ck in zip(probs, cs)), "cr": sum(p * ck * rk for p, ck, rk in zip(probs, cs, rs)),
            "rr": sum(p * rk * rk for p, rk in zip(probs, rs)),
        }
        for k, w in want.items():
            torch.testing.assert_close(torch.as_tensor(got[k]).expand_as(w), w, msg=k)
        draws = law.draw(torch.zeros(20000, dtype=torch.long), torch.Generator().manual_seed(0), False, X)
        for j, p in enumerate(probs):
            freq = (draws == j).to(DT).mean(0)
            assert (freq - p).abs().max() < 5 * math.sqrt(0.25 / 20000) + 1e-12, (j, freq, p)
    else:
        assert isinstance(rule, SmoothGate)
        got = law.moments(0)
        for k, w in want.items():
            torch.testing.assert_close(got[k], w, msg=k)
        # the four sigma points have exactly the stored mean and covariance
        pc, pr = law.points_c[0], law.points_r[0]
        torch.testing.assert_close(pc.mean(0), want["c"])
        torch.testing.assert_close(pr.mean(0), want["r"])
        torch.testing.assert_close((pc * pc).mean(0), want["cc"])
        torch.testing.assert_close((pc * pr).mean(0), want["cr"])
        torch.testing.assert_close((pr * pr).mean(0), want["rr"])
        # and the rule's closed-form slope (used by gates="relu") is the derivative
        torch.testing.assert_close(rule.slope(s0, None, (None,), {}) if type(rule).slope is not SmoothGate.slope
                                   else c, c)


def _prelu_weight(model: nn.Module) -> tuple:
    act = model[1]
    if hasattr(act, "p"):  # functional prelu with a parameter
        return (act.p.detach(),)
    return ()


# ---------------------------------------------------------------------------------------------- per op, end to end
def _one_per_rule(table: dict) -> list:
    seen, out = set(), []
    for t in table:
        cls = _targets(lambda r: True)[t]
        if cls not in seen:
            seen.add(cls)
            out.append(t)
    return out


def _norm_net(target, act: nn.Module | None = None) -> nn.Module:
    factory, layout = NORMS[target]
    shape = (4, 6) if layout == "last" else (6, 4)
    return nn.Sequential(nn.Linear(5, 24), nn.Unflatten(1, shape), factory(), nn.Flatten(),
                         act if act is not None else nn.Identity(), nn.Linear(24, 3))


def _op_net(target) -> nn.Module:
    if target in NORMS:
        model = _norm_net(target, nn.GELU())
        for m in model.modules():  # non-trivial affine parameters
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)) or (
                    hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)):
                with torch.no_grad():
                    for p in m.parameters():
                        p.normal_(1.0 if p.ndim and p is getattr(m, "weight", None) else 0.0, 0.3)
        if hasattr(model[2], "p"):
            with torch.no_grad():
                model[2].p.normal_(1, 0.3)
        return model.to(DT)
    factory = PIECEWISE[target][0] if target in PIECEWISE else SMOOTH[target]
    act1, act2 = factory(), factory()
    if hasattr(act2, "p"):
        act2.p = nn.Parameter(act2.p.detach()[:4] if act2.p.numel() > 1 else act2.p.detach())
    if isinstance(act2, nn.PReLU):
        act2 = nn.PReLU(4, init=0.3)
    model = nn.Sequential(nn.Linear(5, 6), act1, nn.Linear(6, 4), act2, nn.Linear(4, 3)).to(DT)
    if target in POSITIVE:
        _positive_inputs(model)
    return model


OPS = _one_per_rule(PIECEWISE) + _one_per_rule(SMOOTH) + list(NORMS)


def _data(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("target", OPS, ids=_name)
def test_closed_form_equals_monte_carlo(target):
    model = _op_net(target)
    X, Y = _data()
    other = perturbed(model, 0.15)
    for im in ("gaussian", "classwise"):
        exact = laftr.make_estimator("laftr-exact", input_model=im).fit(model, (X, Y))(other).item()
        vals = torch.tensor([laftr.make_estimator("laftr", input_model=im, num_samples=3000, seed=10 + r)
                             .fit(model, (X, Y))(other).item() for r in range(10)])
        mean, se = vals.mean().item(), vals.std().item() / math.sqrt(len(vals))
        assert se > 0
        assert abs(mean - exact) < 4.5 * se + 1e-12, (im, mean, exact, se)


@pytest.mark.parametrize("target", OPS, ids=_name)
def test_own_linearization_tends_to_the_exact_fsd(target):
    """gates="relu" (theta0's tangent on every input) on all the data: estimate / exact FSD -> 1 as theta -> theta0."""
    model = _op_net(target)
    rule = next(iter(TracedNet(model).sites.values()))
    if not getattr(rule, "continuous", True):
        pytest.skip("an op with jumps: examples crossing a jump add a first-order term no linearization has")
    X, _ = _data(60)
    g = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    est = laftr.make_estimator("laftr", gates="relu", input_model="coreset", coreset_size=60, num_samples=60,
                               metric="kl").fit(model, X)
    errs = []
    for t in (1e-2, 1e-3, 1e-4):
        other = copy.deepcopy(model)
        with torch.no_grad():
            for p, u in zip(other.parameters(), direction):
                p.add_(t * u)
        errs.append(abs(est(other).item() / laftr.exact_fsd(model, other, X, metric="kl").item() - 1))
    # the error is first order in t (one larger step may sit where the error changes sign); its constant is
    # largest for normalizers over few entries (instance norm over 4: 0.23, 0.025, 0.0025)
    assert errs[2] < 0.3 * max(errs[:2]) + 1e-7, errs
    assert errs[2] < 1e-2, errs


@pytest.mark.parametrize("target", _one_per_rule(PIECEWISE), ids=_name)
@pytest.mark.parametrize("metric", ["kl", "l2"])
def test_piecewise_gates_are_exact_when_no_unit_leaves_its_piece(target, metric):
    """Biases put every unit deep inside one piece, so the law is degenerate and theta0's and theta's pieces agree:
    LAFTR (sampled pieces) and its closed form on the data are then the exact FSD."""
    factory, reps = PIECEWISE[target]
    act = factory()
    model = nn.Sequential(nn.Linear(5, 6), act, nn.Linear(6, 3)).to(DT)
    with torch.no_grad():
        model[0].weight.mul_(0.01)
        model[0].bias.copy_(torch.tensor([reps[i % len(reps)] for i in range(6)]))
    X = torch.rand(40, 5)
    other = perturbed(model, 1e-3)
    truth = laftr.exact_fsd(model, other, X, metric=metric)
    assert truth > 0
    est = laftr.make_estimator("laftr", metric=metric, input_model="coreset", coreset_size=40, num_samples=40)
    torch.testing.assert_close(est.fit(model, X)(other), truth, rtol=1e-9, atol=1e-15)
    if metric == "l2":
        ex = laftr.make_estimator("laftr-exact", input_model="coreset", coreset_size=40).fit(model, X)(other)
        torch.testing.assert_close(ex, truth, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("target", OPS, ids=_name)
def test_zero_at_theta0_and_gradients(target):
    model = _op_net(target)
    X, _ = _data(50)
    other = perturbed(model, 0.2)
    params = [p for p in other.parameters()]
    for name, kw in (("laftr", {"metric": "kl", "num_samples": 16, "fixed_noise": True}),
                     ("laftr", {"metric": "kl", "num_samples": 16, "fixed_noise": True, "gates": "relu"}),
                     ("laftr-exact", {})):
        est = laftr.make_estimator(name, **kw).fit(model, X)
        if name == "laftr":  # both streams compute the same numbers
            assert est(model).item() == 0.0, (name, kw)
        else:  # the closed form subtracts moments of separate blocks: zero up to rounding
            assert abs(est(model).item()) < 1e-13 * est(other).item(), (name, kw)
        d = est(other)
        grads = torch.autograd.grad(d, params)
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
        eps = 1e-6
        for p, gr in zip(params, grads):
            idx = tuple(s - 1 for s in p.shape)
            with torch.no_grad():
                p[idx] += eps
                up = est(other).item()
                p[idx] -= 2 * eps
                down = est(other).item()
                p[idx] += eps
            fd = (up - down) / (2 * eps)
            assert abs(fd - gr[idx].item()) < 1e-5 * max(1.0, abs(fd)), (name, kw, fd, gr[idx].item())


def test_prelu_slope_is_each_streams_own_parameter():
    """PReLU: the piece is theta0's, the negative slope the stream's own: changing only the PReLU weight on a
    network whose units never change piece is the exact FSD."""
    model = nn.Sequential(nn.Linear(5, 6), nn.PReLU(6, init=0.2), nn.Linear(6, 3)).to(DT)
    with torch.no_grad():
        model[0].weight.mul_(0.01)
        model[0].bias.copy_(torch.tensor([-2.0, 2.0, -2.0, 2.0, -2.0, 2.0]))
    X = torch.rand(30, 5)
    other = perturbed(model, 0.3, only="1")
    truth = laftr.exact_fsd(model, other, X)
    assert truth > 1e-4
    est = laftr.make_estimator("laftr-exact", input_model="coreset", coreset_size=30).fit(model, X)
    torch.testing.assert_close(est(other), truth, rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------------------- normalization
class _FixedScale:
    """A stand-in law that always draws the same normalizer (to evaluate the sampled model at given nu)."""

    def __init__(self, nu: torch.Tensor) -> None:
        self.nu = nu
        self.first = nu  # (1, *positions), for the shape check

    def draw(self, groups, gen, shared, like):
        return self.nu


@pytest.mark.parametrize("target", list(NORMS), ids=_name)
def test_norm_closed_form_is_the_exact_expectation_of_the_sampled_model(target):
    """Linear -> norm -> Linear: for a fixed normalizer nu the sampled model's change dz is affine in x and in
    nu, so E||dz||^2 follows from the stored moments (E nu, E nu^2 per position, independent positions) and the
    input moments; the closed form must equal it."""
    model = _norm_net(target).to(DT)
    X, _ = _data(200)
    other = perturbed(model, 0.2)
    est = laftr.make_estimator("laftr-exact").fit(model, X)
    net = TracedNet(model)
    (site, rule), = net.sites.items()
    law = rule.law(est.summary.site_sums[site], est.summary.counts, torch.device("cpu"), DT)
    E1, E2 = (t.reshape(-1) for t in law.moments(0))
    mean, second = est.summary.inputs.moments(0, torch.device("cpu"), DT)
    p0, p1 = param_dict(model, detach=True), param_dict(other, detach=True)
    pos_shape = tuple(law.first.shape[1:])
    P = E1.numel()

    def dz(x, nu):
        from laftr.graph import SampleMode

        mode = SampleMode([p0, p1], {site: _FixedScale(nu.view(1, *pos_shape))}, torch.zeros(1, dtype=torch.long),
                          torch.Generator())
        z0, z1 = net.run((x, x), mode)
        return (z1 - z0)[0]

    zero_x, zero_nu = torch.zeros(1, 5), torch.zeros(P)
    const = dz(zero_x, zero_nu)
    a = [dz(zero_x, torch.eye(P)[q]) - const for q in range(P)]
    A = [torch.stack([dz(torch.eye(5)[i: i + 1], torch.eye(P)[q]) - const - a[q] - (dz(torch.eye(5)[i: i + 1], zero_nu)
                                                                                      - const)
                      for i in range(5)], 1) for q in range(P)]
    # dz(x, nu) = sum_q nu_q (A_q x + a_q) + const, with independent nu_q
    total = const @ const
    for q in range(P):
        total = total + 2 * E1[q] * const @ (A[q] @ mean + a[q])
        for r in range(P):
            w = E2[q] if q == r else E1[q] * E1[r]
            total = total + w * (torch.trace(A[q] @ second @ A[r].T) + a[q] @ A[r] @ mean + a[r] @ A[q] @ mean
                                 + a[q] @ a[r])
    torch.testing.assert_close(est(other), 0.5 * total, rtol=1e-9, atol=1e-12)


def _norm_fn_args(m: nn.Module) -> tuple:
    return (m[2].p.detach(),) if hasattr(m[2], "p") else ()


@pytest.mark.parametrize("target", list(NORMS), ids=_name)
def test_norm_own_linearization_is_its_jacobian(target):
    """With gates="relu", a change upstream of the norm moves its output by the exact Jacobian (autograd jvp) at
    theta0's input, and theta0's stream is the norm itself."""
    from laftr.graph import OwnMode

    model = _norm_net(target).to(DT)
    trunk = nn.Sequential(*list(model)[:3])  # Linear -> Unflatten -> norm
    moved = perturbed(trunk, 1e-3, only="0")  # only the Linear before the norm changes
    X, _ = _data(10)
    net = TracedNet(trunk)
    y0, y1 = net.run((X, X), OwnMode([param_dict(trunk, detach=True), param_dict(moved, detach=True)]))
    with torch.no_grad():
        h0, h1 = trunk[1](trunk[0](X)), moved[1](moved[0](X))
        _, jvp = torch.func.jvp(lambda h: trunk[2](h), (h0,), (h1 - h0,))
        torch.testing.assert_close(y1 - y0, jvp, rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(y0, trunk(X), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- a user's rule
class Swish(nn.Module):
    """A user's activation that laftr does not know."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.5 * x)


def test_custom_rule_end_to_end(tmp_path):
    model = nn.Sequential(nn.Linear(5, 6), Swish(), nn.Linear(6, 3)).to(DT)
    X, _ = _data()
    # without a rule the module is traced into: x * sigmoid(1.5 x), a product of two data tensors (linearized at
    # theta0 by the product rule) and a sigmoid gate; with the rule it is one leaf with its own law
    traced = {n.op for n in TracedNet(model).gm.graph.nodes if n.target in (operator.mul, torch.sigmoid)}
    assert traced == {"call_function"}
    laftr.make_estimator("laftr").fit(model, X)

    @laftr.rules.register(Swish)
    class SwishRule(laftr.rules.SmoothGate):  # the slope comes from autograd
        family = "swish"

    try:
        assert laftr.rules.lookup(TracedNet(model).gm.graph.find_nodes(op="call_module")[1],
                                  TracedNet(model).gm) is SwishRule
        other = perturbed(model, 0.2)
        exact = laftr.make_estimator("laftr-exact").fit(model, X)
        mc = laftr.make_estimator("laftr", num_samples=40000, seed=3).fit(model, X)
        assert abs(mc(other).item() / exact(other).item() - 1) < 0.03
        path = laftr.save(exact, tmp_path / "swish.laftr")
        back = laftr.load(path)
        torch.testing.assert_close(back(other), exact(other), rtol=1e-12, atol=0)
        own = laftr.make_estimator("laftr", gates="relu", input_model="coreset", coreset_size=120,
                                   num_samples=120).fit(model, X)
        near = perturbed(model, 1e-4)
        assert abs(own(near).item() / laftr.exact_fsd(model, near, X).item() - 1) < 1e-2
        with pytest.raises(ValueError, match="already has the rule"):
            laftr.rules.register(Swish)(laftr.rules.SmoothGate)
    finally:
        laftr.rules.unregister(Swish)
    # unregistered: traced into again (no Swish leaf)
    assert not TracedNet(model).gm.graph.find_nodes(op="call_module", target="1")
    # and a summary fitted with the rule names it when the process that uses it lacks it (it said only that
    # the graph differs: audit)
    with pytest.raises(laftr.UsageError, match=r"families \['swish'\], which no rule registered"):
        laftr.load(path)(other)
    assert TracedNet(model).gm.graph.find_nodes(op="call_function", target=operator.mul)


def test_subclass_that_overrides_forward_is_not_taken_for_its_base():
    class Doubling(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Doubling(5, 3)).to(DT)
    X, _ = _data(20)
    net = TracedNet(model)  # traced into (2 * F.linear), not called as an nn.Linear
    torch.testing.assert_close(net.forward(X, param_dict(model)), model(X))


def test_a_linearization_a_rule_lacks_is_refused_at_fit_not_at_the_first_use():
    """A user's rule with a Monte Carlo linearization and none at theta0's input: ``gates="relu"`` (which reads no
    stored law at fit) passed the fit and refused at the first evaluation; the fit's probe evaluation refuses it
    now, and the sampled mode still works. The probe draws from its own generator: the estimates are the same
    as those of an estimator fitted without it (same seed, same draws)."""

    class SampledOnly(laftr.rules.SmoothGate):
        family = "swish-sampled-only"

        def own(self, mode, args, kwargs):
            return laftr.rules.Rule.own(self, mode, args, kwargs)

    model = nn.Sequential(nn.Linear(5, 6), Swish(), nn.Linear(6, 3)).to(DT)
    X, _ = _data(40)
    laftr.rules.register(Swish)(SampledOnly)
    try:
        with pytest.raises(laftr.UnsupportedOpError, match="defines no linearization at theta0's input"):
            laftr.make_estimator("laftr", gates="relu").fit(model, X)
        other = perturbed(model, 0.2)
        for opts in ({}, {"fixed_noise": True}, {"gates": "none"}):
            est = laftr.make_estimator("laftr", num_samples=8, seed=4, **opts).fit(model, X)
            unprobed = laftr.make_estimator("laftr", num_samples=8, seed=4, **opts)
            unprobed._after_fit = lambda model: None
            unprobed.fit(model, X)
            assert [est(other).item() for _ in range(2)] == [unprobed(other).item() for _ in range(2)], opts
    finally:
        laftr.rules.unregister(Swish)


def test_rule_errors_name_the_node():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            return torch.clamp(h, min=h.shape[1] * 0.1)  # a bound computed at run time from a shape

    with pytest.raises(laftr.UnsupportedOpError, match=r"clamp.*computed at run time"):
        laftr.make_estimator("laftr").fit(Bad(), torch.randn(8, 4))
    # (a bound computed from the data, torch.clamp(h, min=h.mean(1, keepdim=True)), is torch.maximum of the
    # two: a gate on their difference, tests/test_more_ops.py)
    with pytest.raises(laftr.UnsupportedOpError, match=r"gelu.*approximate"):
        laftr.make_estimator("laftr").fit(Lambda(lambda x: torch.nn.functional.gelu(x, approximate="erf?")),
                                          torch.randn(8, 4))
    with pytest.raises(TypeError, match="Rule subclasses"):
        laftr.rules.register(Swish)(object)


def test_elementwise_functions_outside_their_domain_and_data_powers_are_named():
    """log of a pre-activation that is negative on the data: the fit refuses the non-finite tangent, naming the
    node (not a NaN summary); a constant raised to a data power and a learned exponent are refused with why."""
    X = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"node 'log'.*not finite.*domain"):
        laftr.make_estimator("laftr").fit(_gate_net(Lambda(torch.log)), X)
    with pytest.raises(ValueError, match=r"node 'sqrt'.*not finite"):
        laftr.make_estimator("laftr-exact").fit(_gate_net(Lambda(lambda x: torch.sqrt(x.relu()))), X)
    with pytest.raises(laftr.UnsupportedOpError, match=r"constant raised to a data-dependent power.*torch.exp"):
        laftr.make_estimator("laftr").fit(_gate_net(Lambda(lambda x: 2.0 ** x)), X)
    learned = _gate_net(WithParam(lambda x, p: x ** p, ()))
    with pytest.raises(laftr.UnsupportedOpError, match=r"exponent.*computed at run time"):
        laftr.make_estimator("laftr").fit(learned, X)
    ok = laftr.make_estimator("laftr", num_samples=8).fit(_gate_net(Lambda(torch.log), positive=True), X)
    assert torch.isfinite(ok(_gate_net(Lambda(torch.log), positive=True)))


def test_normalize_refuses_other_norms_and_dimensions_by_name():
    X = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    # (another dim than the last is supported: NORMS["F.normalize(dim=1)"]; the batch's is refused)
    for fn, match in ((lambda x: F.normalize(x, p=1.0, dim=-1), r"p=1.0"),
                      (lambda x: F.normalize(x, dim=0), r"normalize.*(the examples along|mixes the examples)"),
                      (lambda x: F.normalize(x, dim=-2), r"normalize.*(the examples along|mixes the examples)")):
        with pytest.raises(laftr.UnsupportedOpError, match=match):
            laftr.make_estimator("laftr").fit(_gate_net(Lambda(fn)), X)


def test_one_support_matrix_for_every_estimator_that_walks_the_network():
    """LAFTR, K-FAC and diag-Fisher trace the same way: an untraceable forward gives each of them the same
    UnsupportedOpError. An op without a rule is refused by name where it would be linearized (laftr,
    laftr-exact); K-FAC and diag-Fisher run the real network (they read layer inputs and output gradients
    only), so there it runs exactly."""
    from cases import CumprodNet

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 2)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else -self.a(x)

    X = torch.randn(12, 4)
    walkers = (("laftr", {}), ("laftr-exact", {}), ("kfac", {"unsupported": "diag"}), ("diag-fisher", {}))
    for name, kw in walkers:
        with pytest.raises(laftr.UnsupportedOpError, match="could not trace.*control flow that depends"):
            laftr.make_estimator(name, **kw).fit(Branchy().to(DT), X)
    model = CumprodNet().to(DT)
    for name, kw in walkers[:2]:
        with pytest.raises(laftr.UnsupportedOpError, match=r"'cumprod'.*no rule"):
            laftr.make_estimator(name, **kw).fit(model, X)
    for name, kw in walkers[2:]:
        est = laftr.make_estimator(name, **kw).fit(model, X)
        assert abs(float(est(model))) < 1e-12 and float(est(perturbed(model, 0.2))) > 0, name
    # K-FAC's own limits are the same error type, naming the layer
    with pytest.raises(laftr.UnsupportedOpError, match=r"'1'.*LayerNorm"):
        laftr.make_estimator("kfac").fit(nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).to(DT), X)


@pytest.mark.parametrize("target", [nn.GELU, nn.ReLU6, nn.PReLU, nn.LayerNorm, nn.GroupNorm], ids=_name)
def test_gradcheck(target):
    """torch.autograd.gradcheck of the estimate w.r.t. every parameter (float64), Monte Carlo with fixed draws,
    theta0's own linearization, and the closed form."""
    model = _op_net(target)
    X, _ = _data(40)
    other = perturbed(model, 0.2)
    names = [n for n, _ in other.named_parameters()]
    for name, kw in (("laftr", {"metric": "kl", "num_samples": 8, "fixed_noise": True}),
                     ("laftr", {"metric": "l2-probs", "num_samples": 8, "fixed_noise": True, "gates": "relu"}),
                     ("laftr-exact", {})):
        call = EstimateCall(other, laftr.make_estimator(name, **kw).fit(model, X))

        def f(*ts, call=call):
            return torch.func.functional_call(call, {f"inner.{n}": t for n, t in zip(names, ts)}, ())

        inputs = tuple(p.detach().clone().requires_grad_(True) for p in other.parameters())
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5), (name, kw)


@pytest.mark.parametrize("target", list(NORMS), ids=_name)
def test_norm_law_reproduces_the_op_on_its_data(target):
    """With each example's own normalizer nu0 the rule's linear form is the op itself (so nu0 is right), and the
    stored law's moments are the data averages of nu0 and nu0^2."""
    from laftr.graph import SampleMode

    model = _norm_net(target).to(DT)
    trunk = nn.Sequential(*list(model)[:3])
    X, _ = _data(80)
    net = TracedNet(trunk)
    (site, rule), = net.sites.items()
    with torch.no_grad():
        h0 = trunk[1](trunk[0](X))
        nu0 = rule.inv_sigma(h0)
    p0 = param_dict(trunk, detach=True)
    mode = SampleMode([p0], {site: _FixedScale(nu0)}, torch.zeros(len(X), dtype=torch.long), torch.Generator())
    (y,) = net.run((X,), mode)
    torch.testing.assert_close(y, trunk(X), rtol=1e-10, atol=1e-12)
    summary = fit_summary(net, p0, X, "gaussian")
    law = rule.law(summary.site_sums[site], summary.counts, torch.device("cpu"), DT)
    m1, m2 = law.moments(0)
    torch.testing.assert_close(m1, nu0.mean(0))
    torch.testing.assert_close(m2, (nu0 * nu0).mean(0))
    # the log-normal draws have those moments (up to sampling error)
    draws = law.draw(torch.zeros(200000, dtype=torch.long), torch.Generator().manual_seed(0), False, X)
    assert (draws > 0).all()
    torch.testing.assert_close(draws.mean(0), m1, rtol=2e-2, atol=0)


def test_untraceable_spellings_of_sizes_are_refused_with_the_traceable_one():
    """``torch.ones(L, L)`` and ``h.view(*h.shape[:-1], 2, -1)`` (LM code) fail in torch.fx; say what works."""

    class Sized(nn.Module):
        def __init__(self, spelling: str) -> None:
            super().__init__()
            self.a, self.spelling = nn.Linear(4, 4), spelling

        def forward(self, x):
            h = self.a(x)
            n = x.shape[1]
            if self.spelling == "ones(n, n)":
                return h @ torch.ones(n, n, dtype=h.dtype).tril()
            if self.spelling == "ones((n, n))":
                return h @ torch.ones((n, n), dtype=h.dtype).tril()
            if self.spelling == "view(*shape)":
                return h.view(*h.shape[:-1], 2, -1).flatten(-2)
            return h.view(h.shape[:-1] + (2, -1)).flatten(-2)

    X = torch.randn(12, 4, dtype=DT)
    with pytest.raises(laftr.UnsupportedOpError, match=r"as one tuple, torch.ones\(\(L, L\)\)"):
        laftr.make_estimator("laftr").fit(Sized("ones(n, n)").to(DT), X)
    with pytest.raises(laftr.UnsupportedOpError, match=r"h.view\(h.shape\[:-1\] \+ \(2, -1\)\)"):
        laftr.make_estimator("laftr").fit(Sized("view(*shape)").to(DT), X)
    for ok in ("ones((n, n))", "view(shape + tuple)"):  # the spellings the messages suggest trace
        model = Sized(ok).to(DT)
        assert float(laftr.make_estimator("laftr").fit(model, X)(model).detach()) == 0.0
