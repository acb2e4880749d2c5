"""Fits and exact FSDs over a torch.distributed process group: two gloo ranks on the CPU.

One spawn of two ranks runs every check (spawning is the slow part); each rank holds half of a small float64
data set, fits every estimator on it and writes what it got. The tests compare that with one process on all
the data (float64 rounding), check that both ranks hold identical state, and look at the bad cases the ranks
ran: an empty shard, every shard empty, ranks with different architectures or options, a rank whose data is
bad (each an error on both ranks, not a hang: the spawn has a deadline).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import laftr
from laftr.continual import FSDRegularizer
from laftr.distributed import stream_seed
from laftr.errors import DataError, UsageError

N, D, K = 40, 4, 3
DEADLINE_S = 90.0

#: name -> (estimator, options): the fits compared with one process
FITS: dict[str, tuple[str, dict[str, Any]]] = {
    "laftr-exact": ("laftr-exact", {}),
    "laftr-exact-mixture": ("laftr-exact", {"input_model": "mixture", "components": 2, "mixture_sample": 16}),
    "laftr-classwise": ("laftr", {"input_model": "classwise"}),
    "laftr-coreset": ("laftr", {"input_model": "coreset", "coreset_size": 7}),
    "laftr-none-classwise": ("laftr", {"input_model": "classwise", "gates": "none", "fixed_noise": True}),
    "liftr-exact": ("liftr-exact", {"input_model": "diag"}),
    "kfac": ("kfac", {"fisher": "exact"}),
    "diag-fisher": ("diag-fisher", {"fisher": "exact"}),
    "subset": ("subset", {"coreset_size": 7}),
    "ntk": ("ntk", {"coreset_size": 6, "selection": "balanced"}),
    "weight": ("weight", {}),
}

#: name -> (estimator, options): Monte Carlo estimators evaluated in the group
MC: dict[str, tuple[str, dict[str, Any]]] = {
    "laftr": ("laftr", {"metric": "kl", "num_samples": 5, "seed": 3}),
    "liftr": ("liftr", {"num_samples": 4}),
    "laftr-fixed": ("laftr", {"num_samples": 3, "fixed_noise": True, "input_model": "classwise"}),
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


def token_model() -> nn.Module:
    """An embedding of a vocabulary of 7 into a small classifier of 5-token sequences."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(15, 6), nn.ReLU(), nn.Linear(6, K)).double()


