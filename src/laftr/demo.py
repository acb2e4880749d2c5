"""A three-minute end-to-end demo: LAFTR as a continual-learning regularizer on split (Fashion-)MNIST.

Task A is classes 0-4, task B classes 5-9, with a multi-head MLP (logits 0-4 answer task A, 5-9 task B).
After training on A we store a LAFTR summary (KL metric, Gaussian input model, outputs 0-4) instead of
A's data, then train on B twice: plain fine-tuning, and with ``lam * LAFTR(theta0, theta)`` added to the
loss. The report compares old/new-task accuracies and the estimated vs true function space distances.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import laftr

from .continual import FSDRegularizer, Task, TrainConfig, evaluate_task, train_task
from .errors import UsageError
from .models import mlp
from .report import RunFolder, markdown_table, pyplot, run_metadata, write_json_atomic

log = logging.getLogger(__name__)

TASK_A = [0, 1, 2, 3, 4]
TASK_B = [5, 6, 7, 8, 9]
METRIC = "kl"
COLUMNS = ["model", "acc_A", "acc_B", "fsd_true", "fsd_laftr"]


@dataclass
class DemoSettings:
    """Sizes and hyperparameters of one demo run."""

    epochs: int = 3
    n_train: int = 12000  # training examples per task
    n_test: int | None = None  # test examples per task (None: all)
    batch_size: int = 128
    lr: float = 1e-3
    lam: float = 1.0  # weight of the LAFTR penalty
    num_samples: int = 64
    eval_calls: int = 5  # estimator calls averaged for the reported estimate
    hidden: list[int] = field(default_factory=lambda: [256, 256])


def _task_split(x: torch.Tensor, y: torch.Tensor, classes: list[int], n: int | None,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.nonzero(torch.isin(y, torch.tensor(classes))).flatten()
    if n is not None and n < len(idx):
        idx = idx[torch.randperm(len(idx), generator=gen)[:n]].sort().values
    return x[idx], y[idx]


def _task(name: str, classes: list[int], train: tuple[torch.Tensor, torch.Tensor],
          test: tuple[torch.Tensor, torch.Tensor]) -> Task:
    """A :class:`laftr.continual.Task` of consecutive ``classes`` (its head), labels made local."""
    return Task(name, outputs=list(classes), x_train=train[0], y_train=train[1] - classes[0], x_eval=test[0],
                y_eval=test[1] - classes[0], classes=list(classes))


def _estimate(est: laftr.FSDEstimator, model: nn.Module, calls: int) -> float:
    with torch.no_grad():
        return float(torch.stack([est(model) for _ in range(calls)]).mean())


def run_demo(
    out_dir: str | Path,
    force: bool = False,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = True,
    quick: bool = False,
    lam: float | None = None,
    command: str = "laftr demo",
) -> dict[str, Any]:
    """Run the continual-learning demo and write its files to ``out_dir``.

    The files are ``taskA.laftr``, ``report.md``, ``results.json`` and ``demo.png``.

    Args:
        out_dir: output folder (must be new or empty unless ``force``).
        force: allow writing into a non-empty folder.
        epochs: training epochs per task (default 3, or 1 with ``quick``).
        seed: seed of data subsampling, initialization and training order.
        progress: show tqdm progress bars.
        quick: tiny sizes (2000 training examples per task, 1 epoch, 1000 test) for tests.
        lam: weight of the LAFTR penalty (default 1; measured: 1 keeps task A nearly intact at no cost to B).
        command: the command line recorded in the run metadata.

    Returns:
        The results dictionary also written to ``results.json``.
    """
    t_start = time.perf_counter()
    if lam is not None and not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise UsageError(f"lam must be a finite number >= 0, got {lam!r}")  # (-1 and nan skipped the penalty)
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise UsageError(f"epochs must be a positive integer, got {epochs!r}")
    folder = RunFolder(out_dir, force=force)
    out = folder.open()
    st = DemoSettings()
    if quick:
        st.epochs, st.n_train, st.n_test, st.num_samples, st.eval_calls = 1, 2000, 1000, 32, 2
    if epochs is not None:
        st.epochs = int(epochs)
    if lam is not None:
        st.lam = float(lam)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    from .data import default_dataset

    t0 = time.perf_counter()
    ds = default_dataset()
    xa, ya = _task_split(ds.x_train, ds.y_train, TASK_A, st.n_train, gen)
    xb, yb = _task_split(ds.x_train, ds.y_train, TASK_B, st.n_train, gen)
    xa_te, ya_te = _task_split(ds.x_test, ds.y_test, TASK_A, st.n_test, gen)
    xb_te, yb_te = _task_split(ds.x_test, ds.y_test, TASK_B, st.n_test, gen)
    timings: dict[str, float] = {"load_data": time.perf_counter() - t0}
    log.info(
        "%s: task A %d train / %d test, task B %d train / %d test",
        ds.name,
        len(xa),
        len(xa_te),
        len(xb),
        len(xb_te),
    )

    # --- task A
    t0 = time.perf_counter()
    task_a = _task("task A", TASK_A, (xa, ya), (xa_te, ya_te))
    task_b = _task("task B", TASK_B, (xb, yb), (xb_te, yb_te))
    cpu = torch.device("cpu")
    cfg = TrainConfig(epochs=st.epochs, batch_size=st.batch_size, lr=st.lr, device="cpu", progress=progress)
    model0 = mlp(xa[0].numel(), st.hidden, 10)
    train_task(model0, [task_a], cfg, torch.Generator().manual_seed(seed), cpu, desc="task A")
    timings["train_A"] = time.perf_counter() - t0

    # --- LAFTR summary of task A at theta0
    t0 = time.perf_counter()
    est = laftr.make_estimator(
        "laftr",
        metric=METRIC,
        num_samples=st.num_samples,
        input_model="gaussian",
        seed=seed,
        progress=progress,
    )
    est.fit(model0, (xa, ya), outputs=TASK_A)
    summary_path = out / "taskA.laftr"
    laftr.save(est, summary_path)
    timings["fit_summary"] = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model0.parameters())
    sizes = {
        "summary_stored_floats": int(est.stored_floats()),
        "summary_file_bytes": summary_path.stat().st_size,
        "theta0_floats": int(n_params),
        "taskA_data_floats": int(xa.numel()),
        "taskA_data_bytes_float32": int(xa.numel()) * 4,
    }
    log.info(
        "summary: %d stored floats, %d bytes on disk; task A inputs: %d floats",
        sizes["summary_stored_floats"],
        sizes["summary_file_bytes"],
        sizes["taskA_data_floats"],
    )

    # --- task B: plain fine-tuning, and with the LAFTR penalty
    models: dict[str, nn.Module] = {"theta0 (after A)": model0}
    for name, lam_ in (("fine-tuned on B", 0.0), (f"LAFTR-reg. on B (lam={st.lam:g})", st.lam)):
        t0 = time.perf_counter()
        m = mlp(xa[0].numel(), st.hidden, 10)
        m.load_state_dict(model0.state_dict())
        reg = None
        if lam_ > 0:
            reg = FSDRegularizer(None, lam_)
            reg.add(est)
        gen_b = torch.Generator().manual_seed(seed + 1)
        train_task(m, [task_b], cfg, gen_b, cpu, reg, desc=name.split(" (")[0])
        timings["train_B_laftr" if lam_ > 0 else "train_B_plain"] = time.perf_counter() - t0
        models[name] = m

    # --- evaluation
    t0 = time.perf_counter()
    rows = []
    for name, net in models.items():
        rows.append(
            {
                "model": name,
                "acc_A": evaluate_task(net, task_a, cpu),
                "acc_B": evaluate_task(net, task_b, cpu),
                "fsd_true": float(laftr.exact_fsd(model0, net, xa, metric=METRIC, outputs=TASK_A)),
                "fsd_laftr": _estimate(est, net, st.eval_calls),
            }
        )
    timings["evaluate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    table = markdown_table(rows, COLUMNS)
    settings = {k: getattr(st, k) for k in st.__dataclass_fields__}
    results = {
        "dataset": ds.name,
        "metric": METRIC,
        "task_A_classes": TASK_A,
        "task_B_classes": TASK_B,
        "settings": settings,
        "estimator": est.describe(),
        "sizes": sizes,
        "rows": rows,
        "timings_s": timings,
        "table_markdown": table,
        "metadata": run_metadata(command, seed),
    }
    _write_report(out, results)
    _plot(out / "demo.png", rows, ds.name)
    write_json_atomic(out / "results.json", results)
    timings["total"] = time.perf_counter() - t_start
    out = folder.commit()
    log.info("demo finished in %.1f s; outputs in %s", timings["total"], out)
    return results


def _write_report(out: Path, res: dict[str, Any]) -> None:
    s, st, sz = res["settings"], res["timings_s"], res["sizes"]
    ratio = sz["taskA_data_floats"] / max(sz["summary_stored_floats"], 1)
    lines = [
        "# LAFTR demo: continual learning on split " + res["dataset"],
        "",
        (
            f"Data set: **{res['dataset']}**; task A = classes {res['task_A_classes']}, "
            f"task B = classes {res['task_B_classes']} "
            f"(multi-head MLP 784-{'-'.join(map(str, s['hidden']))}-10)."
        ),
        (
            f"{s['n_train']} training examples per task, {s['epochs']} epoch(s) per task, Adam lr {s['lr']}, "
            f"batch {s['batch_size']}."
        ),
        (
            f"LAFTR summary: metric `{res['metric']}`, Gaussian input model, {s['num_samples']} MC samples, "
            f"outputs {res['task_A_classes']}; penalty weight lambda = {s['lam']:g}."
        ),
        "",
        (
            "acc_A: task-A test accuracy (argmax over logits 0-4); acc_B: task-B test accuracy (logits 5-9); "
            "fsd_true: exact KL FSD to theta0 over task A's training inputs; fsd_laftr: LAFTR estimate "
            f"(mean of {s['eval_calls']} calls)."
        ),
        "",
        res["table_markdown"],
        "",
        "## Sizes",
        "",
        (
            f"- LAFTR summary: {sz['summary_stored_floats']:,} stored floats beyond theta0; file taskA.laftr "
            f"{sz['summary_file_bytes']:,} bytes (includes theta0, {sz['theta0_floats']:,} floats)"
        ),
        f"- task A training inputs: {sz['taskA_data_floats']:,} floats ({ratio:.1f}x the summary)",
        "",
        "## Timing (s)",
        "",
        markdown_table([{"step": k, "seconds": round(v, 2)} for k, v in st.items()], ["step", "seconds"]),
        "",
        (
            f"git revision: {res['metadata']['git_revision']}; torch {res['metadata']['torch_version']}; "
            f"{res['metadata']['platform']}; {res['metadata']['timestamp']}"
        ),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")


def _plot(path: Path, rows: list[dict[str, Any]], dataset: str) -> None:
    plt = pyplot()
    labels = [r["model"].split(" (lam")[0] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    xs = range(len(rows))
    w = 0.38
    ax1.bar([x - w / 2 for x in xs], [r["acc_A"] for r in rows], w, label="old task A")
    ax1.bar([x + w / 2 for x in xs], [r["acc_B"] for r in rows], w, label="new task B")
    ax1.set_xticks(list(xs), labels, fontsize=8)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("test accuracy")
    ax1.set_title(f"split {dataset}")
    ax1.legend(fontsize=8)
    ax2.bar([x - w / 2 for x in xs], [r["fsd_true"] for r in rows], w, label="true FSD")
    ax2.bar([x + w / 2 for x in xs], [r["fsd_laftr"] for r in rows], w, label="LAFTR estimate")
    ax2.set_xticks(list(xs), labels, fontsize=8)
    ax2.set_ylabel(f"{METRIC} FSD to theta0 on task A")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
