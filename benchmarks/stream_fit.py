"""Fit LAFTR and K-FAC on a stream larger than memory: Fashion-MNIST augmented on the fly (issue 9, item 4).

The stream (:class:`AugmentedStream`) is an ``IterableDataset`` of ``(x, y)`` batches made on the fly from the
60,000 training images, read from a memory-mapped uint8 ``.npy``: example ``i`` of the stream is image
``i mod 60000`` shifted by up to +-2 pixels in each direction (zero padding) and flipped horizontally with
probability 1/2, the shift and the flip taken from a hash of ``(seed, i)``. So example ``i`` is the same
whatever the sharding and the batch size, and no more than one batch of examples ever exists in memory.
Rank ``r`` of ``W`` reads its contiguous share, examples ``r*N//W`` up to ``(r+1)*N//W``.

Each (estimator, N, process count) fits in fresh processes (``torch.multiprocessing.spawn``; 2 processes form a
gloo group over a file:// store, 1 process has no group), each with ``torch.set_num_threads(--threads)``.
Inside each process: the RSS before the fit, the wall time of the fit, and the peak RSS after it: VmHWM of
/proc/self/status, the process's own peak (``ru_maxrss`` of a spawned process also counts the spawning
parent's RSS at the fork, so it is only recorded), reset just before the fit (/proc/self/clear_refs) so that
the growth over the fit is the peak during the fit less the RSS before it. The memory map's pages count once
touched: up to 45 MiB, all of them from N = 60,000 on. A row gives the fit's wall time (max over ranks),
examples/s (N over it), the peak RSS and its growth over the fit (max over ranks) and the speed-up of P
processes over 1 at the same N. The checks printed at the end: the peak RSS at the largest N is within 5 % (or
10 MiB) of the smallest N, and the 2-process speed-up is at least 1.6. With ``--verify`` (on in ``--quick``)
every multi-process fit's summary tensors are compared with the 1-process fit on the same stream (float64
sums of the same float32 batches, equal up to the order of the float64 additions; K-FAC keeps its factors in
the model's float32, so 1e-7 there) and the ranks' tensors with each other (bit-identical).

    # the full run (minutes: 2 x 1.1 M examples per estimator; run it on a quiet machine, 2 free cores)
    OMP_NUM_THREADS=1 python benchmarks/stream_fit.py --n 100000,1000000 --estimators laftr,kfac \
        --procs 1,2 --batch-size 1000 --threads 1 --out benchmarks/results/stream_fit.json
    # a check in under a minute
    OMP_NUM_THREADS=1 python benchmarks/stream_fit.py --quick --out /tmp/stream_fit_quick.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "laftr": {"input_model": "gaussian"},
    "kfac": {"fisher": "exact"},
}
SHIFT = 2  # pixels, each direction
MEMORY_RTOL, MEMORY_ATOL_MIB = 0.05, 10.0
TARGET_SPEEDUP = 1.6
VERIFY_RTOL = 1e-6  # max |a - b| / max |a| per tensor: float64 sums of the same float32 batches

_M64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------- the stream


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def example_hash(seed: int, index: np.ndarray) -> np.ndarray:
    """A 64-bit hash of ``(seed, i)`` for every global example index ``i`` (uint64)."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        base = _mix(np.array([(int(seed) * 0x9E3779B97F4A7C15 + 1) & _M64], dtype=np.uint64))
        return _mix(base + (index.astype(np.uint64) + np.uint64(1)) * golden)


