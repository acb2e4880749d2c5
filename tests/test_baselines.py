"""Baseline FSD estimators (weight, diag-fisher, kfac, ntk, subset) against dense, brute-force computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from cases import FunctionalNet, SmallCNN, mlp, perturbed, randomize_bn
from torch import nn
from torch.func import functional_call

import laftr
from laftr.estimators.curvature import output_hessian_factor, output_vectors
from laftr.metrics import discrepancy

DT = torch.float64
BASELINES = ["weight", "diag-fisher", "kfac", "ntk", "subset"]
METRICS = ["l2", "kl", "l2-probs"]


pytestmark = pytest.mark.usefixtures("float64")


def _data(n=60, shape=(5,), classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn((n, *shape), generator=g)
    Y = torch.randint(0, classes, (n,), generator=g)
    return X, Y


def _make(name, **kw):
    if name in ("ntk", "subset"):
        kw.setdefault("coreset_size", 40)
    if name in ("diag-fisher", "kfac"):
        kw.setdefault("fisher", "exact")
    return laftr.make_estimator(name, **kw)


# ---------------------------------------------------------------------- brute force references
def _flat_fn(model):
    """``f(flat_params, x) -> outputs`` for one example and the flat theta0 vector, plus per-parameter slices."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    slices, i = {}, 0
    for n, s in zip(names, shapes):
        slices[n] = slice(i, i + s.numel())
        i += s.numel()

    def f(flat, x):
        params = {n: flat[slices[n]].view(s) for n, s in zip(names, shapes)}
        return functional_call(model, (params, buffers), (x[None],))[0].reshape(-1)

    return f, flat0, slices


def dense_ggn(model, X, metric, outputs=None):
    """``mean_x J^T H J`` by brute force: dense Jacobian and the autograd Hessian of rho(z0, .) at z0."""
    model.eval()
    f, flat0, slices = _flat_fn(model)
    idx = None if outputs is None else torch.tensor(outputs)
    G = torch.zeros(flat0.numel(), flat0.numel())
    for x in X:
        J = torch.autograd.functional.jacobian(lambda t, x=x: f(t, x), flat0, vectorize=True)
        if idx is not None:
            J = J[idx]
        z0 = (f(flat0, x) if idx is None else f(flat0, x)[idx]).detach()
        H = torch.autograd.functional.hessian(lambda z, z0=z0: discrepancy(z0[None], z[None], metric)[0], z0)
        G += J.T @ H @ J
    return G / len(X), slices


def param_delta(model, other):
    return torch.cat([(b - a).detach().reshape(-1) for a, b in zip(model.parameters(), other.parameters())])


def block_quadratic(G, slices, delta, layer_of):
    """``1/2 sum_layers delta_l^T G_ll delta_l`` with the layers given by ``layer_of(parameter name)``."""
    groups = {}
    for n, s in slices.items():
        groups.setdefault(layer_of(n), []).append(torch.arange(s.start, s.stop))
    total = 0.0
    for ids in groups.values():
        i = torch.cat(ids)
        total = total + 0.5 * delta[i] @ G[i][:, i] @ delta[i]
    return total


def _layer(name):
    return name.rsplit(".", 1)[0]


def _move(model, direction, t):
    with torch.no_grad():
        for p, u in zip(model.parameters(), direction):
            p.add_(t * u)


# ---------------------------------------------------------------------- curvature of the metrics
@pytest.mark.parametrize("metric", ["l2", "mse", "kl", "l2-probs"])
def test_output_hessian_factor_is_a_factor_of_the_autograd_hessian(metric):
    z0 = torch.randn(4, 5)
    L = output_hessian_factor(z0, metric)
    for b in range(4):
        H = torch.autograd.functional.hessian(lambda z, b=b: discrepancy(z0[b : b + 1], z[None], metric)[0], z0[b])
        torch.testing.assert_close(L[b] @ L[b].T, H, rtol=1e-10, atol=1e-12)
    # the exact vectors are that factor; the sampled ones reproduce H on average
    torch.testing.assert_close(output_vectors(z0, metric, "exact", 1, None), L)
    gen = torch.Generator().manual_seed(0)
    W = output_vectors(z0, metric, "mc", 40000, gen)
    est = W @ W.transpose(1, 2)
    H = L @ L.transpose(1, 2)
    err = (est - H).abs().max().item()
    assert err < 0.04 * H.abs().max().item(), err
    W_few = output_vectors(z0, metric, "mc", 40, gen)
    assert (W_few @ W_few.transpose(1, 2) - H).abs().max().item() > 2 * err


