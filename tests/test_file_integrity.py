"""Summary files are checked when loaded (format 3: SHA-256 of every tensor and of the metadata; every format:
finiteness, dtypes, shapes), and :func:`laftr.save` does not clobber files it did not write.

The hash scheme is re-implemented here (``_forge``) rather than imported, so that these tests pin the file
format: a forged file with correct hashes must still be refused for what it holds (NaN, garbage metadata)."""

from __future__ import annotations

import io
import os
import random
import time

import pytest
import torch
from cases import mlp, perturbed
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from summary_files import forge as _forge
from summary_files import split as _split
from summary_files import write as _write
from torch import nn

import laftr
from laftr.errors import SummaryFileError
from laftr.io import FORMAT_VERSION, _load_bytes, atomic_write_bytes

DT = torch.float64


# ---------------------------------------------------------------------------------------------- helpers
def _data(n=40, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def _model(seed=0):
    torch.manual_seed(seed)
    return mlp().to(DT)


CASES = {
    "laftr": ("laftr", {"num_samples": 8, "fixed_noise": True, "input_model": "classwise"}),
    "kfac": ("kfac", {"metric": "kl"}),
}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Per case: the saved bytes, a perturbed model and the distance the file gives to it."""
    folder = tmp_path_factory.mktemp("integrity")
    model = _model()
    other = perturbed(model, 0.2)
    out = {}
    for key, (name, kw) in CASES.items():
        est = laftr.make_estimator(name, **kw).fit(model, _data())
        raw = laftr.save(est, folder / f"{key}.laftr").read_bytes()
        want = laftr.load(folder / f"{key}.laftr")(other)
        torch.testing.assert_close(want, est(other), rtol=0, atol=0)
        out[key] = (raw, other, want)
    return out


def _refused(raw: bytes, match: str | None = None) -> str:
    with pytest.raises(SummaryFileError, match=match) as e:
        _load_bytes(raw, "f.laftr")
    return str(e.value)


# ---------------------------------------------------------------------------------------------- fuzz
@pytest.mark.parametrize("key", sorted(CASES))
def test_fuzz_single_byte_changes_are_refused_or_harmless(fitted, key):
    """1,000 random single-byte changes anywhere in the file: each load raises SummaryFileError (nothing else)
    or gives an estimator with the bit-identical distance."""
    raw, other, want = fitted[key]
    rng = random.Random(2024 + len(key))
    refused, problems = 0, []
    t0 = time.perf_counter()
    for _ in range(1000):
        pos = rng.randrange(len(raw))
        new = rng.randrange(255)
        new += new >= raw[pos]  # any value but the old one
        changed = bytearray(raw)
        changed[pos] = new
        try:
            est = _load_bytes(bytes(changed), "fuzzed.laftr")
        except SummaryFileError:
            refused += 1
            continue
        except Exception as e:  # noqa: BLE001 - any other exception type is the failure this test looks for
            problems.append((pos, raw[pos], new, f"{type(e).__name__}: {e}"))
            continue
        got = est(other)
        if not torch.equal(got, want):
            problems.append((pos, raw[pos], new, f"distance {got.item()!r} instead of {want.item()!r}"))
    assert not problems, problems[:5]
    assert refused >= 950  # only JSON whitespace (padding) changes can be harmless
    assert time.perf_counter() - t0 < 20


@pytest.mark.parametrize("key", sorted(CASES))
def test_fuzz_header_bytes(fitted, key):
    """The same, concentrated on the JSON header (lengths, names, dtypes, offsets, the metadata string)."""
    raw, other, want = fitted[key]
    n = int.from_bytes(raw[:8], "little")
    rng = random.Random(7)
    alphabet = b'0123456789{}[]",:. \\-eEtfn\x00\xff'
    for _ in range(500):
        pos = rng.randrange(8 + n)
        new = rng.choice([c for c in alphabet if c != raw[pos]])
        changed = bytearray(raw)
        changed[pos] = new
        try:
            est = _load_bytes(bytes(changed), "fuzzed.laftr")
        except SummaryFileError:
            continue
        assert torch.equal(est(other), want), (pos, raw[pos], new)


# ---------------------------------------------------------------------------------------------- targeted damage
@pytest.mark.parametrize(("kind", "name", "index", "value", "message"), [
    ("laftr", "state/inputs/x_outer", 0, float("nan"), "contains NaN"),
    ("laftr", "state/site/_1/p1", 0, float("nan"), "contains NaN"),
    ("laftr", "theta0/0.weight", 0, float("nan"), "contains NaN"),
    ("kfac", "state/A/0", 1, float("-inf"), "contains infinite values"),
    ("kfac", "theta0/2.weight", 1, float("-inf"), "contains infinite values"),
])
def test_non_finite_value_with_a_correct_hash_is_refused(fitted, kind, name, index, value, message):
    raw, _, _ = fitted[kind]
    tensors, meta = _split(raw)
    assert _load_bytes(_forge(tensors, meta), "f").stored_floats() > 0  # the forger itself is faithful
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[index] = value
    _refused(_forge(tensors, meta), rf"'{name}' {message}")


def test_flipped_bit_in_a_tensor_is_refused(fitted):
    raw, _, _ = fitted["laftr"]
    tensors, _ = _split(raw)
    target = tensors["state/inputs/x_outer"].view(-1)[3].item()
    at = raw.index(torch.tensor([target], dtype=DT).numpy().tobytes())
    for bit in (0, 52, 62):  # lowest mantissa bit (a nearby finite number), lowest exponent bit, top exponent bit
        changed = bytearray(raw)
        changed[at + bit // 8] ^= 1 << (bit % 8)
        _refused(bytes(changed), r"'state/inputs/x_outer' does not match its recorded SHA-256")


@pytest.mark.parametrize("old,new", [('\\"num_samples\\": 8', '\\"num_samples\\": 9'),
                                     ('\\"fixed_noise\\": true', '\\"fixed_noise\\": 1   '),
                                     ('\\"metric\\": \\"l2\\"', '\\"metric\\": \\"kl\\"'),
                                     ('[\\"0.weight\\", [8, 5]]', '[\\"0.weight\\", [5, 8]]')])
def test_changed_header_values_are_refused(fitted, old, new):
    """Edits that keep the header valid JSON of the same length but change what it says."""
    raw, _, _ = fitted["laftr"]
    assert old.encode() in raw, old
    _refused(raw.replace(old.encode(), new.encode(), 1), "metadata does not match its recorded SHA-256")


def test_dtype_and_shape_disagreeing_with_the_metadata_are_refused(fitted):
    raw, _, _ = fitted["kfac"]
    tensors, meta = _split(raw)
    as32 = dict(tensors, **{"theta0/0.bias": tensors["theta0/0.bias"].float()})
    _refused(_write(as32, meta), r"'theta0/0.bias' has dtype float32, the metadata records 'float64'")
    longer = dict(tensors, **{"state/G/4": torch.ones(4, 4, dtype=DT)})
    _refused(_write(longer, meta), r"'state/G/4' has shape \[4, 4\], the metadata records \[3, 3\]")
    missing = {k: v for k, v in tensors.items() if k != "state/A/2"}
    _refused(_write(missing, meta), r"'state/A/2' is recorded in the metadata but missing")
    added = dict(tensors, **{"state/extra": torch.zeros(2, dtype=DT)})
    _refused(_write(added, meta), r"'state/extra' is in the file but has no recorded hash")
    # correct hashes do not make a disagreement with the architecture acceptable
    _refused(_forge(longer, meta), "K-FAC factors of layer '4' have the wrong shapes")


def test_truncated_files_and_bad_header_lengths_are_refused(fitted):
    raw, _, _ = fitted["laftr"]
    n = int.from_bytes(raw[:8], "little")
    for cut in (0, 3, 8, 9, 8 + n // 2, 8 + n, 8 + n + 5, len(raw) - 1):
        _refused(raw[:cut])
    for length in (len(raw), 2**63, 2**64 - 1, 0, 1, n - 1, n + 1):
        _refused(length.to_bytes(8, "little") + raw[8:])
    _refused(b"\x00" * 64)
    _refused(b"not a summary at all")
    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, buf)  # a weights file given where a summary is expected
    _refused(buf.getvalue(), r"f.laftr is a torch.save file .*not a laftr summary")


def test_missing_hashes_in_a_format_3_file_are_refused(fitted):
    raw, _, _ = fitted["laftr"]
    tensors, meta = _split(raw)
    for drop in ("tensors", "metadata_sha256"):
        stripped = {k: v for k, v in meta.items() if k != drop}
        _refused(_write(tensors, stripped), "without its content hashes")
    _refused(_write(tensors, dict(meta, metadata_sha256="0" * 64)), "metadata does not match")
    records = dict(meta["tensors"], **{"theta0/0.bias": {"dtype": "float64"}})
    _refused(_forge(tensors, dict(meta, tensors=records), records=False), "'theta0/0.bias' is malformed")


@pytest.mark.parametrize("change,match", [
    ({"outputs": "0,1"}, "outputs must be"),
    ({"outputs": [0, True]}, "outputs must be"),
    ({"outputs": []}, "outputs must be"),
    ({"arch": "garbage"}, "architecture is malformed"),
    ({"arch": [["0.weight", [8, -5]]]}, "architecture is malformed"),
    ({"arch": [[1, 2, 3]]}, "architecture is malformed"),
    ({"config": ["kl"]}, "config is not a JSON object"),
    ({"config": {"num_samples": "many"}}, "config does not match"),
    ({"config": {"no_such_option": 1}}, "config does not match"),
    ({"estimator": "nope"}, "does not know"),
    ({"estimator": ["laftr"]}, "does not know"),
    ({"extra": [1, 2]}, "not a JSON object"),
    ({"extra": {"summary": 5, "sites": None}}, "inconsistent"),
    ({"extra": {"summary": {"input_model": []}, "sites": None}}, "inconsistent"),
    ({"graph_fingerprint": 12}, "graph_fingerprint"),
    ({"surprise": 1}, r"unknown metadata entries \['surprise'\]"),
    ({"format_version": 99}, "format version 99"),
    ({"format_version": True}, "format version True"),
    ({"format_version": "3"}, "format version '3'"),
])
def test_garbage_metadata_with_correct_hashes_is_refused(fitted, change, match):
    raw, _, _ = fitted["laftr"]
    tensors, meta = _split(raw)
    _refused(_forge(tensors, dict(meta, **change)), match)


def test_garbage_kfac_state_is_refused(fitted):
    raw, _, _ = fitted["kfac"]
    tensors, meta = _split(raw)
    for extra in ({"layers": 3, "diag": []}, {"layers": [["0"]], "diag": []}, {"layers": [], "diag": None},
                  {"layers": None}, {}):
        _refused(_forge(tensors, dict(meta, extra=extra)), "inconsistent")


def test_headers_that_are_not_laftr_summaries_are_refused(fitted):
    raw, _, _ = fitted["laftr"]
    tensors, meta = _split(raw)

    def with_header(header: bytes) -> bytes:
        header += b" " * (-len(header) % 8)
        return len(header).to_bytes(8, "little") + header

    _refused(with_header(b"[1, 2]"), "not a JSON object")
    _refused(with_header(b'{"__metadata__": [1]}'), "not a laftr summary")
    _refused(with_header(b'{"__metadata__": {"laftr": "[1]"}}'), "not a laftr summary")
    _refused(with_header(b'{"__metadata__": {"laftr": "{\\"format\\": \\"laftr-summary\\""}}'), "not valid JSON")
    _refused(with_header(b'{"__metadata__": {"laftr": 3}}'), "not a laftr summary")
    _refused(with_header(b'{"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}'), "not a laftr summary")
    _refused(with_header('{"é": 1}'.encode("latin-1")), "not valid JSON")
    _refused(st_save(tensors), "not a laftr summary")
    # a tensor outside theta0/ and state/
    _refused(_forge(dict(tensors, stray=torch.zeros(1, dtype=DT)), meta), "unexpected tensor 'stray'")


# ---------------------------------------------------------------------------------------------- old formats
def _as_format_2(raw: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = _split(raw)
    for k in ("tensors", "metadata_sha256", "graph_fingerprint", "buffers"):
        meta.pop(k)
    meta["format_version"] = 2
    return tensors, meta


@pytest.mark.parametrize("key", sorted(CASES))
def test_format_3_files_without_buffers_still_load(fitted, key):
    raw, other, want = fitted[key]
    tensors, meta = _split(raw)
    meta = {k: v for k, v in meta.items() if k != "buffers"}
    meta["format_version"] = 3
    est = _load_bytes(_forge(tensors, meta), "v3.laftr")
    assert torch.equal(est(other), want)
    assert est._buffer_names is None  # unknown, not "none"
    _refused(_forge(tensors, dict(meta, buffers=[])), r"unknown metadata entries \['buffers'\]")


def test_stored_buffer_names_are_checked(fitted):
    tensors, meta = _split(fitted["kfac"][0])
    _refused(_forge(tensors, dict(meta, buffers="0.weight")), "buffers must be null or a list of names")
    _refused(_forge(tensors, dict(meta, buffers=[3])), "buffers must be null or a list of names")
    _refused(_forge(tensors, dict(meta, buffers=["nope"])), r"buffers \['nope'\] are not in the stored architecture")
    assert _load_bytes(_forge(tensors, dict(meta, buffers=None)), "f")._buffer_names is None


@pytest.mark.parametrize("key", sorted(CASES))
def test_format_2_files_without_hashes_still_load(fitted, key):
    raw, other, want = fitted[key]
    tensors, meta = _as_format_2(raw)
    est = _load_bytes(_write(tensors, meta), "v2.laftr")
    assert torch.equal(est(other), want)
    assert est.graph_fingerprint is None


def test_format_2_files_get_the_finiteness_and_shape_checks(fitted):
    raw, _, _ = fitted["laftr"]
    tensors, meta = _as_format_2(raw)
    for name, value in (("state/site/_3/p1", float("nan")), ("state/inputs/x_outer", float("inf")),
                        ("theta0/4.weight", float("inf")), ("theta0/4.bias", float("nan"))):
        bad = dict(tensors, **{name: tensors[name].clone()})
        bad[name].view(-1)[0] = value
        _refused(_write(bad, meta), rf"'{name}' contains")
    _refused(_write(dict(tensors, **{"theta0/0.bias": torch.zeros(7, dtype=DT)}), meta), "'0.bias' has shape")
    _refused(_write(tensors, dict(meta, outputs="all")), "outputs must be")
    _refused(_write(tensors, dict(meta, graph_fingerprint="abc")), "unknown metadata entries")


# ---------------------------------------------------------------------------------------------- what is stored
class _Masked(nn.Module):
    """A linear layer with an additive mask buffer of -inf entries (like a causal attention mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.register_buffer("mask", torch.tensor([0.0, float("-inf"), 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_infinite_buffers_round_trip_and_are_recorded(tmp_path):
    model = _Masked().to(DT)
    est = laftr.make_estimator("weight").fit(model, _data()[0])
    path = laftr.save(est, tmp_path / "m.laftr")
    tensors, meta = _split(path.read_bytes())
    assert meta["tensors"]["theta0/mask"]["infinite"] is True
    assert "infinite" not in meta["tensors"]["theta0/lin.weight"]
    back = laftr.load(path)
    assert torch.equal(back.theta0["mask"], model.mask)
    # infinities where none were recorded are refused, even with correct hashes
    bad = dict(tensors, **{"theta0/lin.bias": torch.tensor([0.0, float("inf"), 0.0], dtype=DT)})
    _refused(_forge(bad, meta), "'theta0/lin.bias' contains infinite values")
    # format 2 (nothing recorded): an additive mask (finite entries all zero) is accepted
    meta2 = {k: v for k, v in meta.items()
             if k not in ("tensors", "metadata_sha256", "graph_fingerprint", "buffers")}
    assert meta["buffers"] == ["mask"]
    meta2["format_version"] = 2
    assert torch.equal(_load_bytes(_write(tensors, meta2), "v2").theta0["mask"], model.mask)


def test_save_refuses_what_load_would_refuse(tmp_path):
    model = _model()
    est = laftr.make_estimator("diag-fisher").fit(model, _data())
    est.diag["0.weight"][0, 0] = float("inf")
    with pytest.raises(laftr.DataError, match="'state/F/0.weight' contains NaN or infinite"):
        laftr.save(est, tmp_path / "x.laftr")
    est = laftr.make_estimator("weight").fit(model, _data()[0])
    est.theta0["0.bias"][0] = float("nan")
    with pytest.raises(laftr.DataError, match="'theta0/0.bias'"):
        laftr.save(est, tmp_path / "x.laftr")
    assert not (tmp_path / "x.laftr").exists()


def test_graph_fingerprint_round_trips_and_is_covered_by_the_hash(tmp_path):
    est = laftr.make_estimator("weight").fit(_model(), _data()[0])
    est.graph_fingerprint = "fp-0123abcd"
    raw = laftr.save(est, tmp_path / "g.laftr").read_bytes()
    assert laftr.load(tmp_path / "g.laftr").graph_fingerprint == "fp-0123abcd"
    _refused(raw.replace(b"fp-0123abcd", b"fp-0123abce"), "metadata does not match")
    est.graph_fingerprint = 5
    with pytest.raises(TypeError, match="graph_fingerprint"):
        laftr.save(est, tmp_path / "h.laftr")


def test_saved_files_are_format_4(fitted):
    for raw, _, _ in fitted.values():
        _, meta = _split(raw)
        assert meta["format_version"] == FORMAT_VERSION == 4
        assert meta["buffers"] == []  # the MLP has none
        assert set(meta["tensors"]) == set(st_load(raw))
        assert all(len(r["sha256"]) == 64 for r in meta["tensors"].values())


# ---------------------------------------------------------------------------------------------- overwrite, mode
@pytest.fixture
def weight_est():
    return laftr.make_estimator("weight").fit(_model(), _data()[0])


def test_save_refuses_an_unrelated_file_by_default(tmp_path, weight_est):
    for content in (b"precious notes", b"", _write({"x": torch.zeros(1)}, {"format": "other"})):
        path = tmp_path / "notes.txt"
        path.write_bytes(content)
        with pytest.raises(FileExistsError, match="not a laftr summary.*overwrite=True"):
            laftr.save(weight_est, path)
        assert path.read_bytes() == content
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_save_replaces_a_summary_by_default_and_anything_with_overwrite_true(tmp_path, weight_est):
    path = tmp_path / "s.laftr"
    laftr.save(laftr.make_estimator("kfac").fit(_model(), _data()), path)
    laftr.save(weight_est, path)  # a laftr summary: replaced
    assert laftr.load(path).name == "weight"
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])  # damaged after its header: still recognized as a summary
    laftr.save(weight_est, path)
    assert laftr.load(path).name == "weight"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        laftr.save(weight_est, path, overwrite=False)  # False: never replace
    other = tmp_path / "notes.txt"
    other.write_text("precious notes")
    laftr.save(weight_est, other, overwrite=True)
    assert laftr.load(other).name == "weight"
    with pytest.raises(TypeError, match="overwrite"):
        laftr.save(weight_est, path, overwrite="yes")


def test_save_never_replaces_a_directory(tmp_path, weight_est):
    folder = tmp_path / "d.laftr"
    folder.mkdir()
    for overwrite in (None, True, False):
        with pytest.raises(IsADirectoryError):
            laftr.save(weight_est, folder, overwrite=overwrite)
    with pytest.raises(IsADirectoryError):
        atomic_write_bytes(folder, b"x")
    assert folder.is_dir() and not any(folder.iterdir())


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002, 0o000])
def test_files_are_created_with_the_mode_the_umask_allows(tmp_path, weight_est, umask):
    old = os.umask(umask)
    try:
        path = laftr.save(weight_est, tmp_path / "s.laftr")
        atomic_write_bytes(tmp_path / "sub" / "b.bin", b"data")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "sub" / "b.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"data"


def test_load_from_a_path_reports_the_path(tmp_path, fitted):
    raw, _, _ = fitted["laftr"]
    path = tmp_path / "bad.laftr"
    path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(SummaryFileError, match="bad.laftr: tensor .* does not match its recorded SHA-256"):
        laftr.load(path)
    with pytest.raises(FileNotFoundError):
        laftr.load(tmp_path / "missing.laftr")
