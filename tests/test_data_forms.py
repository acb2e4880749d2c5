"""The data forms every laftr function reads (a tensor, an (X, Y) tuple, a list of batches, a loader), the
refusals of ambiguous or inconsistent data, and the checks of `outputs` and of mixed model dtypes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import laftr
from laftr._util import iter_batches
from laftr.errors import DataError, UsageError
from laftr.exact import exact_fsd_and_grad


def _pair_of_models(dtype=torch.float32):
    torch.manual_seed(0)
    m0 = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)
    m1 = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m1.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m0, m1


def _data(n=40, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def test_list_of_two_equal_batches_is_two_batches_not_a_pair():
    """The issue's case: [xb1, xb2] of equal size was read as (X, Y) and the second batch dropped."""
    m0, m1 = _pair_of_models()
    X, _ = _data()
    xb1, xb2 = X[:20], X[20:]
    whole = laftr.exact_fsd(m0, m1, X)
    first = laftr.exact_fsd(m0, m1, xb1)
    assert not torch.allclose(whole, first)  # the case can tell the two readings apart
    assert torch.allclose(laftr.exact_fsd(m0, m1, [xb1, xb2]), whole, rtol=1e-6, atol=0)
    for name in ("laftr", "kfac", "subset"):
        a = laftr.make_estimator(name, seed=3).fit(m0, [xb1, xb2])
        b = laftr.make_estimator(name, seed=3).fit(m0, X)
        assert torch.allclose(a(m1), b(m1), rtol=1e-5, atol=0), name


def test_every_form_gives_the_same_answer():
    m0, m1 = _pair_of_models()
    X, Y = _data()
    ref = laftr.exact_fsd(m0, m1, X)
    forms = {
        "tuple (X, Y)": (X, Y),
        "list of x batches": [X[:13], X[13:30], X[30:]],
        "list of (x, y) batches": [(X[:16], Y[:16]), (X[16:], Y[16:])],
        "list of dict batches": [{"x": X[:16], "y": Y[:16]}, {"x": X[16:]}],
        "DataLoader": DataLoader(TensorDataset(X, Y), batch_size=7),  # yields [x, y] lists
        "generator": (X[i : i + 9] for i in range(0, 40, 9)),
        "regression targets (N, 1)": (X, torch.randn(40, 1)),
        "multi-output targets (N, 3)": (X, torch.randn(40, 3)),
    }
    for what, data in forms.items():
        assert torch.allclose(laftr.exact_fsd(m0, m1, data), ref, rtol=1e-6, atol=0), what


def test_tuple_of_two_same_shaped_tensors_is_refused_as_ambiguous():
    m0, m1 = _pair_of_models()
    X, _ = _data()
    with pytest.raises(DataError, match="ambiguous"):
        laftr.exact_fsd(m0, m1, (X[:20], X[20:]))
    with pytest.raises(DataError, match="ambiguous"):
        laftr.make_estimator("laftr").fit(m0, (X[:20], X[20:]))


def test_list_holding_x_and_labels_names_the_tuple_form():
    m0, _ = _pair_of_models()
    X, Y = _data()
    with pytest.raises(DataError, match="pass an \\(X, Y\\) pair as a tuple"):
        laftr.make_estimator("laftr").fit(m0, [X, Y])


def test_unequal_lengths_are_named():
    m0, m1 = _pair_of_models()
    X, Y = _data()
    with pytest.raises(DataError, match="X has 40 examples, Y has shape \\(39,\\)"):
        laftr.exact_fsd(m0, m1, (X, Y[:39]))
    with pytest.raises(DataError, match="batch 1 has 20 inputs but labels of shape \\(19,\\)"):
        laftr.make_estimator("laftr", input_model="classwise").fit(m0, [(X[:20], Y[:20]), (X[20:], Y[21:])])


def test_batches_of_different_shape_or_kind_are_refused():
    X, _ = _data()
    with pytest.raises(DataError, match="batch 0 has floating inputs of per-example shape \\(5,\\), batch 1 "
                                        "floating inputs of per-example shape \\(4,\\)"):
        list(iter_batches([X[:10], X[10:, :4]]))
    with pytest.raises(DataError, match="integer inputs"):
        list(iter_batches([X[:10], torch.zeros(10, 5, dtype=torch.long)]))


@pytest.mark.parametrize("data, match", [
    ([], "empty"),
    (torch.zeros(0, 5), "empty"),
    ([torch.zeros(0, 5)], "empty"),
    (torch.tensor(1.0), "0-dim"),
    ("data.npy", "got str"),
    ({"x": torch.zeros(3, 5)}, "got dict"),
    ([object()], "cannot read batch 0 of type object"),
    ([torch.tensor([[1.0, float("nan")] * 2 + [0.0]])], "batch 0 contains NaN"),
])
def test_bad_data_is_named(data, match):
    with pytest.raises(DataError, match=match):
        list(iter_batches(data))