# ---------------------------------------------------------------------- diag-fisher
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("outputs", [None, [0, 2]])
def test_diag_fisher_exact_equals_dense_ggn_diagonal(metric, outputs):
    model = mlp(4, (5,), 3)
    X, _ = _data(6, (4,))
    G, slices = dense_ggn(model, X, metric, outputs)
    est = _make("diag-fisher", metric=metric, batch_size=4, chunk_size=3).fit(model, X, outputs=outputs)
    diag = torch.cat([est.diag[n].reshape(-1) for n in slices])
    torch.testing.assert_close(diag, G.diagonal(), rtol=1e-10, atol=1e-14)
    other = perturbed(model, 0.3)
    delta = param_delta(model, other)
    torch.testing.assert_close(est(other), 0.5 * (G.diagonal() * delta**2).sum(), rtol=1e-10, atol=1e-14)
    # per-example: one batch of 6 gives the same as 6 batches of 1
    single = _make("diag-fisher", metric=metric, batch_size=1).fit(model, X, outputs=outputs)
    torch.testing.assert_close(single(other), est(other), rtol=1e-12, atol=0)


class _MixedNet(nn.Module):
    """Every branch of diag-fisher's layer taps: a conv with many positions, batch norm (per-example vmap
    fallback), a Linear called twice (shared weights) and a Linear on (B, T, d) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.shared = nn.Linear(4, 4)
        self.seq = nn.Linear(4, 3, bias=False)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))  # (B, 2, 2, 2)
        t = h.flatten(2).transpose(1, 2).reshape(x.shape[0], 2, 4)  # (B, T=2, 4)
        t = F.relu(self.shared(t))
        t = self.shared(t)  # the same layer again
        return self.head(F.relu(self.seq(t)).mean(1))


@pytest.mark.parametrize("metric", ["kl", "l2"])
def test_diag_fisher_layer_taps_equal_dense_ggn_on_a_mixed_net(metric):
    model = _MixedNet()
    randomize_bn(model, torch.Generator().manual_seed(4))
    X, _ = _data(5, (1, 2, 2))
    G, slices = dense_ggn(model, X, metric)
    est = _make("diag-fisher", metric=metric, batch_size=3).fit(model, X)
    diag = torch.cat([est.diag[n].reshape(-1) for n in slices])
    torch.testing.assert_close(diag, G.diagonal(), rtol=1e-10, atol=1e-14)


def test_empirical_fisher_equals_mean_of_squared_per_example_loss_gradients():
    model = mlp(4, (5,), 4)
    X, Y = _data(8, (4,), classes=2)
    Yg = Y + 2  # labels index the model's outputs; the task uses outputs 2 and 3
    outputs = [2, 3]
    est = _make("diag-fisher", metric="kl", fisher="empirical", batch_size=3).fit(model, (X, Yg), outputs=outputs)
    acc = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in zip(X, Y):
        loss = F.cross_entropy(model(x[None])[:, outputs], y[None])
        for a, g in zip(acc, torch.autograd.grad(loss, list(model.parameters()))):
            a += g**2
    for (n, _), a in zip(model.named_parameters(), acc):
        torch.testing.assert_close(est.diag[n], a / len(X), rtol=1e-10, atol=1e-14)
    # the square of the batch-mean gradient (the known bug) is different
    loss = F.cross_entropy(model(X)[:, outputs], Y)
    g = torch.autograd.grad(loss, [model[0].weight])[0]
    assert not torch.allclose(g**2, est.diag["0.weight"], rtol=1e-3)


@pytest.mark.parametrize("name,metric", [("diag-fisher", "kl"), ("diag-fisher", "l2-probs"), ("kfac", "kl"),
                                         ("kfac", "l2")])
def test_monte_carlo_fisher_converges_to_exact(name, metric):
    model = mlp(4, (5,), 3)
    X, _ = _data(5, (4,))
    other = perturbed(model, 0.3)
    exact = _make(name, metric=metric).fit(model, X)(other).item()
    reps = 10
    vals = torch.tensor([_make(name, metric=metric, fisher="mc", num_label_samples=400, seed=10 + r)
                         .fit(model, X)(other).item() for r in range(reps)])
    mean, se = vals.mean().item(), vals.std().item() / math.sqrt(reps)
    assert se > 0
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    # fewer samples: visibly noisier
    few = torch.tensor([_make(name, metric=metric, fisher="mc", num_label_samples=4, seed=r).fit(model, X)(other).item()
                        for r in range(reps)])
    assert few.std().item() > 3 * vals.std().item()


# ---------------------------------------------------------------------- kfac
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("outputs", [None, [1, 2]])
def test_kfac_single_example_equals_dense_ggn_blocks(metric, outputs):
    model = mlp(4, (5, 4), 3)
    X, _ = _data(1, (4,))
    G, slices = dense_ggn(model, X, metric, outputs)
    est = _make("kfac", metric=metric).fit(model, X, outputs=outputs)
    other = perturbed(model, 0.3)
    delta = param_delta(model, other)
    truth = block_quadratic(G, slices, delta, _layer)
    assert truth > 1e-6
    torch.testing.assert_close(est(other), truth, rtol=1e-10, atol=1e-14)
    # one layer moved: exactly that layer's block
    only = perturbed(model, 0.3, only="2.")
    d = param_delta(model, only)
    i = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in ("2.weight", "2.bias")])
    torch.testing.assert_close(est(only), 0.5 * d[i] @ G[i][:, i] @ d[i], rtol=1e-10, atol=1e-14)


def test_kfac_deep_linear_net_equals_dense_ggn_blocks_on_many_examples():
    # with l2, a linear network's backpropagated vectors do not depend on x, so A (x) G is exact
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 2))
    X, _ = _data(20, (4,))
    X = X + 0.5  # non-zero mean: the bias column matters
    G, slices = dense_ggn(model, X, "l2")
    other = perturbed(model, 0.3)
    truth = block_quadratic(G, slices, param_delta(model, other), _layer)
    est = _make("kfac", metric="l2", batch_size=7).fit(model, X)
    torch.testing.assert_close(est(other), truth, rtol=1e-10, atol=1e-14)
    # and the whole-network quadratic form differs (K-FAC drops the cross-layer blocks)
    full = 0.5 * param_delta(model, other) @ G @ param_delta(model, other)
    assert abs(full - truth) > 1e-3 * truth


class _ConvT1(nn.Module):
    """A conv whose kernel covers its 3x3 input (one output position), then a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("metric", METRICS)
