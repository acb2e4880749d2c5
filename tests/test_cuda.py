"""The GPU path: every estimator, the exact FSD, the regularizer, persistence, the command line and a process
group on a CUDA device, against the same computation on the CPU (float64).

Every test here is marked ``cuda`` and skipped where CUDA is missing (``pytest -m cuda`` runs them alone).
``LAFTR_TEST_DEVICE`` names another device to run them on (``cpu`` checks the tests themselves on a machine
without a GPU: each comparison is then of the CPU with itself).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from cases import SmallCNN, TinyResNet, mlp, perturbed, randomize_bn
from torch import nn

import laftr
from laftr.cli import main
from laftr.continual import FSDRegularizer
from laftr.errors import UsageError
from laftr.models import transformer, vit

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("float64")]

DEV = torch.device(os.environ.get("LAFTR_TEST_DEVICE", "cuda"))
CPU = torch.device("cpu")
#: float64 results of the same computation on two devices differ by summation order only
TOL: dict[str, Any] = {"rtol": 1e-9, "atol": 1e-12}

#: (estimator, options) whose fit and evaluation draw nothing: equal on both devices
DETERMINISTIC: list[tuple[str, dict[str, Any]]] = [
    ("laftr-exact", {}),
    ("laftr-exact", {"input_model": "diag"}),
    ("laftr-exact", {"input_model": "lowrank", "rank": 3}),
    ("laftr-exact", {"input_model": "classwise"}),
    ("laftr-exact", {"input_model": "mixture", "components": 2, "mixture_sample": 40}),
    ("liftr-exact", {}),
    ("liftr-exact", {"input_model": "diag"}),
    ("weight", {}),
    ("diag-fisher", {"fisher": "exact"}),
    ("kfac", {"fisher": "exact"}),
    ("ntk", {"coreset_size": 20}),
    ("subset", {"coreset_size": 30}),
]
IDS = [name + "".join(f"-{v}" for v in opts.values()) for name, opts in DETERMINISTIC]


def _data(n: int = 120, shape: tuple[int, ...] = (5,), classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g)


def _on(data: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in data)


def _value_and_grads(est: laftr.FSDEstimator, model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``est(model)`` and its gradient w.r.t. every parameter, on the CPU."""
    model.zero_grad(set_to_none=True)
    d = est(model)
    d.backward()
    return d.detach().cpu(), [p.grad.detach().cpu() for p in model.parameters() if p.grad is not None]


def _both(name: str, opts: dict[str, Any], model: nn.Module, other: nn.Module, data: tuple[torch.Tensor, ...],
          metric: str | None = None) -> tuple[Any, Any]:
    """(value, grads) of one estimator fitted and evaluated on the CPU, then on ``DEV`` (default metric: l2 for
    the closed forms, kl for the rest)."""
    metric = metric or ("l2" if name.endswith("-exact") else "kl")
    out = []
    for device in (CPU, DEV):
        est = laftr.make_estimator(name, metric=metric, seed=0, **opts)
        est.fit(copy.deepcopy(model).to(device), _on(data, device))
        theta = copy.deepcopy(other).to(device)
        out.append(_value_and_grads(est, theta))
        assert est(theta).device.type == DEV.type or device == CPU
    return out[0], out[1]


