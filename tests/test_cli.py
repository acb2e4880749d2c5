"""The command-line interface: demo (quick), out-folder safety, info, --version, bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import laftr
from laftr.cli import SUBCOMMANDS, main
from laftr.report import markdown_table, prepare_out_dir, write_json_atomic


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo"
    rc = main(["demo", "--quick", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def test_demo_quick_writes_outputs(demo_dir, capsys):
    for name in ("report.md", "results.json", "demo.png", "taskA.laftr"):
        assert (demo_dir / name).is_file() and (demo_dir / name).stat().st_size > 0, name
    res = json.loads((demo_dir / "results.json").read_text())
    assert [r["model"].split(" (")[0] for r in res["rows"]] == [
        "theta0",
        "fine-tuned on B",
        "LAFTR-reg. on B",
    ]
    assert res["metadata"]["command"].startswith("laftr demo")
    assert res["rows"][0]["fsd_true"] == pytest.approx(0.0, abs=1e-6)
    assert res["sizes"]["summary_stored_floats"] > 0
    report = (demo_dir / "report.md").read_text()
    assert "acc_A" in report and res["dataset"] in report


def test_demo_refuses_non_empty_dir(demo_dir, capsys):
    rc = main(["demo", "--quick", "--out", str(demo_dir), "--no-progress"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err


def test_info(demo_dir, capsys):
    assert main(["info", str(demo_dir / "taskA.laftr")]) == 0
    out = capsys.readouterr().out
    assert "estimator:     laftr" in out and "[0, 1, 2, 3, 4]" in out and "stored floats" in out


def test_info_of_an_estimator_that_keeps_no_site_statistics(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    laftr.save(laftr.make_estimator("laftr", gates="relu").fit(model, torch.randn(30, 4)), tmp_path / "r.laftr")
    assert main(["info", str(tmp_path / "r.laftr")]) == 0
    out = capsys.readouterr().out
    assert "sites (1, statistics stored for 0):" in out and "nothing stored" in out
    assert "stored floats: 20 (beyond theta0)" in out  # the Gaussian input model alone: 4 + 16


def test_info_corrupt_file(demo_dir, tmp_path, capsys):
    bad = tmp_path / "bad.laftr"
    raw = (demo_dir / "taskA.laftr").read_bytes()
    bad.write_bytes(raw[: len(raw) // 3])
    assert main(["info", str(bad)]) == 2
    assert "error" in capsys.readouterr().err
    junk = tmp_path / "junk.laftr"
    junk.write_bytes(b"not a summary at all")
    assert main(["info", str(junk)]) == 2
    assert main(["info", str(tmp_path / "missing.laftr")]) == 2


def test_version_and_bad_args(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert laftr.__version__ in capsys.readouterr().out
    for argv in ([], ["nope"], ["demo", "--seed", "x"], ["info"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert {"demo", "info"} <= set(SUBCOMMANDS)


def test_python_m_laftr():
    r = subprocess.run(
        [sys.executable, "-m", "laftr", "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0 and laftr.__version__ in r.stdout


def test_report_helpers(tmp_path):
    p = write_json_atomic(tmp_path / "a" / "r.json", {"x": 1.5})
    assert json.loads(p.read_text()) == {"x": 1.5}
    assert [f.name for f in p.parent.iterdir()] == ["r.json"]
    t = markdown_table([{"a": 1, "b": 0.123456}, {"a": 2}], ["a", "b"])
    assert t.splitlines()[0].startswith("| a") and "0.1235" in t and len(t.splitlines()) == 4
    d = tmp_path / "out"
    prepare_out_dir(d)
    (d / "f").write_text("x")
    with pytest.raises(RuntimeError, match="not empty"):
        prepare_out_dir(d)
    prepare_out_dir(d, force=True)
