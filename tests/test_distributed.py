"""Fits and exact FSDs over a torch.distributed process group: two gloo ranks on the CPU.

One spawn of two ranks runs every check (spawning is the slow part); each rank holds half of a small float64
data set, fits every estimator on it and writes what it got. The tests compare that with one process on all
the data (float64 rounding), check that both ranks hold identical state, and look at the bad cases the ranks
ran: an empty shard, every shard empty, ranks with different architectures or options, a rank whose data is
bad (each an error on both ranks, not a hang: the spawn has a deadline).
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import laftr
from laftr.errors import DataError, UsageError

N, D, K = 40, 4, 3
DEADLINE_S = 90.0

#: name -> (estimator, options): the fits compared with one process
FITS: dict[str, tuple[str, dict[str, Any]]] = {
    "laftr-exact": ("laftr-exact", {}),
    "laftr-exact-mixture": ("laftr-exact", {"input_model": "mixture", "components": 2, "mixture_sample": 16}),
    "laftr-classwise": ("laftr", {"input_model": "classwise"}),
    "laftr-coreset": ("laftr", {"input_model": "coreset", "coreset_size": 7}),
    "liftr-exact": ("liftr-exact", {"input_model": "diag"}),
    "kfac": ("kfac", {"fisher": "exact"}),
    "diag-fisher": ("diag-fisher", {"fisher": "exact"}),
    "subset": ("subset", {"coreset_size": 7}),
    "ntk": ("ntk", {"coreset_size": 6, "selection": "balanced"}),
    "weight": ("weight", {}),
}


def make_model(hidden: int = 6, seed: int = 0) -> nn.Module:
    """A small float64 ReLU network (the same on every rank for the same seed)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, hidden), nn.ReLU(), nn.Linear(hidden, K)).double()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(N, D)`` float64 and labels in ``0..K-1``."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(0, K, (N,), generator=g)


def perturbed(model: nn.Module) -> nn.Module:
    """``model`` with every parameter moved a little (deterministically)."""
    other = make_model()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for i, p in enumerate(other.parameters()):
            p.add_(0.1 * torch.cos(torch.arange(p.numel(), dtype=p.dtype) + i).view_as(p))
    return other


def state(est: laftr.FSDEstimator) -> dict[str, torch.Tensor]:
    """The fitted estimator's stored tensors (what would be saved), on the CPU."""
    tensors, _ = est._state()
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


def fit_all(data: Any, model: nn.Module, distributed: bool | None = None) -> dict[str, Any]:
    """Every fit of :data:`FITS`, the exact FSDs and their gradients, as plain tensors."""
    other = perturbed(model)
    out: dict[str, Any] = {}
    for name, (est_name, options) in FITS.items():
        est = laftr.make_estimator(est_name, batch_size=6, **options).fit(model, data, distributed=distributed)
        out[name] = state(est)
        if name == "laftr-exact":
            out["laftr-exact value"] = est(other).detach()
    out["exact"] = laftr.exact_fsd(model, other, data, batch_size=7, distributed=distributed).detach()
    other.zero_grad()
    value = laftr.exact_fsd(model, other, data, grad=True, batch_size=7, distributed=distributed)
    value.backward()
    out["exact grad=True"] = value.detach()
    out["exact grad=True, gradient"] = {n: p.grad.clone() for n, p in other.named_parameters()}
    d, g = laftr.exact_fsd_and_grad(model, other, data, batch_size=7, distributed=distributed)
    out["exact_fsd_and_grad"] = (d, g)
    return out


def _error(run: Any) -> tuple[str, str] | None:
    """``(type name, message)`` of what ``run()`` raises, or None."""
    try:
        run()
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)
    return None


