"""The proximal Bregman response function (PBRF), solved with the exact data or with any FSD estimator.

For a trained ``theta_s`` on ``N`` examples and a removed example ``z_m`` (METHOD.md section 5)::

    theta_m = argmin_theta  D(theta_s, theta) - eps * L(f(x_m; theta), y_m) + (lam / 2) ||theta - theta_s||^2

with ``D(theta_s, theta) = (1/N) sum_i D_B(f(x_i; theta), f(x_i; theta_s))`` the function space distance
whose discrepancy is the loss's Bregman divergence (``mse`` for squared error, ``kl`` for cross-entropy),
and ``eps = 1/N``. The ground truth uses the exact ``D`` over the training set; ``pbrf-<estimator>``
replaces it by an :class:`~laftr.estimators.base.FSDEstimator` fitted once at ``theta_s``, so a query
touches only the removed example.

Numerics. ``theta_m - theta_s`` is of order ``eps``, so the solver works in the rescaled variable
``u = (theta - theta_s) / eps`` and minimizes ``J(theta_s + eps u) / eps^2`` (the same minimizer; values and
gradients of order one) with full-batch, deterministic L-BFGS (backtracking line search, capped steps), warm
started at ``theta_s`` (``u = 0``) and stopped when the gradient's largest entry falls below ``rtol`` times
that of the removed example's loss gradient. Use float64 models: in float32 the output changes
``f(x; theta_m) - f(x; theta_s)`` have only a few significant digits.

Optional upweighting (``epsilon`` in :class:`PBRFConfig`): solve with a larger weight ``eps`` on the
removed example and rescale every response by ``(1/N) / eps``. In the linear-response regime (``eps``
small enough that ``theta_m - theta_s`` is linear in ``eps``) this gives the same answer with a larger,
better-resolved displacement; the default ``None`` is the exact ``eps = 1/N`` of the definition.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._util import check_same_arch, model_device_dtype
from ..errors import NoLocalMinimumError as NoLocalMinimumError  # defined in laftr.errors; importable here
from ..errors import UsageError
from ..estimators.base import FSDEstimator
from ..metrics import discrepancy
from ._checks import check_int, check_positive, is_number
from .losses import BREGMAN_METRIC, COMPATIBLE_METRICS, check_task, infer_task, per_example_loss
from .measure import check_examples, check_like, inputs_for, run_model, training_tensors
from .params import ParamSpace

log = logging.getLogger(__name__)


#: Precisions in which L-BFGS can store its curvature pairs (``PBRFConfig.history_dtype``).
_STORE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclasses.dataclass
class PBRFConfig:
    """Options of the PBRF solver.

    Attributes:
        damping: ``lam`` > 0, the weight of the proximity term ``(lam/2) ||theta - theta_s||^2`` (0 is
            refused: the problem is then ill-posed wherever the network has more parameters than the data
            constrain, and the step cap and trust region below, in units of ``1/lam``, would be off).
        epsilon: weight of the removed example's loss. ``None``: ``1/N`` (the definition). A larger value
            upweights the example and every response is rescaled by ``(1/N)/epsilon`` (linear response).
        rtol: stop when ``max|grad J|`` is below ``rtol`` times ``max|grad L(z_m)|`` (both in the rescaled
            variable, where the gradient at ``theta_s`` is ``-grad L(z_m)``).
        max_iter: most L-BFGS iterations per query.
        history_size: L-BFGS memory (curvature pairs kept: ``2 * history_size`` vectors of the parameters'
            size). The default keeps every pair of a typical solve (about 60 iterations on the influence
            benchmarks), which takes fewer evaluations than 50 pairs (measured in docs/influence.md).
        max_step: longest step, in units of ``||grad L(z_m)|| / lam`` (the largest displacement, in the
            rescaled variable, that the minimizer of a ``lam``-strongly convex objective can have).
        trust_radius: the solve fails (:class:`laftr.errors.NoLocalMinimumError`) when ``||u||`` exceeds
            this many such units: the objective then has no local minimum near ``theta_s``.
        batch_size: batch size of the exact, full-data objective.
        stall_window: stop (``stalled``) when, with ``max|grad J|`` within 100 times the tolerance, the last
            ``stall_window`` accepted steps together lowered the objective by at most
            ``stall_ftol * max(1, |J|)`` and did not halve ``max|grad J|``: the
            objective's rounding noise is reached (``J / eps^2`` amplifies the rounding of the per-example
            divergences; about 1e-10 relative on the exact objective of 1,000 Fashion-MNIST images). ``0``
            turns the rule off (the solver before it).
        stall_ftol: that relative decrease: 1e-11, about the spread of the objective's values at its floor on
            the mislabeled benchmark (1e-12 before; measured in docs/influence.md: 5-8 % fewer evaluations,
            self-influences changed by at most 1e-7 relative).
        history_dtype: ``float64`` or ``float32``: the precision of the stored curvature pairs (and of the
            two-loop recursion). ``float32`` halves their memory and the recursion's time, but its directions
            are less accurate near the tolerance: on the mislabeled benchmark more solves stalled on kinks
            and one self-influence moved by 1.3e-3 (docs/influence.md), so it is not the default.
        precondition: ``auto``: when the estimate is a fixed quadratic form with a cheap damped inverse
            (``weight``, ``diag-fisher``, ``kfac``: :meth:`~laftr.estimators.base.FSDEstimator.damped_solve`),
            L-BFGS starts from ``(H_D + lam I)^{-1}``, the inverse Hessian of the objective but for the
            removed example's O(eps) term, instead of a multiple of the identity: a solve then takes a few
            iterations where the example's loss is smooth (measured in docs/influence.md). A preconditioned
            solve that stalls (on a kink) is solved again without it, and the lower objective kept.
            ``none``: never. The exact PBRF and the other estimators are never preconditioned.
    """

    damping: float = 1e-3
    epsilon: float | None = None
    rtol: float = 1e-7
    max_iter: int = 1000
    history_size: int = 100
    max_step: float = 1.0
    trust_radius: float = 10.0
    batch_size: int = 8192
    stall_window: int = 5
    stall_ftol: float = 1e-11
    precondition: str = "auto"
    history_dtype: str = "float64"

    def __post_init__(self) -> None:
        """Check every field (:class:`~laftr.errors.UsageError` naming the first bad one)."""
        if not (is_number(self.damping) and math.isfinite(self.damping)):
            raise UsageError(f"damping must be a finite number > 0, got {self.damping!r}")
        if not self.damping > 0:
            raise UsageError(
                f"damping must be > 0, got {self.damping!r}: without the proximity term the PBRF of a "
                "network with more parameters than the data constrain has no unique minimum (and the "
                "solver's step cap and trust region, in units of 1/damping, are off); use e.g. 1e-3")
        e = self.epsilon
        if e is not None and not (is_number(e) and math.isfinite(e) and e > 0):
            raise UsageError(f"epsilon must be None (1/N) or a finite number > 0, got {e!r}")
        check_positive(self.rtol, "rtol")
        for name in ("max_iter", "history_size", "batch_size"):
            check_int(getattr(self, name), name, minimum=1)
        check_positive(self.max_step, "max_step", finite=False)
        check_positive(self.trust_radius, "trust_radius", finite=False)
        w = self.stall_window
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise UsageError(f"stall_window must be an integer >= 0 (0: off), got {self.stall_window!r}")
        if not (is_number(self.stall_ftol) and math.isfinite(self.stall_ftol) and self.stall_ftol >= 0):
            raise UsageError(f"stall_ftol must be a finite number >= 0, got {self.stall_ftol!r}")
        if self.history_dtype not in _STORE_DTYPES:
            raise UsageError(f"history_dtype must be one of {list(_STORE_DTYPES)}, "
                             f"got {self.history_dtype!r}")
        if self.precondition not in ("auto", "none"):
            raise UsageError(f"precondition must be 'auto' or 'none', got {self.precondition!r}")


@dataclasses.dataclass
class PBRFSolution:
    """One solve of the PBRF.

    Attributes:
        delta: ``theta_eps - theta_s`` (flat, over the trainable parameters), at the weight ``epsilon`` used.
        scale: ``(1/N) / epsilon``: multiply responses by it (1 for the definition's ``epsilon = 1/N``).
        iterations: L-BFGS iterations.
        evaluations: objective evaluations (each one pass of the FSD term).
        grad_ratio: ``||grad J(u*)|| / ||grad J(0)||`` (2-norms, rescaled variable): the stationarity check.
        grad_ratio_max: the same with max-norms (the stopping rule's quantity).
        converged: ``grad_ratio_max <= rtol``.
        status: ``gradient`` (stopped by the gradient tolerance), ``stalled`` (no step along the L-BFGS
            direction or the negative gradient lowers the objective any more: on ReLU networks typically a
            minimum on a kink of the piecewise-smooth objective, where the gradient does not vanish; or the
            floating-point resolution of the objective) or ``max_iter``.
        seconds: wall time of the solve (without the stationarity check).
        cpu_seconds: CPU time of this process during the solve (robust to other load on the machine).
    """

    delta: torch.Tensor
    scale: float
    iterations: int
    evaluations: int
    grad_ratio: float
    grad_ratio_max: float
    converged: bool
    status: str
    seconds: float
    cpu_seconds: float

    def stats(self) -> dict[str, Any]:
        """Scalars for reports."""
        return {k: getattr(self, k) for k in ("iterations", "evaluations", "grad_ratio", "grad_ratio_max",
                                              "converged", "status", "seconds", "cpu_seconds")}


def check_deterministic(name: str, fixed_noise: bool | None, sample_pool: int = 0) -> None:
    """Refuse a Monte Carlo estimator that draws new samples at every evaluation (:class:`UsageError`).

    The PBRF solver evaluates one fixed objective many times; with fresh samples (``fixed_noise=False``) or
    a random subset of a ``sample_pool`` per evaluation, the objective changes between evaluations and the
    answer is noise that depends on the order of the queries. ``fixed_noise`` None: the estimator draws
    nothing.
    """
    if sample_pool:
        raise UsageError(
            f"the PBRF needs one fixed objective, but the {name!r} estimator has "
            f"sample_pool={sample_pool!r}: every evaluation uses another random subset of its pool; use "
            "sample_pool=0 and fixed_noise=True")
    if fixed_noise is False:
        raise UsageError(
            f"the PBRF needs one fixed objective, but the {name!r} estimator draws fresh Monte Carlo samples "
            "at every evaluation (fixed_noise=False), so its answers are noise that depends on the order of "
            f"the queries; make it with fixed_noise=True (make_estimator({name!r}, ..., fixed_noise=True), "
            f"or pbrf-{name}[fixed_noise=true])")


class PBRF:
    """Solve the PBRF at ``theta_s`` = ``model``'s current parameters.

    Give either ``train`` (the ground truth, exact FSD over the training set) or ``fsd`` (a fitted
    :class:`FSDEstimator` whose metric is the loss's Bregman divergence, with ``num_train``).

    Inputs: floating inputs are converted to the model's dtype; integer inputs (token ids) keep theirs.

    Args:
        model: the trained network (copied; not changed).
        train: the training data, for the exact objective: an ``(X, Y)`` tuple of tensors, or batches with
            targets (a DataLoader, a list of ``(x, y)`` batches), concatenated into one ``(X, Y)``.
        fsd: an estimator fitted at ``model``'s current parameters and buffers, for ``pbrf-<name>``. Its
            evaluations must be deterministic: a Monte Carlo estimator needs ``fixed_noise=True``.
        num_train: ``N``, a positive integer (the removed example's weight is ``1/N``); defaults to ``len(X)``
            with ``train``.
        task: ``regression`` or ``classification`` (inferred from ``Y`` when ``train`` is given).
        config: a :class:`PBRFConfig`; keyword arguments override its fields.

    Raises:
        laftr.errors.UsageError: both or neither of ``train``/``fsd``, a bad ``num_train``, an unknown task,
            an estimator with another metric, not fitted, fitted at other parameters or buffers or on another
            architecture, or drawing fresh Monte Carlo samples at every evaluation.
        laftr.errors.DataError: training data in another form, non-finite, or that the network does not take.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Any = None,
        *,
        fsd: FSDEstimator | None = None,
        num_train: int | None = None,
        task: str | None = None,
        config: PBRFConfig | None = None,
        **kwargs: Any,
    ) -> None:
        """Copy the model and prepare the objective (see the class for the arguments)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.config = dataclasses.replace(config or PBRFConfig(), **kwargs)
        if (train is None) == (fsd is None):
            raise UsageError("give exactly one of train=(X, Y) (exact PBRF) or fsd=<fitted estimator>")
        if num_train is not None:
            check_int(num_train, "num_train (N, the training set size)", minimum=1)
        self.device, self.dtype = model_device_dtype(model)
        if self.dtype != torch.float64:
            log.warning("PBRF on a %s model: the response is of order 1/N and float64 is advised", self.dtype)
        self.model = copy.deepcopy(model).eval()  # theta_s, frozen
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.work = copy.deepcopy(model).eval()  # theta during the solve
        for p in self.work.parameters():
            p.requires_grad_(True)
        self.space = ParamSpace(model)
        self.theta_s = self.space.get(self.model).clone()
        self.fsd = fsd
        self.X: torch.Tensor | None = None
        self.Zs: torch.Tensor | None = None
        if train is not None:
            X, Y = training_tensors(train)
            check_examples(X, Y, "training data")
            self.task = check_task(task) if task is not None else infer_task(Y)
            self.num_train = int(X.shape[0]) if num_train is None else int(num_train)
            self.X = inputs_for(X, self.device, self.dtype)
            with torch.no_grad():
                self.Zs = torch.cat([run_model(self.model, xb, "training data")
                                     for xb in self.X.split(self.config.batch_size)])
        else:
            if task is None:
                raise UsageError("with an FSD estimator, task='regression' or 'classification' is required")
            self.task = check_task(task)
            if num_train is None:
                raise UsageError("with an FSD estimator, num_train (N, the training set size) is required")
            self.num_train = int(num_train)
            self._check_estimator(fsd, model)
        self.metric = BREGMAN_METRIC[self.task]

    # ------------------------------------------------------------------ validation
    def _check_estimator(self, est: FSDEstimator | None, model: nn.Module) -> None:
        if not isinstance(est, FSDEstimator):
            raise TypeError(f"fsd must be an FSDEstimator, got {type(est).__name__}")
        if not est.fitted or est.theta0 is None or est.arch is None:
            raise UsageError(f"the {est.name!r} estimator is not fitted: call "
                             "est.fit(model, data) at theta_s first")
        if est.metric not in COMPATIBLE_METRICS[self.task]:
            raise UsageError(
                f"the PBRF of a {self.task} loss needs rho = its Bregman divergence "
                f"({BREGMAN_METRIC[self.task]!r}); the {est.name!r} estimator uses {est.metric!r}"
            )
        if est.outputs is not None:
            raise UsageError("the PBRF compares all outputs; fit the estimator with outputs=None")
        cfg = getattr(est, "config", None)
        check_deterministic(est.name, getattr(cfg, "fixed_noise", None), getattr(cfg, "sample_pool", 0))
        check_same_arch(est.arch, model, what=f"the network the {est.name!r} estimator was fitted on")
        # theta0 in the model's dtype: an estimator fitted on the float32 model is accepted for its exact
        # float64 copy (model.double()), whose values are the same
        theta0 = est.theta0_on(model)
        for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
            for n, t in named:
                if n in theta0 and not torch.equal(theta0[n], t.detach()):
                    why = (", e.g. running statistics updated by a forward pass in train mode"
                           if kind == "buffer" else "")
                    raise UsageError(
                        f"the {est.name!r} estimator was fitted at other parameters than theta_s ({kind} "
                        f"{n!r} differs{why}): fit it on this model, in its current state, before building "
                        "the PBRF"
                    )

    # ------------------------------------------------------------------ objective
    @property
    def epsilon(self) -> float:
        """The weight of the removed example's loss in the solved objective."""
        return self.config.epsilon if self.config.epsilon is not None else 1.0 / self.num_train

    def fsd_term(self, model: nn.Module) -> torch.Tensor:
        """``D(theta_s, theta)`` at ``model``'s parameters (exact or estimated; differentiable).

        The exact term is ``(1/N) sum_i D_B`` over the training set in one graph (``N`` = ``num_train``);
        :meth:`solve` uses it when the data are one batch and a batch-by-batch version otherwise.
        """
        if self.fsd is not None:
            return self.fsd(model)
        assert self.X is not None and self.Zs is not None
        return discrepancy(self.Zs, model(self.X), self.metric).sum() / self.num_train

    @property
    def num_batches(self) -> int:
        """Batches of the exact objective's pass over the training data (1 with an estimator)."""
        return 1 if self.X is None else -(-int(self.X.shape[0]) // self.config.batch_size)

    def _fsd_backward(self, scale: float) -> float:
        """Add ``scale * grad D`` (exact term, by batches) to the work model's ``.grad``; return ``D``."""
        assert self.X is not None and self.Zs is not None
        total = 0.0
        bs = self.config.batch_size
        for xb, zb in zip(self.X.split(bs), self.Zs.split(bs), strict=True):
            d = discrepancy(zb, self.work(xb), self.metric).sum() / self.num_train
            (d * scale).backward()
            total += float(d.detach())
        return total

    def _example(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The removed example(s) on the model's device (floating inputs in its dtype), checked."""
        check_examples(x, y, "removed example")
        if self.X is not None:
            check_like(x, self.X, "removed example")
        x = inputs_for(x, self.device, self.dtype)
        y = y.to(device=self.device, dtype=self.dtype) if y.is_floating_point() else y.to(self.device)
        if self.X is None:  # no training inputs to compare with: the network says whether it takes them
            with torch.no_grad():
                run_model(self.model, x, "removed example")
        return x, y

    def solve(self, x: torch.Tensor, y: torch.Tensor) -> PBRFSolution:
        """Solve the PBRF for removing the example(s) ``(x, y)`` (a batch; their losses are summed).

        Args:
            x: inputs ``(B, ...)``, usually ``B = 1``.
            y: targets ``(B, K)`` or labels ``(B,)``.

        Raises:
            laftr.errors.NoLocalMinimumError: the iterates left the trust region (see :class:`PBRFConfig`):
                the objective has no local minimum near ``theta_s`` (it is unbounded below far from it, e.g.
                when an estimator's curvature does not dominate the removed example's negative curvature).
        """
        x, y = self._example(x, y)
        cfg = self.config
        eps = self.epsilon
        lam = float(cfg.damping)
        with torch.no_grad():
            loss0 = float(per_example_loss(self.model(x), y, self.task).sum())
        # gradient of the removed example's loss at theta_s: the objective's gradient at u = 0 is its negative
        self.space.set(self.work, self.theta_s)
        self.work.zero_grad(set_to_none=True)
        with torch.enable_grad():
            per_example_loss(self.work(x), y, self.task).sum().backward()
        g_loss = self.space.grads(self.work)
        if not torch.isfinite(g_loss).all():
            raise ValueError("the removed example's loss gradient is not finite")
        g0_max = float(g_loss.abs().max())
        g0_norm = float(g_loss.norm())
        evals = [0]
        # the last point whose gradient was computed, with its objective and gradient: where _lbfgs returns
        # (its start or an accepted point), so the checks after a solve need not evaluate it again
        seen: dict[str, Any] = {}

        # one graph for the whole objective (an estimator, or training data in one batch): the gradient is
        # computed only for the points the line search accepts; otherwise a backward pass per batch at once
        one_graph = self.fsd is not None or self.num_batches == 1

        def objective(u: torch.Tensor) -> tuple[float, Callable[[], torch.Tensor]]:
            """``J(theta_s + eps u) / eps^2`` (inf where not finite) and a function giving its ``u``-gradient.

            The gradient function must be called before the next evaluation (it backpropagates through this
            one's graph).
            """
            evals[0] += 1
            this = evals[0]
            self.space.set(self.work, self.theta_s + eps * u)
            self.work.zero_grad(set_to_none=True)
            with torch.enable_grad():
                if one_graph:
                    d_t = self.fsd_term(self.work)
                    d = float(d_t.detach())
                else:
                    d = self._fsd_backward(1.0 / eps**2)
                loss = per_example_loss(self.work(x), y, self.task).sum()
                rest = d_t / eps**2 - loss / eps if one_graph else -loss / eps
                if not one_graph:
                    rest.backward()
            value = d / eps**2 - (float(loss.detach()) - loss0) / eps + 0.5 * lam * float(u.pow(2).sum())

            def gradient() -> torch.Tensor:
                if evals[0] != this:
                    raise RuntimeError("the PBRF gradient of an earlier evaluation was asked for")
                if one_graph:
                    with torch.enable_grad():
                        rest.backward()
                g = eps * self.space.grads(self.work) + lam * u
                seen.update(u=u, f=f, g=g)
                return g

            f = value if math.isfinite(value) else math.inf
            return f, gradient

        def value_at(u: torch.Tensor) -> float:
            return float(seen["f"]) if seen.get("u") is u else objective(u)[0]

        def gradient_at(u: torch.Tensor) -> torch.Tensor:
            return seen["g"] if seen.get("u") is u else _gradient(objective(u)[1])

        t0, c0 = time.perf_counter(), time.process_time()
        h0 = self._preconditioner(lam)
        u = torch.zeros(self.space.size, device=self.device, dtype=self.dtype)
        if g0_max > 0:
            scale = g0_norm / max(lam, 1e-12)  # the size of a lam-strongly convex problem's minimizer
            kw: dict[str, Any] = {
                "tol": cfg.rtol * g0_max, "max_iter": cfg.max_iter, "history": cfg.history_size,
                "max_step": cfg.max_step * scale, "radius": cfg.trust_radius * scale,
                "stall_window": cfg.stall_window, "stall_ftol": cfg.stall_ftol,
                "store_dtype": _STORE_DTYPES[cfg.history_dtype]}
            u, iterations, status = _lbfgs(objective, u, h0=h0, **kw)
            if h0 is not None and status == "stalled":
                # on a kink of the piecewise-smooth objective a preconditioned solve can stall at a worse
                # point of it than the plain one (pbrf-kfac on the mislabeled benchmark: objectives up to
                # 0.7 % higher, self-influences 1.5 % off): solve again without it, keep the lower objective
                f_pre = value_at(u)
                u_plain, it_plain, status_plain = _lbfgs(objective, torch.zeros_like(u), **kw)
                iterations += it_plain
                if value_at(u_plain) <= f_pre:
                    u, status = u_plain, status_plain
        else:
            iterations, status = 0, "gradient"
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        n_evals = evals[0]
        # stationarity check at the returned point (not timed)
        g_end = gradient_at(u)
        ratio = float(g_end.norm()) / g0_norm if g0_norm > 0 else 0.0
        ratio_max = float(g_end.abs().max()) / g0_max if g0_max > 0 else 0.0
        converged = ratio_max <= cfg.rtol
        if status == "max_iter":
            log.warning("PBRF solve stopped after %d iterations with max|grad| ratio %.2e > rtol %.1e",
                        iterations, ratio_max, cfg.rtol)
        delta = (eps * u).clone()
        self.space.set(self.work, self.theta_s)
        return PBRFSolution(
            delta=delta, scale=(1.0 / self.num_train) / eps, iterations=iterations,
            evaluations=n_evals, grad_ratio=ratio, grad_ratio_max=ratio_max,
            converged=converged, status=status, seconds=seconds, cpu_seconds=cpu_seconds,
        )

    def _preconditioner(self, lam: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``v -> (H_D + lam I)^{-1} v`` in the flat parameters, or None (see ``PBRFConfig.precondition``)."""
        est = self.fsd
        if self.config.precondition == "none" or est is None or not est.quadratic or not lam > 0:
            return None

        def h0(v: torch.Tensor) -> torch.Tensor:
            return self.space.flatten(est.damped_solve(self.space.unflatten(v), lam))

        return h0

    # ------------------------------------------------------------------ responses
    def response(self, solution: PBRFSolution, fn: Callable[[nn.Module], torch.Tensor]) -> float:
        """``scale * (fn(theta_s + delta) - fn(theta_s))``: a scalar function's change under the removal.

        ``fn`` is a scalar function of the network, e.g. a :class:`~laftr.influence.measure.Measurement`.
        """
        with torch.no_grad():
            base = float(fn(self.model))
            self.space.set(self.work, self.theta_s + solution.delta)
            try:
                val = float(fn(self.work))
            finally:
                self.space.set(self.work, self.theta_s)
        return solution.scale * (val - base)

    def example_loss_change(self, solution: PBRFSolution, x: torch.Tensor, y: torch.Tensor) -> float:
        """Change of the summed loss on ``(x, y)`` under the removal.

        It is the self-influence when ``(x, y) = z_m``.
        """
        x, y = self._example(x, y)
        return self.response(solution, lambda m: per_example_loss(m(x), y, self.task).sum())


#: The noise-floor rule applies only where ``max|grad J|`` is within this factor of the tolerance. Far from
#: it a stall is a kink, not rounding noise, and the solve can still go on: on the mislabeled benchmark one
#: ``pbrf-laftr`` solve held up for 5 steps at 1.25e-2 of its initial gradient (tolerance 1e-6) later lowered
#: its objective by 7e-5 relative (docs/influence.md).
_NOISE_FLOOR_GTOL = 100.0


def _lbfgs(
    fg: Callable[[torch.Tensor], tuple[float, torch.Tensor | Callable[[], torch.Tensor]]],
    u: torch.Tensor,
    tol: float,
    max_iter: int,
    history: int,
    max_step: float,
    radius: float,
    stall_window: int = 5,
    stall_ftol: float = 1e-11,
    h0: Callable[[torch.Tensor], torch.Tensor] | None = None,
    store_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, int, str]:
    """L-BFGS with a backtracking (Armijo) line search and a cap on each step's length.

    Unlike an extrapolating Wolfe line search, it cannot jump far from the start, which matters because the
    PBRF is a local problem: far from ``theta_s`` the objective is typically unbounded below.

    Returns:
        ``(u, iterations, status)`` with status ``gradient`` (``max|grad| <= tol``), ``stalled`` (no step
        along the quasi-Newton direction or along the negative gradient lowers the objective, three steps
        in a row lower it only at its floating-point resolution, or the last ``stall_window`` steps
        together lower it by less than ``stall_ftol`` relative without halving a gradient already within
        ``_NOISE_FLOOR_GTOL`` times ``tol``: a minimum on a kink of a piecewise-smooth objective, or the limit
        of what float64 resolves) or ``max_iter``.

    ``fg(u)`` returns the objective and its gradient, or a function computing the gradient: it is then
    called only at the start and at the points the line search accepts (a rejected trial point costs no
    backward pass; but near the tolerance the first one within the objective's noise of the current point,
    whose gradient may meet the tolerance: then it is the solution), before the next evaluation.
    ``h0`` (symmetric positive definite) is the initial inverse
    Hessian, a preconditioner: without it, the usual ``(s^T y / y^T y) I`` of the newest pair (the identity
    before any pair).

    Raises:
        NoLocalMinimumError: ``||u|| > radius``.
    """

    def steepest(g: torch.Tensor) -> torch.Tensor:
        return -g if h0 is None else -h0(g)

    f, g_of = fg(u)
    g = _gradient(g_of)
    if not (math.isfinite(f) and bool(torch.isfinite(g).all())):
        raise FloatingPointError("the PBRF objective is not finite at theta_s")
    store = store_dtype or u.dtype
    S: list[torch.Tensor] = []
    Yv: list[torch.Tensor] = []
    rho: list[float] = []
    it = 0
    flat = 0  # consecutive iterations whose decrease is at the floating-point resolution of f
    gmax = float(g.abs().max())  # max|grad| at the current iterate
    recent = [(f, gmax)]  # objective and max|grad| at the last accepted iterates (the stall rule's window)
    for it in range(1, max_iter + 1):
        if gmax <= tol:
            return u, it - 1, "gradient"
        d = _two_loop(g, S, Yv, rho, h0)
        gd = float(g @ d)
        if not gd < 0:  # not a descent direction: forget the curvature pairs
            S.clear()
            Yv.clear()
            rho.clear()
            d = steepest(g)
            gd = float(g @ d)
        accepted = False
        probed = False  # a rejected point within the objective's noise had its gradient computed
        for attempt in range(2):
            dn = float(d.norm())
            if dn > max_step:
                d, gd = d * (max_step / dn), gd * (max_step / dn)
            t = 1.0
            for _ in range(30):
                u_new = u + t * d
                f_new, g_of = fg(u_new)
                if math.isfinite(f_new) and f_new <= f + 1e-4 * t * gd:
                    g_new = _gradient(g_of)  # only for accepted points
                    if bool(torch.isfinite(g_new).all()):
                        accepted = True
                        break
                    f_new = math.inf
                elif (not probed and stall_window > 0 and gmax <= _NOISE_FLOOR_GTOL * tol
                      and math.isfinite(f_new) and f_new <= f + stall_ftol * max(1.0, abs(f))
                      and float(u_new.norm()) <= radius):
                    # near the tolerance, a point whose objective is within the rounding noise of the current
                    # one cannot show a decrease; where its gradient meets the tolerance it is the solution
                    # (else one such point was missed and the solve stalled beside it). Its gradient is
                    # computed for the first such point of a line search only (one backward pass at most).
                    probed = True
                    g_new = _gradient(g_of)
                    if float(g_new.abs().max()) <= tol and bool(torch.isfinite(g_new).all()):
                        return u_new, it, "gradient"
                if math.isfinite(f_new):  # minimizer of the quadratic through f, gd and f_new, safeguarded
                    den = 2.0 * (f_new - f - t * gd)
                    t_q = -gd * t * t / den if den > 0 else 0.5 * t
                    t = min(max(t_q, 0.1 * t), 0.5 * t)
                else:
                    t *= 0.1
            if accepted or attempt == 1 or not S:
                break
            S.clear()  # retry once along the (preconditioned) negative gradient
            Yv.clear()
            rho.clear()
            d = steepest(g)
            gd = float(g @ d)
        if not accepted:
            return u, it - 1, "stalled"
        s_k, y_k = u_new - u, g_new - g
        sy = float(s_k @ y_k)
        if sy > 1e-12 * float(s_k.norm()) * float(y_k.norm()):
            S.append(s_k.to(store))
            Yv.append(y_k.to(store))
            rho.append(1.0 / sy)
            if len(S) > history:
                S.pop(0)
                Yv.pop(0)
                rho.pop(0)
        flat = flat + 1 if f - f_new <= 1e-14 * max(1.0, abs(f)) else 0
        u, f, g = u_new, f_new, g_new
        gmax = float(g.abs().max())
        recent.append((f, gmax))
        if len(recent) > stall_window + 1:
            recent.pop(0)
        # near the tolerance, the last stall_window iterations together lowered f by no more than its rounding
        # noise and did not halve the gradient: a solve that still converges (its gradient shrinking) is never
        # stopped by it, nor one held up on a kink far from the tolerance (it may still move on)
        noise_floor = (stall_window > 0 and len(recent) > stall_window
                       and gmax <= _NOISE_FLOOR_GTOL * tol
                       and recent[0][0] - f <= stall_ftol * max(1.0, abs(f))
                       and min(gm for _, gm in recent[1:]) >= 0.5 * recent[0][1])
        if flat >= 3 or noise_floor:
            return u, it, "gradient" if gmax <= tol else "stalled"
        if float(u.norm()) > radius:
            raise NoLocalMinimumError(
                f"the PBRF iterates left the trust region (||u|| > {radius:.3g}): no local minimum near "
                "theta_s; increase the damping"
            )
    if gmax <= tol:
        return u, it, "gradient"
    return u, it, "max_iter"


def _gradient(g: torch.Tensor | Callable[[], torch.Tensor]) -> torch.Tensor:
    """An objective's gradient, given as a tensor or as a function computing it."""
    return g() if callable(g) else g


def _two_loop(g: torch.Tensor, S: list[torch.Tensor], Yv: list[torch.Tensor], rho: list[float],
              h0: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The L-BFGS direction ``-H g`` by the two-loop recursion from the initial inverse Hessian ``h0``.

    Without ``h0``: ``(s^T y / y^T y) I`` of the newest pair, and ``-g`` without curvature pairs.
    """
    q = g.to(S[0].dtype if S else g.dtype, copy=True)  # the recursion runs in the pairs' precision
    alphas = []
    for s, y, r in zip(reversed(S), reversed(Yv), reversed(rho), strict=True):
        a = r * float(s @ q)
        alphas.append(a)
        q.sub_(y, alpha=a)
    if h0 is not None:
        q = h0(q.to(g.dtype)).to(q.dtype)
    elif S:
        q.mul_(float(S[-1] @ Yv[-1]) / float(Yv[-1] @ Yv[-1]))
    for s, y, r, a in zip(S, Yv, rho, reversed(alphas), strict=True):
        b = r * float(y @ q)
        q.add_(s, alpha=a - b)
    return -q.to(g.dtype)
