"""Summary files written by laftr 0.1 (format 1) still load and give the same distances.

The files in tests/data/format_v1 were saved by laftr 0.1 (git e92129e) together with the distance each gave to a
fixed perturbation of its theta0 (``expected.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cases import SmallCNN, mlp, perturbed

import laftr

DATA = Path(__file__).parent / "data" / "format_v1"
EXPECTED = json.loads((DATA / "expected.json").read_text())


pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_format_1_files_load_and_give_the_same_distance(name):
    est = laftr.load(DATA / f"{name}.laftr")
    want = EXPECTED[name]
    model = est.theta0_model(SmallCNN() if want["arch"] == "cnn" else mlp())
    other = perturbed(model, 0.2)
    assert est.stored_floats() == want["stored_floats"]
    assert est(other).item() == pytest.approx(want["value"], rel=1e-12, abs=0)
    # and it saves in today's format, which loads back to the same estimator
    assert est(model).item() == pytest.approx(0.0, abs=1e-15)


def test_format_1_file_resaved_in_the_current_format(tmp_path):
    est = laftr.load(DATA / "mlp-exact-classwise.laftr")
    path = laftr.save(est, tmp_path / "v3.laftr")
    back = laftr.load(path)
    other = perturbed(est.theta0_model(mlp()), 0.2)
    torch.testing.assert_close(back(other), est(other), rtol=1e-12, atol=0)
    header = json.loads(path.read_bytes()[8: 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert json.loads(header["__metadata__"]["laftr"])["format_version"] == laftr.io.FORMAT_VERSION == 4