def _assert_same(a: tuple[torch.Tensor, list[torch.Tensor]], b: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    torch.testing.assert_close(b[0], a[0], **TOL)
    assert len(a[1]) == len(b[1]) > 0
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(gb, ga, **TOL)


# ------------------------------------------------------------------------------------------ estimators
@pytest.mark.parametrize("second", [False, True])
@pytest.mark.parametrize("name,opts", DETERMINISTIC, ids=IDS)
def test_deterministic_estimators_equal_the_cpu_on_an_mlp(name, opts, second):
    """Metrics l2, and mse (closed forms) or kl (the rest)."""
    metric = "l2" if not second else "mse" if name.endswith("-exact") else "kl"
    model = mlp()
    cpu, dev = _both(name, opts, model, perturbed(model), _data(), metric)
    _assert_same(cpu, dev)
    assert cpu[0] > 0


@pytest.mark.parametrize("name,opts", [("laftr-exact", {}), ("laftr-exact", {"input_model": "coreset",
                                                                            "coreset_size": 20}),
                                       ("kfac", {"fisher": "exact", "unsupported": "diag"}),
                                       ("diag-fisher", {"fisher": "exact"})])
@pytest.mark.parametrize("net", ["cnn", "resnet"])
def test_conv_nets_with_batch_norm_and_pooling_equal_the_cpu(net, name, opts):
    """Convolutions, eval batch norm, average pooling and a residual block (the closed form has no max pool)."""
    torch.manual_seed(0)
    model = SmallCNN(maxpool=False) if net == "cnn" else TinyResNet()
    randomize_bn(model, torch.Generator().manual_seed(2))
    model.eval()
    data = _data(40, (1, 6, 6) if net == "cnn" else (1, 8, 8))
    cpu, dev = _both(name, opts, model, perturbed(model, 0.05), data)
    _assert_same(cpu, dev)


@pytest.mark.parametrize("name,opts", [("laftr", {}), ("laftr", {"input_model": "classwise"}),
                                       ("laftr", {"input_model": "coreset", "coreset_size": 30}),
                                       ("laftr", {"input_model": "mixture", "components": 2, "mixture_sample": 40}),
                                       ("liftr", {})])
def test_monte_carlo_estimators_average_to_the_closed_form_on_the_device(name, opts):
    """The device's own random streams: seeded draws repeat, and their mean is the closed form's value."""
    model, data = mlp(), _data()
    other = perturbed(model)
    m0, theta, d = copy.deepcopy(model).to(DEV), copy.deepcopy(other).to(DEV), _on(data, DEV)
    exact = laftr.make_estimator(name + "-exact", metric="l2", **opts).fit(m0, d)(theta).item()
    vals = []
    for seed in range(10):
        est = laftr.make_estimator(name, metric="l2", num_samples=4000, seed=seed, **opts).fit(m0, d)
        v = est(theta)
        assert v.device.type == DEV.type
        vals.append(v.item())
        if seed == 0:  # the same seed on the same device: the same samples (GPU sums in any order)
            again = laftr.make_estimator(name, metric="l2", num_samples=4000, seed=0, **opts).fit(m0, d)
            torch.testing.assert_close(again(theta), v, **TOL)
    mean = sum(vals) / len(vals)
    se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / len(vals))
    assert abs(mean - exact) < 5 * se + 1e-9 * exact, (mean, se, exact)


def test_kept_draws_run_theta_alone_on_the_device(monkeypatch):
    """sample_pool on the device: the calls that run theta's stream alone from theta0's kept outputs equal
    passes over both streams on the same draw (values and gradients)."""
    from laftr.graph import TracedNet

    model, data = mlp(), _data()
    m0, d = copy.deepcopy(model).to(DEV), _on(data, DEV)
    thetas = [perturbed(model, 0.1, seed=s).to(DEV) for s in range(5)]

    def run(est):
        out = []
        for t in thetas:
            t.zero_grad(set_to_none=True)
            v = est(t)
            v.backward()
            out.append((v.detach(), [p.grad.clone() for p in t.parameters()]))
        return out

    kept = run(laftr.make_estimator("laftr", num_samples=16, seed=1, sample_pool=48).fit(m0, d))
    monkeypatch.setattr(TracedNet, "sample_separable", lambda self, mode: False)
    paired = run(laftr.make_estimator("laftr", num_samples=16, seed=1, sample_pool=48).fit(m0, d))
    for (a, ga), (b, gb) in zip(kept, paired, strict=True):
        assert a.device.type == DEV.type
        torch.testing.assert_close(a, b, **TOL)
        for x, y in zip(ga, gb, strict=True):
            torch.testing.assert_close(x, y, **TOL)


def test_sampled_fisher_baselines_draw_on_the_device():
    model, data = mlp(), _data()
    for name in ("diag-fisher", "kfac"):
        est = laftr.make_estimator(name, fisher="mc", seed=0).fit(copy.deepcopy(model).to(DEV), data[0].to(DEV))
        d = est(perturbed(model).to(DEV))
        assert d.device.type == DEV.type and torch.isfinite(d) and d > 0