def token_data() -> torch.Tensor:
    """``(N, 5)`` token ids: the first half below 3, the second half up to 6."""
    g = torch.Generator().manual_seed(2)
    return torch.cat([torch.randint(0, 3, (N // 2, 5), generator=g), torch.randint(0, 7, (N // 2, 5), generator=g)])


def token_mixture() -> laftr.FSDEstimator:
    return laftr.make_estimator("laftr", input_model="tokens-mixture", components=2, mixture_sample=16)


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


def mc_estimators(model: nn.Module, data: Any) -> dict[str, laftr.FSDEstimator]:
    """The Monte Carlo estimators of :data:`MC`, fitted (reduced over the group, if any)."""
    return {name: laftr.make_estimator(est, **opts).fit(model, data) for name, (est, opts) in MC.items()}


def estimate_and_grad(est: laftr.FSDEstimator, model: nn.Module, **kwargs: Any,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A fresh copy of ``est`` called once on ``model`` (so the first draws of its stream), and the gradient."""
    model.zero_grad()
    value = copy.deepcopy(est)(model, **kwargs)
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def mc_checks(model: nn.Module, shard: Any) -> dict[str, Any]:
    """Per estimator of :data:`MC`: this rank's estimate and gradient, the ranks' average, and the same with
    ``distributed=False``."""
    out: dict[str, Any] = {}
    other = perturbed(model)
    for name, est in mc_estimators(model, shard).items():
        value, grad = estimate_and_grad(est, other)
        averaged = {}
        for n, g in grad.items():  # what DDP does with the gradients: all-reduce, divide by the world size
            g = g.clone()
            dist.all_reduce(g)
            averaged[n] = g / dist.get_world_size()
        mean = value.clone()
        dist.all_reduce(mean)
        out[name] = {"value": value, "grad": grad, "averaged grad": averaged,
                     "averaged value": mean / dist.get_world_size(),
                     "local": estimate_and_grad(est, other, distributed=False)}
        # a second call draws the next samples of the rank's stream; fixed_noise redraws the first
        twice = copy.deepcopy(est)
        out[name]["calls"] = [twice(other).detach() for _ in range(2)]
    return out


def ddp_checks(shard: Any) -> dict[str, Any]:
    """A DistributedDataParallel training step with an FSD penalty, passing the wrapper and its module."""
    X, Y = shard
    out: dict[str, Any] = {}
    for how in ("wrapper", "module"):
        net = make_model(seed=2)
        reg = FSDRegularizer(lambda: laftr.make_estimator("laftr", metric="kl", num_samples=8), lam=0.5)
        reg.after_task(net, (X, Y))  # a distributed fit: the same estimator on every rank
        ddp = DistributedDataParallel(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        with torch.no_grad():
            for p in net.parameters():  # move away from theta0 (the same on every rank)
                p.add_(0.05)
        for _ in range(2):
            loss = F.cross_entropy(ddp(X), Y) + reg.penalty(ddp if how == "wrapper" else ddp.module)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[how] = {n: p.detach().clone() for n, p in net.named_parameters()}
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
        # the same architecture with other values (weights loaded on one rank only) or other frozen layers
        result["values"] = _error(lambda: laftr.make_estimator("weight").fit(make_model(seed=rank), X[half]))
        frozen = make_model()
        if rank == 1:
            frozen[0].requires_grad_(False)
        result["trainable"] = _error(lambda: laftr.make_estimator("diag-fisher").fit(frozen, X[half]))
        result["exact values"] = _error(lambda: laftr.exact_fsd(make_model(seed=rank), model, X[half]))
        # arguments refused on one rank before the first collective: no wait for the group's timeout
        result["early outputs"] = _error(lambda: laftr.make_estimator("kfac").fit(
            model, X[half], outputs=[0, 1] if rank == 0 else [-1]))
        result["early distributed"] = _error(lambda: laftr.make_estimator("kfac").fit(
            model, X[half], distributed=None if rank == 0 else "yes"))
        result["early metric"] = _error(lambda: laftr.exact_fsd(model, model, X[half],
                                                                metric="l2" if rank == 0 else "L2"))
        # a rank whose data is bad: its own error there, an error naming it on the other
        bad = X[half].clone()
        if rank == 1:
            bad[3, 0] = float("nan")
        result["bad data"] = _error(lambda: laftr.make_estimator("diag-fisher").fit(model, bad))
        result["bad data exact"] = _error(lambda: laftr.exact_fsd(model, model, bad))
        # a one-shot generator on rank 1 only, for an input model that reads the data twice: refused there
        # inside the k-means sample's collectives, it left rank 0 waiting for the group's timeout (audit)
        once = iter([X[half]]) if rank == 1 else [X[half]]
        result["one-shot data"] = _error(lambda: laftr.make_estimator(
            "laftr", input_model="mixture", components=2).fit(model, once))
        # examples of another shape on rank 1 (a network that takes both): torch's cat error (audit)
        wide = torch.cat([X[half], X[half][:, :2]], 1) if rank == 1 else X[half]
        torch.manual_seed(0)
        pooled = nn.Sequential(nn.Unflatten(1, (1, -1)), nn.AdaptiveAvgPool1d(4), nn.Flatten(), nn.Linear(4, 3))
        result["shapes"] = _error(lambda: laftr.make_estimator("subset", coreset_size=6).fit(pooled, wide))
        # token ids of int32 on one rank, int64 on the other: one kind, promoted as torch.cat does
        ids = token_data()[half]
        result["id dtypes"] = state(laftr.make_estimator("subset", coreset_size=6).fit(
            token_model(), ids.int() if rank == 0 else ids))
        # Monte Carlo estimates in the group: each rank its own stream; DDP with a regularizer
        result["mc"] = mc_checks(model, (X[half], Y[half]))
        result["ddp"] = ddp_checks((X[half], Y[half]))
        # token sequences whose largest id differs between the shards (rank 0 sees ids 0..2 only)
        result["tokens-mixture"] = state(token_mixture().fit(token_model(), token_data()[half]))
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


def _walk(a: Any, b: Any, what: str, leaf: Callable[[Any, Any, str], None]) -> None:
    """``leaf`` on every pair of leaves of two equally structured dicts / tuples / lists."""
    if isinstance(b, dict):
        assert sorted(a) == sorted(b), what
        for k in b:
            _walk(a[k], b[k], f"{what}/{k}", leaf)
    elif isinstance(b, (tuple, list)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _walk(x, y, f"{what}[{i}]", leaf)
    else:
        leaf(a, b, what)


def _close_leaf(got: Any, want: Any, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if got.is_floating_point():
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13, msg=what)
    else:
        assert torch.equal(got, want), what


def _identical_leaf(a: Any, b: Any, what: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    else:
        assert a == b, what


def assert_close(got: Any, want: Any, what: str) -> None:
    """Equal up to float64 rounding, recursively through dicts and tuples."""
    _walk(got, want, what, _close_leaf)


def assert_identical(a: Any, b: Any, what: str) -> None:
    """Bit-identical, recursively."""
    _walk(a, b, what, _identical_leaf)


@pytest.mark.parametrize("name", [*FITS, "laftr-exact value", "exact", "exact grad=True", "exact_fsd_and_grad"])
def test_two_ranks_equal_one_process(ranks: list[dict[str, Any]], reference: dict[str, Any], name: str) -> None:
    assert_close(ranks[0]["shard"][name], reference[name], name)


@pytest.mark.parametrize("name", ["kfac", "diag-fisher"])
def test_a_distributed_curvature_fit_keeps_one_process_s_order(ranks: list[dict[str, Any]],
                                                                reference: dict[str, Any], name: str) -> None:
    """The reduction sorted the parameter names: a distributed diag-fisher's file listed them in another order
    than one process's, and its distance summed them in that order (audit)."""
    assert list(ranks[0]["shard"][name]) == list(reference[name])


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


def test_a_token_mixture_over_shards_of_other_vocabularies_equals_one_process(ranks: list[dict[str, Any]]) -> None:
    """Each rank took the vocabulary of the k-means sample from its own largest id: the rank whose shard saw
    ids 0..2 only failed in one_hot on the gathered sample (audit)."""
    want = state(token_mixture().fit(token_model(), token_data()))
    for r in ranks:
        assert_close(r["tokens-mixture"], want, "tokens-mixture")


@pytest.mark.parametrize(("key", "words"), [
    ("values", "the parameter values"), ("trainable", "the trainable parameters"),
    ("exact values", "model_a's values")])
def test_ranks_with_other_weights_or_frozen_layers_fail_on_every_rank(ranks: list[dict[str, Any]], key: str,
                                                                      words: str) -> None:
    """Ranks holding the same architecture with other values (weights loaded on rank 0 only) were accepted:
    each kept its own theta0 with statistics summed over both (laftr-exact 0.24 vs 0.75 on one network);
    ranks freezing different layers gave a Fisher diagonal summed with zeros (audit)."""
    assert ranks[0][key] == ranks[1][key] and ranks[0][key] is not None, key
    kind, message = ranks[0][key]
    assert kind == UsageError.__name__ and f"disagree on {words}" in message, message


@pytest.mark.parametrize(("key", "words"), [
    ("early outputs", "outputs must be non-negative"), ("early distributed", "distributed must be True"),
    ("early metric", "unknown metric 'L2'")])
def test_arguments_refused_on_one_rank_fail_every_rank_at_once(ranks: list[dict[str, Any]], key: str,
                                                               words: str) -> None:
    """A refusal before the first collective left the other rank waiting for the group's timeout (30 min by
    default), then a raw gloo error."""
    assert ranks[1][key] is not None and ranks[1][key][0] == "UsageError" and words in ranks[1][key][1]
    assert ranks[0][key] is not None and ranks[0][key][0] == "UsageError"
    assert "rank(s) [1]" in ranks[0][key][1] and words in ranks[0][key][1]


@pytest.mark.parametrize(("key", "words"), [("bad data", "NaN"), ("bad data exact", "NaN"),
                                           ("one-shot data", "reads the data twice")])
def test_a_failing_rank_fails_every_rank(ranks: list[dict[str, Any]], key: str, words: str) -> None:
    assert ranks[1][key] is not None and ranks[1][key][0] == "DataError"
    assert ranks[0][key] is not None and ranks[0][key][0] == "UsageError"
    assert "rank(s) [1]" in ranks[0][key][1] and words in ranks[0][key][1]


def test_examples_of_other_shapes_on_the_ranks_are_named(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["shapes"] is not None and r["shapes"][0] == "UsageError"
        assert "the ranks' examples differ in shape" in r["shapes"][1]
    assert_identical(ranks[0]["id dtypes"], ranks[1]["id dtypes"], "int32 and int64 ids")


def test_distributed_true_without_a_group() -> None:
    X, _ = make_data()
    with pytest.raises(UsageError, match="process group"):
        laftr.make_estimator("laftr-exact").fit(make_model(), X, distributed=True)
    with pytest.raises(UsageError, match="process group"):
        laftr.exact_fsd(make_model(), make_model(), X, distributed=True)
    with pytest.raises(UsageError, match="distributed must be"):
        laftr.exact_fsd(make_model(), make_model(), X, distributed="yes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- Monte Carlo
@pytest.fixture(scope="module")
def mc_reference() -> dict[str, Any]:
    """One process: per estimator, the estimate and gradient drawn from the streams of ranks 0 and 1."""
    X, Y = make_data()
    model = make_model()
    other = perturbed(model)
    out: dict[str, Any] = {}
    for name, est in mc_estimators(model, (X, Y)).items():
        streams = []
        for r in range(2):
            mine = copy.deepcopy(est)
            mine.config = dataclasses.replace(mine.config, seed=stream_seed(mine.config.seed, r))
            other.zero_grad()
            value = mine(other)
            streams.append(value)
        other.zero_grad()
        mean = torch.stack(streams).mean()  # the estimate with the samples of both ranks
        mean.backward()
        out[name] = {"streams": [v.detach() for v in streams], "value": mean.detach(),
                     "grad": {n: p.grad.clone() for n, p in other.named_parameters()},
                     "calls": [est(other).detach() for _ in range(2)]}
    return out


@pytest.mark.parametrize("name", list(MC))
def test_ddp_averaged_gradient_is_the_estimate_of_every_rank_s_samples(
        ranks: list[dict[str, Any]], mc_reference: dict[str, Any], name: str) -> None:
    ref = mc_reference[name]
    for r in range(2):
        got = ranks[r]["mc"][name]
        assert_close(got["value"], ref["streams"][r], f"rank {r}: its stream")
        assert_close(got["averaged value"], ref["value"], f"rank {r}: the mean of the ranks' estimates")
        assert_close(got["averaged grad"], ref["grad"], f"rank {r}: the averaged gradient")
    # the ranks drew different samples
    assert not torch.equal(ranks[0]["mc"][name]["value"], ranks[1]["mc"][name]["value"])
    # rank 0 draws what a single process draws, call after call (fixed_noise: the same samples every call)
    assert_close(ranks[0]["mc"][name]["calls"], ref["calls"], "rank 0: successive calls")
    calls = ranks[1]["mc"][name]["calls"]
    assert torch.equal(calls[0], calls[1]) == MC[name][1].get("fixed_noise", False)


@pytest.mark.parametrize("name", list(MC))
def test_distributed_false_draws_the_same_samples_on_every_rank(
        ranks: list[dict[str, Any]], mc_reference: dict[str, Any], name: str) -> None:
    a, b = ranks[0]["mc"][name]["local"], ranks[1]["mc"][name]["local"]
    assert_identical(a, b, "distributed=False")
    assert_close(a[0], mc_reference[name]["streams"][0], "distributed=False: the seed's own stream")


def test_ddp_training_step_with_a_penalty(ranks: list[dict[str, Any]]) -> None:
    """DDP around the model, loss + penalty(wrapper or module): both run and keep the ranks in step."""
    for how in ("wrapper", "module"):
        assert_identical(ranks[0]["ddp"][how], ranks[1]["ddp"][how], how)
    # the wrapper is unwrapped: the same step as passing the module (the same samples, the same gradients)
    assert_identical(ranks[0]["ddp"]["wrapper"], ranks[0]["ddp"]["module"], "wrapper vs module")
    start = make_model(seed=2)
    moved = [not torch.equal(p + 0.05, ranks[0]["ddp"]["module"][n]) for n, p in start.named_parameters()]
    assert all(moved)


def test_distance_of_a_wrapper_outside_a_group() -> None:
    """``est(DataParallel(model))`` is ``est(model)`` (no group needed); distributed=True needs one."""
    X, Y = make_data()
    model = make_model()
    est = laftr.make_estimator("laftr", num_samples=4).fit(torch.nn.DataParallel(model), (X, Y))
    other = perturbed(model)
    assert torch.equal(copy.deepcopy(est)(torch.nn.DataParallel(other)), copy.deepcopy(est)(other))
    with pytest.raises(UsageError, match="process group"):
        est(other, distributed=True)
