"""laftr summarize / laftr distance from the shell: a user's own model and tensors, and bad input.

The model files here are whole pickled modules, so they are passed with --trust-pickle (see test_cli_errors.py
for the refusal without it)."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import mlp, perturbed

import laftr
from laftr.cli import main


@pytest.fixture()
def files(tmp_path):
    torch.manual_seed(0)
    model = mlp(5, (8,), 3)
    other = perturbed(model, 0.3)
    X = torch.randn(200, 5)
    Y = torch.randint(0, 3, (200,))
    torch.save(model, tmp_path / "net0.pt")
    torch.save(other, tmp_path / "net1.pt")
    torch.save(other.state_dict(), tmp_path / "w1.pt")
    torch.save((X, Y), tmp_path / "data.pt")
    return tmp_path, model, other, X, Y


def test_summarize_then_distance_matches_the_library(files, capsys):
    d, model, other, X, Y = files
    out = d / "s.laftr"
    rc = main(["summarize", "--model", str(d / "net0.pt"), "--trust-pickle", "--tensors", str(d / "data.pt"), "--estimator",
               "laftr-exact", "--metric", "l2", "--set", "input_model=diag", "--classes", "0,2", "--out", str(out),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "stored floats" in capsys.readouterr().out
    est = laftr.load(out)
    keep = torch.isin(Y, torch.tensor([0, 2]))
    ref = laftr.make_estimator("laftr-exact", metric="l2", input_model="diag").fit(model, (X[keep], Y[keep]))
    assert est.stored_floats() == ref.stored_floats()
    torch.testing.assert_close(est(other), ref(other))
    rc = main(["distance", str(out), "--model", str(d / "net1.pt"), "--trust-pickle", "--tensors", str(d / "data.pt"),
               "--classes", "0,2", "--calls", "1"])
    text = capsys.readouterr().out
    assert rc == 0
    assert f"{float(ref(other)):.6g}" in text
    truth = laftr.exact_fsd(model, other, X[keep])
    assert f"exact FSD over {int(keep.sum())} examples: {float(truth):.6g}" in text
    # theta0 rebuilt from the file equals the original network
    m0 = est.theta0_model(copy.deepcopy(other))
    assert all(torch.equal(a, b) for a, b in zip(m0.parameters(), model.parameters()))


def test_factory_and_weights(files, capsys, monkeypatch):
    d = files[0]
    (d / "mynets.py").write_text("from torch import nn\n\ndef small():\n    return nn.Sequential(nn.Linear(5, 8), "
                                 "nn.ReLU(), nn.Linear(8, 3))\n")
    monkeypatch.chdir(d)
    out = d / "s.laftr"
    assert main(["summarize", "--model", str(d / "net0.pt"), "--trust-pickle", "--tensors", str(d / "data.pt"),
                 "--out", str(out), "--set", "num_samples=32", "--no-progress"]) == 0
    assert main(["distance", str(out), "--model", "mynets:small", "--weights", str(d / "w1.pt"), "--calls", "3"]) == 0
    assert "laftr estimate (kl)" in capsys.readouterr().out


def test_bad_input(files, capsys):
    d = files[0]
    out = d / "s.laftr"
    base = ["summarize", "--tensors", str(d / "data.pt"), "--out", str(out), "--no-progress", "--trust-pickle"]
    assert main([*base, "--model", str(d / "missing.pt")]) == 2
    assert "no model file" in capsys.readouterr().err
    assert main([*base, "--model", str(d / "w1.pt")]) == 2
    assert "state dict" in capsys.readouterr().err
    assert main([*base, "--model", "nosuchpkg.mod:make"]) == 2
    assert "cannot import" in capsys.readouterr().err
    assert main([*base, "--model", str(d / "net0.pt"), "--metric", "cosine"]) == 2
    assert "unknown metric" in capsys.readouterr().err
    assert main([*base, "--model", str(d / "net0.pt"), "--set", "input_modle=diag"]) == 2
    assert "input_modle" in capsys.readouterr().err
    assert main(["summarize", "--model", str(d / "net0.pt"), "--trust-pickle", "--out", str(out)]) == 2
    assert "exactly one of --dataset and --tensors" in capsys.readouterr().err
    assert main([*base, "--model", str(d / "net0.pt")]) == 0
    assert main([*base, "--model", str(d / "net0.pt")]) == 1  # exists, no --force
    assert "--force" in capsys.readouterr().err
    (d / "junk.laftr").write_bytes(b"junk")
    assert main(["distance", str(d / "junk.laftr"), "--model", str(d / "net0.pt"), "--trust-pickle"]) == 2
    assert "not a readable laftr summary" in capsys.readouterr().err
    torch.save(mlp(5, (9,), 3), d / "wide.pt")
    assert main(["distance", str(out), "--model", str(d / "wide.pt"), "--trust-pickle"]) == 2
    assert "architecture mismatch" in capsys.readouterr().err


@pytest.mark.parametrize("device,match", [("gpu", "unknown --device 'gpu'"), ("meta", "holds no values"),
                                          ("cuda", "asks for CUDA")])
def test_a_device_the_machine_lacks_is_refused(files, capsys, device, match):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    d = files[0]
    for cmd in (["summarize", "--model", str(d / "net0.pt"), "--trust-pickle", "--tensors", str(d / "data.pt"),
                 "--out", str(d / "s.laftr"), "--no-progress"],
                ["distance", str(d / "missing.laftr"), "--model", str(d / "net1.pt"), "--trust-pickle"]):
        assert main([*cmd, "--device", device]) == 2
        assert match in capsys.readouterr().err
    assert not (d / "s.laftr").exists()