def test_kfac_conv_with_one_position_single_example_equals_dense_blocks(metric):
    model = _ConvT1()
    X, _ = _data(1, (2, 3, 3))
    G, slices = dense_ggn(model, X, metric)
    other = perturbed(model, 0.3)
    truth = block_quadratic(G, slices, param_delta(model, other), _layer)
    torch.testing.assert_close(_make("kfac", metric=metric).fit(model, X)(other), truth, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), padding_mode="reflect"),
    lambda: nn.Conv2d(2, 3, 3, padding="same"),
])
def test_kfac_conv_positions_convention_exact_when_conv_is_the_output(conv):
    # The conv's output is the network output and the metric is l2: each output unit's backpropagated
    # vector is a unit vector at one position, so the dense block is sum_t a_t a_t^T (x) I. KFC's
    # A = mean_t a_t a_t^T and G = sum_t g_t g_t^T must reproduce it (a wrong normalization would not).
    model = nn.Sequential(conv(), nn.Flatten())
    X, _ = _data(4, (2, 4, 4))
    G, slices = dense_ggn(model, X, "l2")
    other = perturbed(model, 0.3)
    truth = block_quadratic(G, slices, param_delta(model, other), _layer)
    torch.testing.assert_close(_make("kfac", metric="l2").fit(model, X)(other), truth, rtol=1e-10, atol=1e-14)


def test_kfac_unsupported_layers_error_or_diagonal_fallback():
    model = SmallCNN()
    randomize_bn(model, torch.Generator().manual_seed(1))
    X, _ = _data(10, (1, 6, 6))
    with pytest.raises(ValueError, match=r"'bn'.*BatchNorm2d"):
        laftr.make_estimator("kfac").fit(model, X)
    est = _make("kfac", metric="kl", unsupported="diag").fit(model, X)
    # batch norm gets exactly the diagonal Gauss-Newton term of diag-fisher
    fisher = _make("diag-fisher", metric="kl").fit(model, X)
    for n in ("bn.weight", "bn.bias"):
        torch.testing.assert_close(est.diag[n], fisher.diag[n], rtol=1e-10, atol=1e-14)
    assert sorted(est.diag) == ["bn.bias", "bn.weight"]
    # and the layers K-FAC handles get Kronecker factors of the right size
    assert {n: tuple(a.shape) for n, a in est.A.items()} == {"conv1": (10, 10), "conv2": (28, 28), "fc": (17, 17)}


def test_kfac_leaves_the_model_unchanged_and_pools_a_shared_module():
    model = FunctionalNet()  # the module `b` is called twice per forward
    state = copy.deepcopy(model.state_dict())
    model.train()
    X, _ = _data(12)
    est = _make("kfac", metric="kl").fit(model, X)
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    # both calls of `b` are pooled as positions: A averages them, G sums them
    h = F.relu(model.a(X))
    r = model.c(torch.relu(model.b(h))).relu()
    a = torch.stack([h, h + r], 1)  # inputs of the two calls
    a = torch.cat([a, torch.ones(12, 2, 1)], -1)
    torch.testing.assert_close(est.A["b"], torch.einsum("bti,btj->ij", a, a).detach() / (2 * 12))
    assert est(perturbed(model)).item() > 0


