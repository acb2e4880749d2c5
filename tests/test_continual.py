"""Continual learning: task streams, metrics, the FSD regularizer, the loop, the method table and the CLI.

Everything runs on tiny synthetic data in the standard file formats (IDX for MNIST, python pickles for
CIFAR), so the whole file takes well under a minute on two CPU cores.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import laftr
from laftr.cli import main
from laftr.cli.continual import DEFAULT_METHODS
from laftr.continual import (
    METHODS,
    FSDRegularizer,
    TrainConfig,
    average_accuracy,
    backward_transfer,
    parse_method,
    parse_methods,
    run_method,
)
from laftr.continual.metrics import mean_std
from laftr.continual.runner import ContinualSettings, run_benchmark
from laftr.data import Dataset, DatasetNotFoundError, write_idx
from laftr.data.tasks import permuted_tasks, split_cifar_tasks, split_tasks
from laftr.errors import UsageError

# ------------------------------------------------------------------ synthetic data


def _images(n: int, classes: int, side: int, channels: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images with a class-dependent bright block on noise, so tasks are learnable."""
    y = rng.integers(0, classes, size=n)
    x = rng.integers(0, 60, size=(n, channels, side, side))
    cells = math.ceil(math.sqrt(classes))
    step = side // cells
    for i, c in enumerate(y):
        r, q = divmod(int(c), cells)
        x[i, :, r * step : (r + 1) * step, q * step : (q + 1) * step] += 180
    return x.clip(0, 255).astype(np.uint8), y.astype(np.uint8)


def _tiny_dataset(n_train: int = 120, n_test: int = 60, classes: int = 10, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    xt, yt = _images(n_train, classes, 8, 1, rng)
    xe, ye = _images(n_test, classes, 8, 1, rng)
    f = lambda a: torch.from_numpy(a.astype(np.float32) / 255)
    return Dataset(f(xt), torch.from_numpy(yt.astype(np.int64)), f(xe), torch.from_numpy(ye.astype(np.int64)),
                   name="tiny", num_classes=classes)


def write_mnist(folder: Path, n_train: int = 300, n_test: int = 100) -> Path:
    rng = np.random.default_rng(3)
    xt, yt = _images(n_train, 10, 28, 1, rng)
    xe, ye = _images(n_test, 10, 28, 1, rng)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", xt[:, 0])
    write_idx(folder / "train-labels-idx1-ubyte.gz", yt)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", xe[:, 0])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", ye)
    return folder


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar(root: Path, per_batch: int = 20, n100: int = 300) -> Path:
    """Tiny cifar-10-batches-py/ and cifar-100-python/ folders in the python-pickle format."""
    rng = np.random.default_rng(4)
    for i in range(1, 6):
        x, y = _images(per_batch, 10, 32, 3, rng)
        _pickle(root / "cifar-10-batches-py" / f"data_batch_{i}", {b"data": x.reshape(per_batch, -1),
                                                                   b"labels": [int(v) for v in y]})
    x, y = _images(40, 10, 32, 3, rng)
    _pickle(root / "cifar-10-batches-py" / "test_batch", {b"data": x.reshape(40, -1), b"labels": [int(v) for v in y]})
    for split, n in (("train", n100), ("test", n100 // 2)):
        x, y = _images(n, 100, 32, 3, rng)
        # make sure every one of the first 50 classes appears (5 ten-class tasks)
        y[:50] = np.arange(50)
        _pickle(root / "cifar-100-python" / split, {b"data": x.reshape(n, -1), b"fine_labels": [int(v) for v in y],
                                                     b"coarse_labels": [int(v) // 5 for v in y]})
    return root


# ------------------------------------------------------------------ task streams


def test_split_tasks_heads_targets_and_validation():
    ds = _tiny_dataset()
    s = split_tasks(ds)
    assert len(s) == 5 and s.multi_head and s.num_outputs == 10
    for t, task in enumerate(s):
        assert task.outputs == [2 * t, 2 * t + 1] and task.classes == [2 * t, 2 * t + 1]
        # local targets map back to the original labels of exactly the task's examples
        orig = ds.y_train[torch.isin(ds.y_train, torch.tensor(task.classes))]
        assert torch.equal(torch.tensor(task.classes)[task.y_train], orig)
        assert set(task.y_eval.tolist()) <= {0, 1}
    # the validation split is carved from the training data and is disjoint from what is trained on
    v = split_tasks(ds, split="val", val_fraction=0.25, seed=1)
    for tv, tt in zip(v, s):
        assert len(tv.x_train) + len(tv.x_eval) == len(tt.x_train)
        rows = {tuple(r.tolist()) for r in tt.x_train.flatten(1)}
        ev = [tuple(r.tolist()) for r in tv.x_eval.flatten(1)]
        tr = {tuple(r.tolist()) for r in tv.x_train.flatten(1)}
        assert all(r in rows for r in ev) and not (set(ev) & tr)
    sub = split_tasks(ds, [[3, 7, 1], [0, 2]], n_train=5, seed=2)
    assert sub.num_outputs == 5 and sub[1].outputs == [3, 4] and all(t.n_train <= 5 for t in sub)
    assert torch.equal(split_tasks(ds, n_train=5, seed=2)[0].x_train, split_tasks(ds, n_train=5, seed=2)[0].x_train)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"class_groups": [[0, 1], [1, 2]]}, "overlap"),
        ({"class_groups": [[0]]}, "at least two"),
        ({"class_groups": [[0, 10]]}, "0..9"),
        ({"split": "train"}, "split"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"n_train": 0}, "n_train"),
    ],
)
def test_split_tasks_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_tasks(_tiny_dataset(), **kwargs)


def test_permuted_tasks():
    ds = _tiny_dataset()
    s = permuted_tasks(ds, 4, seed=5)
    assert len(s) == 4 and not s.multi_head and s.num_outputs == 10
    assert s[0].perm is None and all(t.outputs == list(range(10)) for t in s)
    perms = [t.perm for t in s.tasks[1:]]
    for p in perms:
        assert torch.equal(p.sort().values, torch.arange(64))
    assert not torch.equal(perms[0], perms[1])
    x, y = s[2].train_batch(torch.tensor([0, 3]))
    assert torch.equal(x.flatten(1), ds.x_train[[0, 3]].flatten(1)[:, perms[1]]) and torch.equal(y, ds.y_train[[0, 3]])
    assert x.shape == (2, 1, 8, 8)
    # same seed, same stream; other seed, other permutations
    assert torch.equal(permuted_tasks(ds, 4, seed=5)[3].perm, s[3].perm)
    assert not torch.equal(permuted_tasks(ds, 4, seed=6)[3].perm, s[3].perm)
    with pytest.raises(ValueError, match="num_tasks"):
        permuted_tasks(ds, 0)