def test_integer_inputs_keep_their_dtype_and_floats_follow_the_model():
    ids = torch.randint(0, 7, (6, 4))
    (x, _), = iter_batches(ids, dtype=torch.float64)
    assert x.dtype == torch.long
    (x, _), = iter_batches(torch.zeros(6, 4), dtype=torch.float64)
    assert x.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.uint8, torch.long])
def test_integer_inputs_into_a_floating_network_are_named_with_the_fix(dtype):
    """uint8 pixels (or ids) into a Linear: a DataError naming the dtype and the conversion, from exact_fsd and
    every estimator's fit, instead of torch's "mat1 and mat2 must have the same dtype" from deep inside; a
    network that converts its input itself runs."""
    m0, m1 = _pair_of_models()
    X = torch.randint(0, 255, (20, 5)).to(dtype)
    def fitted(name: str) -> laftr.FSDEstimator:
        opts = {"coreset_size": 4} if name in ("ntk", "subset") else {}
        return laftr.make_estimator(name, **opts).fit(m0, X)

    runs = {"exact_fsd": lambda: laftr.exact_fsd(m0, m1, X), "grad": lambda: exact_fsd_and_grad(m0, m1, X)}
    for name in ("laftr", "kfac", "diag-fisher", "ntk", "subset"):
        runs[name] = lambda name=name: fitted(name)(m1)
    for run in runs.values():
        with pytest.raises(DataError, match=rf"{dtype}.*X.float\(\) / 255"):
            run()
    assert float(fitted("weight")(m1)) > 0  # reads no data: nothing to refuse

    class Scaled(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.float() / 255)

    assert float(laftr.exact_fsd(Scaled(m0), Scaled(m1), X)) > 0


def test_exact_fsd_of_a_float32_reference_and_a_float64_model():
    m0, m1 = _pair_of_models()
    X, _ = _data()
    ref = laftr.exact_fsd(m0, m1, X)
    m1d = copy.deepcopy(m1).double()
    m0d = copy.deepcopy(m0).double()
    got = laftr.exact_fsd(m0, m1d, X)  # float32 reference, float64 model
    assert got.dtype == torch.float64
    assert torch.allclose(got, ref.double(), rtol=1e-5)
    got = laftr.exact_fsd(m0d, m1, X)  # float64 reference, float32 model
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=1e-5)
    d, g = exact_fsd_and_grad(m0, m1d, X)
    assert torch.allclose(d, ref.double(), rtol=1e-5) and g["0.weight"].dtype == torch.float64
    assert float(laftr.exact_fsd(m0, copy.deepcopy(m0).double(), X)) < 1e-12


@pytest.mark.parametrize("outputs, match", [
    ([99], "out of range for a model with 4 outputs"),
    ([-1], "non-negative"),
    ([0, 0], "repeat an index"),
    ([1.5], "integer output indices, got 1.5"),
    ([True], "integer output indices, got True"),
    ([], "non-empty"),
    ("0", "list of output indices"),
])
def test_exact_fsd_checks_outputs(outputs, match):
    m0, m1 = _pair_of_models()
    X, _ = _data()
    with pytest.raises(UsageError, match=match):
        laftr.exact_fsd(m0, m1, X, metric="kl", outputs=outputs)
    with pytest.raises(UsageError, match=match):
        exact_fsd_and_grad(m0, m1, X, metric="kl", outputs=outputs)


def test_unknown_metric_is_a_usage_error():
    m0, m1 = _pair_of_models()
    with pytest.raises(UsageError, match="unknown metric 'kld'"):
        laftr.exact_fsd(m0, m1, _data()[0], metric="kld")


def test_models_of_different_output_shapes_are_named():
    m0, _ = _pair_of_models()
    other = nn.Sequential(nn.Linear(5, 3))
    with pytest.raises(DataError, match="output shapes differ: \\(40, 4\\) vs \\(40, 3\\)"):
        laftr.exact_fsd(m0, other, _data()[0])


def test_meta_models_and_devices_are_refused():
    from laftr._util import resolve_device
    from laftr.continual import TrainConfig

    m0, m1 = _pair_of_models()
    with pytest.raises(UsageError, match="model_b's '0.weight' is on the 'meta' device"):
        laftr.exact_fsd(m0, copy.deepcopy(m1).to("meta"), _data()[0])
    for bad, match in (("meta", "holds no values"), ("gpu", "unknown device 'gpu'"), (3, "device name")):
        with pytest.raises(UsageError, match=match):
            resolve_device(bad)
        with pytest.raises(UsageError, match=match):
            TrainConfig(device=bad)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="asks for CUDA"):
            TrainConfig(device="cuda:0")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None) is None


@pytest.mark.parametrize("field, value", [("epochs", 2.5), ("epochs", "3"), ("batch_size", 0),
                                          ("eval_batch_size", -1), ("lr", 0), ("weight_decay", float("nan"))])
def test_train_config_values_are_checked(field, value):
    from laftr.continual import TrainConfig

    with pytest.raises(UsageError, match=field):
        TrainConfig(**{field: value})