def augmentations(seed: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dy, dx, flip)`` of the examples ``start .. stop-1``: shifts in ``-SHIFT..SHIFT``, flips 0/1."""
    h = example_hash(seed, np.arange(start, stop, dtype=np.int64))
    side = np.uint64(2 * SHIFT + 1)
    dy = (h % side).astype(np.int64) - SHIFT
    dx = ((h // side) % side).astype(np.int64) - SHIFT
    flip = ((h >> np.uint64(32)) & np.uint64(1)).astype(bool)
    return torch.from_numpy(dy), torch.from_numpy(dx), torch.from_numpy(flip)


def augment(images: np.ndarray, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Images ``(B, H, W)`` uint8 shifted by ``(dy, dx)`` (zeros come in) and flipped where ``flip``.

    Returns float32 ``(B, H*W)`` in ``[0, 1]``.
    """
    x = torch.from_numpy(np.array(images, dtype=np.uint8))  # a copy: the map is read-only
    B, H, W = x.shape
    padded = F.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT))
    rows = (SHIFT - dy)[:, None] + torch.arange(H)[None, :]  # output row r reads input row r - dy
    cols = (SHIFT - dx)[:, None] + torch.arange(W)[None, :]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded[torch.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.reshape(B, H * W).to(torch.float32).div_(255.0)


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share of ``n`` examples: ``[rank*n//world, (rank+1)*n//world)``."""
    return rank * n // world, (rank + 1) * n // world


class AugmentedStream(torch.utils.data.IterableDataset):
    """``(x, y)`` batches of the augmented examples ``start .. stop-1``, made on the fly.

    ``images``: ``(M, H, W)`` uint8 (a memory-mapped ``.npy`` is fine), ``labels``: ``(M,)``. Example ``i`` is
    ``images[i % M]`` augmented by the hash of ``(seed, i)``; batches are ``batch_size`` consecutive examples
    from ``start``. Every iteration yields the same batches; nothing but the current batch is held.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, start: int, stop: int, batch_size: int,
                 seed: int) -> None:
        super().__init__()
        self.images, self.labels = images, labels
        self.start, self.stop, self.batch_size, self.seed = int(start), int(stop), int(batch_size), int(seed)

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)

    def batch(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples ``a .. b-1`` (global indices) as ``(x (B, 784) float32, y (B,) int64)``."""
        M = len(self.images)
        src = np.arange(a, b, dtype=np.int64) % M
        lo, hi = int(src[0]), int(src[-1]) + 1
        # a contiguous slice of the memory map when the batch does not wrap around, else fancy indexing
        imgs = self.images[lo:hi] if hi - lo == b - a else self.images[src]
        labs = self.labels[lo:hi] if hi - lo == b - a else self.labels[src]
        x = augment(imgs, *augmentations(self.seed, a, b))
        return x, torch.from_numpy(np.asarray(labs, dtype=np.int64))

    def __iter__(self) -> Any:
        for a in range(self.start, self.stop, self.batch_size):
            yield self.batch(a, min(a + self.batch_size, self.stop))


# --------------------------------------------------------------------------------------------- one process


def _status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process from /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_mib() -> float:
    """``ru_maxrss`` of this process (MiB; KiB on Linux).

    In a spawned process it is at least the spawning parent's RSS at the fork: Linux keeps the pre-exec
    high-water mark. So the rows use VmHWM (this process's own peak) and record this only for reference.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(rank: int, world: int, cfg: dict[str, Any]) -> None:
    import torch.distributed as dist

    import laftr
    from laftr.models import mlp

    torch.set_num_threads(cfg["threads"])
    if world > 1:
        dist.init_process_group("gloo", init_method=cfg["store"], rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    try:
        images = np.load(cfg["images"], mmap_mode="r")
        labels = np.load(cfg["labels"])
        torch.manual_seed(0)
        model = mlp(784, (256, 256), 10)
        model.load_state_dict(torch.load(cfg["model"], weights_only=True))
        start, stop = shard_range(cfg["n"], rank, world)
        stream = AugmentedStream(images, labels, start, stop, cfg["batch_size"], cfg["seed"])
        est = laftr.make_estimator(cfg["estimator"], **cfg["options"])
        if world > 1:
            dist.barrier()
        gc.collect()
        rss_before, peak_before = _status_mib("VmRSS"), _status_mib("VmHWM")
        reset = _reset_peak()  # then VmHWM after the fit is the peak during the fit
        t0, c0 = time.perf_counter(), time.process_time()
        est.fit(model, stream)
        fit_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        hwm, rss_after = _status_mib("VmHWM"), _status_mib("VmRSS")
        res = {"rank": rank, "examples": stop - start, "fit_s": fit_s, "cpu_s": cpu_s,
               "rss_before_mib": rss_before, "peak_rss_before_mib": peak_before,
               "peak_rss_mib": max(peak_before, hwm), "fit_peak_rss_mib": hwm if reset else None,
               "rss_growth_mib": (hwm if reset else max(peak_before, hwm)) - rss_before,
               "rss_after_mib": rss_after, "peak_reset": reset, "ru_maxrss_mib": _ru_maxrss_mib(),
               "threads": torch.get_num_threads()}
        out = Path(cfg["result_dir"])
        (out / f"rank{rank}.json").write_text(json.dumps(res))
        if cfg["save_state"]:
            laftr.save(est, out / f"state{rank}.laftr")
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_fit(cfg: dict[str, Any], world: int, tmp: Path, tag: str) -> tuple[list[dict[str, Any]], Path, float]:
    """Spawn ``world`` fresh processes fitting ``cfg``; their per-rank results, their folder, the spawn's wall."""
    import torch.multiprocessing as mp

    result_dir = tmp / tag
    result_dir.mkdir()
    cfg = {**cfg, "result_dir": str(result_dir), "store": f"file://{tmp / (tag + '.store')}"}
    t0 = time.perf_counter()
    mp.spawn(_worker, args=(world, cfg), nprocs=world, join=True)
    wall = time.perf_counter() - t0
    ranks = [json.loads((result_dir / f"rank{r}.json").read_text()) for r in range(world)]
    return ranks, result_dir, wall


# --------------------------------------------------------------------------------------------- the driver


def parse_estimators(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, name, options)`` per spec of ``text`` (laftr's spec grammar); defaults of DEFAULT_OPTIONS."""
    from laftr.specs import format_spec, parse_spec, split_specs

    out = []
    for s in split_specs(text, "--estimators"):
        spec = parse_spec(s, "--estimators")
        options = {**DEFAULT_OPTIONS.get(spec.base, {}), **spec.options}
        out.append((format_spec(spec.base, options), spec.base, options))
    return out


def ints(text: str) -> list[int]:
    return [int(float(t)) for t in text.split(",") if t.strip()]


def prepare(tmp: Path, seed: int, train_steps: int) -> dict[str, Any]:
    """Fashion-MNIST's training images as a uint8 ``.npy`` (memory-mapped by the fits), labels, a trained MLP."""
    from laftr.data import load_fashion_mnist
    from laftr.models import mlp

    ds = load_fashion_mnist()
    x = ds.x_train.reshape(-1, 28, 28)
    images = (x * 255).round().to(torch.uint8).numpy()
    labels = ds.y_train.numpy().astype(np.int64)
    np.save(tmp / "images.npy", images)
    np.save(tmp / "labels.npy", labels)
    torch.manual_seed(seed)
    model = mlp(784, (256, 256), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for _ in range(train_steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = F.cross_entropy(model(x[idx].reshape(128, -1)), ds.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(ds.x_test.reshape(len(ds.x_test), -1)).argmax(1) == ds.y_test).float().mean().item()
    torch.save(model.state_dict(), tmp / "model.pt")
    del ds, x
    return {"images": str(tmp / "images.npy"), "labels": str(tmp / "labels.npy"), "model": str(tmp / "model.pt"),
            "train": {"steps": train_steps, "batch": 128, "lr": 0.1, "momentum": 0.9,
                      "last_loss": float(loss), "test_accuracy": acc,
                      "seconds": time.perf_counter() - t0}}


def summary_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The summary tensors of a file written by ``laftr.save`` (its ``state/...`` tensors; theta0 left out)."""
    from safetensors.torch import load_file

    return {k.removeprefix("state/"): v for k, v in load_file(path).items() if k.startswith("state/")}


def compare_states(ref: Path, other: Path) -> dict[str, Any]:
    """Max over tensors of ``max |a - b| / max |a|`` between two saved summaries (same keys expected)."""
    a, b = summary_tensors(ref), summary_tensors(other)
    if sorted(a) != sorted(b):
        return {"same_keys": False, "max_rel_diff": float("inf"), "worst": None}
    worst, rel = None, 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        if x.shape != y.shape:
            return {"same_keys": True, "max_rel_diff": float("inf"), "worst": k}
        scale = x.abs().max().item() if x.numel() else 0.0
        d = (x - y).abs().max().item() if x.numel() else 0.0
        r = d / scale if scale > 0 else d
        if r > rel or worst is None:
            worst, rel = k, max(rel, r)
    return {"same_keys": True, "max_rel_diff": rel, "worst": worst, "tensors": len(a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="100000,1000000", help="stream lengths N (comma-separated)")
    ap.add_argument("--estimators", default="laftr,kfac",
                    help="estimator specs, e.g. 'laftr,kfac[fisher=mc]' (defaults: laftr[input_model=gaussian], "
                         "kfac[fisher=exact])")
    ap.add_argument("--procs", default="1,2", help="process counts (1 must be among them for the speed-up)")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--seed", type=int, default=0, help="seed of the augmentations and of the model")
    ap.add_argument("--train-steps", type=int, default=300, help="SGD steps training the MLP before the fits")
    ap.add_argument("--verify", action="store_true",
                    help="compare every multi-process fit with the 1-process fit (on in --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="N = 2000,4000, batch 500, 50 training steps, --verify: a check in under a minute")
    ap.add_argument("--out", required=True, help="results JSON (refuses to overwrite without --force)")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n, args.batch_size, args.train_steps, args.verify = "2000,4000", 500, 50, True
    out = Path(args.out)
    if out.exists() and not args.force:
        sys.exit(f"{out} exists; pass --force to replace it")
    ns, procs = sorted(set(ints(args.n))), sorted(set(ints(args.procs)))
    if not ns or min(ns) < 1 or not procs or min(procs) < 1 or args.batch_size < 1 or args.threads < 1:
        sys.exit("--n, --procs, --batch-size and --threads must be positive")
    estimators = parse_estimators(args.estimators)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the spawned processes
    torch.set_num_threads(args.threads)
    from laftr.report import markdown_table, run_metadata, write_json_atomic

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    meta = run_metadata(command, seed=args.seed, device="cpu")
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    verify: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="stream_fit_") as tmpdir:
        tmp = Path(tmpdir)
        data = prepare(tmp, args.seed, args.train_steps)
        print(f"model trained: {data['train']['steps']} steps, test accuracy {data['train']['test_accuracy']:.3f}",
              flush=True)
        for label, name, options in estimators:
            for n in ns:
                one: dict[str, Any] | None = None
                states: dict[int, Path] = {}
                for p in procs:
                    cfg = {"images": data["images"], "labels": data["labels"], "model": data["model"],
                           "estimator": name, "options": options, "n": n, "batch_size": args.batch_size,
                           "seed": args.seed, "threads": args.threads, "save_state": args.verify}
                    tag = f"{name}-{len(rows)}"
                    ranks, rdir, wall = run_fit(cfg, p, tmp, tag)
                    fit_s = max(r["fit_s"] for r in ranks)
                    row = {"estimator": label, "n": n, "procs": p, "threads": args.threads,
                           "batch_size": args.batch_size, "fit_s": fit_s, "examples_per_s": n / fit_s,
                           "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
                           "rss_before_mib": max(r["rss_before_mib"] for r in ranks),
                           "rss_growth_mib": max(r["rss_growth_mib"] for r in ranks),
                           "ru_maxrss_mib": max(r["ru_maxrss_mib"] for r in ranks),
                           "cpu_s": sum(r["cpu_s"] for r in ranks), "spawn_wall_s": wall, "speedup": None,
                           "per_rank": ranks, "load_average": list(os.getloadavg())}
                    if p == 1:
                        one = row
                    if one is not None:
                        row["speedup"] = row["examples_per_s"] / one["examples_per_s"]
                    rows.append(row)
                    print(f"{label} N={n} procs={p}: fit {fit_s:.2f} s, {row['examples_per_s']:.0f} ex/s, "
                          f"peak RSS {row['peak_rss_mib']:.1f} MiB (+{row['rss_growth_mib']:.1f} over the fit)",
                          flush=True)
                    if args.verify:
                        states[p] = rdir
                        if p > 1 and 1 in states:
                            v = {"estimator": label, "n": n, "procs": p,
                                 "vs_one_process": compare_states(states[1] / "state0.laftr", rdir / "state0.laftr"),
                                 "ranks_identical": all(
                                     compare_states(rdir / "state0.laftr", rdir / f"state{r}.laftr")["max_rel_diff"] == 0
                                     for r in range(1, p))}
                            v["ok"] = bool(v["vs_one_process"]["max_rel_diff"] <= VERIFY_RTOL and v["ranks_identical"])
                            verify.append(v)

    checks: list[dict[str, Any]] = []
    lo, hi = ns[0], ns[-1]
    for label, _, _ in estimators:
        for p in procs:
            if hi == lo:
                break
            a = next(r for r in rows if r["estimator"] == label and r["n"] == lo and r["procs"] == p)
            b = next(r for r in rows if r["estimator"] == label and r["n"] == hi and r["procs"] == p)
            diff = b["peak_rss_mib"] - a["peak_rss_mib"]
            tol = max(MEMORY_RTOL * a["peak_rss_mib"], MEMORY_ATOL_MIB)
            checks.append({"check": "memory flat in N", "estimator": label, "procs": p,
                           "detail": f"peak RSS {a['peak_rss_mib']:.1f} MiB at N={lo}, {b['peak_rss_mib']:.1f} "
                                     f"MiB at N={hi} (diff {diff:+.1f}, tolerance {tol:.1f})",
                           "ok": abs(diff) <= tol})
        for n in ns:
            for r in rows:
                if r["estimator"] == label and r["n"] == n and r["procs"] == 2 and r["speedup"] is not None:
                    checks.append({"check": f"2-process speed-up >= {TARGET_SPEEDUP}", "estimator": label,
                                   "procs": 2, "detail": f"N={n}: {r['speedup']:.2f}x"
                                   + (" (quick sizes: fixed costs dominate)" if args.quick else ""),
                                   "ok": r["speedup"] >= TARGET_SPEEDUP})
    for v in verify:
        checks.append({"check": "P-process fit == 1-process fit", "estimator": v["estimator"], "procs": v["procs"],
                       "detail": f"N={v['n']}: max rel diff {v['vs_one_process']['max_rel_diff']:.2e} "
                                 f"(<= {VERIFY_RTOL:g}), ranks identical {v['ranks_identical']}",
                       "ok": v["ok"]})

    meta["load_average_end"] = list(os.getloadavg())
    result = {**meta, "config": {"n": ns, "procs": procs, "estimators": [e[0] for e in estimators],
                                 "batch_size": args.batch_size, "threads": args.threads, "quick": args.quick,
                                 "augmentation": f"shift +-{SHIFT} px (zero padding), horizontal flip p=1/2, "
                                                 "from a SplitMix64 hash of (seed, global index)",
                                 "source": "Fashion-MNIST train (60,000), uint8 .npy memory-mapped, example i "
                                           "from image i mod 60000",
                                 "model": "mlp(784, (256, 256), 10) float32", "train": data["train"]},
              "rows": rows, "verify": verify, "checks": checks, "wall_s": time.perf_counter() - t_start}
    write_json_atomic(out, result)
    cols = ["estimator", "n", "procs", "fit_s", "examples_per_s", "speedup", "peak_rss_mib", "rss_growth_mib"]
    print()
    print(markdown_table(rows, cols, floatfmt=".4g"))
    print()
    print(markdown_table(checks, ["check", "estimator", "procs", "detail", "ok"]))
    print(f"\nwrote {out} ({result['wall_s']:.1f} s)")


if __name__ == "__main__":
    main()