def test_split_cifar_stream_from_pickles(tmp_path):
    root = write_cifar(tmp_path)
    s = split_cifar_tasks(root)
    assert len(s) == 6 and s.num_outputs == 60 and s.multi_head
    assert s[0].outputs == list(range(10)) and s[0].n_train == 100
    assert s[3].outputs == list(range(30, 40)) and s[3].classes == list(range(20, 30))
    assert s.input_shape == (3, 32, 32)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        split_cifar_tasks(None)
    with pytest.raises(DatasetNotFoundError, match="test_batch"):
        (root / "cifar-10-batches-py" / "test_batch").unlink()
        split_cifar_tasks(root)


# ------------------------------------------------------------------ metrics


def test_accuracy_metrics():
    A = [[0.9, 0.1, 0.0], [0.7, 0.8, 0.2], [0.6, 0.5, 1.0]]
    assert average_accuracy(A) == pytest.approx((0.6 + 0.5 + 1.0) / 3)
    assert average_accuracy(A, after=1) == pytest.approx(0.75)
    assert backward_transfer(A) == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert backward_transfer([[0.5]]) == 0.0
    with pytest.raises(ValueError, match="square"):
        backward_transfer([[0.9, 0.1]])
    ms = mean_std([1.0, 2.0, 3.0])
    assert ms["mean"] == 2.0 and ms["std"] == pytest.approx(1.0) and ms["n"] == 3


# ------------------------------------------------------------------ the regularizer


def _mlp(d_in=64, out=4, seed=0):
    torch.manual_seed(seed)
    return laftr.models.mlp(d_in, (16, 12), out).double()


def _xy(n, d=64, classes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def test_regularizer_penalty_is_lam_times_mean_of_estimates():
    model = _mlp()
    reg = FSDRegularizer(lambda: laftr.make_estimator("laftr-exact"), lam=2.5)
    assert float(reg.penalty(model)) == 0.0 and len(reg) == 0
    heads = [[0, 1], [2, 3], [0, 3]]
    for j, outs in enumerate(heads):
        reg.after_task(model, _xy(50, seed=j), outputs=outs)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    assert len(reg) == 3 and all(e.outputs == h for e, h in zip(reg.estimators, heads))
    pen = reg.penalty(model)
    direct = [e(model) for e in reg.estimators]
    assert all(float(d.detach()) > 0 for d in direct)
    torch.testing.assert_close(pen, 2.5 * torch.stack(direct).mean())
    pen.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert reg.stored_floats() == [e.stored_floats() for e in reg.estimators]
    # one old task per step: the penalty is lam times one of the three estimates, and all get drawn
    sub = FSDRegularizer(None, lam=2.5, tasks_per_step=1, seed=0)
    for e in reg.estimators:
        sub.add(e)
    seen = set()
    for _ in range(30):
        v = float(sub.penalty(model).detach())
        k = min(range(3), key=lambda i: abs(v - 2.5 * float(direct[i])))
        assert v == pytest.approx(2.5 * float(direct[k]), rel=1e-9)
        seen.add(k)
    assert seen == {0, 1, 2}


def test_regularizer_every_k_steps_is_k_times_the_penalty_on_every_kth_call():
    model = _mlp()
    est = laftr.make_estimator("laftr-exact").fit(model, _xy(50))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    full = float(est(model).detach())
    reg = FSDRegularizer(None, lam=2.0, every=3)
    assert float(reg.penalty(model)) == 0.0  # nothing stored: not counted as a step
    reg.add(est)
    got = [reg.penalty(model) for _ in range(9)]
    assert [float(g.detach()) for g in got] == pytest.approx([0, 0, 6 * full] * 3, rel=1e-12)
    assert not got[0].requires_grad and got[2].requires_grad
    assert sum(float(g.detach()) for g in got) / 9 == pytest.approx(2.0 * full, rel=1e-12)  # the same mean
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="every"):
            FSDRegularizer(None, every=bad)
    assert parse_method("laftr[penalty_every=2]").penalty_every == 2 and parse_method("laftr").penalty_every == 1
    for spec in ("laftr[penalty_every=0]", "laftr[penalty_every=1.5]", "laftr[tasks_per_step=0]"):
        with pytest.raises(ValueError, match="must be an integer >= 1"):  # at parse time, before any run
            parse_method(spec)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _nudge(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_regularizer_refresh_reuses_the_fresh_estimates_gradient_in_between():
    model = _mlp()
    est = laftr.make_estimator("laftr-exact").fit(model, _xy(50))
    _nudge(model, 0.05, 1)
    reg = FSDRegularizer(None, lam=2.0, refresh=3)
    assert float(reg.penalty(model)) == 0.0  # nothing stored: not counted as a call
    reg.add(est)
    for cycle in range(2):
        # a fresh call: the estimate's value and gradient, exactly
        model.zero_grad()
        fresh = reg.penalty(model)
        fresh.backward()
        g_r = _grads(model)
        model.zero_grad()
        exact = 2.0 * est(model)
        exact.backward()
        assert float(fresh.detach()) == pytest.approx(float(exact.detach()), rel=1e-12)
        torch.testing.assert_close(g_r, _grads(model), rtol=1e-12, atol=0)
        theta_r = [p.detach().clone() for p in model.parameters()]
        for k in range(2):  # the two calls in between: value + g_r . (theta - theta_r), gradient g_r
            _nudge(model, 0.01, 10 * cycle + k)
            model.zero_grad()
            stale = reg.penalty(model)
            stale.backward()
            torch.testing.assert_close(_grads(model), g_r, rtol=0, atol=0)
            step = float(g_r @ torch.cat([(p.detach() - p0).flatten() for p, p0 in
                                          zip(model.parameters(), theta_r)]))
            assert float(stale.detach()) == pytest.approx(float(exact.detach()) + step, rel=1e-12)
            assert float(stale.detach()) != pytest.approx(2.0 * float(est(model).detach()), rel=1e-6)
    # a new task: the next call is estimated afresh, with it (not the expansion of the fresh call just before)
    reg.penalty(model)
    est2 = laftr.make_estimator("laftr-exact").fit(model, _xy(50, seed=3))
    reg.add(est2)
    _nudge(model, 0.01, 99)
    both = 2.0 * torch.stack([est(model), est2(model)]).mean()
    assert float(reg.penalty(model).detach()) == pytest.approx(float(both.detach()), rel=1e-12)
    # frozen parameters get no gradient from it
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    first.weight.requires_grad_(False)
    reg2 = FSDRegularizer(None, lam=1.0, refresh=2)
    reg2.add(est)
    model.zero_grad()
    reg2.penalty(model).backward()
    assert first.weight.grad is None and first.bias.grad is not None
    first.weight.requires_grad_(True)
    # the second call of the cycle, with a parameter more than the fresh one had: estimated afresh (was an
    # error; a swap of which same-shaped layer is frozen applied one layer's gradient to another)
    model.zero_grad()
    again = reg2.penalty(model)
    again.backward()
    assert float(again.detach()) == pytest.approx(float(est(model).detach()), rel=1e-12)
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    # bad settings, at construction or when the method is parsed
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="refresh"):
            FSDRegularizer(None, refresh=bad)
    with pytest.raises(ValueError, match="set one of them"):
        FSDRegularizer(None, every=2, refresh=2)
    assert parse_method("laftr[penalty_refresh=4]").penalty_refresh == 4
    assert parse_method("laftr").penalty_refresh == 1
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        parse_method("laftr[penalty_refresh=0]")
    with pytest.raises(ValueError, match="set one of them"):
        parse_method("laftr[penalty_refresh=2,penalty_every=2]")