def test_kfac_in_place_relu_does_not_corrupt_pre_activation_gradients():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))
    X, _ = _data(1, (4,))
    X = X * 3  # some units on, some off
    G, slices = dense_ggn(model, X, "kl")
    other = perturbed(model, 0.3)
    truth = block_quadratic(G, slices, param_delta(model, other), _layer)
    torch.testing.assert_close(_make("kfac", metric="kl").fit(model, X)(other), truth, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------- ntk and subset
@pytest.mark.parametrize("metric", METRICS)
def test_ntk_equals_exact_fsd_for_a_model_linear_in_its_parameters(metric):
    model = nn.Linear(5, 3)
    X, _ = _data(80)
    est = _make("ntk", metric=metric, coreset_size=30).fit(model, X)
    assert est.X.shape == (30, 5)
    other = perturbed(model, 0.5)
    truth = laftr.exact_fsd(model, other, est.X, metric=metric)
    assert truth > 1e-3
    torch.testing.assert_close(est(other), truth, rtol=1e-12, atol=0)
    sub = _make("ntk", metric=metric, coreset_size=30).fit(model, X, outputs=[0, 2])
    torch.testing.assert_close(sub(other), laftr.exact_fsd(model, other, est.X, metric=metric, outputs=[0, 2]),
                               rtol=1e-12, atol=0)


def test_ntk_is_first_order_accurate_on_a_smooth_network():
    # the linearization error of the FSD is O(|dtheta|) relative: 10x smaller moves, ~10x smaller error
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    X, _ = _data(40)
    est = _make("ntk", coreset_size=40).fit(model, X)
    g = torch.Generator().manual_seed(4)
    direction = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    errs = []
    for t in (1e-2, 1e-3):
        other = copy.deepcopy(model)
        _move(other, direction, t)
        errs.append(abs(est(other).item() / laftr.exact_fsd(model, other, X).item() - 1))
    assert errs[1] < 0.2 * errs[0] and errs[1] < 1e-2, errs


@pytest.mark.parametrize("metric", ["l2", "mse", "kl", "l2-probs"])
def test_subset_on_all_data_equals_exact_fsd(metric):
    model = SmallCNN()  # eval batch norm (theta0's statistics), dropout, max pooling
    randomize_bn(model, torch.Generator().manual_seed(2))
    X, _ = _data(30, (1, 6, 6))
    est = _make("subset", metric=metric, coreset_size=100).fit(model, X, outputs=[0, 1])
    other = perturbed(model, 0.2)
    randomize_bn(other, torch.Generator().manual_seed(5))  # theta's own statistics differ
    other.train()
    d = est(other)
    assert other.training  # put back as it was
    torch.testing.assert_close(d, laftr.exact_fsd(model, other, X, metric=metric, outputs=[0, 1]), rtol=1e-12, atol=0)


def test_coreset_selection_is_independent_of_batch_size_and_order():
    X, Y = _data(90)
    model = mlp()
    ref = _make("subset", coreset_size=11, batch_size=90).fit(model, X).X
    perm = torch.randperm(90, generator=torch.Generator().manual_seed(3))
    for bs in (1, 7, 32):
        torch.testing.assert_close(_make("subset", coreset_size=11, batch_size=bs).fit(model, (X, Y)).X, ref,
                                   rtol=0, atol=0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[perm], Y[perm]), batch_size=13)
    torch.testing.assert_close(_make("ntk", coreset_size=11).fit(model, loader).X, ref, rtol=0, atol=0)
    assert not torch.equal(_make("subset", coreset_size=11, seed=1).fit(model, X).X, ref)  # the seed matters
    bal = _make("subset", coreset_size=12, selection="balanced", batch_size=90).fit(model, (X, Y)).X
    for bs in (5, 16):
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[perm], Y[perm]), batch_size=bs)
        torch.testing.assert_close(_make("subset", coreset_size=12, selection="balanced").fit(model, loader).X, bal,
                                   rtol=0, atol=0)


def test_balanced_selection_counts():
    g = torch.Generator().manual_seed(0)
    Y = torch.cat([torch.zeros(60), torch.ones(30), torch.full((8,), 2)]).long()
    Y = Y[torch.randperm(len(Y), generator=g)]
    X = torch.randn(len(Y), 5, generator=g)
    X[:, 0] = Y  # the class can be read off a stored input

    def counts(k, selection="balanced"):
        est = _make("subset", coreset_size=k, selection=selection, batch_size=16).fit(mlp(), (X, Y))
        return torch.bincount(est.X[:, 0].long(), minlength=3).tolist()

    assert counts(15) == [5, 5, 5]
    assert sorted(counts(17)) == [5, 6, 6]
    assert counts(30) == [11, 11, 8]  # the rare class gives its missing share to the others
    assert sum(counts(300)) == len(Y)
    assert counts(15, "random") != [5, 5, 5]  # a uniform sample follows the class frequencies