def test_transformer_estimators_equal_the_cpu():
    """A small decoder transformer on integer tokens (embedding, LayerNorm, causal attention, GELU)."""
    torch.manual_seed(0)
    V, L = 7, 4
    model = transformer(V, L, 3, d_model=8, heads=2, blocks=1, d_mlp=16)
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randint(0, V, (60, L), generator=g), torch.randint(0, 3, (60,), generator=g)
    other = perturbed(model, 0.05)
    for name, opts in [("kfac", {"fisher": "exact", "unsupported": "diag"}), ("diag-fisher", {"fisher": "exact"}),
                       ("subset", {"coreset_size": 20}), ("ntk", {"coreset_size": 10})]:
        cpu, dev = _both(name, opts, model, other, (X, Y))
        _assert_same(cpu, dev)
    for name in ("laftr", "liftr"):  # Monte Carlo only (attention has no closed form): zero at theta0, finite
        est = laftr.make_estimator(name, input_model="tokens", num_samples=64, seed=0)
        est.fit(copy.deepcopy(model).to(DEV), (X.to(DEV), Y.to(DEV)))
        assert abs(float(est(copy.deepcopy(model).to(DEV)))) < 1e-12
        d = est(copy.deepcopy(other).to(DEV))
        assert d.device.type == DEV.type and torch.isfinite(d) and d > 0


def test_recurrent_estimators_equal_the_cpu():
    """An embedding and a 2-layer LSTM (the recurrent rule's step-by-step pass): theta0's own linearization on a
    coreset of every input and the deterministic baselines equal the CPU; the sampled laws run on the device."""
    torch.manual_seed(0)
    V, L = 7, 4
    model = laftr.models.lstm(V, 3, d_model=6, layers=2)
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randint(0, V, (40, L), generator=g), torch.randint(0, 3, (40,), generator=g)
    other = perturbed(model, 0.05)
    for name, opts in [("laftr", {"gates": "relu", "input_model": "coreset", "coreset_size": 40,
                                  "num_samples": 40}),
                       ("kfac", {"fisher": "exact", "unsupported": "diag"}), ("diag-fisher", {"fisher": "exact"}),
                       ("subset", {"coreset_size": 20}), ("ntk", {"coreset_size": 10})]:
        cpu, dev = _both(name, opts, model, other, (X, Y))
        _assert_same(cpu, dev)
    est = laftr.make_estimator("laftr", input_model="tokens", num_samples=64, seed=0)
    est.fit(copy.deepcopy(model).to(DEV), (X.to(DEV), Y.to(DEV)))
    assert abs(float(est(copy.deepcopy(model).to(DEV)))) < 1e-12
    d = est(copy.deepcopy(other).to(DEV))
    assert d.device.type == DEV.type and torch.isfinite(d) and d > 0


# ------------------------------------------------------------------------------------------ the exact FSD
def test_exact_fsd_and_its_gradient_equal_the_cpu():
    model, (X, _) = mlp(), _data()
    other = perturbed(model)
    m_dev, o_dev = copy.deepcopy(model).to(DEV), copy.deepcopy(other).to(DEV)
    for metric in ("l2", "kl"):
        cpu = laftr.exact_fsd(model, other, X, metric=metric, batch_size=32)
        dev = laftr.exact_fsd(m_dev, o_dev, X.to(DEV), metric=metric, batch_size=32)
        assert dev.device.type == DEV.type
        torch.testing.assert_close(dev.cpu(), cpu, **TOL)
        v_cpu, g_cpu = laftr.exact_fsd_and_grad(model, other, X, metric=metric)
        v_dev, g_dev = laftr.exact_fsd_and_grad(m_dev, o_dev, X, metric=metric)  # CPU data
        torch.testing.assert_close(v_dev.cpu(), v_cpu, **TOL)
        assert g_dev.keys() == g_cpu.keys()
        for name, g in g_cpu.items():
            torch.testing.assert_close(g_dev[name].cpu(), g, **TOL)
    # theta0 on the CPU, theta on the device: each network runs where it lives
    mixed = laftr.exact_fsd(model, o_dev, X)
    torch.testing.assert_close(mixed.cpu(), laftr.exact_fsd(model, other, X), **TOL)


# ------------------------------------------------------------------------------------------ training with the penalty
def test_regularized_training_on_the_device_follows_the_cpu():
    """Three SGD steps on a task loss plus the laftr-exact penalty: the same parameters on both devices."""
    model, (X, Y) = mlp(), _data()
    nets = []
    for device in (CPU, DEV):
        reg = FSDRegularizer(lambda: laftr.make_estimator("laftr-exact", metric="l2"), lam=3.0)
        net = copy.deepcopy(model).to(device)
        reg.after_task(net, (X.to(device), Y.to(device)))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for step in range(3):
            b = slice(20 * step, 20 * step + 20)
            opt.zero_grad()
            loss = F.cross_entropy(net(X[b].to(device)), (Y[b] + 1).remainder(3).to(device)) + reg.penalty(net)
            loss.backward()
            opt.step()
        nets.append(net)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), **TOL)
    assert not torch.equal(nets[0][0].weight, model[0].weight)