@pytest.mark.parametrize("lam", [-1.0, float("nan"), float("inf"), "big"])
def test_regularizer_bad_lam(lam):
    with pytest.raises(ValueError, match="lam"):
        FSDRegularizer(lambda: laftr.make_estimator("laftr"), lam=lam)


def test_regularizer_bad_use():
    # checked like every and the method keys: 1.5 was silently truncated to 1, True read as 1
    for bad in (0, -1, 1.5, 2.0, True, "2"):
        with pytest.raises(ValueError, match="tasks_per_step must be an integer >= 1 or None"):
            FSDRegularizer(None, tasks_per_step=bad)
    assert FSDRegularizer(None, tasks_per_step=np.int64(2)).tasks_per_step == 2
    assert FSDRegularizer(None, tasks_per_step=None).tasks_per_step is None
    with pytest.raises(RuntimeError, match="factory"):
        FSDRegularizer(None).after_task(_mlp(), _xy(10))
    with pytest.raises(ValueError, match="not fitted"):
        FSDRegularizer(None).add(laftr.make_estimator("laftr"))
    with pytest.raises(TypeError, match="FSDEstimator"):
        FSDRegularizer(lambda: object()).after_task(_mlp(), _xy(10))  # type: ignore[arg-type,return-value]


def test_regularizer_audit_findings():
    # a factory, not an estimator (an instance failed only at after_task, after the first task had trained)
    for bad in (laftr.make_estimator("laftr"), "laftr"):
        with pytest.raises(ValueError, match="make must build a fresh estimator for each task"):
            FSDRegularizer(bad)
    with pytest.raises(ValueError, match="add\\(\\) takes a fitted laftr estimator, got str"):
        FSDRegularizer(None).add("laftr")
    with pytest.raises(ValueError, match="penalty\\(\\) takes the network"):
        FSDRegularizer(None).penalty(torch.zeros(3))
    # each submodule's mode is restored (a BatchNorm frozen in eval mode inside a training model was set to train)
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    model.train()
    model[1].eval()
    reg = FSDRegularizer(None, lam=1.0)
    reg.add(laftr.make_estimator("laftr", num_samples=4).fit(model, _xy(30)))
    reg.penalty(model)
    assert model.training and not model[1].training
    # refresh: a model moved to another dtype is estimated afresh (the expansion stayed in the old dtype)
    net32 = _mlp().float()
    reg = FSDRegularizer(None, lam=1.0, refresh=4)
    reg.add(laftr.make_estimator("laftr", num_samples=4).fit(net32, _xy(30)[0].float()))
    assert reg.penalty(net32).dtype == torch.float32
    assert reg.penalty(net32.double()).dtype == torch.float64
    # with refresh / every, a call without gradients (logging) is a fresh estimate that leaves the schedule alone
    net = _mlp()
    est = laftr.make_estimator("laftr-exact").fit(net, _xy(50))
    _nudge(net, 0.05, 1)
    want = 2.0 * est(net)
    for kw in ({"refresh": 3}, {"every": 2}):
        runs = []
        for log_first in (False, True):
            reg = FSDRegularizer(None, lam=2.0, **kw)
            reg.add(est)
            if log_first:
                with torch.no_grad():
                    logged = reg.penalty(net)
                assert float(logged) == pytest.approx(float(want.detach()), rel=1e-12)
            calls = []
            for _ in range(4):
                net.zero_grad()
                pen = reg.penalty(net)
                if pen.requires_grad:
                    pen.backward()
                calls.append((float(pen.detach()), float(_grads(net).norm()) if pen.requires_grad else 0.0))
            runs.append(calls)
        assert runs[0] == runs[1], kw  # the same penalties and gradients as without the logging call
        assert any(g > 0 for _, g in runs[1])