@pytest.mark.parametrize("name", ["subset", "ntk"])
def test_balanced_selection_takes_labels_as_strata(name):
    """The labels only stratify the selection (then they are dropped): a binary classifier with one logit and
    labels 0 / 1 is balanced (a check that labels were output units refused it); labels must be integers."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 5, generator=g)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    y = (torch.arange(20) % 4 == 0).long()  # 5 of class 1, 15 of class 0
    est = _make(name, coreset_size=6, selection="balanced", metric="l2").fit(model, (X, y))
    kept = {int(i) for i in range(20) if any(torch.equal(X[i], r) for r in est.X)}
    assert sum(int(y[i]) for i in kept) == 3  # 3 of each class
    with pytest.raises(laftr.DataError, match="integer class"):
        _make(name, coreset_size=6, selection="balanced").fit(mlp(), (X, torch.full((20,), 0.5)))


# ---------------------------------------------------------------------- properties of every baseline
@pytest.mark.parametrize("name", BASELINES)
def test_save_load_round_trip(tmp_path, name):
    model, shape = (SmallCNN(), (1, 6, 6)) if name == "kfac" else (mlp(), (5,))
    randomize_bn(model, torch.Generator().manual_seed(1))
    data = _data(30, shape)
    kw = {"unsupported": "diag"} if name == "kfac" else {}
    est = _make(name, metric="kl", **kw).fit(model, data, outputs=[0, 2])
    other = perturbed(model)
    path = laftr.save(est, tmp_path / "b.laftr")
    back = laftr.load(path)
    assert type(back) is type(est) and back.outputs == [0, 2] and back.config == est.config
    assert back.stored_floats() == est.stored_floats()
    torch.testing.assert_close(back(other), est(other), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name,metric", [(n, "kl") for n in BASELINES] + [("ntk", "l2-probs"), ("subset", "l2"),
                                                                            ("kfac", "l2-probs")])
def test_gradient_matches_finite_differences_and_zero_at_theta0(name, metric):
    model = mlp(4, (5,), 3)
    X, Y = _data(20, (4,))
    est = _make(name, metric=metric, coreset_size=20).fit(model, (X, Y)) if name in ("ntk", "subset") else \
        _make(name, metric=metric).fit(model, (X, Y))
    d0 = est(model)
    assert d0.ndim == 0 and d0.item() == 0.0
    other = perturbed(model, 0.3)
    params = list(other.parameters())
    d = est(other)
    assert d.item() > 0
    grads = torch.autograd.grad(d, params)
    u = [torch.randn_like(p) for p in params]
    analytic = sum((g * v).sum() for g, v in zip(grads, u)).item()
    h = 1e-5
    _move(other, u, h)
    up = est(other).item()
    _move(other, u, -2 * h)
    down = est(other).item()
    _move(other, u, h)
    assert abs((up - down) / (2 * h) - analytic) < 1e-6 * max(1.0, abs(analytic)), ((up - down) / (2 * h), analytic)
    # gradient descent on the estimate moves theta back towards theta0 in function space
    before = laftr.exact_fsd(model, other, X, metric=metric).item()
    opt = torch.optim.SGD(other.parameters(), lr=0.02 if name == "weight" else 0.5)
    for _ in range(10):
        opt.zero_grad()
        est(other).backward()
        opt.step()
    assert laftr.exact_fsd(model, other, X, metric=metric).item() < before


@pytest.mark.parametrize("name", BASELINES[1:])
def test_outputs_restriction_splits_the_l2_distance(name):
    # for l2 the distance is a sum over output units, so disjoint output sets add up
    model = mlp()
    X, _ = _data(25)
    other = perturbed(model, 0.2)
    kw = {"coreset_size": 25} if name in ("ntk", "subset") else {}
    full = _make(name, **kw).fit(model, X)(other)
    parts = _make(name, **kw).fit(model, X, outputs=[0])(other) + _make(name, **kw).fit(model, X, outputs=[1, 2])(other)
    torch.testing.assert_close(parts, full, rtol=1e-10, atol=0)
    assert _make(name, **kw).fit(model, X, outputs=[1, 2])(other) < 0.99 * full


def test_weight_estimator():
    model = mlp()
    other = perturbed(model, 0.1)
    other[0].bias.requires_grad_(False)  # frozen when evaluated: its change still counts
    est = laftr.make_estimator("weight", scale=3.0).fit(model, _data()[0])
    sq = sum(((b - a) ** 2).sum() for a, b in zip(model.parameters(), other.parameters()))
    torch.testing.assert_close(est(other), 1.5 * sq)
    assert est.stored_floats() == 0


def test_stored_floats_formulas():
    model = mlp(5, (8, 6), 3)
    data = _data(50)
    P = (5 * 8 + 8) + (8 * 6 + 6) + (6 * 3 + 3)
    assert _make("diag-fisher").fit(model, data).stored_floats() == P
    assert _make("kfac").fit(model, data).stored_floats() == (6**2 + 8**2) + (9**2 + 6**2) + (7**2 + 3**2)
    assert _make("ntk", coreset_size=7).fit(model, data).stored_floats() == 7 * 5
    assert _make("subset", coreset_size=500).fit(model, data).stored_floats() == 50 * 5  # all the data
    cnn = SmallCNN()
    kf = _make("kfac", unsupported="diag").fit(cnn, _data(10, (1, 6, 6)))
    assert kf.stored_floats() == (1 * 9 + 1) ** 2 + 3**2 + (3 * 9 + 1) ** 2 + 4**2 + (16 + 1) ** 2 + 3**2 + 2 * 3
    assert _make("diag-fisher").fit(cnn, _data(10, (1, 6, 6))).stored_floats() == sum(
        p.numel() for p in cnn.parameters())  # batch-norm running statistics are buffers, not counted


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name,kw,match", [
    ("diag-fisher", {"fisher": "bogus"}, "unknown fisher"),
    ("kfac", {"fisher": "laplace"}, "unknown fisher"),
    ("diag-fisher", {"fisher": "empirical", "metric": "l2"}, "only metric 'kl'"),
    ("diag-fisher", {"num_label_samples": 0}, "num_label_samples"),
    ("kfac", {"unsupported": "skip"}, "unsupported"),
    ("ntk", {"selection": "memorable"}, "unknown selection"),
    ("subset", {"coreset_size": 0}, "coreset_size"),
    ("weight", {"scale": -1.0}, "scale"),
    ("subset", {"metric": "cosine"}, "unknown metric"),
])
def test_unknown_option_values(name, kw, match):
    with pytest.raises(ValueError, match=match):
        laftr.make_estimator(name, **kw)
    with pytest.raises(TypeError):
        laftr.make_estimator(name, not_an_option=1)


@pytest.mark.parametrize("name", BASELINES)
def test_bad_inputs_give_clear_errors(name):
    model = mlp()
    X, Y = _data()
    with pytest.raises(RuntimeError, match="not fitted"):
        _make(name)(model)
    Xn = X.clone()
    Xn[3, 1] = float("nan")
    if name != "weight":  # the weight estimator does not read the data
        with pytest.raises(ValueError, match="NaN"):
            _make(name).fit(model, Xn)
    est = _make(name).fit(model, (X, Y))
    with pytest.raises(ValueError, match="architecture mismatch"):
        est(mlp(5, (9, 6), 3))
    with pytest.raises(TypeError, match="nn.Module"):
        est("not a model")


def test_label_requirements():
    model = mlp()
    X, Y = _data()
    for name, kw in [("subset", {"selection": "balanced"}), ("ntk", {"selection": "balanced"}),
                     ("diag-fisher", {"fisher": "empirical", "metric": "kl"}),
                     ("kfac", {"fisher": "empirical", "metric": "kl"})]:
        with pytest.raises(ValueError, match="labels"):
            _make(name, **kw).fit(model, X)
    with pytest.raises(ValueError, match="integer class labels"):
        _make("subset", selection="balanced").fit(model, (X, Y.double()))
    # (two compared units: a softmax over one unit is refused before the labels are read)
    with pytest.raises(ValueError, match=r"labels \[0\] are not among the compared outputs \[1, 2\]"):
        _make("diag-fisher", fisher="empirical", metric="kl").fit(model, (X, Y), outputs=[1, 2])
    with pytest.raises(ValueError, match="out of range"):
        _make("kfac", fisher="empirical", metric="kl").fit(mlp(5, (4,), 2), (X, Y))


def test_kfac_rejects_layers_it_cannot_handle():
    class Direct(nn.Module):  # uses a Linear's weight without calling the module
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return F.linear(x, self.lin.weight, self.lin.bias)

    X, _ = _data()
    with pytest.raises(ValueError, match=r"'lin'.*not called"):
        laftr.make_estimator("kfac").fit(Direct(), X)
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten())
    with pytest.raises(ValueError, match=r"'0'.*groups=2"):
        laftr.make_estimator("kfac").fit(grouped, torch.randn(4, 2, 5, 5))

    class Tied(nn.Module):  # the embedding's table is also the output layer's weight
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 3)

        def forward(self, x):
            return F.linear(self.emb(x).mean(1), self.emb.weight)

    with pytest.raises(ValueError, match=r"'emb'.*Embedding.*tied weights"):
        laftr.make_estimator("kfac").fit(Tied(), torch.randint(0, 10, (4, 2)))


def test_selected_outputs_out_of_range_fail_at_fit():
    model = mlp()
    X, _ = _data()
    for name in BASELINES[1:]:
        with pytest.raises(ValueError, match="out of range"):
            _make(name).fit(model, X, outputs=[7])


def test_mc_draws_are_reproducible_from_the_seed():
    model = mlp()
    X, _ = _data()
    other = perturbed(model)
    a = _make("diag-fisher", metric="kl", fisher="mc", seed=3).fit(model, X)(other)
    b = _make("diag-fisher", metric="kl", fisher="mc", seed=3).fit(model, X)(other)
    c = _make("diag-fisher", metric="kl", fisher="mc", seed=4).fit(model, X)(other)
    assert a.item() == b.item() and a.item() != c.item()



# ---------------------------------------------------------------------- damped inverse Hessians (PBRF preconditioner)
class _TokenNet(nn.Module):
    """Embedding, a Linear with bias, a LayerNorm (K-FAC's diagonal fallback) and a Linear without bias."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.l1 = nn.Linear(8, 5)
        self.ln = nn.LayerNorm(5)
        self.l2 = nn.Linear(5, 3, bias=False)

    def forward(self, t):
        return self.l2(self.ln(torch.tanh(self.l1(self.emb(t).reshape(t.shape[0], -1)))))


def _dense_hessian(est, model):
    """The estimate's Hessian in all parameters, column by column (it is quadratic: gradients are linear)."""
    names = [n for n, _ in model.named_parameters()]
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    work = copy.deepcopy(model)
    params = dict(work.named_parameters())
    size = sum(p.numel() for p in p0.values())
    cols = []
    for i in range(size):
        e = torch.zeros(size)
        e[i] = 1.0
        with torch.no_grad():
            for n, chunk in zip(names, e.split([p0[n].numel() for n in names])):
                params[n].copy_(p0[n] + chunk.view_as(p0[n]))
        work.zero_grad()
        est(work).backward()
        cols.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
    H = torch.stack(cols, 1)
    return (H + H.T) / 2, names, p0


@pytest.mark.parametrize("name", ["kfac", "diag-fisher", "weight"])
def test_damped_solve_inverts_the_estimates_hessian(name):
    """``(H + lam I)^{-1} v`` equals the dense solve with the estimate's own Hessian (float64), on all parameters
    and on subsets (a frozen bias: the weight's block alone; the bias alone)."""
    torch.manual_seed(0)
    model = _TokenNet()
    X, Y = torch.randint(0, 7, (40, 2)), torch.randint(0, 3, (40,))
    kw = {"kfac": {"unsupported": "diag"}, "weight": {"scale": 2.5}}.get(name, {})
    est = _make(name, metric="kl", **kw).fit(model, (X, Y))
    assert est.quadratic
    H, names, p0 = _dense_hessian(est, model)
    offsets = dict(zip(names, torch.tensor([0] + [p0[n].numel() for n in names]).cumsum(0).tolist()))
    g = torch.Generator().manual_seed(1)
    for subset in (names, [n for n in names if n != "l1.bias"], [n for n in names if n != "l1.weight"]):
        idx = torch.cat([torch.arange(offsets[n], offsets[n] + p0[n].numel()) for n in subset])
        v = torch.randn(len(idx), generator=g)
        lam = 0.37
        ref = torch.linalg.solve(H[idx][:, idx] + lam * torch.eye(len(idx)), v)
        vd = dict(zip(subset, [c.view_as(p0[n]) for n, c in zip(subset, v.split([p0[n].numel() for n in subset]))]))
        got = est.damped_solve(vd, lam)
        assert list(got) == subset
        torch.testing.assert_close(torch.cat([got[n].reshape(-1) for n in subset]), ref, rtol=1e-10, atol=1e-13)
    if name == "kfac":  # the test must see a real Kronecker structure, not a diagonal
        assert H[offsets["l1.weight"]:offsets["l1.bias"], offsets["l1.weight"]:offsets["l1.bias"]].count_nonzero() > 100


def test_damped_solve_follows_a_refit_and_survives_save_and_load(tmp_path):
    model = mlp(5, (6,), 3)
    X, _ = _data(50)
    est = _make("kfac", metric="kl").fit(model, X)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    before = est.damped_solve(v, 0.1)
    path = tmp_path / "k.laftr"
    laftr.save(est, path)
    loaded = laftr.load(path)
    for n in v:
        torch.testing.assert_close(loaded.damped_solve(v, 0.1)[n], before[n], rtol=1e-12, atol=0)
    est.fit(perturbed(model, 0.5), X)  # other factors: the cached eigendecompositions must not be reused
    assert any(not torch.allclose(est.damped_solve(v, 0.1)[n], before[n]) for n in v)


def test_damped_solve_refuses_bad_input(tmp_path):
    model = mlp(5, (6,), 3)
    X, _ = _data(30)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="not fitted"):
        _make("kfac").damped_solve(v, 0.1)
    with pytest.raises(NotImplementedError, match="not a fixed quadratic form"):
        _make("ntk").fit(model, X).damped_solve(v, 0.1)
    est = _make("kfac").fit(model, X)
    for bad in (0.0, -1.0, math.nan, math.inf, True, "0.1"):
        with pytest.raises(ValueError, match="damping"):
            est.damped_solve(v, bad)
    with pytest.raises(ValueError, match="'nope' is not a parameter"):
        est.damped_solve({"nope": torch.zeros(3)}, 0.1)
    normed = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    for name in ("weight", "diag-fisher", "kfac"):  # weight used to return v / (scale + damping) for it
        fitted = _make(name, **({"unsupported": "diag"} if name == "kfac" else {})).fit(normed, X)
        with pytest.raises(ValueError, match="'1.running_mean' is a buffer"):
            fitted.damped_solve({"1.running_mean": torch.ones(6)}, 0.1)
        loaded = laftr.load(laftr.save(fitted, tmp_path / f"{name}.laftr"))  # the file says which are buffers
        with pytest.raises(ValueError, match="'1.running_mean' is a buffer"):
            loaded.damped_solve({"1.running_mean": torch.ones(6)}, 0.1)
        ok = {"0.weight": torch.ones(6, 5)}
        torch.testing.assert_close(loaded.damped_solve(ok, 0.1)["0.weight"], fitted.damped_solve(ok, 0.1)["0.weight"],
                                   rtol=0, atol=0)
    name = next(iter(v))
    with pytest.raises(ValueError, match="has shape"):
        est.damped_solve({name: torch.zeros(2)}, 0.1)
    with pytest.raises(ValueError, match="floating-point"):
        est.damped_solve({name: torch.zeros(v[name].shape, dtype=torch.long)}, 0.1)


