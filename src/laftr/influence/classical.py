"""Classical influence functions with the damped Gauss-Newton matrix.

The linear response of the PBRF (METHOD.md section 5) to removing ``z_m`` is::

    theta_m - theta_s ~= (1/N) (G + lam I)^{-1} grad L(z_m, theta_s)
    M(theta_m) - M(theta_s) ~= (1/N) grad M(theta_s)^T (G + lam I)^{-1} grad L(z_m, theta_s)

with ``G = (1/N) sum_i J_i^T H_i J_i`` the Gauss-Newton matrix of the training loss (``H_i`` the output
Hessian of the loss's Bregman divergence: the PBRF objective's Hessian at ``theta_s`` without the O(1/N)
term). Sign convention: METHOD.md writes ``-(1/N) grad M^T (G + lam I)^{-1} grad L``, the effect of
*upweighting* ``z_m`` by ``1/N``; removing it is the opposite, which is what this module returns so that
every method estimates the same quantity, ``M(theta_m) - M(theta_s)``.

``G`` is never formed for real networks: Gauss-Newton-vector products come from ``torch.func`` (per
batch a ``jvp``, linearized once at ``theta_s``, then a cached ``vjp``) and the system is solved by
conjugate gradient. For tiny models ``solver="exact"`` builds ``G`` densely and solves with a Cholesky
factorization (used in the tests).
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
from torch.func import jacrev, vjp

from .._util import functional_call, model_device_dtype, tangent_map
from ..errors import ConvergenceError as ConvergenceError  # defined in laftr.errors; importable here
from ..errors import UsageError
from ._checks import check_int, is_number
from .losses import check_task, infer_task, output_hessian_product, per_example_loss
from .measure import Measurement, check_examples, check_like, inputs_for, run_model, training_tensors
from .params import ParamSpace

log = logging.getLogger(__name__)

#: Largest ``N * K * P`` for which ``solver="exact"`` forms the dense Jacobian.
MAX_DENSE_ENTRIES = 20_000_000

#: Conjugate gradient stops as diverged when its residual exceeds this multiple of ``||b||``: for a symmetric
#: positive definite matrix the residual can grow by at most ``sqrt(cond(A))``, so this means a condition
#: number beyond 1e12, a matrix that is singular in float64.
CG_DIVERGED = 1e6

#: The smallest relative residual conjugate gradient is asked to reach, in units of its dtype's precision:
#: about 1.2e-4 in float32 (where the true residual stalls long before 1e-8), 2.2e-13 in float64.
CG_FLOOR = 1e3


@dataclasses.dataclass
class CGInfo:
    """Outcome of a conjugate-gradient solve."""

    iterations: int
    rel_residual: float
    converged: bool
    seconds: float


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    rtol: float = 1e-8,
    max_iter: int = 1000,
) -> tuple[torch.Tensor, CGInfo]:
    """Solve ``A x = b`` for a symmetric positive definite ``A`` given by ``matvec``.

    Stops when ``||b - A x|| <= rtol ||b||`` (the residual is recomputed exactly at the end), after
    ``max_iter`` iterations, or when the residual diverges (grows beyond ``CG_DIVERGED`` ``||b||``, or is
    not finite). ``converged`` is whether the final relative residual is within ``10 rtol`` (the recursively
    updated residual and the recomputed one differ by rounding), or within ``CG_FLOOR`` times the
    precision of ``b``'s dtype where that is larger (float32 cannot resolve a residual of 1e-8).

    Raises:
        laftr.errors.UsageError: ``p^T A p <= 0`` for a search direction: ``A`` is not positive definite.
    """
    t0 = time.perf_counter()
    x = torch.zeros_like(b)
    bnorm = float(b.norm())
    if bnorm == 0:
        return x, CGInfo(0, 0.0, True, 0.0)
    r = b.clone()
    p = r.clone()
    rs = float(r @ r)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (`it`, the iterations run, is read after the loop)
        Ap = matvec(p)
        pAp = float(p @ Ap)
        if not pAp > 0:
            raise UsageError(f"conjugate gradient: the matrix is not positive definite (p^T A p = {pAp:.3e})")
        alpha = rs / pAp
        x.add_(p, alpha=alpha)
        r.sub_(Ap, alpha=alpha)
        rs_new = float(r @ r)
        if math.sqrt(rs_new) <= rtol * bnorm:
            break
        if not math.sqrt(rs_new) <= CG_DIVERGED * bnorm:  # diverged (or not finite): no solution to refine
            break
        p.mul_(rs_new / rs).add_(r)
        rs = rs_new
    res = float((b - matvec(x)).norm()) / bnorm
    tol = max(10 * rtol, CG_FLOOR * torch.finfo(b.dtype).eps)
    return x, CGInfo(it, res, res <= tol, time.perf_counter() - t0)  # res NaN: not converged


@dataclasses.dataclass
class InfluenceConfig:
    """Options of the classical influence function.

    Attributes:
        damping: ``lam`` >= 0 in ``(G + lam I)^{-1}`` (use the PBRF's damping to compare). 0 works only where
            ``G`` is positive definite (fewer parameters than the data constrain): otherwise the exact solver
            refuses it and conjugate gradient fails to converge (:class:`ConvergenceError`).
        solver: ``cg`` (Gauss-Newton-vector products) or ``exact`` (dense G, tiny models only).
        cg_rtol: relative residual at which conjugate gradient stops, in (0, 1). A solve that ends above
            ``10 cg_rtol`` (or ``CG_FLOOR`` times the model dtype's precision, where that is larger: about
            1.2e-4 in float32) raises :class:`ConvergenceError`.
        cg_max_iter: most conjugate-gradient iterations.
        batch_size: batch size of the Gauss-Newton-vector products.
    """

    damping: float = 1e-3
    solver: str = "cg"
    cg_rtol: float = 1e-8
    cg_max_iter: int = 2000
    batch_size: int = 8192

    def __post_init__(self) -> None:
        """Check every field (:class:`~laftr.errors.UsageError` naming the first bad one)."""
        if not (is_number(self.damping) and math.isfinite(self.damping) and self.damping >= 0):
            raise UsageError(f"damping must be a finite number >= 0, got {self.damping!r}")
        if self.solver not in ("cg", "exact"):
            raise UsageError(f"unknown solver {self.solver!r}; choose 'cg' or 'exact'")
        if not (is_number(self.cg_rtol) and 0 < self.cg_rtol < 1):
            raise UsageError(f"cg_rtol must be a number in (0, 1), got {self.cg_rtol!r}")
        check_int(self.cg_max_iter, "cg_max_iter", minimum=1)
        check_int(self.batch_size, "batch_size", minimum=1)


class ClassicalInfluence:
    """First-order influence of removing training examples, at ``theta_s`` = ``model``'s parameters.

    Inputs: floating inputs are converted to the model's dtype; integer inputs (token ids) keep theirs.
    Trainable parameters that the output does not use get zero gradients (and contribute nothing to ``G``,
    so their block of ``G + lam I`` is ``lam I``).

    Args:
        model: the trained network (copied).
        train: the training data: an ``(X, Y)`` tuple of tensors, or batches with targets (a DataLoader, a
            list of ``(x, y)`` batches), concatenated (``G`` is over all of ``X``; ``Y`` only sets the task).
        task: ``regression`` or ``classification``; inferred from ``Y`` when None.
        config: an :class:`InfluenceConfig`; keyword arguments override its fields.

    Raises:
        laftr.errors.DataError: training data in another form, non-finite, or that the network does not take.
    """

    def __init__(self, model: nn.Module, train: Any, task: str | None = None,
                 config: InfluenceConfig | None = None, **kwargs: Any) -> None:
        """Copy the model and the training inputs (see the class for the arguments)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.config = dataclasses.replace(config or InfluenceConfig(), **kwargs)
        X, Y = training_tensors(train)
        check_examples(X, Y, "training data")
        self.task = check_task(task) if task is not None else infer_task(Y)
        self.model = copy.deepcopy(model).eval()
        self.space = ParamSpace(self.model)
        self.device, self.dtype = model_device_dtype(self.model)
        self.X = inputs_for(X, self.device, self.dtype)
        with torch.no_grad():  # the network takes these inputs (a clear error now rather than in a solve)
            run_model(self.model, self.X[:1], "training data")
        self.num_train = int(X.shape[0])
        self.params = {n: p.detach() for n, p in self.model.named_parameters() if n in self.space.names}
        self.buffers = dict(self.model.named_buffers())
        self._vjps: list[tuple[Callable[..., Any], Callable[..., Any], torch.Tensor]] | None = None
        self._dense: torch.Tensor | None = None
        self._chol: torch.Tensor | None = None
        self._direction: torch.Tensor | None = None
        self._direction_for: Measurement | None = None
        self.last_info: CGInfo | None = None
        self.matvecs = 0

    # ------------------------------------------------------------------ Gauss-Newton
    def _f(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        z = functional_call(self.model, (params, self.buffers), (x,))
        return z.reshape(z.shape[0], -1)

    def _jvp_fn(self, xb: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """``v -> J v`` on the batch ``xb``.

        ``torch.func.linearize`` traces the forward pass at ``theta_s`` once (a product then costs about
        half a ``jvp``); where the model cannot be traced, a plain ``jvp`` per product.
        """

        def fb(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return self._f(p, xb)

        return tangent_map(fb, self.params, "Gauss-Newton products")

    def ggn_matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``G v`` (flat): per training batch one cached linearized ``jvp`` and one cached ``vjp``."""
        if self._vjps is None:
            self._vjps = []
            for xb in self.X.split(self.config.batch_size):
                # torch.func annotates the result as a pair or, with has_aux, a triple: here it is a pair
                zb, fn = vjp(lambda p, xb=xb: self._f(p, xb), self.params)  # type: ignore[misc]
                self._vjps.append((fn, self._jvp_fn(xb), zb.detach()))
        vd = self.space.unflatten(v)
        out = torch.zeros_like(v)
        for fn, jfn, zb in self._vjps:
            (g,) = fn(output_hessian_product(zb, jfn(vd), self.task))
            out += self.space.flatten(g)
        self.matvecs += 1
        return out / self.num_train

    def dense_ggn(self) -> torch.Tensor:
        """``G`` as a dense ``(P, P)`` matrix (tiny models only)."""
        if self._dense is None:
            P = self.space.size
            with torch.no_grad():
                K = self._f(self.params, self.X[:1]).shape[1]
            if self.num_train * K * P > MAX_DENSE_ENTRIES:
                raise ValueError(f"the dense Jacobian would have {self.num_train * K * P:,} entries; "
                                 "use solver='cg' for a model of this size")
            G = torch.zeros(P, P, device=self.device, dtype=self.dtype)
            for xb in self.X.split(self.config.batch_size):
                jac = jacrev(lambda p, xb=xb: self._f(p, xb))(self.params)  # name -> (B, K, *shape)
                J = torch.cat([jac[n].reshape(xb.shape[0], K, -1) for n in self.space.names], dim=2)
                with torch.no_grad():
                    zb = self._f(self.params, xb)
                HJ = torch.stack([output_hessian_product(zb, J[:, :, j], self.task) for j in range(P)], dim=2)
                G += torch.einsum("bkp,bkq->pq", J, HJ)
            self._dense = G / self.num_train
        return self._dense

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """``(G + lam I)^{-1} b``.

        Raises:
            ConvergenceError: conjugate gradient ended above ``10 cg_rtol`` (or diverged), or the dense
                ``G + lam I`` (``lam > 0``) is not positive definite in floating point.
            laftr.errors.UsageError: ``damping=0`` and ``G`` is singular (not positive definite).
        """
        lam = float(self.config.damping)
        singular = ("G is singular (the network has directions in parameter space that no training output "
                    "depends on), so G + damping I is not invertible at damping=0: use damping > 0 "
                    "(e.g. 1e-3)")
        if self.config.solver == "exact":
            t0 = time.perf_counter()
            if self._chol is None:
                A = self.dense_ggn() + lam * torch.eye(self.space.size, device=self.device, dtype=self.dtype)
                chol, info = torch.linalg.cholesky_ex(A)
                if lam == 0:  # positive definite to working precision, or refused
                    ev = torch.linalg.eigvalsh(A)
                    tiny = float(ev[-1]) * ev.shape[0] * torch.finfo(A.dtype).eps
                    if int(info) != 0 or not float(ev[0]) > tiny:
                        raise UsageError(f"{singular} (smallest eigenvalue {float(ev[0]):.3g}, largest "
                                         f"{float(ev[-1]):.3g})")
                elif int(info) != 0:
                    raise ConvergenceError(f"G + damping I is not positive definite in floating point at "
                                           f"damping {lam:g} (Cholesky failed at order {int(info)}); "
                                           "increase the damping")
                self._chol = chol
            x = torch.cholesky_solve(b[:, None], self._chol)[:, 0]
            self.last_info = CGInfo(0, 0.0, True, time.perf_counter() - t0)
            return x
        try:
            x, info = conjugate_gradient(lambda v: self.ggn_matvec(v) + lam * v, b, self.config.cg_rtol,
                                         self.config.cg_max_iter)
        except UsageError as e:  # p^T (G + lam I) p <= 0: only by rounding, or with lam = 0
            if lam == 0:
                raise UsageError(f"{singular} ({e})") from e
            raise ConvergenceError(f"{e} at damping {lam:g}; increase the damping") from e
        self.last_info = info
        if not info.converged:
            fix = ("use damping > 0 (e.g. 1e-3): at damping=0 a singular G has no inverse" if lam == 0 else
                   f"increase the damping (now {lam:g}: G + damping I may be nearly singular) or cg_max_iter")
            if self.dtype != torch.float64:
                fix += ", or use a float64 model"
            raise ConvergenceError(
                f"conjugate gradient did not converge: relative residual {info.rel_residual:.3g} after "
                f"{info.iterations} iterations (cg_rtol {self.config.cg_rtol:g}, cg_max_iter "
                f"{self.config.cg_max_iter}); {fix}")
        return x

    # ------------------------------------------------------------------ influence
    def loss_grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``grad_theta`` of the summed loss on ``(x, y)`` (flat; zeros for parameters it does not use)."""
        check_examples(x, y, "example")
        check_like(x, self.X, "example")
        x = inputs_for(x, self.device, self.dtype)
        y = y.to(device=self.device, dtype=self.dtype) if y.is_floating_point() else y.to(self.device)
        params = [dict(self.model.named_parameters())[n] for n in self.space.names]
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            loss = per_example_loss(self.model(x), y, self.task).sum()
            gs = torch.autograd.grad(loss, params, allow_unused=True)
        return self.space.flatten([torch.zeros_like(p) if g is None else g
                                   for g, p in zip(gs, params, strict=True)])

    def set_measurement(self, measurement: Measurement) -> torch.Tensor:
        """Precompute ``s = (G + lam I)^{-1} grad M`` (one solve shared by all queries); returns ``s``."""
        if not isinstance(measurement, Measurement):
            raise TypeError(f"measurement must be a Measurement, got {type(measurement).__name__}")
        if measurement.task != self.task:
            raise ValueError(f"measurement task {measurement.task!r} differs from the model's {self.task!r}")
        self._direction = self.solve(measurement.grad(self.model, self.space))
        self._direction_for = measurement
        return self._direction

    def influence(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Estimated ``M(theta_m) - M(theta_s)`` for removing ``(x, y)``: ``(1/N) s^T grad L``."""
        if self._direction is None:
            raise RuntimeError("call set_measurement(measurement) first")
        return float(self._direction @ self.loss_grad(x, y)) / self.num_train

    def self_influence(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Estimated change of the example's own loss when it is removed.

        That is ``(1/N) grad L^T (G + lam I)^{-1} grad L`` (one solve per call).
        """
        g = self.loss_grad(x, y)
        return float(g @ self.solve(g)) / self.num_train