def test_regularizer_in_a_users_loop_keeps_the_old_function():
    """A user's own two-task loop: with the LAFTR penalty, the true (KL) FSD on task A grows far less."""
    xa, ya = _xy(200, seed=1)
    xb, yb = _xy(200, seed=2)
    ya, yb = (xa[:, 0] > 0).long(), (xb[:, 1] > 0).long()

    def train(model, x, y, outs, reg, steps=150):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = F.cross_entropy(model(x)[:, outs], y) + (reg.penalty(model) if reg else 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()

    base = _mlp(seed=3)
    train(base, xa, ya, [0, 1], None)
    theta_a = _mlp()
    theta_a.load_state_dict(base.state_dict())
    fsd = {}
    for lam in (0.0, 3.0):
        model = _mlp()
        model.load_state_dict(base.state_dict())
        reg = FSDRegularizer(lambda: laftr.make_estimator("laftr", metric="kl", num_samples=64), lam=lam)
        reg.after_task(model, (xa, ya), outputs=[0, 1])
        train(model, xb, yb, [2, 3], reg)
        fsd[lam] = float(laftr.exact_fsd(theta_a, model, xa, metric="kl", outputs=[0, 1]))
        assert (model(xb)[:, [2, 3]].argmax(1) == yb).double().mean() > 0.9  # task B is still learned
    assert fsd[3.0] < 0.05 * fsd[0.0], fsd  # measured: 0.0018 vs 1.03


# ------------------------------------------------------------------ the method table


def test_parse_methods_and_overrides():
    specs = parse_methods("none,laftr[lam=10,num_samples=100],subset[coreset_size=786, selection=balanced],joint")
    assert next(s.name for s in specs) == "none" and specs[1].base == "laftr"
    assert specs[1].lam == 10.0 and specs[1].config["num_samples"] == 100 and specs[1].config["input_model"] == "gaussian"
    assert specs[2].config == {**METHODS["subset"].config, "coreset_size": 786, "selection": "balanced"}
    assert parse_method("laftr-exact").tasks_per_step == 1 and parse_method("laftr-exact[tasks_per_step=None]").tasks_per_step is None
    tuned = parse_method("laftr", {"laftr": {"lam": 7}})
    assert tuned.lam == 7 and parse_method("laftr[lam=3]", {"laftr": {"lam": 7}}).lam == 3
    assert parse_method("subset-eqmem").match_memory == "laftr"
    assert parse_method("subset-eqmem[coreset_size=5]").match_memory is None
    assert len(parse_methods(DEFAULT_METHODS)) == 10
    # every regularized method maps to an estimator whose config accepts its settings, once registered
    for spec in (parse_method(m) for m in METHODS):
        if spec.kind == "fsd" and spec.estimator in laftr.available_estimators():
            laftr.make_estimator(spec.estimator, **spec.config)


@pytest.mark.parametrize(
    "text, match",
    [
        ("nope", "unknown method 'nope'.*laftr-coreset"),
        ("laftr[lam=-1]", "lam"),
        ("laftr[lam=nan]", "lam"),
        ("laftr[lam", "unbalanced"),
        ("laftr[lam]", "key=value"),
        ("none[num_samples=3]", "no estimator"),
        ("none[tasks_per_step=1]", "'none' has no regularizer.*tasks_per_step"),
        ("joint[lam=3]", "'joint' has no regularizer.*lam"),
        ("laftr[fit_examples=0]", "fit_examples must be an integer >= 1"),
        ("laftr[fit_examples=2.5]", "fit_examples must be an integer >= 1"),
        ("laftr,laftr", "twice"),
        ("laftr]", "unbalanced"),
        ("", "no methods"),
    ],
)
def test_parse_methods_bad_input(text, match):
    with pytest.raises(ValueError, match=match):
        parse_methods(text)
    if "[" in text and text.count("[") == text.count("]") == 1:
        with pytest.raises(ValueError, match=match):
            parse_method(text)
    with pytest.raises(ValueError, match="malformed"):
        parse_method("laftr[lam=1")


# ------------------------------------------------------------------ the loop


def test_run_method_every_method_matrix_memory_and_determinism():
    stream = split_tasks(_tiny_dataset(), [[0, 1], [2, 3], [4, 5]], seed=0)
    model_fn = lambda: laftr.models.mlp(64, (16,), stream.num_outputs)
    cfg = TrainConfig(epochs=2, batch_size=32, progress=False)
    avail = laftr.available_estimators()
    names = [m for m, spec in METHODS.items() if spec.kind != "fsd" or spec.estimator in avail]
    runs = {m: run_method(stream, parse_method(m), model_fn, cfg, seed=1) for m in names}
    for r in runs.values():
        assert len(r.acc_matrix) == 3 and all(len(row) == 3 for row in r.acc_matrix)
        assert all(0.0 <= a <= 1.0 for row in r.acc_matrix for a in row)
        assert set(r.timings) == {"train", "fit", "eval"} and r.wall_time_s > 0 and r.cpu_time_s > 0
        assert len(r.history) == 3 and len(r.history[0]["loss"]) == 2
        assert len(r.stored_floats) == 3
    assert runs["none"].stored_floats == [0, 0, 0]
    assert runs["joint"].stored_floats == [t.x_train.numel() for t in stream]
    lf = runs["laftr"]
    assert lf.stored_floats[0] == 16 + 64 + 64 * 64  # mu of the 16 hidden units, input mean, full covariance
    assert lf.history[0]["penalty"] == [0.0, 0.0] and lf.history[1]["penalty"][1] > 0
    assert runs["laftr-coreset"].stored_floats[0] == 16 + min(200, stream[0].n_train) * 64
    for m in ("subset-eqmem", "ntk-eqmem"):
        if m in runs:
            assert runs[m].details["coreset_size"] == round(lf.stored_floats[0] / 64)
    again = run_method(stream, parse_method("none"), model_fn, cfg, seed=1)
    assert again.acc_matrix == runs["none"].acc_matrix
    other = run_method(stream, parse_method("none"), model_fn, cfg, seed=2)
    assert other.acc_matrix != runs["none"].acc_matrix


def test_fit_examples_fits_each_task_on_its_own_random_subset_and_leaves_training_alone(monkeypatch):
    from laftr.continual.train import FIT_SUBSET_STREAM, fit_data

    stream = split_tasks(_tiny_dataset(n_train=300), [[0, 1], [2, 3], [4, 5]], seed=0)
    task = stream[0]
    x_all, y_all = task.train_data()
    gen = torch.Generator().manual_seed(5)
    x, y = fit_data(task, 7, gen)
    rows = [int(torch.nonzero((x_all == xi).flatten(1).all(1))[0]) for xi in x]
    assert len(set(rows)) == 7 and rows == sorted(rows) and torch.equal(y, y_all[rows])
    x2, _ = fit_data(task, 7, torch.Generator().manual_seed(5))
    assert torch.equal(x, x2) and not torch.equal(x, fit_data(task, 7, gen)[0])
    assert torch.equal(fit_data(task, task.n_train, gen)[0], x_all)  # all of them: no draw, the task itself
    assert torch.equal(fit_data(task, None, gen)[0], x_all)

    model_fn = lambda: laftr.models.mlp(64, (16,), stream.num_outputs)
    cfg = TrainConfig(epochs=2, batch_size=32, progress=False)
    fitted = []
    real = FSDRegularizer.after_task

    def spy(self, model, data, outputs=None):
        fitted.append(data)
        return real(self, model, data, outputs)

    with monkeypatch.context() as m:
        m.setattr(FSDRegularizer, "after_task", spy)
        sub = run_method(stream, parse_method("laftr[fit_examples=10]"), model_fn, cfg, seed=1)
    full = run_method(stream, parse_method("laftr"), model_fn, cfg, seed=1)
    # each task's estimator saw 10 examples, the subset the seed's own stream draws
    gen = torch.Generator().manual_seed(1 + FIT_SUBSET_STREAM)
    for t, (xs, ys) in enumerate(fitted):
        want_x, want_y = fit_data(stream[t], 10, gen)
        assert xs.shape[0] == 10 and torch.equal(xs, want_x) and torch.equal(ys, want_y)
    # the training stream is the same: the first task (no penalty yet) ends with the same accuracies
    assert sub.acc_matrix[0] == full.acc_matrix[0] and sub.history[0] == full.history[0]
    assert sub.history[1]["penalty"] != full.history[1]["penalty"]  # then the summaries differ
    assert parse_method("laftr[fit_examples=10]").describe()["fit_examples"] == 10


def test_estimators_are_fitted_on_output_units_so_label_reading_ones_run_on_later_heads():
    """The runner fitted on the task's local targets (0, 1 for the head [2, 3]): an empirical Fisher, which
    reads a label as the output unit, failed on task 2 (audit). Labels now index the output units, as fit's."""
    from laftr.continual.train import fit_data

    stream = split_tasks(_tiny_dataset(), [[0, 1], [2, 3]], seed=0)
    _, y = fit_data(stream[1], None, torch.Generator())
    assert set(y.tolist()) == {2, 3} and torch.equal(y - 2, stream[1].y_train)
    model_fn = lambda: laftr.models.mlp(64, (16,), stream.num_outputs)
    cfg = TrainConfig(epochs=2, batch_size=32, progress=False)
    run = run_method(stream, parse_method("ewc[fisher=empirical]"), model_fn, cfg, seed=1)
    assert len(run.stored_floats) == 2 and run.history[1]["penalty"][1] > 0


def test_joint_scores_each_example_on_its_own_head():
    """Joint training on two tasks with *different* heads must fit both: one shared head would not."""
    ds = _tiny_dataset(n_train=300)
    stream = split_tasks(ds, [[0, 1], [2, 3]])
    model_fn = lambda: laftr.models.mlp(64, (32,), stream.num_outputs)
    r = run_method(stream, parse_method("joint"), model_fn, TrainConfig(epochs=20, batch_size=32, progress=False))
    assert min(r.acc_matrix[-1]) > 0.9, r.acc_matrix


# ------------------------------------------------------------------ the CLI, end to end


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for these tiny nets (faster on a shared machine; the CLI tests also pass
    --threads 1); the setting is restored afterwards (``one_thread`` in conftest.py)."""


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist"))


# a few methods per benchmark keep the test fast; every method runs in the loop test above
CLI_METHODS = {"split-mnist": "none,joint,laftr,ewc", "permuted-mnist": "none,laftr-coreset[coreset_size=20],kfac"}


@pytest.mark.parametrize("bench", ["split-mnist", "permuted-mnist"])
def test_cli_mnist_benchmarks_end_to_end(bench, mnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    methods = CLI_METHODS[bench]
    seeds = 1 if bench == "split-mnist" else 2
    rc = main(["continual", "--benchmark", bench, "--methods", methods, "--seeds", str(seeds), "--quick",
               "--data-dir", str(mnist_dir), "--out", str(out), "--no-progress", "--n-train", "60", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    assert "avg acc" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete" and res["benchmark"] == bench
    md = res["metadata"]
    assert md["command"].startswith("laftr continual --benchmark " + bench)
    assert md["device"].split()[0] == ("cuda" if torch.cuda.is_available() else "cpu")  # the default device
    assert md["git_revision"] is None or len(md["git_revision"]) == 40
    assert res["settings"]["seeds"] == list(range(seeds)) and res["protocol"]["train"]["epochs"] == 1
    assert res["protocol"]["stream"]["n_train"] == 60
    T = 5 if bench == "split-mnist" else 3
    assert res["stream"]["num_tasks"] == T
    for name in parse_methods(methods):
        s = res["methods"][name.name]["summary"]
        assert set(s["final_avg_acc"]) == {"mean", "std", "n"} and s["final_avg_acc"]["n"] == seeds
        assert len(s["acc_matrix"]) == seeds and len(s["acc_matrix"][0]) == T
        assert s["final_avg_acc"]["mean"] == pytest.approx(
            np.mean([average_accuracy(a) for a in s["acc_matrix"]]))
        assert s["bwt"]["mean"] == pytest.approx(np.mean([backward_transfer(a) for a in s["acc_matrix"]]))
        assert len(s["stored_floats_per_task"][0]) == T and s["wall_time_s"]["mean"] > 0 and s["cpu_time_s"]["mean"] > 0
    if bench == "split-mnist":
        assert res["methods"]["laftr"]["summary"]["stored_floats_per_task"][0] == [512 + 784 + 784 * 784] * T
    else:  # two seeds: the spread over seeds is reported
        accs = [average_accuracy(a) for a in res["methods"]["none"]["summary"]["acc_matrix"]]
        assert res["methods"]["none"]["summary"]["final_avg_acc"]["std"] == pytest.approx(np.std(accs, ddof=1))
    table = (out / "table.md").read_text()
    assert all(m.name.split("[")[0] in table for m in parse_methods(methods))
    assert (out / "heatmaps.png").stat().st_size > 1000


def test_cli_split_cifar_end_to_end(tmp_path, capsys):
    root = write_cifar(tmp_path / "data")
    out = tmp_path / "out"
    rc = main(["continual", "--benchmark", "split-cifar", "--methods",
               "none,laftr[input_model=diag,num_samples=8]", "--seeds", "1", "--quick", "--n-train", "12",
               "--n-eval", "20", "--data-dir", str(root), "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["stream"]["num_tasks"] == 6 and res["stream"]["num_outputs"] == 60
    m = res["methods"]["laftr[input_model=diag,num_samples=8]"]["summary"]
    assert len(m["acc_matrix"][0]) == 6 and len(m["stored_floats_per_task"][0]) == 6
    assert res["protocol"]["benchmark"]["conv_width"] == 0.25 and res["settings"]["threads"] == 1


def test_cli_val_split_never_reads_test_files(mnist_dir, tmp_path, capsys):
    """--split val must work from the training files alone (the test files are not consulted)."""
    out = tmp_path / "val"
    rc = main(["continual", "--benchmark", "split-mnist", "--methods", "none", "--seeds", "1", "--quick",
               "--split", "val", "--data-dir", str(mnist_dir), "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["stream"]["split"] == "val"
    n_eval = sum(t["n_eval"] for t in res["stream"]["tasks"])
    assert n_eval == pytest.approx(0.1 * 300, abs=10)  # 10 % of the 300 training images


@pytest.mark.parametrize(
    "argv, code, needle",
    [
        (["--benchmark", "split-nope"], 2, "unknown benchmark 'split-nope'"),
        (["--benchmark", "split-fmnist", "--methods", "none,magic"], 2, "unknown method 'magic'"),
        (["--benchmark", "split-fmnist", "--lam", "-1"], 2, "lam must be"),
        (["--benchmark", "split-fmnist", "--lam", "nan"], 2, "lam must be"),
        (["--benchmark", "split-fmnist", "--seeds", "0"], 2, "--seeds"),
        (["--benchmark", "split-fmnist", "--epochs", "0"], 2, "epochs"),
        (["--benchmark", "split-mnist"], 2, "no data_dir"),
        (["--benchmark", "split-cifar"], 2, "cifar-10-batches-py"),
        (["--benchmark", "split-cifar", "--methods", "none,laftr-exact"], 2, "not available on split-cifar"),
        (["--benchmark", "split-fmnist", "--methods", "laftr[lam=1"], 2, "unbalanced"),
    ],
)
def test_cli_bad_input(argv, code, needle, tmp_path, capsys):
    rc = main(["continual", *argv, "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == code
    assert needle in capsys.readouterr().err


def test_cli_missing_files_named(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["continual", "--benchmark", "permuted-mnist", "--data-dir", str(empty), "--out",
               str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "t10k-labels-idx1-ubyte" in err
    rc = main(["continual", "--benchmark", "split-cifar", "--data-dir", str(empty), "--out",
               str(tmp_path / "o2"), "--no-progress"])
    assert rc == 2 and "cifar-10-batches-py" in capsys.readouterr().err


def test_cli_refuses_non_empty_out(mnist_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "results.json").write_text("{}")
    argv = ["continual", "--benchmark", "split-mnist", "--methods", "none", "--seeds", "1", "--quick",
            "--data-dir", str(mnist_dir), "--out", str(out), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    assert (out / "results.json").read_text() == "{}"
    assert main([*argv, "--force"]) == 0
    assert json.loads((out / "results.json").read_text())["status"] == "complete"


def test_cli_resume_keeps_finished_runs_and_checks_settings(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["continual", "--benchmark", "split-mnist", "--methods", "none,ewc", "--seeds", "2", "--quick",
            "--n-train", "40", "--data-dir", str(mnist_dir), "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    full = json.loads((out / "results.json").read_text())
    # simulate an interruption after (none, seed 0), (ewc, seed 0), (none, seed 1)
    cut = json.loads(json.dumps(full))
    cut["status"] = "running"
    for name, keep in (("none", 2), ("ewc", 1)):
        s = cut["methods"][name]["summary"]
        s["runs"] = s["runs"][:keep]
    (out / "results.json").write_text(json.dumps(cut))
    (out / "table.md").unlink()
    # a different setting is refused and the folder is left alone
    assert main([*argv[:-2], "--resume", "--epochs", "2"]) == 2  # a usage mistake (the exit table)
    assert "settings differ" in capsys.readouterr().err and not (out / "table.md").exists()
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete" and res["resumed"]["earlier_runs"] == 3
    kept = full["methods"]["none"]["summary"]["runs"]
    assert res["methods"]["none"]["summary"]["runs"] == kept  # not rerun: identical records, timings included
    ewc = res["methods"]["ewc"]["summary"]
    assert ewc["seeds"] == [0, 1] and ewc["runs"][0] == full["methods"]["ewc"]["summary"]["runs"][0]
    # the rerun seed is deterministic: same accuracies as the uninterrupted run
    assert ewc["acc_matrix"][1] == full["methods"]["ewc"]["summary"]["acc_matrix"][1]
    assert (out / "table.md").exists()
    assert main([*argv[:-2], "--resume", "--out", str(tmp_path / "nothing-here")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_settings_bad_input():
    with pytest.raises(ValueError, match="seed"):
        ContinualSettings("split-fmnist", "none", [])
    with pytest.raises(ValueError, match="split"):
        ContinualSettings("split-fmnist", "none", [0], split="test2")
    with pytest.raises(ValueError, match="n_train"):
        ContinualSettings("split-fmnist", "none", [0], n_train=0)
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        ContinualSettings("nope", "none", [0])
    with pytest.raises(ValueError, match="unknown method"):
        run_benchmark(ContinualSettings("split-fmnist", "none,foo", [0]), "never-created")
    # a bad value of an estimator's option: refused before the first method runs (it was refused when its
    # method's turn came, after fine-tuning had run and task 1 had trained), naming the method
    for spec, match in (("laftr[num_samples=8.0]", "num_samples must be a positive integer"),
                        ("subset[coreset_size=0]", "coreset_size"), ("ewc[fisher=typo]", "fisher")):
        with pytest.raises(UsageError, match=rf"method '{re.escape(spec)}': .*{match}"):
            run_benchmark(ContinualSettings("split-fmnist", f"none,{spec}", [0], quick=True), "never-created")


def test_loop_rejects_diverging_penalty():
    stream = split_tasks(_tiny_dataset(), [[0, 1], [2, 3]])

    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = laftr.models.mlp(64, (8,), 4)

        def forward(self, x):
            return self.net(x) * float("inf")

    with pytest.raises(FloatingPointError, match="loss"):
        run_method(stream, parse_method("none"), Boom, TrainConfig(epochs=1, progress=False))


# ------------------------------------------------------------------ transformers: arithmetic and --arch vit


def test_cli_arithmetic_quick_end_to_end(tmp_path, capsys):
    """LIFTR's modular arithmetic, tiny (p = 11, a one-block transformer of width 16), two tasks, one seed."""
    out = tmp_path / "arith"
    methods = "none,laftr,liftr,ewc,subset"
    rc = main(["continual", "--benchmark", "arithmetic", "--methods", methods, "--seeds", "1", "--quick",
               "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete" and res["benchmark"] == "arithmetic"
    st = res["stream"]
    assert st["num_tasks"] == 2 and st["p"] == 11 and st["num_outputs"] == 11 and not st["multi_head"]
    assert st["task_names"] == ["add", "subtract"] and st["input_shape"] == [4]
    bench = res["protocol"]["benchmark"]
    assert bench["arch"] == "transformer" and bench["transformer"]["d_model"] == 16
    assert res["protocol"]["train"]["weight_decay"] == 1.0
    for name in methods.split(","):
        s = res["methods"][name]["summary"]
        accs = [a for row in s["acc_matrix"][0] for a in row]
        assert len(s["acc_matrix"][0]) == 2 and all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in accs)
        assert math.isfinite(s["final_avg_acc"]["mean"])
    assert res["methods"]["laftr"]["spec"]["config"]["input_model"] == "tokens"
    assert res["methods"]["liftr"]["spec"]["config"]["input_model"] == "tokens"
    assert min(res["methods"]["liftr"]["summary"]["stored_floats_per_task"][0]) > 0
    assert "network transformer" in (out / "table.md").read_text()


def test_cli_split_with_vit(mnist_dir, tmp_path, capsys):
    out = tmp_path / "vit"
    rc = main(["continual", "--benchmark", "split-mnist", "--arch", "vit", "--methods", "laftr[num_samples=4]",
               "--seeds", "1", "--quick", "--n-train", "30", "--n-eval", "20", "--data-dir", str(mnist_dir),
               "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["arch"] == "vit" and res["protocol"]["benchmark"]["arch"] == "vit"
    s = res["methods"]["laftr[num_samples=4]"]["summary"]
    assert len(s["acc_matrix"][0]) == 5 and all(math.isfinite(a) for row in s["acc_matrix"][0] for a in row)
    # a ViT: the summary holds the attention, LayerNorm and GELU laws beyond the MLP's 512 gates
    assert s["stored_floats_per_task"][0][0] != 512 + 784 + 784 * 784


def test_token_and_transformer_benchmarks_adapt_the_methods():
    from laftr.cli.continual import default_methods
    from laftr.continual.benchmarks import get_benchmark
    from laftr.continual.runner import resolve_settings

    names = "laftr,laftr-classwise,laftr-mixture,laftr-coreset,liftr,liftr-full,kfac,ewc"
    bench, _, train, specs, ref = resolve_settings(ContinualSettings("arithmetic", names, [0]))
    cfg = {s.name: s.config for s in specs}
    assert cfg["laftr"]["input_model"] == "tokens" and ref.config["input_model"] == "tokens"
    assert cfg["laftr-classwise"]["input_model"] == "tokens-classwise"
    assert cfg["laftr-mixture"]["input_model"] == "tokens-mixture"
    assert cfg["laftr-coreset"]["input_model"] == "coreset"  # stored token sequences need no change
    assert cfg["liftr"]["input_model"] == "tokens" and cfg["liftr-full"]["input_cov"] == "full"
    assert cfg["kfac"]["unsupported"] == "diag" and cfg["ewc"] == METHODS["ewc"].config
    assert bench.arch == "transformer" and train.weight_decay == 1.0 and bench.traits() == ("tokens", "transformer")
    # overrides in brackets still win over the trait settings
    assert parse_method("laftr[input_model=tokens-mixture]", None, ("tokens",)).config["input_model"] == "tokens-mixture"
    # image benchmarks keep their settings; a ViT changes only what it must (kfac's diagonal fallback)
    _, _, train, mlp_specs, _ = resolve_settings(ContinualSettings("split-fmnist", names, [0]))
    assert {s.name: s.config for s in mlp_specs} == {n: METHODS[n].config for n in names.split(",")}
    assert train.weight_decay == 0.0
    _, _, _, vit_specs, _ = resolve_settings(ContinualSettings("split-fmnist", names, [0], arch="vit"))
    vit_cfg = {s.name: s.config for s in vit_specs}
    assert vit_cfg["kfac"]["unsupported"] == "diag" and vit_cfg["laftr"]["input_model"] == "gaussian"
    assert vit_cfg["liftr"]["input_model"] == "diag"
    # default method lists: laftr-exact cannot run on attention, liftr joins on transformers
    assert default_methods("split-fmnist") == DEFAULT_METHODS
    for bench_name, arch in (("arithmetic", None), ("arithmetic-4", None), ("split-fmnist", "vit")):
        d = default_methods(bench_name, arch).split(",")
        assert "laftr-exact" not in d and "liftr" in d and "laftr" in d
    assert "laftr-diag" in get_benchmark("arithmetic").excluded
    with pytest.raises(ValueError, match="unknown benchmark traits"):
        parse_method("laftr", None, ("images",))


def _named_searches(filename: str) -> dict[str, dict]:
    """The entries of a committed search summary that belong to named methods (a variant's search, made with
    ``--fixed ... --name X``, does not set a default)."""
    from laftr.continual.methods import METHODS

    search = json.loads((Path(__file__).parents[1] / "benchmarks/results/continual" / filename).read_text())
    return {m: e for m, e in search["methods"].items() if m in METHODS}


def _assert_search_winners(searched: dict[str, dict], lam: dict[str, float]) -> None:
    """Each searched method's lam is its grid's best on validation, and that best is interior."""
    for method, entry in searched.items():
        grid = entry["lam"]["grid"]
        best = max(grid, key=lambda g: g["val_avg_acc"])
        assert lam[method] == best["lam"], method
        assert best["lam"] not in (min(g["lam"] for g in grid), max(g["lam"] for g in grid)), method  # interior


def test_vit_defaults_are_the_vit_search_winners():
    """``--arch vit`` on Split Fashion-MNIST runs with the lam its own validation search chose (read from the
    committed search file), the unsearched methods with the MLP's; a network without its own search says so."""
    from laftr.continual.runner import resolve_settings

    searched = _named_searches("search_split-fmnist-vit.json")
    assert {"ewc", "kfac", "laftr", "liftr", "subset"} <= set(searched)
    names = ",".join(searched) + ",ntk,laftr-classwise"
    bench, _, _, specs, _ = resolve_settings(ContinualSettings("split-fmnist", names, [0], arch="vit"))
    lam = {s.name: s.lam for s in specs}
    _assert_search_winners(searched, lam)
    _, _, _, mlp_specs, _ = resolve_settings(ContinualSettings("split-fmnist", names, [0]))
    mlp_lam = {s.name: s.lam for s in mlp_specs}
    assert lam["ntk"] == mlp_lam["ntk"] and lam["laftr-classwise"] == mlp_lam["laftr-classwise"]
    assert lam["laftr"] != mlp_lam["laftr"]
    assert "search_split-fmnist-vit.json" in bench.tuning and "arch_tuning" not in bench.describe()
    other, *_ = resolve_settings(ContinualSettings("split-mnist", "laftr", [0], arch="vit"))
    assert "not tuned for vit" in other.tuning


def test_arithmetic_four_task_defaults_are_its_search_winners():
    """``arithmetic-4`` runs with the lam of its own four-task validation search (the committed search file) for
    the methods searched there, and with the two-task values for the others."""
    from laftr.continual.runner import resolve_settings

    searched = _named_searches("search_arithmetic-4.json")
    assert {"ewc", "kfac", "laftr", "liftr", "subset"} == set(searched)
    names = ",".join(searched) + ",ntk"
    bench, _, _, specs, _ = resolve_settings(ContinualSettings("arithmetic-4", names, [0]))
    lam = {s.name: s.lam for s in specs}
    _assert_search_winners(searched, lam)
    _, _, _, two, _ = resolve_settings(ContinualSettings("arithmetic", "ntk,ewc", [0]))
    assert lam["ntk"] == {s.name: s.lam for s in two}["ntk"]
    assert "search_arithmetic-4.json" in bench.tuning


def test_arithmetic_four_tasks_stream():
    from laftr.continual.benchmarks import build_stream, get_benchmark

    bench = get_benchmark("arithmetic-4")
    s = build_stream(bench, None, seed=0, n_eval=7)
    assert [t.name for t in s] == ["add", "subtract", "quadratic", "random"] and s.num_outputs == 113
    assert all(t.n_train == round(0.7 * 113 * 113) and len(t.x_eval) == 7 for t in s)
    assert [t.name for t in build_stream(bench, None, seed=0, num_tasks=2)] == ["add", "subtract"]
    model = bench.build_model(s)()
    assert model(s[0].x_train[:3]).shape == (3, 113)


def test_train_config_weight_decay_picks_adamw():
    model = nn.Linear(3, 2)
    assert type(TrainConfig().optimizer(model.parameters())) is torch.optim.Adam
    opt = TrainConfig(weight_decay=0.5).optimizer(model.parameters())
    assert type(opt) is torch.optim.AdamW and opt.defaults["weight_decay"] == 0.5
    for bad in (-1.0, float("nan"), "big"):
        with pytest.raises(ValueError, match="weight_decay"):
            TrainConfig(weight_decay=bad)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--benchmark", "arithmetic", "--methods", "none,laftr-exact"],
         "'laftr-exact' is not available on arithmetic: attention has no closed form"),
        (["--benchmark", "arithmetic-4", "--methods", "laftr-diag"], "cannot describe token ids"),
        (["--benchmark", "split-fmnist", "--arch", "vit", "--methods", "laftr-exact"],
         "not available on split-fmnist with arch 'vit': attention has no closed form"),
        (["--benchmark", "arithmetic", "--arch", "mlp"], "its inputs are token sequences"),
        (["--benchmark", "arithmetic", "--num-tasks", "3"], "more than the 2 tasks of arithmetic"),
        (["--benchmark", "arithmetic", "--weight-decay", "-1"], "weight_decay must be"),
    ],
)
def test_cli_transformer_benchmarks_bad_input(argv, needle, tmp_path, capsys):
    rc = main(["continual", *argv, "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_search_gathers_finished_grids_only(tmp_path):
    """A grid still running (its ``.NAME.partial`` folder beside the finished ones) is not gathered."""
    from cases import load_benchmark_script

    search = load_benchmark_script("continual_search")

    def write(folder, lam, acc):
        run = {"methods": {f"laftr[lam={lam}]": {"spec": {"lam": lam, "config": {}},
                                                  "summary": {"final_avg_acc": {"mean": acc}, "bwt": {"mean": 0.0},
                                                              "wall_time_s": {"mean": 1.0}}}},
               "protocol": {}, "settings": {"seeds": [10]}, "metadata": {"command": "x", "git_revision": "y"}}
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text(json.dumps(run))

    write("laftr__lam", 10.0, 0.5)
    write(".ewc__lam.partial", None, 0.9)
    out = search.gather("b", tmp_path)
    assert list(out["methods"]) == ["laftr"] and out["methods"]["laftr"]["lam"]["best"] == 10.0


def test_num_tasks_takes_the_first_tasks_of_a_split_stream(mnist_dir, tmp_path, capsys):
    from laftr.continual import build_stream, get_benchmark
    from laftr.errors import UsageError

    bench = get_benchmark("split-fmnist")
    full = build_stream(bench, _tiny_dataset(), seed=0)
    first = build_stream(bench, _tiny_dataset(), seed=0, num_tasks=2)
    assert len(full) == 5 and len(first) == 2 and first.num_outputs == full.num_outputs == 10
    assert [t.outputs for t in first] == [t.outputs for t in full.tasks[:2]]
    assert all(torch.equal(a.x_train, b.x_train) for a, b in zip(first, full.tasks[:2]))
    with pytest.raises(UsageError, match="split-fmnist has 5 tasks; num_tasks 6 is more"):
        build_stream(bench, _tiny_dataset(), seed=0, num_tasks=6)
    # from the command line: recorded and used (was recorded and ignored); too many: refused before any file
    out = tmp_path / "o"
    base = ["continual", "--benchmark", "split-mnist", "--methods", "none", "--seeds", "1", "--quick",
            "--data-dir", str(mnist_dir), "--no-progress"]
    assert main([*base, "--num-tasks", "3", "--out", str(out)]) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["stream"]["num_tasks"] == 3 and len(res["methods"]["none"]["summary"]["acc_matrix"][0]) == 3
    assert main([*base, "--num-tasks", "6", "--out", str(tmp_path / "o2")]) == 2
    assert "num_tasks 6 is more" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no staging folder of the refused run
