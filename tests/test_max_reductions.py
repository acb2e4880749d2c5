"""Max pooling in its other spellings (laftr.rules.pooling): MaxPool1d with padding, AdaptiveMaxPool1d/2d, and
amax / amin over one dimension. Each is a max pool over a viewed input, so every selection rule (theta0's
argmax, each stream's own, positions drawn from the stored frequencies) applies -- the drawn positions except
for adaptive windows of unequal sizes; checked against the network, against the exact FSD where the selection
cannot change, and for the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import perturbed
from torch import nn

import laftr
from laftr._util import param_dict
from laftr.errors import UnsupportedOpError
from laftr.graph import ForwardMode, TracedNet

pytestmark = pytest.mark.usefixtures("float64")

POOLS = {
    "maxpool1d-padded": lambda h: nn.functional.max_pool1d(h.flatten(2), 3, 2, padding=1),
    "maxpool1d-over-time": lambda h: F.max_pool1d(h.flatten(2), h.flatten(2).size(2)),  # text CNNs' idiom
    "adaptive1d": lambda h: F.adaptive_max_pool1d(h.flatten(2), 4),
    "adaptive2d-global": nn.AdaptiveMaxPool2d(1),
    "adaptive2d": lambda h: F.adaptive_max_pool2d(h, (2, 1)),
    "amax": lambda h: h.amax(-1),
    "torch.amax-keepdim": lambda h: torch.amax(h, dim=(2,), keepdim=True),
    "amin": lambda h: h.amin(1),
    "maxpool2d-ceil": nn.MaxPool2d(3, 2, ceil_mode=True),  # 2 x 2 windows (1 x 1 without ceil_mode)
    "maxpool1d-ceil-padded": lambda h: F.max_pool1d(h.flatten(2), 3, 2, padding=1, ceil_mode=True),
    "torch.max-dim": lambda h: torch.max(h, 2)[0],  # PointNet's global feature
    "max.values": lambda h: h.max(dim=-1).values,
    "torch.min-keepdim": lambda h: torch.min(h, 1, keepdim=True)[0],
}


class Net(nn.Module):
    """conv -> tanh -> one max reduction -> flatten -> linear (input (1, 4, 4)); tanh, not relu, so that no window
    holds tied zeros (a max over ties has no derivative, and no linearization recovers it)."""

    def __init__(self, pool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = pool
        with torch.no_grad():
            n = self.pool(torch.zeros(1, 2, 4, 4)).numel()
        self.head = nn.Linear(n, 3)

    def forward(self, x):
        return self.head(self.pool(torch.tanh(self.conv(x))).flatten(1))


def _data(n=40, seed=0):
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def _traced_like_the_module(pool) -> tuple[nn.Module, torch.Tensor, nn.Module]:
    """Net(pool), its data and a theta; its traced graph computes what the module does."""
    torch.manual_seed(0)
    model = Net(pool).eval()
    X = _data()
    (z,) = TracedNet(model).run((X,), ForwardMode([param_dict(model)]))
    torch.testing.assert_close(z, model(X), rtol=1e-12, atol=1e-12)
    return model, X, perturbed(model, 0.2)


def _other_estimators_and_the_limit(model: nn.Module, X: torch.Tensor, other: nn.Module) -> None:
    """liftr and K-FAC (which walk the graph) read the reduction; theta0's own linearization on all the data
    tends to the exact FSD as theta -> theta0."""
    for name in ("liftr", "kfac"):
        est = laftr.make_estimator(name, **({"unsupported": "diag"} if name == "kfac" else {})).fit(model, X)
        assert float(est(other)) > 0, name
    est = laftr.make_estimator("laftr", gates="relu", input_model="coreset", coreset_size=40, num_samples=40,
                               metric="l2").fit(model, X)
    errors = []
    for step in (0.1, 0.01, 0.001):
        near = perturbed(model, step, seed=3)
        errors.append(abs(float(est(near)) / float(laftr.exact_fsd(model, near, X, metric="l2")) - 1))
    assert errors[-1] < 1e-2 and errors[-1] <= errors[0]


@pytest.mark.parametrize("kind", list(POOLS))
def test_every_selection_rule_runs_and_theta0s_own_tends_to_the_exact_fsd(kind):
    model, X, other = _traced_like_the_module(POOLS[kind])
    for mp in ("argmax0", "sample", "separate"):
        est = laftr.make_estimator("laftr", metric="kl", num_samples=16, maxpool=mp, fixed_noise=True).fit(model, X)
        assert float(est(model)) == 0.0, mp
        d = est(other)
        grads = torch.autograd.grad(d, list(other.parameters()))
        assert float(d) > 0 and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), mp
        if mp == "sample":  # the stored argmax frequencies: one law per window, summing to 1
            (pi,) = [v for k, v in est.summary.site_means().items() if k not in ("tanh",)]
            torch.testing.assert_close(pi.sum(1), torch.ones_like(pi.sum(1)))
    _other_estimators_and_the_limit(model, X, other)


class AffinePool(nn.Module):
    """A 1 x 1 conv scaling its one channel by 1 and 2 (no bias, no gate), a max reduction, a linear head."""

    def __init__(self, pool) -> None:
        super().__init__()
        self.conv, self.pool = nn.Conv2d(1, 2, 1), pool
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
            self.conv.bias.zero_()
            self.head = nn.Linear(pool(torch.zeros(1, 2, 4, 4)).numel(), 3)

    def forward(self, x):
        return self.head(self.pool(self.conv(x)).flatten(1))


@pytest.mark.parametrize("maxpool", ["sample", "argmax0", "separate"])
@pytest.mark.parametrize("kind", ["adaptive2d", "amax", "amin", "maxpool1d-padded", "maxpool1d-over-time",
                                  "max.values", "torch.min-keepdim"])
def test_a_fixed_winner_makes_every_selection_rule_exact(kind, maxpool):
    """No gates and inputs whose winning position in every window is the same (a large value there): every
    selection rule picks theta0's positions, and LAFTR on a coreset of all the data is the exact FSD."""
    model = AffinePool(POOLS[kind]).eval()
    X = 0.1 * torch.rand(30, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sign = -1.0 if kind == "amin" else 1.0
    if kind == "maxpool1d-padded":  # windows {2j-1, 2j, 2j+1} of the 16 flattened positions: 2j wins
        X.view(30, 16)[:, 0::2] += 5.0
    elif kind == "adaptive2d":  # windows of 2 rows x 4 columns
        X[:, :, 0::2, 2] += 5.0
    elif kind == "maxpool1d-over-time":  # one window: all 16 flattened positions
        X.view(30, 16)[:, 7] += 5.0
    else:  # the whole last / second dimension
        sign = -1.0 if kind in ("amin", "torch.min-keepdim") else 1.0
        X[:, :, 1, 2] += 5.0 * sign
        X[:, :, :, 2] += 5.0 * sign
    other = perturbed(model, 0.05, only="head")  # the conv stays, so theta's winners are theta0's
    est = laftr.make_estimator("laftr", metric="kl", input_model="coreset", coreset_size=30, num_samples=30,
                               maxpool=maxpool).fit(model, X)
    torch.testing.assert_close(est(other), laftr.exact_fsd(model, other, X, metric="kl"), rtol=1e-10, atol=1e-14)


class _Indices(nn.Module):
    """An adaptive max pool asked for its indices (the values taken from the pair it returns)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.p, self.head = nn.Conv2d(1, 2, 1), nn.AdaptiveMaxPool2d(2, return_indices=True), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.p(self.conv(x))[0].flatten(1))


def test_max_reductions_are_refused_where_they_are_not_a_pool():
    X = _data(8)
    cases = [
        (_Indices(), "return_indices"),
        (Net(lambda h: h.amax((2, 3))), "several dimensions"),
        (Net(lambda h: h.amax()), r"dim=None"),
        (Net(lambda h: torch.amax(h, 0)), "batch dimension"),
        (Net(lambda h: h - torch.max(h)), r"torch.max.*mixes the examples"),
        # (the elementwise torch.max(h, torch.tanh(h)) is torch.maximum: tests/test_more_ops.py)
        (Net(lambda h: torch.max(h, h.dim() - 3).values.unsqueeze(1)), "dim is computed while tracing"),
    ]
    for net, match in cases:
        with pytest.raises(UnsupportedOpError, match=match):
            # (the network's own rules, as the estimators' fit builds them: h.amax() gives a network that does
            # not run on a batch at all, which fit now names as data that does not fit before reaching them)
            TracedNet(net)
            laftr.make_estimator("laftr").fit(net, X)
    with pytest.raises(UnsupportedOpError, match=r"output size 3 over an input of size 4 has windows of unequal"):
        laftr.make_estimator("laftr", maxpool="sample").fit(Net(nn.AdaptiveMaxPool2d(3)), X)
    with pytest.raises(UnsupportedOpError, match="laftr-exact does not handle max pooling"):
        laftr.make_estimator("laftr-exact").fit(Net(POOLS["amax"]), X)(Net(POOLS["amax"]))


def test_a_kernel_read_from_the_shape_is_recorded_as_such_and_reloads(tmp_path):
    """``F.max_pool1d(h, h.size(2))``: the summary records the kernel as read at run time (not the size of the
    fit's data), and a saved estimator gives the same value after loading."""
    torch.manual_seed(0)
    model, X = Net(POOLS["maxpool1d-over-time"]).eval(), _data()
    other = perturbed(model, 0.1)
    est = laftr.make_estimator("laftr", maxpool="sample", fixed_noise=True).fit(model, X)
    (pool,) = [p for name, fam, p in est.site_signature if fam == "maxpool"]
    assert pool["kernel_size"] == "runtime" and pool["stride"] == "runtime"
    back = laftr.load(laftr.save(est, tmp_path / "s.laftr"))
    torch.testing.assert_close(back(other), est(other), rtol=1e-12, atol=1e-15)


def test_max_pool_windows_with_ceil_mode_are_torchs():
    """``ceil_mode=True`` (a last window that runs past the padded input, if it starts inside it) was refused by
    every laftr selection rule ('not supported by window statistics'), also where the statistics are unused.
    The windows now are torch's: their maxima equal ``F.max_pool2d`` for every geometry below."""
    import itertools

    from laftr.rules.pooling import pool_windows

    x = torch.randn(2, 3, 8, 7, generator=torch.Generator().manual_seed(0))
    checked = 0
    for H, W, k, s, p, d in itertools.product([5, 6, 8], [5, 7], [2, 3], [1, 2, 3], [0, 1], [1, 2]):
        if p > k // 2 or d * (k - 1) + 1 > min(H, W) + 2 * p:
            continue
        for ceil in (False, True):
            pool = {"dims": 2, "kernel_size": k, "stride": s, "padding": p, "dilation": d, "ceil_mode": ceil}
            cols, shape = pool_windows(x[:, :, :H, :W], pool, float("-inf"))
            want = F.max_pool2d(x[:, :, :H, :W], k, s, p, d, ceil)
            assert shape == tuple(want.shape), (H, W, k, s, p, d, ceil)
            assert torch.equal(cols.max(2).values.view(shape), want), (H, W, k, s, p, d, ceil)
            checked += 1
    assert checked > 100


UNEQUAL = {"adaptive2d-unequal": nn.AdaptiveMaxPool2d(3),  # windows of rows / columns [0, 2), [1, 3), [2, 4)
           "adaptive1d-unequal": lambda h: F.adaptive_max_pool1d(h.flatten(2), 5),  # 16 -> 5: windows of 4 and 5
           "adaptive2d-mixed": nn.AdaptiveMaxPool2d((3, 2))}  # unequal along the rows, 2-wide along the columns


@pytest.mark.parametrize("kind", list(UNEQUAL))
def test_adaptive_pools_of_unequal_windows_take_theta0s_argmax_or_each_streams_own(kind):
    """Adaptive windows of unequal sizes (overlapping where the output size does not divide the input size) were
    refused, also by theta0's own linearization and the real networks, which only need torch's pooling: they run
    now in every mode but the drawn positions, which are refused at fit (a late refusal was the bug)."""
    model, X, other = _traced_like_the_module(UNEQUAL[kind])
    for opts in ({}, {"maxpool": "separate"}, {"gates": "relu"}, {"gates": "none"},
                 {"linearize": "activations"}):
        est = laftr.make_estimator("laftr", metric="kl", num_samples=16, fixed_noise=True, **opts).fit(model, X)
        assert float(est(model)) == 0.0, opts
        d = est(other)
        grads = torch.autograd.grad(d, list(other.parameters()))
        assert float(d) > 0 and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), opts
    with pytest.raises(UnsupportedOpError, match="windows of unequal sizes.*maxpool='argmax0'"):
        laftr.make_estimator("laftr", maxpool="sample").fit(model, X)
    # the same from a summary fitted elsewhere (no pass has seen the windows): named too (a bare ValueError)
    from laftr.summary import fit_summary

    summary = fit_summary(TracedNet(model), param_dict(model, detach=True), X, "gaussian")
    with pytest.raises(laftr.UsageError, match=r"max-pool sites \['[a-z0-9_]+'\] recorded no argmax frequencies"):
        laftr.make_estimator("laftr", maxpool="sample").fit_summary_only(summary, model)
    assert laftr.make_estimator("laftr").fit_summary_only(summary, model)(model).item() == 0.0
    _other_estimators_and_the_limit(model, X, other)


@pytest.mark.parametrize("maxpool", ["argmax0", "separate"])
def test_unequal_adaptive_windows_with_a_fixed_winner_are_exact(maxpool):
    """Rows 1 and 2 (and columns 1 and 2) hold the largest values, row 1 above row 2: the windows [0, 2), [1, 3)
    and [2, 4) of a 4 -> 3 adaptive pool are won by rows 1, 1 and 2 in every stream, so LAFTR on a coreset of
    all the data with no gates is the exact FSD (a wrong window or gather would not be)."""
    model = AffinePool(nn.AdaptiveMaxPool2d(3)).eval()
    X = 0.1 * torch.rand(30, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    X[:, :, 1, :] += 5.0
    X[:, :, 2, :] += 4.0
    X[:, :, :, 1] += 0.5
    X[:, :, :, 2] += 0.4
    other = perturbed(model, 0.05, only="head")
    est = laftr.make_estimator("laftr", metric="kl", input_model="coreset", coreset_size=30, num_samples=30,
                               maxpool=maxpool).fit(model, X)
    torch.testing.assert_close(est(other), laftr.exact_fsd(model, other, X, metric="kl"), rtol=1e-10, atol=1e-14)