# ---------------------------------------------------------------------- ntk's traced tangent map
def test_ntk_traced_products_equal_plain_jvp_and_follow_models_and_refits(monkeypatch):
    """The cached ``linearize`` gives the values and gradients of a ``jvp`` per call (the fallback where tracing
    fails); another model object or a refit is traced afresh, and a pickled estimator drops the traced map."""
    import pickle

    import laftr._util as util

    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    X, _ = _data(40)
    other = perturbed(model, 0.3)

    def value_and_grads(est, m):
        m.zero_grad()
        d = est(m)
        d.backward()
        return d.detach(), [p.grad.clone() for p in m.parameters()]

    traced = _make("ntk", metric="kl", coreset_size=20).fit(model, X)
    d1, g1 = value_and_grads(traced, other)
    d1b, _ = value_and_grads(traced, other)  # served by the cache
    assert traced.__dict__["_tangent_cache"][0]() is other
    monkeypatch.setattr(util, "linearize", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("untraceable")))
    plain = _make("ntk", metric="kl", coreset_size=20).fit(model, X)
    d2, g2 = value_and_grads(plain, other)
    monkeypatch.undo()
    torch.testing.assert_close(d1, d2, rtol=1e-12, atol=0)
    assert d1 == d1b
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    twin = copy.deepcopy(other)
    torch.testing.assert_close(traced(twin), d1, rtol=1e-12, atol=0)  # another object: traced for it
    assert traced.__dict__["_tangent_cache"][0]() is twin
    copy_ = pickle.loads(pickle.dumps(traced))
    assert "_tangent_cache" not in copy_.__dict__
    torch.testing.assert_close(copy_(other), d1, rtol=1e-12, atol=0)
    traced.fit(perturbed(model, 0.2), X)  # a refit (new theta0) is traced afresh
    truth = _make("ntk", metric="kl", coreset_size=20).fit(perturbed(model, 0.2), X)
    torch.testing.assert_close(traced(other), truth(other), rtol=1e-12, atol=0)


def test_ntk_without_forward_ad_anywhere_takes_its_products_by_reverse_mode_twice(monkeypatch):
    """Without forward-mode AD ntk runs the network through laftr's interpreter; where that refuses an op too
    (here cumprod), the products are taken by reverse mode twice (this was a refusal naming both): the value
    and gradient of the forward-mode products."""
    from cases import CumprodNet

    import laftr.estimators.ntk as ntk_mod

    def no_forward_ad(*args, **kwargs):
        raise NotImplementedError("Trying to use forward AD with cumprod_backward that does not support it")

    model = CumprodNet().double()
    X = torch.randn(20, 4, dtype=torch.float64)
    est = _make("ntk", coreset_size=10).fit(model, X)
    other = perturbed(model, 0.1)
    want = est(other)
    want_grad = torch.autograd.grad(want, list(other.parameters()))
    monkeypatch.setattr(ntk_mod, "tangent_map", no_forward_ad)
    with pytest.raises(laftr.UnsupportedOpError, match="node 'cumprod'"):
        laftr.graph.TracedNet(model)  # (the interpreter's refusal, which the fallback goes around)
    got = est(other)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    for a, b in zip(torch.autograd.grad(got, list(other.parameters())), want_grad, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