def test_laftr_penalty_backward_under_a_ddp_wrapper_on_the_device(tmp_path):
    """One process group of one rank (NCCL on a GPU): the DDP-wrapped model's penalty equals the bare one's."""
    from torch.nn.parallel import DistributedDataParallel

    model, (X, Y) = mlp(), _data()
    with _group(tmp_path):
        reg = FSDRegularizer(lambda: laftr.make_estimator("laftr", num_samples=16, seed=0, fixed_noise=True),
                             lam=1.0, distributed=False)
        net = copy.deepcopy(model).to(DEV)
        reg.after_task(net, (X.to(DEV), Y.to(DEV)))
        moved = perturbed(model).to(DEV)
        bare = reg.penalty(moved)
        ddp = DistributedDataParallel(moved, device_ids=[DEV.index] if DEV.type == "cuda" else None)
        wrapped = reg.penalty(ddp)
        torch.testing.assert_close(wrapped, bare, rtol=0, atol=0)
        wrapped.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in moved.parameters())


# ------------------------------------------------------------------------------------------ process group
class _group:
    """A process group of one rank (NCCL on a GPU, gloo on the CPU) for the ``with`` block."""

    def __init__(self, tmp_path: Any) -> None:
        self.path = tmp_path / "store"

    def __enter__(self) -> None:
        if DEV.type == "cuda":
            torch.cuda.set_device(DEV.index or 0)
        backend = "nccl" if DEV.type == "cuda" else "gloo"
        if not dist.is_available() or not dist.is_backend_available(backend):
            pytest.skip(f"torch.distributed has no {backend} backend here")
        dist.init_process_group(backend, init_method=f"file://{self.path}", rank=0, world_size=1)

    def __exit__(self, *exc: Any) -> None:
        dist.destroy_process_group()


@pytest.mark.parametrize("name,opts", [("laftr-exact", {}), ("laftr-exact", {"input_model": "mixture",
                                                                            "components": 2,
                                                                            "mixture_sample": 40}),
                                       ("laftr", {"input_model": "coreset", "coreset_size": 20}),
                                       ("kfac", {"fisher": "exact"}), ("ntk", {"coreset_size": 20,
                                                                              "selection": "balanced"}),
                                       ("liftr", {"input_model": "tokens", "num_samples": 8})])
def test_fits_reduced_over_a_process_group_equal_local_fits(tmp_path, name, opts):
    """The collectives (all-reduced sums, gathered coreset candidates) run on the device's backend."""
    if opts.get("input_model") == "tokens":
        torch.manual_seed(0)
        model = transformer(6, 3, 3, d_model=8, heads=2, blocks=1, d_mlp=16).to(DEV)
        g = torch.Generator().manual_seed(0)
        data: tuple[torch.Tensor, ...] = (torch.randint(0, 6, (50, 3), generator=g),
                                          torch.randint(0, 3, (50,), generator=g))
    else:
        model, data = mlp().to(DEV), _data()
    data = _on(data, DEV)
    other = perturbed(model.cpu(), 0.05).to(DEV)
    model = model.to(DEV)
    local = laftr.make_estimator(name, seed=0, **opts).fit(model, data, distributed=False)
    with _group(tmp_path):
        grouped = laftr.make_estimator(name, seed=0, **opts).fit(model, data, distributed=True)
        if name in ("laftr", "liftr"):  # rank 0 of a group draws the single process's samples
            pair = (local.distance(other, distributed=False), grouped.distance(other, distributed=True))
        else:
            pair = (local(other), grouped(other))
        exact = (laftr.exact_fsd(model, other, data[0], distributed=False),
                 laftr.exact_fsd(model, other, data[0], distributed=True))
    torch.testing.assert_close(pair[1], pair[0], **TOL)
    torch.testing.assert_close(exact[1], exact[0], **TOL)


