"""Every Python example in the README and docs/ runs as written.

A user's first contact with the library is a copied example; a renamed argument or a changed convention that
leaves an example behind is a fault they hit before any other. Each ```python block is found by file and
position (its first line is checked, so that an edit that moves blocks fails here rather than running the
wrong set-up) and executed after a set-up that defines the names the text leaves to the reader (``model``,
``train_loader``, ...), in a temporary directory. A new block fails until it is listed here, either with its
set-up or with the reason it cannot run here. Statements whose comment names an error (``# UsageError: ...``)
must raise it; expression statements whose comment is a Python literal must evaluate to it.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import itertools
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import pytest
import torch

import laftr
import laftr.bench.fsd
import laftr.continual
import laftr.influence.experiment
from laftr.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

MLP = """
import torch, torch.nn.functional as F
import laftr
torch.manual_seed(0)
model = laftr.models.mlp(784, (32,), 10)
X, Y = torch.randn(192, 784), torch.randint(0, 10, (192,))
train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=64)
task_loss, lam = torch.tensor(0.0), 1.0
def _task(lo, n):
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(n, 784), torch.randint(lo, lo + 2, (n,))), batch_size=32)
tasks = [([0, 1], _task(0, 64)), ([2, 3], _task(2, 64))]
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
"""

INFLUENCE = """
import torch
torch.manual_seed(0)
X, Y = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, 1, dtype=torch.float64)
X_test, Y_test = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, 1, dtype=torch.float64)
model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
m = 5
"""

SHARDS = MLP + """
est = laftr.make_estimator("laftr-exact").fit(model, train_loader)
model0 = est.theta0_model(model)
my_shard = (X[:96], Y[:96])
shard_a, shard_b = (X[:96], Y[:96]), (X[96:], Y[96:])
"""

ONE_RANK = MLP + """
import os
import torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + os.path.abspath("rendezvous"), rank=0, world_size=1)
rank, world = 0, 1
model = torch.nn.Sequential(torch.nn.Linear(784, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
X_old, Y_old = X, Y
my_shard_of_the_new_task = train_loader
"""

STREAM = MLP + """
import numpy as np
n = 150
np.save("X.npy", np.random.default_rng(0).normal(size=(n, 784)).astype(np.float32))
rank, world = 0, 1
"""

# (file, position) -> (the block's first line, the set-up, or None with the reason it does not run here)
EXAMPLES: dict[tuple[str, int], tuple[str, str | None, str]] = {
    ("README.md", 0): ("import laftr", MLP, ""),
    ("docs/continual.md", 0): ("import torch, torch.nn.functional as F", MLP, ""),
    ("docs/influence.md", 0): ("import laftr", INFLUENCE, ""),
    ("docs/scaling.md", 0): ("est.fit(model, my_shard, distributed=False)", SHARDS, ""),
    ("docs/scaling.md", 1): ("import torch", ONE_RANK, "a process group of one rank"),
    ("docs/scaling.md", 2): ("import datetime", None, "spawns two processes: run as a script below"),
    ("docs/scaling.md", 3): ("import numpy as np", STREAM, ""),
    ("docs/usage.md", 0): ("import laftr", MLP, ""),
    ("docs/usage.md", 1): ("from laftr.continual import FSDRegularizer", MLP, ""),
    ("docs/usage.md", 2): ("from transformers.utils.fx import symbolic_trace", None,
                           "needs Hugging Face transformers and a GPT-2 checkpoint, neither a dependency"),
    ("docs/usage.md", 3): ("from laftr._util import param_dict", SHARDS, ""),
    ("docs/usage.md", 4): ("import torch", "", ""),
    ("docs/usage.md", 5): ("from laftr.influence import InfluenceExperimentConfig", "", ""),
}


def _blocks() -> dict[tuple[str, int], str]:
    found = {}
    for path in DOCS:
        for i, m in enumerate(BLOCK.finditer(path.read_text(encoding="utf-8"))):
            found[(path.relative_to(ROOT).as_posix(), i)] = m.group(1)
    return found


BLOCKS = _blocks()


def test_every_example_is_listed():
    assert sorted(BLOCKS) == sorted(EXAMPLES), (
        "the ```python blocks of the docs and the examples this test runs differ: list a new block in EXAMPLES "
        f"with its set-up; found {sorted(BLOCKS)}")
    for key, (first, _, _) in EXAMPLES.items():
        assert BLOCKS[key].splitlines()[0].startswith(first), f"{key} now starts {BLOCKS[key].splitlines()[0]!r}"


def _comment(source_line: str) -> str | None:
    """The comment of one line of code (a ``#`` outside strings), without the marker."""
    for tok in tokenize.generate_tokens(iter([source_line + "\n"]).__next__):
        if tok.type == tokenize.COMMENT:
            return tok.string[1:].strip()
    return None


def _run(code: str, setup: str, where: Path) -> None:
    """Runs ``setup`` then ``code`` statement by statement in one namespace, checking the commented errors and
    values."""
    old = os.getcwd()
    os.chdir(where)
    try:
        env: dict = {"__name__": "docs_example"}
        exec(compile(textwrap.dedent(setup), "<set-up>", "exec"), env)
        lines = code.splitlines()
        for stmt in ast.parse(code).body:
            text = ast.get_source_segment(code, stmt)
            note = _comment(lines[stmt.end_lineno - 1])
            raises = re.match(r"([A-Z]\w*Error): (.*)", note or "")
            if raises:
                error = getattr(laftr.errors, raises[1], None) or getattr(builtins, raises[1], None)
                assert error is not None, f"the comment names an unknown error {raises[1]}"
                message = re.split(r";|\.\.\.", raises[2])[0].strip()   # the message up to where the comment elides it
                with pytest.raises(error, match=re.escape(message)):
                    exec(compile(ast.Module([stmt], []), "<example>", "exec"), env)
                continue
            if isinstance(stmt, ast.Expr) and note:
                try:
                    expected = ast.literal_eval(note.split(":")[0].strip())
                except (ValueError, SyntaxError):
                    expected = None
                if expected is not None:
                    value = eval(compile(ast.Expression(stmt.value), "<example>", "eval"), env)
                    assert value == expected, f"{text!r} gives {value!r}, the docs say {expected!r}"
                    continue
            exec(compile(ast.Module([stmt], []), "<example>", "exec"), env)
    finally:
        os.chdir(old)


@pytest.mark.parametrize("key", sorted(EXAMPLES), ids=lambda k: f"{k[0]}#{k[1]}")
def test_example_runs(key, tmp_path, one_thread):
    first, setup, why = EXAMPLES[key]
    if setup is None:
        pytest.skip(why)
    registered = {kind: dict(table) for kind, table in laftr.rules.registered_targets().items()}
    try:
        _run(BLOCKS[key], setup, tmp_path)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        added = [t for kind, table in laftr.rules.registered_targets().items() for t in table
                 if t not in registered.get(kind, {})]
        if added:
            laftr.rules.unregister(*added)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_spawned_example_runs(tmp_path):
    """The two-process example of docs/scaling.md, as a script (on a free port instead of its 29500)."""
    code = BLOCKS[("docs/scaling.md", 2)]
    assert "tcp://127.0.0.1:29500" in code
    script = tmp_path / "example.py"
    script.write_text(code.replace("29500", str(_free_port())), encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert laftr.load(tmp_path / "summary.laftr").stored_floats() > 0


# -- the command lines the docs show ---------------------------------------------------------------------------

#: Placeholders the text uses in command lines, and what this test puts in their place.
PLACEHOLDERS = {"coreset_size=K,num_samples=K": "coreset_size=10,num_samples=10"}


def _alternatives(command: str) -> list[str]:
    """One command per choice of the ``a|b|c`` words of a command line (``--arch mlp|cnn``)."""
    words = command.split(" ")
    choices = [w.split("|") if re.fullmatch(r"[\w.-]+(\|[\w.-]+)+", w) else [w] for w in words]
    return [" ".join(c) for c in itertools.product(*choices)]


def _documented_commands() -> list[tuple[str, str]]:
    """``(file, command)`` for every ``laftr SUBCOMMAND --option ...`` line of the docs: inline code and code
    blocks (fenced or indented), continuation lines joined, ``torchrun ... -m`` / ``python -m`` prefixes and
    trailing comments dropped."""
    found = []
    for path in DOCS:
        name = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"(?<!`)`((?:python -m )?laftr [^`]+)`(?!`)", text):
            if len(re.findall(r"(?:^| )--", m[1])) >= 2:  # one option alone (`laftr continual --resume`) names it
                found.append((name, " ".join(m[1].split())))
        blocks = [b[1] for b in re.finditer(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)]
        blocks += [re.sub(r"^    ", "", b[0], flags=re.M) for b in re.finditer(r"(?:^    .*\S.*\n)+", text, re.M)]
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"^\s*(?:OMP_NUM_THREADS=\d+ )?(?:torchrun .*?-m |python -m )?", "", line)
                if line.startswith("laftr "):
                    found.append((name, " ".join(re.sub(r"\s+#.*$", "", line).split())))
    found = [(f, re.sub(r" \[--[^\]]*\]", "", c)) for f, c in found]   # a synopsis without its optional parts
    return [(f, alt) for f, c in found if " --" in c for alt in _alternatives(c)]


COMMANDS = _documented_commands()


def _needs_out(argv: list[str]) -> bool:
    """Whether the subcommand of ``argv`` (after ``-v`` at most) requires ``--out``, read from its parser."""
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    command = next((a for a in argv[:2] if a in subs), None)
    return command is not None and any("--out" in a.option_strings and a.required
                                       for a in subs[command]._actions)


class _Parsed(Exception):
    """Raised by the stand-in for a subcommand's runner: the configuration was built and checked."""


def test_documented_commands_are_found():
    assert len(COMMANDS) >= 40, COMMANDS   # the docs cite ~50 full command lines; the regexes must see them


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{f}:{i}" for i, (f, _) in enumerate(COMMANDS)])
def test_documented_command_is_accepted(where, command, monkeypatch, tmp_path, one_thread):
    """Every documented command line parses, and its settings (methods, options) pass the checks the command
    makes before it starts work; nothing is run."""
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    if "..." in command:
        pytest.skip(f"a synopsis with placeholders: {command}")
    argv = shlex.split(command)[1:]
    if "--out" not in argv and _needs_out(argv):
        argv += ["--out", str(tmp_path / "out")]   # where results go is the reader's choice the text leaves out
    args, extra = build_parser().parse_known_args(argv)
    assert not extra, f"{where}: `{command}`: unrecognized arguments {extra}"

    def parsed(*a, **k):
        raise _Parsed

    for module, runner in ((laftr.bench.fsd, "run_fsd_bench"), (laftr.continual, "run_benchmark"),
                           (laftr.influence.experiment, "run_influence"),
                           (laftr.influence.experiment, "run_mislabeled")):
        monkeypatch.setattr(module, runner, parsed)   # raising: a renamed runner fails here, not by running
    if args.command in ("fsd-bench", "continual", "influence", "mislabeled"):
        with pytest.raises(_Parsed):
            args._run(args)