def _worker(rank: int, store: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    result: dict[str, Any] = {}
    try:
        X, Y = make_data()
        half = slice(0, N // 2) if rank == 0 else slice(N // 2, N)
        model = make_model()
        result["shard"] = fit_all((X[half], Y[half]), model)
        result["local"] = state(laftr.make_estimator("laftr-exact").fit(model, (X[half], Y[half]),
                                                                        distributed=False))
        # an empty shard on rank 1: rank 0 holds everything
        mine = (X, Y) if rank == 0 else (X[:0], Y[:0])
        result["empty shard"] = {
            name: state(laftr.make_estimator(est, batch_size=6, **opts).fit(model, mine))
            for name, (est, opts) in FITS.items() if name in ("laftr-exact", "laftr-coreset", "kfac", "subset")}
        result["empty shard exact"] = laftr.exact_fsd(model, perturbed(model), mine).detach()
        # every shard empty: the error of one process without data, on both ranks
        result["all empty"] = _error(lambda: laftr.make_estimator("kfac").fit(model, (X[:0], Y[:0])))
        result["all empty exact"] = _error(lambda: laftr.exact_fsd(model, model, X[:0]))
        # different architectures / options / outputs: an error on both ranks (no hang)
        result["architecture"] = _error(lambda: laftr.make_estimator("laftr-exact").fit(
            make_model(hidden=6 + rank), X[half]))
        result["options"] = _error(lambda: laftr.make_estimator(
            "laftr-exact", input_model="gaussian" if rank == 0 else "diag").fit(model, X[half]))
        result["outputs"] = _error(lambda: laftr.make_estimator("subset").fit(
            model, X[half], outputs=[0, 1] if rank == 0 else [0]))
        result["exact architecture"] = _error(lambda: laftr.exact_fsd(
            model, make_model(hidden=6 + rank), X[half]))
        # a rank whose data is bad: its own error there, an error naming it on the other
        bad = X[half].clone()
        if rank == 1:
            bad[3, 0] = float("nan")
        result["bad data"] = _error(lambda: laftr.make_estimator("diag-fisher").fit(model, bad))
        result["bad data exact"] = _error(lambda: laftr.exact_fsd(model, model, bad))
        # the group still works after every error above
        result["after"] = state(laftr.make_estimator("laftr-exact").fit(model, X[half]))
    except Exception:  # noqa: BLE001 - reported to the test
        result["crash"] = traceback.format_exc()
    finally:
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each of two gloo ranks (each with half of the data) got; spawned once for the module."""
    tmp = tmp_path_factory.mktemp("dist")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.spawn(_worker, args=(f"file://{tmp / 'store'}", str(tmp)), nprocs=2, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the ranks did not finish within {DEADLINE_S} s (a hang?)")
    out = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r, res in enumerate(out):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
    return out


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """The same fits by one process on all the data (no process group)."""
    X, Y = make_data()
    return fit_all((X, Y), make_model())


def assert_close(got: Any, want: Any, what: str) -> None:
    """Equal up to float64 rounding, recursively through dicts and tuples."""
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), what
        for k in want:
            assert_close(got[k], want[k], f"{what}/{k}")
    elif isinstance(want, (tuple, list)):
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_close(a, b, f"{what}[{i}]")
    else:
        assert got.dtype == want.dtype and got.shape == want.shape, what
        if got.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13, msg=what)
        else:
            assert torch.equal(got, want), what


def assert_identical(a: Any, b: Any, what: str) -> None:
    """Bit-identical, recursively."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), what
        for k in a:
            assert_identical(a[k], b[k], f"{what}/{k}")
    elif isinstance(a, (tuple, list)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    else:
        assert a == b, what


@pytest.mark.parametrize("name", [*FITS, "laftr-exact value", "exact", "exact grad=True", "exact_fsd_and_grad"])
def test_two_ranks_equal_one_process(ranks: list[dict[str, Any]], reference: dict[str, Any], name: str) -> None:
    assert_close(ranks[0]["shard"][name], reference[name], name)


def test_every_rank_holds_identical_state(ranks: list[dict[str, Any]]) -> None:
    for key in ("shard", "empty shard", "empty shard exact", "after"):
        a, b = ranks[0][key], ranks[1][key]
        if key == "shard":  # with grad=True each rank's gradient is its own shard's part
            a = {k: v for k, v in a.items() if k != "exact grad=True, gradient"}
            b = {k: v for k, v in b.items() if k != "exact grad=True, gradient"}
        assert_identical(a, b, key)


def test_exact_grad_parts_add_up(ranks: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    key = "exact grad=True, gradient"
    total = {n: ranks[0]["shard"][key][n] + ranks[1]["shard"][key][n] for n in reference[key]}
    assert_close(total, reference[key], key)


def test_local_fit_opts_out(ranks: list[dict[str, Any]]) -> None:
    X, Y = make_data()
    want = state(laftr.make_estimator("laftr-exact").fit(make_model(), (X[: N // 2], Y[: N // 2])))
    assert_close(ranks[0]["local"], want, "distributed=False")
    assert not torch.equal(ranks[0]["local"]["inputs/counts"], ranks[0]["shard"]["laftr-exact"]["inputs/counts"])


def test_empty_shard(ranks: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    for name, got in ranks[1]["empty shard"].items():
        assert_close(got, reference[name], f"empty shard: {name}")
    assert_close(ranks[1]["empty shard exact"], reference["exact"], "empty shard: exact")


def test_every_shard_empty_is_the_usual_error(ranks: list[dict[str, Any]]) -> None:
    X, _ = make_data()
    with pytest.raises(DataError) as one:
        laftr.exact_fsd(make_model(), make_model(), X[:0])
    for r in ranks:
        for key in ("all empty", "all empty exact"):
            assert r[key] == ("DataError", str(one.value)), key


@pytest.mark.parametrize(("key", "words"), [
    ("architecture", "the parameters"), ("options", "the options (rank 0: {'input_model': 'gaussian'}"),
    ("outputs", "outputs"), ("exact architecture", "model_b's parameters")])
def test_ranks_that_disagree_fail_on_every_rank(ranks: list[dict[str, Any]], key: str, words: str) -> None:
    assert ranks[0][key] == ranks[1][key]  # the same error on both ranks
    assert ranks[0][key] is not None, f"{key}: no error"
    kind, message = ranks[0][key]
    assert kind == UsageError.__name__ and f"disagree on {words}" in message, message


@pytest.mark.parametrize("key", ["bad data", "bad data exact"])
def test_a_failing_rank_fails_every_rank(ranks: list[dict[str, Any]], key: str) -> None:
    assert ranks[1][key] is not None and ranks[1][key][0] == "DataError"
    assert ranks[0][key] is not None and ranks[0][key][0] == "UsageError"
    assert "rank(s) [1]" in ranks[0][key][1] and "NaN" in ranks[0][key][1]


def test_distributed_true_without_a_group() -> None:
    X, _ = make_data()
    with pytest.raises(UsageError, match="process group"):
        laftr.make_estimator("laftr-exact").fit(make_model(), X, distributed=True)
    with pytest.raises(UsageError, match="process group"):
        laftr.exact_fsd(make_model(), make_model(), X, distributed=True)
    with pytest.raises(UsageError, match="distributed must be"):
        laftr.exact_fsd(make_model(), make_model(), X, distributed="yes")  # type: ignore[arg-type]