def test_meta_models_are_refused_at_fit_and_bad_devices_at_load(tmp_path):
    m0, _ = _pair_of_models()
    X, _ = _data()
    meta = copy.deepcopy(m0).to("meta")
    for name in laftr.available_estimators():
        with pytest.raises(UsageError, match="'meta' device"):
            laftr.make_estimator(name).fit(meta, X)
    path = laftr.save(laftr.make_estimator("laftr").fit(m0, X), tmp_path / "s.laftr")
    for bad, match in (("meta", "holds no values"), ("gpu", "unknown device 'gpu'")):
        with pytest.raises(UsageError, match=match):
            laftr.load(path, device=bad)
    assert laftr.load(path, device="cpu").fitted


def test_a_generator_is_refused_where_the_data_is_read_twice():
    """The mixture input model reads the data twice (k-means sample, then sums): a one-shot generator would be
    empty the second time; it is refused by name, while one-pass input models take it."""
    from laftr.models import mlp

    torch.manual_seed(0)
    model = mlp(5, (8,), 3)
    X = torch.randn(200, 5)

    def gen():
        for i in range(0, 200, 50):
            yield X[i:i + 50]

    with pytest.raises(laftr.DataError, match="'mixture' reads the data twice.*generator"):
        laftr.make_estimator("laftr", input_model="mixture").fit(model, gen())
    one_pass = laftr.make_estimator("laftr", input_model="gaussian", seed=1).fit(model, gen())
    whole = laftr.make_estimator("laftr", input_model="gaussian", seed=1).fit(model, X)
    other = mlp(5, (8,), 3)
    torch.testing.assert_close(one_pass(other), whole(other))


def test_an_iterable_that_reads_once_keeps_every_example():
    """An IterableDataset whose ``__iter__`` hands out the same generator every time (a file or socket reader),
    alone or in a DataLoader: the fit's probe of the network read its first batches, and the fit's pass started
    after them (33 of 41 examples counted, silently). A two-pass input model names the data as read-once."""
    from torch.utils.data import IterableDataset

    from laftr.models import mlp

    torch.manual_seed(0)
    model = mlp(4, (6,), 3)
    X, Y = torch.randn(41, 4), torch.randint(0, 3, (41,))

    class OneShot(IterableDataset):
        def __init__(self):
            self.gen = ((X[a:a + 4], Y[a:a + 4]) for a in range(0, 41, 4))

        def __iter__(self):
            return self.gen

    whole = laftr.make_estimator("laftr-exact").fit(model, (X, Y))
    other = mlp(4, (6,), 3)
    for make in (OneShot, lambda: DataLoader(OneShot(), batch_size=None)):
        est = laftr.make_estimator("laftr-exact").fit(model, make())
        assert est.summary.counts.tolist() == [41.0]
        torch.testing.assert_close(est(other), whole(other), rtol=1e-6, atol=0)
        assert laftr.make_estimator("subset", coreset_size=100).fit(model, make()).X.shape[0] == 41
        with pytest.raises(laftr.DataError, match="'mixture' reads the data twice.*read only once"):
            laftr.make_estimator("laftr", input_model="mixture", components=2).fit(model, make())


def test_a_distributed_sampler_that_pads_the_shards_is_named_once():
    """DistributedSampler(drop_last=False) repeats examples to even out the shards: a distributed fit counted
    them twice, silently (41 examples on 2 ranks counted 42; documented, now also warned, once per sampler)."""
    import warnings

    from torch.utils.data import DistributedSampler

    from laftr.models import mlp

    ds = TensorDataset(torch.randn(41, 4))
    model = mlp(4, (6,), 3)
    for drop_last, count in ((False, 1), (True, 0)):
        loader = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, num_replicas=2, rank=1,
                                                                         shuffle=False, drop_last=drop_last))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            laftr.make_estimator("laftr-exact").fit(model, loader, distributed=False)
            laftr.exact_fsd(model, model, loader, distributed=False)
        padded = [w for w in caught if "DistributedSampler repeats 1 example" in str(w.message)]
        assert len(padded) == count


def test_a_network_that_returns_one_number_per_batch_is_named():
    """exact_fsd of a network returning a 0-dim tensor failed with an IndexError inside laftr (a review)."""

    class Total(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x):
            return self.lin(x).sum()

    model = Total()
    with pytest.raises(UsageError, match="one number for the whole batch"):
        laftr.exact_fsd(model, copy.deepcopy(model), torch.randn(16, 6))


def test_uint8_images_into_a_conv_with_a_bias_are_named_with_the_fix():
    """A Conv2d with a bias raises 'Input type (unsigned char) and bias type (float) should be the same',
    which the dtype hint did not recognise (torch's RuntimeError came out of exact_fsd and every fit)."""
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    X = torch.randint(0, 255, (10, 1, 6, 6), dtype=torch.uint8)
    for run in (lambda: laftr.exact_fsd(m, m, X), lambda: laftr.make_estimator("subset").fit(m, X),
                lambda: laftr.make_estimator("kfac").fit(m, X)):
        with pytest.raises(DataError, match=r"uint8.*X.float\(\) / 255"):
            run()
