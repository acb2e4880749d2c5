"""Run a benchmark for several methods and seeds; write ``results.json``, ``table.md`` and heatmaps."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..config import ExperimentConfig
from ..errors import UsageError
from ..report import RunFolder, markdown_table, pyplot, run_metadata, write_json_atomic
from .benchmarks import BenchmarkSpec, build_stream, get_benchmark, load_stream_data
from .methods import MethodSpec, parse_method, parse_methods
from .metrics import mean_std
from .regularizer import _check_lam
from .train import RunResult, TrainConfig, check_estimator_options, run_method

log = logging.getLogger(__name__)

__all__ = ["ContinualSettings", "resolve_settings", "run_benchmark", "summarize_runs"]


class _Plan(NamedTuple):
    """What a run of :class:`ContinualSettings` uses (see :func:`resolve_settings`)."""

    bench: BenchmarkSpec
    stream_kw: dict[str, Any]
    train: TrainConfig
    methods: list[MethodSpec]
    reference: MethodSpec


@dataclass
class ContinualSettings(ExperimentConfig):
    """Everything that defines a benchmark run (recorded in ``results.json``), checked once constructed.

    Construction checks every setting against the benchmark (its network, number of tasks and the methods
    it can run) and each other, and raises :class:`~laftr.errors.UsageError` naming the first bad one.
    Fields left at ``None`` stay ``None`` (they are recorded as given): the run takes the benchmark's
    protocol for them.

    Attributes:
        benchmark: benchmark name (see :data:`laftr.continual.BENCHMARKS`).
        methods: comma-separated methods, optionally with overrides (``laftr[lam=10]``).
        seeds: the seeds; each gives its own initialization, data subsample and permutations.
        split: ``test`` (train on training data, report test accuracy) or ``val`` (hold out part of the
            training data and report accuracy on it: for choosing hyperparameters).
        quick: tiny smoke-test sizes (the benchmark's ``quick`` overrides).
        epochs: epochs per task (None: the benchmark's protocol; so for the next three).
        batch_size: training batch size.
        lr: learning rate.
        weight_decay: decoupled weight decay (above 0: AdamW instead of Adam).
        n_train: training examples per task (None: the benchmark's).
        n_eval: evaluation examples per task (None: all).
        num_tasks: tasks of a permuted stream, or the first tasks of a split or arithmetic one (None: the
            benchmark's).
        arch: the network (see :data:`laftr.continual.ARCHS`; None: the benchmark's own, e.g. the
            MLP of split-fmnist; ``vit`` runs an image benchmark with a vision transformer).
        lam: penalty weight for every regularized method, overriding tuned values (None: tuned).
        data_dir: where the data files are.
        device: torch device (None: CUDA if available).
        threads: ``torch.set_num_threads`` for the run (None: leave it).
        progress: progress bars.
    """

    benchmark: str
    methods: str
    seeds: list[int]
    split: str = "test"
    quick: bool = False
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    n_train: int | None = None
    n_eval: int | None = None
    num_tasks: int | None = None
    arch: str | None = None
    weight_decay: float | None = None
    lam: float | None = None
    data_dir: str | None = None
    device: str | None = None
    threads: int | None = None
    progress: bool = True

    def _validate(self) -> None:
        """Check the settings against the benchmark (network, number of tasks, methods) and each other.

        The methods are checked by resolving the run: the benchmark, stream options, schedule, methods and
        memory reference are kept for :func:`run_benchmark`.
        """
        bench = get_benchmark(self.benchmark)
        bench.resolve_arch(self.arch)
        if bench.tokens and self.num_tasks is not None and self.num_tasks > len(bench.tasks):
            raise UsageError(f"num_tasks {self.num_tasks} is more than the {len(bench.tasks)} tasks of "
                             f"{bench.name} ({', '.join(bench.tasks)})")
        if not self.seeds:
            raise UsageError("at least one seed is needed")
        if self.split not in ("test", "val"):
            raise UsageError(f"split must be 'test' or 'val', got {self.split!r}")
        for name in ("epochs", "batch_size", "n_train", "n_eval", "num_tasks", "threads"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise UsageError(f"{name} must be >= 1, got {v}")
        wd = self.weight_decay
        if wd is not None and (isinstance(wd, bool) or not isinstance(wd, (int, float))
                               or not math.isfinite(wd) or wd < 0):
            raise UsageError(f"weight_decay must be a finite number >= 0, got {wd!r}")
        if self.lam is not None:
            self.lam = _check_lam(self.lam)
        self._plan = _resolve_run(self)


_SETTINGS_KEYS = frozenset(f.name for f in dataclasses.fields(ContinualSettings))


def resolve_settings(
    settings: ContinualSettings,
) -> tuple[BenchmarkSpec, dict[str, Any], TrainConfig, list[MethodSpec], MethodSpec]:
    """The benchmark, stream options, schedule, methods and memory reference a run will use.

    The benchmark returned carries the run's network in ``arch`` and, with ``quick``, its quick overrides of
    benchmark fields (``conv_width``, ``p``, ``transformer``, ...). Constructing the settings resolves and
    checks them; this checks them again (they may have been changed in place) and returns what they resolved
    to.

    Raises:
        ValueError: unknown benchmark, network or method, a method the benchmark cannot run, malformed
            overrides, bad values.
    """
    settings.validate()
    return settings._plan


def _resolve_run(settings: ContinualSettings) -> _Plan:
    """What ``settings`` resolve to (the settings' own fields are already checked).

    Raises:
        UsageError: an unknown method, a method the benchmark cannot run, malformed overrides.
    """
    bench = get_benchmark(settings.benchmark)
    q = bench.quick if settings.quick else {}
    spec_fields = {f.name for f in dataclasses.fields(bench)}
    replaced = {k: v for k, v in q.items() if k in spec_fields and k not in _SETTINGS_KEYS and v is not None}
    replaced["arch"] = bench.resolve_arch(settings.arch)
    if replaced["arch"] in bench.arch_tuning:
        replaced["method_defaults"], replaced["tuning"] = bench.arch_tuning[replaced["arch"]]
    elif replaced["arch"] != bench.arch:
        replaced["tuning"] = (f"{bench.tuning or 'not tuned'} (tuned with the {bench.arch} network; "
                              f"not tuned for {replaced['arch']})")
    bench = dataclasses.replace(bench, **replaced)

    def pick(name: str, default: Any) -> Any:
        v = getattr(settings, name)
        return v if v is not None else q.get(name, default)

    stream_kw = {"n_train": pick("n_train", bench.n_train), "n_eval": pick("n_eval", None),
                 "num_tasks": pick("num_tasks", None)}
    train = TrainConfig(epochs=pick("epochs", bench.epochs), batch_size=pick("batch_size", bench.batch_size),
                        lr=pick("lr", bench.lr), weight_decay=pick("weight_decay", bench.weight_decay),
                        device=settings.device, progress=settings.progress)
    traits = bench.traits()
    methods = parse_methods(settings.methods, bench.method_defaults, traits)
    excluded = bench.excluded_methods()
    for m in methods:
        if m.base in excluded:
            own = bench.arch == get_benchmark(bench.name).arch
            on = bench.name if own else f"{bench.name} with arch {bench.arch!r}"
            raise UsageError(f"method {m.base!r} is not available on {on}: {excluded[m.base]}")
    if settings.lam is not None:
        methods = [m.with_overrides({"lam": settings.lam}) if m.kind == "fsd" else m for m in methods]
    for m in methods:  # every estimator's options checked now, not when its method's turn comes
        check_estimator_options(m)
    reference = parse_method("laftr", bench.method_defaults, traits)
    return _Plan(bench, stream_kw, train, methods, reference)


def summarize_runs(runs: list[RunResult]) -> dict[str, Any]:
    """Mean and std over seeds of final average accuracy and BWT, plus the per-seed details."""
    cpu = [r.cpu_time_s for r in runs if r.cpu_time_s is not None]  # runs resumed from older files have none
    return {
        "final_avg_acc": mean_std([r.final_avg_acc for r in runs]),
        "bwt": mean_std([r.bwt for r in runs]),
        "wall_time_s": mean_std([r.wall_time_s for r in runs]),
        **({"cpu_time_s": mean_std(cpu)} if len(cpu) == len(runs) else {}),
        "stored_floats_per_task": [r.stored_floats for r in runs],
        "acc_matrix": [r.acc_matrix for r in runs],
        "seeds": [r.seed for r in runs],
        "runs": [r.to_dict() for r in runs],
    }


def _table(results: dict[str, Any]) -> str:
    rows = []
    for name, m in results["methods"].items():
        if not m.get("summary"):
            continue
        s = m["summary"]
        floats = [f for run in s["stored_floats_per_task"] for f in run]
        per_task = sum(floats) / len(floats) if floats else 0
        acc, bwt = s["final_avg_acc"], s["bwt"]
        rows.append({
            "method": name,
            "avg acc (%)": f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}",
            "BWT (%)": f"{100 * bwt['mean']:+.2f} ± {100 * bwt['std']:.2f}",
            "stored floats / task": f"{per_task:,.0f}",
            "lam": "" if m["spec"]["kind"] != "fsd" else f"{m['spec']['lam']:g}",
            "seeds": acc["n"],
            "time / seed (s)": f"{s['wall_time_s']['mean']:.0f}",
        })
    cols = ["method", "avg acc (%)", "BWT (%)", "stored floats / task", "lam", "seeds", "time / seed (s)"]
    return markdown_table(rows, cols)


def _heatmaps(path: Path, results: dict[str, Any]) -> None:
    items = [(n, m["summary"]["acc_matrix"]) for n, m in results["methods"].items() if m.get("summary")]
    if not items:
        return
    plt = pyplot()
    cols = min(4, len(items))
    rows = (len(items) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols + 1.0, 3.0 * rows + 0.4), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    # axes.flat has rows * cols >= len(items) panels; the spare ones stay off
    for ax, (name, mats) in zip(axes.flat, items, strict=False):
        A = torch.tensor(mats, dtype=torch.float64).mean(0)
        T = A.shape[0]
        masked = A.clone()
        masked[torch.triu(torch.ones(T, T, dtype=torch.bool), 1)] = float("nan")
        ax.axis("on")
        im = ax.imshow(masked.numpy(), vmin=0.5 if results["stream"]["multi_head"] else 0.0, vmax=1.0,
                       cmap="viridis")
        for i in range(T):
            for j in range(i + 1):
                if T <= 10:
                    ax.text(j, i, f"{100 * A[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="k" if A[i, j] > 0.85 else "w")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("task evaluated", fontsize=7)
        ax.set_ylabel("after training task", fontsize=7)
        ax.set_xticks(range(T), [str(j + 1) for j in range(T)], fontsize=6)
        ax.set_yticks(range(T), [str(j + 1) for j in range(T)], fontsize=6)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="accuracy (mean over seeds)")
    fig.suptitle(f"{results['benchmark']} ({results['settings']['split']} accuracy)", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_benchmark(settings: ContinualSettings, out_dir: str | Path, *, force: bool = False,
                  command: str = "laftr continual", resume: bool = False) -> dict[str, Any]:
    """Run every method of ``settings`` for every seed and write the results into ``out_dir``.

    The run is written into the staging folder ``.NAME.partial`` beside ``out_dir`` and moved to ``out_dir``
    when complete, so an earlier run there is replaced only by a finished one. ``results.json`` is rewritten
    after every (method, seed) run, so a long run that is interrupted keeps what it finished in the staging
    folder. Seeds are the outer loop: every method sees the same data and initialization for a given seed.

    With ``resume``, an interrupted run is continued (from the staging folder, or from ``out_dir`` itself
    when an earlier laftr wrote there in place): its finished (method, seed) runs are kept and only the
    missing ones are run. The earlier run's settings must match (apart from progress bars and threads);
    otherwise the folder is left alone and an error says what differs.

    Raises:
        ValueError: unknown benchmark or method, bad settings; ``resume`` and the folder holds no readable
            results.json of the same settings (a :class:`laftr.UsageError`).
        laftr.errors.DatasetNotFoundError: data files missing.
        laftr.errors.OutDirError: ``out_dir`` is not empty and neither ``force`` nor ``resume`` is given.
    """
    # checked at construction; again before touching the disk, in case a field was changed in place
    settings.validate()
    bench, stream_kw, train, methods, reference = settings._plan
    done: dict[str, list[RunResult]] = {}
    earlier_s = 0.0
    folder = RunFolder(out_dir, force=force, resume=resume)
    if resume:
        done, earlier_s = _load_finished_runs(folder, settings)
    data = load_stream_data(bench, settings.data_dir)
    # the first seed's stream is built before the disk is touched: its errors (num_tasks) leave nothing behind
    first = build_stream(bench, data, seed=settings.seeds[0], split=settings.split, **stream_kw)
    out = folder.open()
    if settings.threads is not None:
        torch.set_num_threads(int(settings.threads))
    device = train.resolved_device()
    results: dict[str, Any] = {
        "benchmark": bench.name,
        "settings": dataclasses.asdict(settings),
        "protocol": {"benchmark": bench.describe(), "train": dataclasses.asdict(train), "stream": stream_kw},
        "metadata": run_metadata(command, seed=None, device=_device_name(device)),
        "methods": {m.name: {"spec": m.describe(), "summary": None} for m in methods},
        "stream": None,
        "status": "running",
    }
    runs: dict[str, list[RunResult]] = {m.name: [] for m in methods}
    if resume:
        results["resumed"] = {"earlier_wall_time_s": earlier_s,
                              "earlier_runs": sum(len(v) for v in done.values())}
    t0 = time.perf_counter() - earlier_s
    for seed in settings.seeds:
        stream = first if seed == settings.seeds[0] else build_stream(bench, data, seed=seed,
                                                                       split=settings.split, **stream_kw)
        if results["stream"] is None:
            results["stream"] = stream.describe()
        model_fn = bench.build_model(stream, bench.arch)
        for spec in methods:
            kept = [r for r in done.get(spec.name, []) if r.seed == seed]
            if kept:
                log.info("%s: %s, seed %d: kept from the interrupted run", bench.name, spec.name, seed)
                runs[spec.name].append(kept[0])
                results["methods"][spec.name]["summary"] = summarize_runs(runs[spec.name])
                continue
            log.info("%s: %s, seed %d", bench.name, spec.name, seed)
            run = run_method(stream, spec, model_fn, train, seed=seed, memory_reference=reference)
            runs[spec.name].append(run)
            results["methods"][spec.name]["summary"] = summarize_runs(runs[spec.name])
            results["wall_time_s"] = time.perf_counter() - t0
            write_json_atomic(out / "results.json", results)
            log.info("%s seed %d: final average accuracy %.4f, BWT %.4f (%.0f s)", spec.name, seed,
                     run.final_avg_acc, run.bwt, run.wall_time_s)
    results["status"] = "complete"
    results["wall_time_s"] = time.perf_counter() - t0
    results["table_markdown"] = _table(results)
    write_json_atomic(out / "results.json", results)
    (out / "table.md").write_text(_header(results) + results["table_markdown"] + "\n", encoding="utf-8")
    _heatmaps(out / "heatmaps.png", results)
    folder.commit()
    return results


_RESUME_IGNORED = ("progress", "threads")


def _load_finished_runs(folder: RunFolder,
                        settings: ContinualSettings) -> tuple[dict[str, list[RunResult]], float]:
    """Finished runs of an interrupted ``run_benchmark``, by method, and its wall time so far.

    They are in ``folder``'s staging folder, or at its path when an earlier laftr wrote there in place.
    """
    path = (folder.staging if folder.staging.is_dir() else folder.path) / "results.json"
    if not path.is_file():
        raise UsageError(f"cannot resume: {folder.path / 'results.json'} does not exist and no interrupted "
                          f"run is in {folder.staging}")
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        old_settings = old["settings"]
        methods = old["methods"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot resume: {path} is not a results file of laftr continual ({exc})") from exc
    new_settings = dataclasses.asdict(settings)
    diff = sorted(k for k in set(old_settings) | set(new_settings)
                  if k not in _RESUME_IGNORED and old_settings.get(k) != new_settings.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old_settings.get(k)!r} there vs {new_settings.get(k)!r} now" for k in diff)
        raise UsageError(f"cannot resume {path}: its settings differ ({shown})")
    done: dict[str, list[RunResult]] = {}
    fields = {f.name for f in dataclasses.fields(RunResult)}
    for name, m in methods.items():
        summary = m.get("summary") or {}
        done[name] = [RunResult(**{k: v for k, v in r.items() if k in fields})
                      for r in summary.get("runs", [])]
    return done, float(old.get("wall_time_s", 0.0))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device)


def _header(results: dict[str, Any]) -> str:
    p = results["protocol"]
    tr, st = p["train"], p["stream"]
    wd = tr.get("weight_decay") or 0
    opt = f"AdamW lr {tr['lr']}, weight decay {wd}" if wd else f"Adam lr {tr['lr']}"
    arch = p["benchmark"].get("arch", "mlp")
    return (
        f"# {results['benchmark']} ({results['settings']['split']} accuracy)\n\n"
        f"{len(results['settings']['seeds'])} seed(s); network {arch}; {tr['epochs']} epochs per task, batch "
        f"{tr['batch_size']}, {opt}; training examples per task: {st['n_train'] or 'all'}; "
        f"device {results['metadata']['device']}; git {results['metadata']['git_revision']}.\n"
        "avg acc: mean accuracy over all tasks after the last one; BWT: mean over tasks of final minus "
        "just-learned accuracy; mean ± std over seeds.\n\n"
    )