# ------------------------------------------------------------------------------------------ persistence
def test_summaries_move_between_devices(tmp_path):
    model, data = mlp(), _data()
    other = perturbed(model)
    for name, opts in [("laftr-exact", {"metric": "l2"}), ("laftr", {"num_samples": 32}),
                       ("kfac", {"fisher": "exact"})]:
        on_dev = laftr.make_estimator(name, seed=0, **opts).fit(copy.deepcopy(model).to(DEV), _on(data, DEV))
        want = on_dev(copy.deepcopy(other).to(DEV))
        laftr.save(on_dev, tmp_path / f"{name}.laftr")
        back = laftr.load(tmp_path / f"{name}.laftr")  # default: the CPU
        assert all(t.device == CPU for t in back._state()[0].values())
        got = back(copy.deepcopy(other))
        if name == "laftr":  # the CPU's stream draws other samples: compare on the device it was fitted on;
            # the sampling factors are solved on the host, so the file's numbers and seed fix the samples
            got = laftr.load(tmp_path / f"{name}.laftr", device=DEV)(copy.deepcopy(other).to(DEV))
        torch.testing.assert_close(got.cpu(), want.cpu(), **TOL)
        # an estimator fitted on the CPU evaluates a network on the device (theta0 follows the network)
        cpu_fit = laftr.make_estimator(name, seed=0, **opts).fit(copy.deepcopy(model), data)
        on_cpu = cpu_fit(copy.deepcopy(other))
        if name != "laftr":
            torch.testing.assert_close(cpu_fit(copy.deepcopy(other).to(DEV)).cpu(), on_cpu, **TOL)


# ------------------------------------------------------------------------------------------ command line
def test_cli_summarize_and_distance_on_the_device(tmp_path, capsys):
    model, (X, Y) = mlp(), _data()
    other = perturbed(model, 0.3)
    torch.save(model, tmp_path / "net0.pt")
    torch.save(other, tmp_path / "net1.pt")
    torch.save((X, Y), tmp_path / "data.pt")
    out = {}
    for i, device in enumerate(("cpu", str(DEV))):
        f = tmp_path / f"{i}.laftr"
        assert main(["summarize", "--model", str(tmp_path / "net0.pt"), "--trust-pickle", "--tensors",
                     str(tmp_path / "data.pt"), "--estimator", "laftr-exact", "--metric", "l2", "--out", str(f),
                     "--no-progress",
                     "--device", device]) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert main(["distance", str(f), "--model", str(tmp_path / "net1.pt"), "--trust-pickle", "--tensors",
                     str(tmp_path / "data.pt"), "--calls", "1", "--device", device]) == 0
        out[i] = capsys.readouterr().out
        est = laftr.load(f)
        ref = laftr.make_estimator("laftr-exact", metric="l2").fit(model, (X, Y))
        torch.testing.assert_close(est(other), ref(other), **TOL)
    assert [line.split(";")[0] for line in out[0].splitlines()] == [line.split(";")[0] for line in
                                                                     out[1].splitlines()]  # the printed values


def test_one_gpu_named_for_several_processes_is_refused(monkeypatch):
    if DEV.type != "cuda":
        pytest.skip("a CUDA check")
    from laftr.cli.common import run_device

    with pytest.raises(UsageError, match="names one GPU for all 2 processes"):
        run_device("cuda:0", 2)
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(UsageError, match="LOCAL_RANK"):
        run_device("cuda", 2)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert run_device("cuda", 2) == torch.device("cuda", 0)


def test_continual_cli_runs_on_the_device(tmp_path, capsys):
    from test_continual import write_mnist

    torch.set_default_dtype(torch.float32)  # the benchmark's networks and data are float32
    data = write_mnist(tmp_path / "mnist")
    rc = main(["continual", "--benchmark", "split-mnist", "--methods", "none,laftr,kfac", "--seeds", "1",
               "--quick", "--data-dir", str(data), "--out", str(tmp_path / "out"), "--no-progress",
               "--n-train", "60", "--threads", "1", "--device", str(DEV)])
    assert rc == 0, capsys.readouterr().err
    import json

    md = json.loads((tmp_path / "out" / "results.json").read_text())["metadata"]
    assert md["device"].startswith(DEV.type)


def test_tf32_rounding_is_not_taken_for_mixing_examples():
    """cuDNN's TF32 convolutions round differently for different batch sizes (relative 1e-3): the probe that
    refuses networks mixing the examples of a batch runs at full float32 precision, and restores the flags."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    model = vit(d_model=32, heads=2, blocks=1, d_mlp=32).to(DEV)
    X = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(DEV)
    old = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    try:
        est = laftr.make_estimator("laftr", num_samples=8).fit(model, X)
        assert torch.isfinite(est(model)) and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cudnn.allow_tf32 = old[0]
        torch.set_float32_matmul_precision(old[1])
