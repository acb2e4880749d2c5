"""The command line's one error guard: user mistakes give a message and exit 2 (an output path in the way: 1),
Ctrl-C exits 130, internal errors keep their traceback and exit 1; model files are unpickled only with
--trust-pickle; module:factory + weights (torch state dict or safetensors) work."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import laftr
from laftr.cli import SUBCOMMANDS, main
from laftr.cli.loading import check_model_accepts, load_model

FACTORY_MODULE = "cli_errors_nets"  # a name no other test module imports


class _Marker:
    """Unpickling this creates the file ``path`` (a stand-in for any code a crafted pickle can run)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture()
def files(tmp_path, monkeypatch):
    torch.manual_seed(0)
    (tmp_path / f"{FACTORY_MODULE}.py").write_text(
        "from torch import nn\n\n"
        "def small():\n    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))\n\n"
        "def image_mlp():\n    return nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, FACTORY_MODULE, raising=False)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    torch.save(model, tmp_path / "net.pt")  # a whole pickled module
    torch.save(model.state_dict(), tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save((torch.randn(40, 5), torch.randint(0, 3, (40,))), tmp_path / "data.pt")
    torch.save((torch.rand(40, 1, 8, 8), torch.randint(0, 3, (40,))), tmp_path / "images.pt")
    (tmp_path / "notes.txt").write_text("these are not tensors\n")
    return tmp_path, model


def _summarize(d, *extra):
    return ["summarize", "--tensors", str(d / "data.pt"), "--estimator", "weight", "--no-progress",
            "--out", str(d / "s.laftr"), *extra]


# ---------------------------------------------------------------------------------------------- pickles
def test_crafted_pickle_is_refused_and_runs_nothing(files, capsys):
    d, _ = files
    marker = d / "marker-created-by-unpickling"
    with open(d / "evil.pt", "wb") as f:
        import pickle

        pickle.dump(_Marker(str(marker)), f)
    assert main(_summarize(d, "--model", str(d / "evil.pt"))) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "laftr summarize: error:" in err and "Traceback" not in err
    assert "can run code" in err and "--trust-pickle" in err and "package.module:factory" in err
    # never unpickled as weights or tensors, --trust-pickle or not
    net = ["--model", f"{FACTORY_MODULE}:small", "--out", str(d / "s.laftr"), "--trust-pickle"]
    for argv in (["summarize", *net, "--weights", str(d / "evil.pt"), "--tensors", str(d / "data.pt")],
                 ["summarize", *net, "--factory-weights", "--tensors", str(d / "evil.pt")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert not marker.exists() and "can run code" in err and "Traceback" not in err
    assert not (d / "s.laftr").exists()


def test_pickled_module_needs_trust_pickle(files, capsys):
    d, model = files
    assert main(_summarize(d, "--model", str(d / "net.pt"))) == 2
    err = capsys.readouterr().err
    assert "net.pt is a pickle" in err and "can run code" in err and "--trust-pickle" in err
    assert not (d / "s.laftr").exists()
    assert main(_summarize(d, "--model", str(d / "net.pt"), "--trust-pickle")) == 0
    est = laftr.load(d / "s.laftr")
    assert all(torch.equal(est.theta0[n], p) for n, p in model.named_parameters())


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_trust_pickle_help_says_it_runs_code(capsys):
    help_text = _help("summarize", capsys)
    assert "--trust-pickle" in help_text and "RUNS CODE" in help_text


# ---------------------------------------------------------------------------------------------- factory + weights
@pytest.mark.parametrize("weights", ["w.pt", "w.safetensors"])
def test_factory_with_weights(files, capsys, weights):
    d, model = files
    assert main(_summarize(d, "--model", f"{FACTORY_MODULE}:small", "--weights", str(d / weights))) == 0, \
        capsys.readouterr().err
    est = laftr.load(d / "s.laftr")
    assert all(torch.equal(est.theta0[n], p) for n, p in model.named_parameters())
    loaded = load_model(f"{FACTORY_MODULE}:small", str(d / weights))
    assert not loaded.training and all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters()))


def test_bad_weights_and_tensor_files(files, capsys):
    d, _ = files
    base = ["--model", f"{FACTORY_MODULE}:small"]
    assert main(_summarize(d, *base, "--weights", str(d / "notes.txt"))) == 2
    err = capsys.readouterr().err
    assert "notes.txt is not a file written by torch.save" in err and "Traceback" not in err
    assert main(["summarize", *base, "--factory-weights", "--tensors", str(d / "notes.txt"), "--out", str(d / "s.laftr")]) == 2
    err = capsys.readouterr().err
    assert "notes.txt is not a file written by torch.save" in err and "tensor file" in err
    (d / "x.pt").write_bytes(b"x")  # torch's restricted unpickler calls this a refused pickle: it is not one
    assert main(["summarize", *base, "--factory-weights", "--tensors", str(d / "x.pt"), "--out", str(d / "s.laftr")]) == 2
    err = capsys.readouterr().err
    assert "x.pt is not a file written by torch.save" in err and "run code" not in err
    (d / "empty.pt").write_bytes(b"")
    assert main(_summarize(d, *base, "--weights", str(d / "empty.pt"))) == 2
    assert "empty.pt is empty" in capsys.readouterr().err
    assert main(_summarize(d, *base, "--weights", str(d / "data.pt"))) == 2  # a tuple, not a state dict
    assert "not a state dict" in capsys.readouterr().err
    assert main(_summarize(d, "--model", f"{FACTORY_MODULE}:image_mlp", "--weights", str(d / "w.pt"))) == 2
    assert "do not fit" in capsys.readouterr().err
    assert main(_summarize(d, *base, "--weights", str(d / "nothing.pt"))) == 2
    assert "no weights file at" in capsys.readouterr().err
    assert main(_summarize(d, "--model", str(d / "w.safetensors"))) == 2
    assert "--weights" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- model vs data
def test_shape_mismatch_names_shapes_and_suggests_flatten(files, capsys):
    d, _ = files
    argv = ["summarize", "--model", f"{FACTORY_MODULE}:image_mlp", "--factory-weights", "--tensors", str(d / "images.pt"),
            "--out", str(d / "s.laftr"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "laftr summarize: error:" in err
    assert "[1, 8, 8]" in err  # the data's per-example shape
    assert "in_features=64" in err and "last dimension is 64" in err  # what the first layer expects
    assert "nn.Flatten()" in err
    # flat data of the wrong width: no Flatten advice, both widths named
    with pytest.raises(laftr.DataError, match=r"shape \[5\].*last dimension is 64.*5 features"):
        check_model_accepts(nn.Linear(64, 3), torch.randn(4, 5))
    with pytest.raises(laftr.DataError, match=r"int64 but the first layer computes with floats.*nn.Embedding"):
        check_model_accepts(nn.Linear(5, 3), torch.randint(0, 9, (4, 5)))
    with pytest.raises(laftr.DataError, match=r"token ids in \[0, 10\)"):
        check_model_accepts(nn.Embedding(10, 4), torch.randint(20, 30, (4, 5)))
    # a bug in the model's own code is not a shape problem: it keeps its traceback (exit 1)
    class Buggy(nn.Module):
        def forward(self, x):
            return x / 0 + undefined_name  # noqa: F821

    with pytest.raises(NameError):
        check_model_accepts(Buggy(), torch.randn(4, 5))


def test_distance_shape_mismatch_and_outputs_range(files, capsys):
    d, _ = files
    assert main(_summarize(d, "--model", f"{FACTORY_MODULE}:small", "--weights", str(d / "w.pt"))) == 0
    capsys.readouterr()
    assert main(["distance", str(d / "s.laftr"), "--model", f"{FACTORY_MODULE}:small", "--weights",
                 str(d / "w.pt"), "--tensors", str(d / "images.pt"), "--calls", "1"]) == 2
    err = capsys.readouterr().err
    assert "[1, 8, 8]" in err and "last dimension is 5" in err and "Traceback" not in err
    assert main(_summarize(d, "--model", f"{FACTORY_MODULE}:small", "--weights", str(d / "w.pt"), "--force",
                           "--outputs", "0,7")) == 2
    assert "--outputs [7] out of range" in capsys.readouterr().err


def test_limit_must_be_positive(files, capsys):
    d, _ = files
    for bad in ("-5", "0", "x"):
        with pytest.raises(SystemExit) as e:
            main(_summarize(d, "--model", f"{FACTORY_MODULE}:small", "--factory-weights", "--limit", bad))
        assert e.value.code == 2
        assert "--limit" in capsys.readouterr().err
    assert main(_summarize(d, "--model", f"{FACTORY_MODULE}:small", "--factory-weights", "--limit", "7")) == 0
    assert "fitted on 7 examples" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- output paths
def test_out_in_the_way(files, capsys):
    d, _ = files
    (d / "folder").mkdir()
    assert main(["summarize", "--model", f"{FACTORY_MODULE}:small", "--tensors", str(d / "data.pt"),
                 "--out", str(d / "folder")]) == 1
    err = capsys.readouterr().err
    assert "is a folder" in err and "Traceback" not in err
    assert main(["demo", "--quick", "--out", str(d / "notes.txt"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "laftr demo: error:" in err and "not a folder" in err and "Traceback" not in err
    assert (d / "notes.txt").read_text() == "these are not tensors\n"


def test_factory_without_weights_is_refused_not_run_on_its_random_initialization(files, capsys):
    d, model = files
    assert main(_summarize(d, "--model", str(d / "net.pt"), "--trust-pickle", "--out", str(d / "t.laftr"))) == 0
    for argv in (_summarize(d, "--model", f"{FACTORY_MODULE}:small"),
                 ["distance", str(d / "t.laftr"), "--model", f"{FACTORY_MODULE}:small"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "without --weights" in err and "--factory-weights" in err and "Traceback" not in err
    assert not (d / "s.laftr").exists()
    both = _summarize(d, "--model", f"{FACTORY_MODULE}:small", "--weights", str(d / "w.pt"), "--factory-weights")
    assert main(both) == 2 and "not both" in capsys.readouterr().err
    # asked for: the factory's own network; a pickled module carries its weights and needs neither
    assert main(_summarize(d, "--model", f"{FACTORY_MODULE}:small", "--factory-weights")) == 0
    assert main(_summarize(d, "--model", str(d / "net.pt"), "--trust-pickle", "--force")) == 0
    capsys.readouterr()
    est = laftr.load(d / "s.laftr")
    assert all(torch.equal(est.theta0[n], p) for n, p in model.named_parameters())


def test_model_as_a_python_file_path_and_errors_in_the_users_code(files, capsys, monkeypatch):
    d, model = files
    weights = ["--weights", str(d / "w.pt")]
    (d / "sub").mkdir()
    monkeypatch.chdir(d / "sub")
    for spec in (f"../{FACTORY_MODULE}.py:small", str(d / f"{FACTORY_MODULE}.py") + ":small"):
        assert main(_summarize(d, "--model", spec, *weights, "--force")) == 0, capsys.readouterr().err
        est = laftr.load(d / "s.laftr")
        assert all(torch.equal(est.theta0[n], p) for n, p in model.named_parameters())
    (d / "broken.py").write_text("def make(:\n")
    (d / "raises.py").write_text("def make():\n    raise RuntimeError('no such checkpoint')\n")
    for spec, msg in [("../broken.py:make", "running ../broken.py raised SyntaxError: .*broken.py, line 1"),
                      ("../raises.py:make", "calling make\\(\\) raised RuntimeError: no such checkpoint "
                                            "\\(.*raises.py, line 2, in make\\)"),
                      ("../none.py:make", "no Python file"), ("../notes.txt:make", "must be a Python file")]:
        assert main(_summarize(d, "--model", spec, *weights, "--force")) == 2
        err = capsys.readouterr().err
        assert re.search(msg, err) and "Traceback" not in err and "internal error" not in err, err


@pytest.mark.parametrize("option, flag", [("metric=l2", "--metric"), ("progress=True", "--no-progress"),
                                          ("outputs=[0]", "--outputs")])
def test_set_of_a_command_option_names_the_flag(files, capsys, option, flag):
    d, _ = files
    argv = _summarize(d, "--model", f"{FACTORY_MODULE}:small", "--weights", str(d / "w.pt"), "--set", option)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"use {flag}" in err and "Traceback" not in err


def test_summarize_force_replaces_an_earlier_summary_only(files, capsys):
    d, _ = files
    net = ["--model", f"{FACTORY_MODULE}:small", "--weights", str(d / "w.pt")]
    notes = d / "notes.txt"
    argv = ["summarize", *net, "--tensors", str(d / "data.pt"), "--estimator", "weight", "--no-progress",
            "--out", str(notes), "--force"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "not a laftr summary" in err and "Traceback" not in err
    assert notes.read_text() == "these are not tensors\n"  # the user's file is untouched
    # without --force the same: the hint was "pass --force", which then refused (a circle; audit)
    assert main(argv[:-1]) == 1
    err = capsys.readouterr().err
    assert "not a laftr summary" in err and "pass --force" not in err
    assert main(_summarize(d, *net)) == 0
    assert main(_summarize(d, *net)) == 1 and "pass --force" in capsys.readouterr().err
    assert main(_summarize(d, *net, "--force")) == 0  # an earlier summary is replaced


# ---------------------------------------------------------------------------------------------- the guard
def _fake_run(monkeypatch, exc: BaseException) -> None:
    help_text, add_args, _ = SUBCOMMANDS["info"]

    def run(args):
        raise exc

    monkeypatch.setitem(SUBCOMMANDS, "info", (help_text, add_args, run))


def test_ctrl_c_exits_130_without_traceback(monkeypatch, capsys):
    _fake_run(monkeypatch, KeyboardInterrupt())
    assert main(["info", "x.laftr"]) == 130
    err = capsys.readouterr().err
    assert "laftr info: interrupted" in err and "Traceback" not in err


def test_internal_error_keeps_traceback_and_exits_1(monkeypatch, capsys):
    _fake_run(monkeypatch, ZeroDivisionError("a bug"))
    assert main(["info", "x.laftr"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err and "internal error" in err
    # a bare ValueError from inside a run is not taken for a usage error any more
    _fake_run(monkeypatch, ValueError("deep inside"))
    assert main(["info", "x.laftr"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("exc, code", [
    (laftr.UsageError("bad option"), 2), (laftr.DataError("bad data"), 2), (laftr.InputFileError("bad file"), 2),
    (laftr.UnsupportedOpError("no rule"), 2), (laftr.OutputPathError("in the way"), 1),
])
def test_user_errors_exit_codes(monkeypatch, capsys, exc, code):
    _fake_run(monkeypatch, exc)
    assert main(["info", "x.laftr"]) == code
    err = capsys.readouterr().err
    assert err.strip() == f"laftr info: error: {exc}"


def test_missing_summary_file(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "is a folder, not a summary file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- structure
def test_public_errors_form_one_hierarchy():
    for name in ("UsageError", "OptionError", "DataError", "FileError", "InputFileError", "UntrustedPickleError",
                 "SummaryFileError", "OutputPathError", "UnsupportedOpError"):
        cls = getattr(laftr, name)
        assert issubclass(cls, laftr.LaftrError) and name in laftr.__all__, name
    assert issubclass(laftr.SummaryFileError, laftr.InputFileError)
    assert issubclass(laftr.InputFileError, ValueError) and issubclass(laftr.OutputPathError, RuntimeError)


def test_library_does_not_import_the_cli():
    code = ("import sys, laftr, laftr.demo, laftr.bench.fsd, laftr.continual.runner, laftr.influence.experiment; "
            "print(sorted(m for m in sys.modules if m.startswith('laftr.cli')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_continual_help_lists_the_default_methods(capsys):
    text = _help("continual", capsys)
    assert "the ten of the issue" not in text
    assert "none, joint, ewc, kfac, ntk, subset, laftr, laftr-classwise, laftr-exact, laftr-coreset" in text


def test_a_dict_of_tensors_names_its_inputs_and_labels(tmp_path):
    from laftr.cli.loading import load_tensors
    from laftr.errors import InputFileError

    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    for d in ({"x": x, "y": y}, {"inputs": x, "labels": y}, {"input_ids": x, "labels": y}, {"X": x}):
        torch.save(d, tmp_path / "d.pt")
        got_x, got_y = load_tensors(tmp_path / "d.pt")
        assert torch.equal(got_x, x) and (got_y is None if len(d) == 1 else torch.equal(got_y, y))
    for bad, match in (({"x": x, "y": y, "w": x}, r"keys \['w', 'x', 'y'\].*'x' \(and 'y'\)"),
                       ({"features": x}, r"keys \['features'\]"), ({"x": x, "y": [1, 2]}, "must be tensors")):
        torch.save(bad, tmp_path / "d.pt")
        with pytest.raises(InputFileError, match=match):
            load_tensors(tmp_path / "d.pt")


@pytest.mark.parametrize("command", [["info", "x.laftr"], ["distance", "x.laftr", "--model", "m:f"]])
def test_unknown_argument_is_named_with_the_subcommands_usage(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: laftr {command[0]}" in err and f"laftr {command[0]}: error: unrecognized arguments: --bogus" in err


def test_audit_3_options_that_were_ignored_or_crashed(files, capsys, tmp_path):
    d, _ = files
    net = ["--model", f"{FACTORY_MODULE}:small", "--weights", str(d / "w.pt")]
    assert main(_summarize(d, *net)) == 0
    capsys.readouterr()
    # distance: data options without data were silently ignored (no exact FSD, no word)
    assert main(["distance", str(d / "s.laftr"), *net, "--classes", "0"]) == 2
    assert "give --dataset or --tensors" in capsys.readouterr().err
    # demo: a negative or nan lam skipped the penalty and exited 0
    for lam in ("-1", "nan"):
        assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "demo"), f"--lam={lam}"]) == 2
        assert "lam must be a finite number >= 0" in capsys.readouterr().err
    # --threads beyond the machine crashed torch (a segmentation fault)
    with pytest.raises(SystemExit) as e:
        main(["continual", "--benchmark", "split-fmnist", "--threads", "100000", "--out", str(tmp_path / "c")])
    assert e.value.code == 2 and "threads on a machine of" in capsys.readouterr().err
    # an --out below a file: one line, exit 1 (was NotADirectoryError's traceback)
    assert main(["demo", "--quick", "--no-progress", "--out", str(d / "notes.txt" / "sub")]) == 1
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err
    # fsd-bench: a metric named twice (a zip() traceback)
    assert main(["fsd-bench", "--quick", "--metrics", "l2,l2", "--out", str(tmp_path / "f")]) == 2
    assert "name one twice" in capsys.readouterr().err
    # a diverging run (the loss became nan) is a bad setting: one line, exit 2 (was an internal error)
    argv = ["continual", "--benchmark", "split-mnist", "--quick", "--methods", "none", "--seeds", "1",
            "--no-progress", "--out", str(tmp_path / "nan"), "--lr", "1e30", "--data-dir", str(_mnist(tmp_path))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the loss became nan" in err and "Traceback" not in err
    # liftr-exact names itself and its Monte Carlo twin
    with pytest.raises(ValueError, match="liftr-exact has a closed form only.*Monte Carlo 'liftr'"):
        laftr.make_estimator("liftr-exact", metric="kl")


def _mnist(tmp_path):
    from test_continual import write_mnist

    return write_mnist(tmp_path / "mnist")


def test_continual_arch_choices_match_what_the_benchmarks_take(capsys, tmp_path):
    # the message for arithmetic offered --arch transformer, which the command line refused as an invalid choice
    assert main(["continual", "--benchmark", "arithmetic", "--arch", "mlp", "--out", str(tmp_path / "a")]) == 2
    assert "choose one of transformer" in capsys.readouterr().err
    from laftr.cli import build_parser

    args = build_parser().parse_args(["continual", "--benchmark", "arithmetic", "--arch", "transformer",
                                      "--out", str(tmp_path / "b")])
    assert args.arch == "transformer"
    assert build_parser().parse_args(["continual", "--benchmark", "split-fmnist", "--arch", "conv",
                                      "--out", str(tmp_path / "c")]).arch == "conv"


def test_summarize_out_below_a_file_names_the_file(files, capsys):
    d, _ = files
    argv = _summarize(d, "--model", f"{FACTORY_MODULE}:small", "--weights", str(d / "w.pt"))
    argv[argv.index("--out") + 1] = str(d / "notes.txt" / "s.laftr")
    assert main(argv) == 1
    assert "notes.txt is a file, not a folder" in capsys.readouterr().err  # (said "does not exist")


def test_ctrl_c_of_continual_says_where_the_finished_runs_are(monkeypatch, capsys, tmp_path):
    help_text, add_args, _ = SUBCOMMANDS["continual"]

    def run(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(SUBCOMMANDS, "continual", (help_text, add_args, run))
    argv = ["continual", "--benchmark", "split-fmnist", "--out", str(tmp_path / "run")]
    assert main(argv) == 130
    assert "--resume" not in capsys.readouterr().err  # nothing written yet: nothing to resume
    (tmp_path / ".run.partial").mkdir()
    (tmp_path / ".run.partial" / "results.json").write_text("{}")
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert ".run.partial" in err and "--resume" in err and "Traceback" not in err


def test_an_output_folder_where_no_file_can_be_created_is_named_before_the_work(files, monkeypatch, capsys):
    """``--out`` in a read-only folder: the whole fit ran, then a traceback and "internal error" (audit). The
    folder is tried first (a file created and removed there); a disk that fails during the run (full,
    made read-only) is one line too."""
    import tempfile

    d, _ = files
    net = ["--model", f"{FACTORY_MODULE}:small", "--weights", str(d / "w.pt")]
    (d / "ro").mkdir()
    real = tempfile.TemporaryFile

    def refusing(*args, **kwargs):
        if str(kwargs.get("dir", "")).endswith("ro"):
            raise OSError(30, "Read-only file system")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", refusing)
    fitted: list[int] = []
    monkeypatch.setattr(laftr.estimators.weight.WeightEstimator, "_fit", lambda self, m, data: fitted.append(1))
    argv = ["summarize", *net, "--tensors", str(d / "data.pt"), "--estimator", "weight", "--no-progress",
            "--out", str(d / "ro" / "s.laftr")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no file can be created in" in err and "Read-only file system" in err and "Traceback" not in err
    assert not fitted
    assert main(["demo", "--quick", "--out", str(d / "ro" / "demo")]) == 1
    assert "no file can be created in" in capsys.readouterr().err
    _fake_run(monkeypatch, OSError(28, "No space left on device", "out/results.json"))
    assert main(["info", "x.laftr"]) == 1
    err = capsys.readouterr().err
    assert "error: No space left on device: out/results.json" in err and "Traceback" not in err
    _fake_run(monkeypatch, OSError(5, "Input/output error"))  # not the disk's space or permissions: a trace
    assert main(["info", "x.laftr"]) == 1 and "internal error" in capsys.readouterr().err


def test_first_hour_mistakes_get_the_right_answer_or_the_fix(files, tmp_path, monkeypatch, capsys):
    """An audit of a new user's mistakes: a class of --classes the data lacks was dropped silently (a typo,
    0,1,22, fitted classes 0 and 1); weights saved from nn.DataParallel were refused with torch's key lists
    (read without the 'module.' prefix now); a factory that needs arguments named laftr's own file; the working
    folder stayed first on sys.path, so a safetensors.py there would run in place of the package."""
    d, model = files
    net = ["--model", f"{FACTORY_MODULE}:small"]
    argv = ["summarize", *net, "--weights", str(d / "w.pt"), "--tensors", str(d / "data.pt"), "--estimator",
            "weight", "--no-progress", "--out", str(d / "c.laftr"), "--classes", "0,1,22"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no examples of class 22 of --classes 0,1,22" in err and "Traceback" not in err
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, d / "dp.pt")
    loaded = load_model(f"{FACTORY_MODULE}:small", str(d / "dp.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    (d / "needs_args.py").write_text("from torch import nn\n\ndef make(width, depth=2):\n"
                                     "    return nn.Linear(5, width)\n")
    with pytest.raises(laftr.UsageError, match=r"called with no arguments, and make needs width"):
        load_model("needs_args:make")
    (d / "wrapped_factory.py").write_text(  # a decorator that supplies the argument: called, as before
        "import functools\nfrom torch import nn\n\ndef width(n):\n    def deco(f):\n"
        "        @functools.wraps(f)\n        def g():\n            return f(n)\n        return g\n    return deco\n\n"
        "@width(8)\ndef make(w):\n    return nn.Linear(5, w)\n")
    assert load_model("wrapped_factory:make").out_features == 8
    work = tmp_path / "work"
    work.mkdir()
    (work / "here_nets.py").write_text("from torch import nn\n\ndef small():\n    return nn.Linear(5, 3)\n")
    monkeypatch.chdir(work)
    monkeypatch.delitem(sys.modules, "here_nets", raising=False)
    assert str(work) not in sys.path
    assert isinstance(load_model("here_nets:small"), nn.Linear)
    assert str(work) not in sys.path
