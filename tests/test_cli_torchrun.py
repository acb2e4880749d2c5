"""``laftr summarize`` / ``distance`` as several processes (torchrun, gloo) and the refusal of the others.

``torchrun --nproc-per-node 2 -m laftr summarize ...`` must write one summary file, the one a single process
writes on all the data; ranks started by hand with the environment torchrun sets show each rank's own exit
code and output (torchrun stops the other ranks as soon as one fails).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import laftr
from laftr.cli import main
from laftr.cli.common import launched_world, shard

TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    """The environment of a child: this checkout's laftr first, one thread, no launcher variables."""
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    src = str(Path(laftr.__file__).resolve().parents[1])
    out["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
    out["OMP_NUM_THREADS"] = "1"
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("torchrun")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    other = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    torch.save(model, d / "net.pt")
    torch.save(other, d / "other.pt")
    torch.save((torch.randn(61, 5), torch.randint(0, 3, (61,))), d / "data.pt")
    return d


def summarize_args(d: Path, out: Path, *extra: str) -> list[str]:
    return ["summarize", "--model", str(d / "net.pt"), "--trust-pickle", "--tensors", str(d / "data.pt"),
            "--estimator", "laftr", "--set", "input_model=classwise", "--out", str(out), "--no-progress", *extra]


def torchrun(d: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "laftr", *argv]
    return subprocess.run(cmd, cwd=d, env=env(), capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def by_hand(d: Path, *argv: str) -> list[subprocess.CompletedProcess[str]]:
    """Two ranks started with the variables torchrun sets; each rank's own exit code and output."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        e = env() | {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "laftr", *argv], cwd=d, env=e, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the ranks did not finish (a hang?)")
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_torchrun_summarize_writes_the_single_process_summary(files: Path, capsys: pytest.CaptureFixture[str]):
    d = files
    r = torchrun(d, *summarize_args(d, d / "two.laftr"))
    assert r.returncode == 0, r.stderr
    # rank 0 alone printed (one "wrote" line) and wrote (one file)
    assert r.stdout.count("wrote ") == 1 and "by 2 processes" in r.stdout, r.stdout
    assert sorted(p.name for p in d.glob("*.laftr")) == ["two.laftr"]
    assert main(summarize_args(d, d / "one.laftr")) == 0
    capsys.readouterr()
    two, one = laftr.load(d / "two.laftr"), laftr.load(d / "one.laftr")
    a, _ = two._state()
    b, _ = one._state()
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)  # float32 forward, float64 sums
    assert two.config == one.config and two.outputs == one.outputs
    for k, v in one.theta0.items():
        assert torch.equal(two.theta0[k], v), k


def test_torchrun_distance_prints_once(files: Path, capsys: pytest.CaptureFixture[str]):
    d = files
    summary = d / "for-distance.laftr"
    assert main(summarize_args(d, summary)) == 0
    capsys.readouterr()
    argv = ["distance", str(summary), "--model", str(d / "other.pt"), "--trust-pickle", "--tensors",
            str(d / "data.pt"), "--calls", "2"]
    r = torchrun(d, *argv)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("laftr estimate") == 1 and "(2 on each of 2 processes)" in r.stdout, r.stdout
    assert main(argv) == 0
    single = capsys.readouterr().out
    exact = [line for line in single.splitlines() if line.startswith("exact FSD")][0].split(" (")[0]
    assert exact in r.stdout  # the exact FSD over the two shards: the one of all the data (6 digits)


def test_ranks_stay_silent_and_fail_together(files: Path):
    d = files
    ok = by_hand(d, *summarize_args(d, d / "hand.laftr"))
    assert [p.returncode for p in ok] == [0, 0], [p.stderr for p in ok]
    assert "wrote" in ok[0].stdout and ok[1].stdout == "" and ok[1].stderr == ""
    # a bad option: a user error (exit 2) on every rank, nothing written
    bad = by_hand(d, *summarize_args(d, d / "bad.laftr", "--set", "no_such_option=1"))
    assert [p.returncode for p in bad] == [2, 2]
    for p in bad:
        assert "no_such_option" in p.stderr and p.stdout == ""
    assert not (d / "bad.laftr").exists()


@pytest.mark.parametrize("argv", [["continual", "--benchmark", "split-digits", "--quick", "--out", "never"],
                                  ["fsd-bench", "--quick", "--out", "never"], ["demo", "--quick", "--out", "never"]])
def test_other_commands_refuse_several_processes(argv: list[str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"laftr {argv[0]} does not run as several processes (WORLD_SIZE=2" in err
    assert not (tmp_path / "never").exists()


def test_launcher_environment(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert launched_world() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "3")
    assert main(["continual", "--benchmark", "split-digits", "--quick", "--out", "never"]) == 2
    assert "RANK=3 and WORLD_SIZE=3" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "2")
    assert launched_world() == (2, 3)
    # summarize under WORLD_SIZE > 1 without the rendezvous address: a usage error, no hang
    assert main(["summarize", "--model", "x.pt", "--tensors", "y.pt", "--out", "z.laftr"]) == 2
    assert "MASTER_ADDR and MASTER_PORT not set" in capsys.readouterr().err


def test_shard_is_contiguous_and_covers_every_example() -> None:
    x = torch.arange(10)
    parts = [shard(r, 3, x, None) for r in range(3)]
    assert [p[1] for p in parts] == [None, None, None]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert [len(p[0]) for p in parts] == [3, 3, 4]
    assert len(shard(0, 4, torch.arange(2))[0]) == 0  # more ranks than examples: empty parts
