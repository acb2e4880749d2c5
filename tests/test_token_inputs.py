"""Integer token inputs: the token input models (``tokens``, ``tokens-classwise``, ``tokens-mixture``) against
brute-force and empirical one-hot moments, their sharding and persistence, and integer inputs kept integer by
the exact FSD and the coreset estimators (``subset``, ``ntk``)."""

from __future__ import annotations

import copy
import hashlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from cases import mlp, perturbed
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import laftr
from laftr._util import iter_batches
from laftr.exact import exact_fsd_and_grad
from laftr.inputs import (
    INPUT_MODELS,
    CoresetInputs,
    TokenClasswiseInputs,
    TokenInputs,
    TokenMixtureInputs,
    hash_keys,
    make_input_model,
)
from laftr.summary import Summary

DT = torch.float64
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("float64")


# ---------------------------------------------------------------------------------------------- helpers
def _fit(inputs, X, Y=None, batch_size=16):
    """What :func:`laftr.summary.fit_summary` does with the input model, without a network."""
    data = X if Y is None else (X, Y)

    def batches():
        return iter_batches(data, batch_size, CPU, DT)

    if inputs.needs_first_pass:
        inputs.prepare(batches)
    for x, y in batches():
        if inputs.input_shape is None:
            inputs.begin(x)
        inputs.accumulate(x, y, inputs.assign(x, y))
    inputs.finish()
    return inputs


def _tokens(n=64, shape=(4,), V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, *shape), generator=g)


def _one_hot(X, V):
    return F.one_hot(X.reshape(X.shape[0], -1), V).reshape(X.shape[0], -1).to(DT)


def _embedding_model(V=6, T=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(V, 4), nn.Flatten(), nn.Linear(4 * T, 3))


def _hand_forward(model, X):
    """The embedding model by hand: one-hot ids times the embedding matrix, then the linear layer."""
    emb, lin = model[0].weight, model[2]
    h = F.one_hot(X, emb.shape[0]).to(DT) @ emb  # (N, T, 4)
    return h.reshape(X.shape[0], -1) @ lin.weight.T + lin.bias


def _separated_sequences(n_per=30, k=3, P=4, width=3, seed=0):
    """``k`` clusters of sequences: cluster j uses only ids ``j*width .. j*width + width - 1``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.cat([j * width + torch.randint(0, width, (n_per, P), generator=g) for j in range(k)])
    Y = torch.arange(k).repeat_interleave(n_per)
    perm = torch.randperm(len(X), generator=g)
    return X[perm], Y[perm]


def _state_equal(a, b):
    ta, tb = a.tensors(), b.tensors()
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _round_trip(inputs):
    """The input model through safetensors bytes and JSON-able metadata (as in a summary file)."""
    tensors = st_load(st_save({k: v.contiguous() for k, v in inputs.tensors().items()}))
    meta = inputs.meta()
    back = INPUT_MODELS[inputs.name](**meta["options"])
    back.restore(tensors, meta)
    return back


def _has_embedding_rule():
    return any(issubclass(nn.Embedding, t) for t in laftr.rules.registered_targets()["modules"])


# ---------------------------------------------------------------------------------------------- tokens
def test_tokens_counts_and_samples_follow_the_marginals():
    X = _tokens(n=200, shape=(2, 3), V=4)
    m = _fit(TokenInputs(), X)
    assert m.moment_shape == (2, 3, 4) and m.vocab == 4
    assert m.stored_floats() == 6 * 4
    torch.testing.assert_close(m.probabilities()[0], _one_hot(X, 4).mean(0).view(6, 4), rtol=0, atol=1e-15)
    gen = torch.Generator().manual_seed(5)
    x, groups = m.sample(40000, gen, CPU, torch.float32)
    assert x.dtype == torch.int64 and x.shape == (40000, 2, 3)
    assert torch.equal(groups, torch.zeros(40000, dtype=torch.long))
    freq = _one_hot(x, 4).mean(0).view(6, 4)
    # 40000 draws: standard error <= 0.0025 per frequency
    assert (freq - m.probabilities()[0]).abs().max() < 0.012
    # the same generator state gives the same draws
    again, _ = m.sample(40000, torch.Generator().manual_seed(5), CPU, DT)
    assert torch.equal(again, x)


def test_tokens_moments_are_the_one_hot_moments_of_independent_positions():
    # every pair of a multiset of ids for position 0 and one for position 1: the empirical law of the
    # sequences is exactly the product of its marginals (dyadic frequencies: exact in float64)
    a, b = [0, 0, 1, 3], [2, 2, 2, 0, 1, 3, 3, 3]
    X = torch.tensor(list(itertools.product(a, b)))
    m = _fit(TokenInputs(), X, batch_size=7)
    mean, second = m.moments(0, CPU, DT)
    U = _one_hot(X, 4)
    assert torch.equal(mean, U.mean(0))
    assert torch.equal(second, U.T @ U / len(U))
    mean32, second32 = m.moments(0, CPU, torch.float32)
    assert mean32.dtype == second32.dtype == torch.float32


def test_tokens_moments_equal_brute_force_over_the_product_law():
    """P = 2 positions, V = 3 ids: E[u u^T] summed over all 9 sequences with their product probabilities."""
    X = torch.tensor([[0, 1], [0, 2], [1, 2], [2, 2]])  # marginals (1/2, 1/4, 1/4) and (0, 1/4, 3/4)
    m = _fit(TokenInputs(), X)
    p = m.probabilities()[0]
    mean = torch.zeros(6, dtype=DT)
    second = torch.zeros(6, 6, dtype=DT)
    for s in itertools.product(range(3), repeat=2):
        prob = p[0, s[0]] * p[1, s[1]]
        u = _one_hot(torch.tensor([s]), 3)[0]
        mean += prob * u
        second += prob * torch.outer(u, u)
    got_mean, got_second = m.moments(0, CPU, DT)
    assert torch.equal(got_mean, mean)
    assert torch.equal(got_second, second)


def test_tokens_shards_merge_exactly_and_batching_does_not_matter():
    X = _tokens(n=90, shape=(3,), V=7)
    X[:40].clamp_(max=4)  # the first shard sees a smaller vocabulary: merging pads it
    whole = _fit(TokenInputs(), X, batch_size=32)
    parts = [_fit(TokenInputs(), X[:40], batch_size=8), _fit(TokenInputs(), X[40:], batch_size=11)]
    assert parts[0].vocab == 5 and parts[1].vocab == whole.vocab == 7
    _state_equal(parts[0].merge(parts[1]), whole)
    _state_equal(parts[1].merge(parts[0]), whole)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(2))
    _state_equal(_fit(TokenInputs(), X[perm], batch_size=5), whole)
    with pytest.raises(laftr.UsageError, match="different options"):
        whole.merge(_fit(TokenInputs(vocab_size=7), X))
    with pytest.raises(laftr.UsageError, match="inputs"):
        whole.merge(_fit(TokenInputs(), X.view(45, 6)))


def test_tokens_vocabulary_grows_or_is_fixed():
    m = TokenInputs()
    first, second = torch.tensor([[0, 2], [1, 1]]), torch.tensor([[6, 0]])
    for x in (first, second):
        if m.input_shape is None:
            m.begin(x)
        m.accumulate(x, None, m.assign(x, None))
    m.finish()
    assert m.token_counts.shape == (1, 2, 7)
    expected = _one_hot(torch.cat([first, second]), 7).sum(0).view(1, 2, 7)
    assert torch.equal(m.token_counts, expected)
    fixed = _fit(TokenInputs(vocab_size=10), torch.cat([first, second]))
    assert fixed.vocab == 10 and fixed.moment_shape == (2, 10) and fixed.stored_floats() == 20
    assert torch.equal(fixed.token_counts[..., :7], expected)


@pytest.mark.parametrize("name", ["tokens", "tokens-classwise", "tokens-mixture"])
def test_token_models_refuse_bad_token_inputs(name):
    Y = torch.zeros(2, dtype=torch.long)

    def fit(X, **opts):
        _fit(make_input_model(name, vocab_size=opts.pop("vocab_size", None)), X, Y)

    with pytest.raises(laftr.DataError, match="needs integer inputs.*float64"):
        fit(torch.randn(2, 3))
    with pytest.raises(laftr.DataError, match="needs integer inputs.*bool"):
        fit(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(laftr.DataError, match=r"token id -1 at position 2 \(example 1 .*negative"):
        fit(torch.tensor([[0, 1, 2], [1, 0, -1]]))
    with pytest.raises(laftr.DataError, match=r"token id 7 at position \(1, 0\) \(example 0 .*vocab_size=5"):
        fit(torch.tensor([[[0, 1], [7, 2]], [[1, 1], [1, 1]]]), vocab_size=5)


def test_bad_token_options():
    with pytest.raises(laftr.UsageError, match="vocab_size"):
        TokenInputs(vocab_size=0)
    with pytest.raises(laftr.UsageError, match="vocab_size"):
        TokenInputs(vocab_size=2.5)
    with pytest.raises(laftr.UsageError, match="components"):
        TokenMixtureInputs(components=0)
    for bad in (0, 2.5, "7"):
        with pytest.raises(laftr.UsageError, match="vocab_size"):
            laftr.make_estimator("laftr", input_model="tokens", vocab_size=bad)


def test_config_passes_the_token_options():
    cfg = laftr.make_estimator("laftr-exact", input_model="tokens-mixture", vocab_size=9, components=3,
                               mixture_sample=50).cfg
    opts = cfg.input_options()
    assert opts == {"seed": 0, "vocab_size": 9, "components": 3, "mixture_sample": 50}
    m = make_input_model(cfg.input_model, **opts)
    assert (m.vocab_size, m.components, m.mixture_sample) == (9, 3, 50)
    assert laftr.make_estimator("laftr", input_model="tokens").cfg.input_options() == {"seed": 0, "vocab_size": None}
    assert laftr.make_estimator("laftr", input_model="tokens-classwise", vocab_size=4).cfg.input_options() == {
        "seed": 0, "vocab_size": 4}


@pytest.mark.parametrize("name", ["gaussian", "diag", "lowrank", "classwise", "mixture"])
def test_gaussian_models_refuse_token_ids(name):
    X = _tokens(n=20, shape=(5,), V=4)
    Y = torch.zeros(20, dtype=torch.long)
    with pytest.raises(laftr.DataError, match="token ids.*input_model='tokens'"):
        laftr.make_estimator("laftr", input_model=name, components=2).fit(mlp(), (X, Y))
    with pytest.raises(laftr.DataError, match="input_model='tokens'"):
        _fit(make_input_model(name), X, Y)


# ---------------------------------------------------------------------------------------------- classwise
def test_tokens_classwise_counts_per_class():
    X = _tokens(n=80, shape=(3,), V=5)
    Y = torch.randint(0, 3, (80,), generator=torch.Generator().manual_seed(1))
    Y[Y == 1] = 4  # an absent class (1) and one beyond it
    m = _fit(TokenClasswiseInputs(), X, Y, batch_size=13)
    assert m.grouped and m.num_groups == 5
    for c in range(5):
        assert m.counts[c] == (Y == c).sum()
        if (Y == c).any():
            alone = _fit(TokenInputs(vocab_size=5), X[Y == c])
            assert torch.equal(m.token_counts[c], alone.token_counts[0])
            assert torch.equal(m.moments(c, CPU, DT)[1], alone.moments(0, CPU, DT)[1])
        else:
            assert not m.token_counts[c].any()
    assert m.stored_floats() == 3 * (1 + 3 * 5)
    x, groups = m.sample(3000, torch.Generator().manual_seed(0), CPU, DT)
    assert set(groups.tolist()) <= {0, 2, 4}
    for c in (0, 2, 4):  # every sequence carries ids its class has at that position
        seen = m.token_counts[c] > 0
        assert seen[torch.arange(3), x[groups == c]].all()
    with pytest.raises(laftr.DataError, match="needs labels"):
        _fit(TokenClasswiseInputs(), X)
    with pytest.raises(laftr.DataError, match="integer class labels"):
        _fit(TokenClasswiseInputs(), X, Y.to(DT))


def test_tokens_classwise_with_one_class_equals_tokens():
    X = _tokens(n=50, shape=(4,), V=6)
    cw = _fit(TokenClasswiseInputs(), X, torch.zeros(50, dtype=torch.long))
    tk = _fit(TokenInputs(), X)
    _state_equal(cw, tk)
    for a, b in zip(cw.moments(0, CPU, DT), tk.moments(0, CPU, DT)):
        assert torch.equal(a, b)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(cw.sample(100, gen_a, CPU, DT)[0], tk.sample(100, gen_b, CPU, DT)[0])
    assert cw.stored_floats() == tk.stored_floats() + 1


# ---------------------------------------------------------------------------------------------- mixture
def test_tokens_mixture_with_one_component_equals_tokens():
    X = _tokens(n=60, shape=(3,), V=5)
    mx = _fit(TokenMixtureInputs(components=1, mixture_sample=32), X)
    tk = _fit(TokenInputs(), X)
    assert torch.equal(mx.counts, tk.counts) and torch.equal(mx.token_counts, tk.token_counts)
    for a, b in zip(mx.moments(0, CPU, DT), tk.moments(0, CPU, DT)):
        assert torch.equal(a, b)


def test_tokens_mixture_recovers_separated_clusters_of_sequences():
    X, Y = _separated_sequences()
    mx = _fit(TokenMixtureInputs(components=3, mixture_sample=64, seed=1), X, batch_size=17)
    comp = mx.assign(X, None)
    pairs = {(int(a), int(b)) for a, b in zip(comp, Y)}
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3  # a relabelling of the clusters
    cw = _fit(TokenClasswiseInputs(), X, Y)
    for a, b in pairs:
        assert torch.equal(mx.token_counts[a], cw.token_counts[b])
    assert mx.stored_floats() == cw.stored_floats() == 3 * (1 + 4 * 9)
    # the k-means sample is chosen by hash: the same centres whatever the batch size and order
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(4))
    again = _fit(TokenMixtureInputs(components=3, mixture_sample=64, seed=1), X[perm], batch_size=40)
    _state_equal(again, mx)


def test_tokens_mixture_merge_needs_equal_centres():
    X, _ = _separated_sequences(n_per=20)
    opts = {"components": 3, "mixture_sample": 40, "seed": 2}
    whole = _fit(TokenMixtureInputs(**opts), X)
    parts = []
    for sl in (slice(0, 25), slice(25, None)):
        part = TokenMixtureInputs(**opts)
        part.centers = whole.centers
        parts.append(_fit(part, X[sl], batch_size=6))
    _state_equal(parts[0].merge(parts[1]), whole)
    own = _fit(TokenMixtureInputs(components=3, mixture_sample=8, seed=9), X[:25])
    with pytest.raises(laftr.UsageError, match="different options"):
        parts[1].merge(own)
    own = _fit(TokenMixtureInputs(**opts), X[:12])  # its own k-means
    assert not torch.equal(own.centers, whole.centers)
    with pytest.raises(laftr.UsageError, match="components differ"):
        parts[1].merge(own)


# ---------------------------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("name", ["tokens", "tokens-classwise", "tokens-mixture"])
def test_token_models_round_trip_and_refuse_bad_files(name):
    X, Y = _separated_sequences(n_per=10)
    m = _fit(make_input_model(name, components=2, mixture_sample=16), X, Y)
    back = _round_trip(m)
    _state_equal(back, m)
    assert back.options() == m.options() and back.moment_shape == m.moment_shape
    assert back.stored_floats() == m.stored_floats()
    for a, b in zip(back.moments(0, CPU, DT), m.moments(0, CPU, DT)):
        assert torch.equal(a, b)
    # a summary without sites, through the summary's own (de)serialization
    s = Summary({}, m)
    s2 = Summary.from_tensors(s.tensors(), s.meta())
    _state_equal(s2.inputs, m)

    def bad(**change):
        t = {**m.tensors(), **change}
        with pytest.raises(ValueError):
            INPUT_MODELS[name](**m.options()).restore(t, m.meta())

    tc = m.token_counts
    bad(token_counts=-tc)
    bad(token_counts=tc[:, :-1])
    bad(token_counts=tc.clone().fill_(float("nan")))
    bad(token_counts=tc * 2)  # positions no longer add up to the example counts
    bad(counts=torch.zeros_like(m.counts), token_counts=torch.zeros_like(tc))
    bad(counts=m.counts[:1] if m.num_groups > 1 else m.counts.repeat(2))
    fixed = INPUT_MODELS[name](**{**m.options(), "vocab_size": 20})
    with pytest.raises(ValueError, match="vocab_size"):
        fixed.restore(m.tensors(), m.meta())
    if name == "tokens-mixture":
        bad(centers=m.centers[:, :-1])


# ---------------------------------------------------------------------------------------------- integer dtype
def test_iter_batches_keeps_integer_inputs():
    X = _tokens(n=10, shape=(3,), V=4)
    for dt in (torch.int64, torch.int32, torch.bool):
        x, _ = next(iter_batches(X.to(dt), 4, CPU, torch.float32))
        assert x.dtype == dt
    x, _ = next(iter_batches(torch.randn(10, 3, dtype=torch.float32), 4, CPU, DT))
    assert x.dtype == DT


def test_hash_keys_of_token_ids():
    X = _tokens(n=40, shape=(3,), V=50)
    keys = hash_keys(X, seed=3)
    assert torch.equal(hash_keys(X.to(torch.int32), seed=3), keys)  # the ids, whatever their integer dtype
    assert len(set(keys.tolist())) == len({tuple(r) for r in X.tolist()})
    assert not torch.equal(hash_keys(X, seed=4), keys)
    # floating inputs: the keys of their float32 bytes, as before token inputs existed
    F_ = torch.randn(5, 2, 3)
    salt = (3).to_bytes(8, "little", signed=True) + b"\0" * 8
    expected = [int.from_bytes(hashlib.blake2b(row.float().numpy().tobytes(), digest_size=8, salt=salt).digest(),
                               "little") >> 1 for row in F_]
    assert hash_keys(F_, 3).tolist() == expected


def test_exact_fsd_on_token_inputs_equals_a_hand_computation():
    V, T = 6, 3
    m0 = _embedding_model(V, T)
    m1 = perturbed(m0, 0.3)
    X = _tokens(n=37, shape=(T,), V=V)
    z0, z1 = _hand_forward(m0, X), _hand_forward(m1, X)
    hand = 0.5 * (z1 - z0).pow(2).sum(1).mean()
    torch.testing.assert_close(laftr.exact_fsd(m0, m1, X, batch_size=8), hand, rtol=1e-12, atol=0)
    kl = (F.log_softmax(z0, 1).exp() * (F.log_softmax(z0, 1) - F.log_softmax(z1, 1))).sum(1).mean()
    torch.testing.assert_close(laftr.exact_fsd(m0, m1, X, metric="kl"), kl, rtol=1e-12, atol=0)
    d, grads = exact_fsd_and_grad(m0, m1, X, batch_size=10)
    torch.testing.assert_close(d, hand, rtol=1e-12, atol=0)
    params = list(m1.parameters())
    expected = torch.autograd.grad(0.5 * (_hand_forward(m1, X) - z0).pow(2).sum(1).mean(), params)
    for (n, _), e in zip(m1.named_parameters(), expected):
        torch.testing.assert_close(grads[n], e, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("name", ["subset", "ntk"])
def test_coreset_estimators_on_token_inputs(name, tmp_path):
    V, T = 6, 3
    model = _embedding_model(V, T)
    X = _tokens(n=30, shape=(T,), V=V)
    est = laftr.make_estimator(name, coreset_size=50).fit(model, X)  # every input is kept
    assert est.X.dtype == torch.int64 and est.stored_floats() == 30 * T
    assert est(model).item() == 0
    # perturbing only the last layer keeps the network affine in what changed: ntk is exact there
    other = perturbed(model, 0.2, only="2.")
    torch.testing.assert_close(est(other), laftr.exact_fsd(model, other, X), rtol=1e-10, atol=0)
    other = perturbed(model, 0.2)
    back = laftr.load(laftr.save(est, tmp_path / f"{name}.laftr"))
    assert back.X.dtype == torch.int64 and torch.equal(back.X, est.X)
    torch.testing.assert_close(back(other), est(other), rtol=1e-12, atol=0)
    if name == "subset":
        torch.testing.assert_close(est(other), laftr.exact_fsd(model, other, X), rtol=1e-10, atol=0)
    small = laftr.make_estimator(name, coreset_size=7).fit(model, X)
    assert small.X.dtype == torch.int64 and small.X.shape == (7, T)
    assert all(any(torch.equal(r, x) for x in X) for r in small.X)


def test_coreset_input_model_keeps_token_ids():
    X = _tokens(n=40, shape=(2, 2), V=5)
    m = _fit(CoresetInputs(coreset_size=12), X, batch_size=9)
    assert m.X.dtype == torch.int64 and m.X.shape == (12, 4)
    assert m.moment_shape == (2, 2, int(m.X.max()) + 1)
    x, _ = m.sample(24, torch.Generator().manual_seed(0), CPU, torch.float32)
    assert x.dtype == torch.int64 and x.shape == (24, 2, 2)
    mean, second = m.moments(0, CPU, DT)
    U = _one_hot(m.X, m.moment_shape[-1])
    torch.testing.assert_close(mean, U.mean(0), rtol=0, atol=1e-15)
    torch.testing.assert_close(second, U.T @ U / 12, rtol=0, atol=1e-15)
    back = _round_trip(m)
    assert back.X.dtype == torch.int64 and torch.equal(back.X, m.X)
    # the same examples whatever the batch size (keys of the ids)
    assert torch.equal(_fit(CoresetInputs(coreset_size=12), X, batch_size=40).X, m.X)


@pytest.mark.skipif(not _has_embedding_rule(), reason="no LAFTR rule for nn.Embedding is registered yet "
                    "(laftr.rules); the laftr estimator cannot run an embedding model")
def test_laftr_with_a_token_input_model_round_trips(tmp_path):
    V, T = 6, 3
    model = _embedding_model(V, T)
    X, Y = _separated_sequences(n_per=10, k=2, P=T, width=3)
    other = perturbed(model, 0.2)
    for input_model in ("tokens", "tokens-classwise", "tokens-mixture"):
        est = laftr.make_estimator("laftr", input_model=input_model, components=2, num_samples=32,
                                   fixed_noise=True, vocab_size=V).fit(model, (X, Y))
        d = est(other)
        assert torch.isfinite(d) and d > 0
        back = laftr.load(laftr.save(est, tmp_path / f"{input_model}.laftr"))
        assert back.summary.inputs.moment_shape == (T, V)
        torch.testing.assert_close(back(other), d, rtol=1e-12, atol=0)


def test_no_linearization_on_tokens_is_the_exact_fsd_over_the_product_law(tmp_path):
    """gates='none' with the per-position categorical law on a transformer: unbiased for the exact FSD averaged
    over every sequence weighted by the product of the stored marginals (enumerated here), zero at theta0,
    gradients reaching every parameter (embeddings included), and the same after save/load."""
    from laftr.models import transformer

    V, T = 5, 3
    torch.manual_seed(0)
    model = transformer(V, T, 3, d_model=8, heads=2, blocks=1, d_mlp=16).double()
    g = torch.Generator().manual_seed(1)
    X = torch.cat([torch.randint(0, 3, (40, 1), generator=g), torch.randint(1, 5, (40, 2), generator=g)], 1)
    other = perturbed(model, 0.3)
    marg = torch.stack([torch.bincount(X[:, t], minlength=V).to(DT) / len(X) for t in range(T)])
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)))
    w = marg[0, seqs[:, 0]] * marg[1, seqs[:, 1]] * marg[2, seqs[:, 2]]
    keep = w > 0
    with torch.no_grad():
        ref = laftr.metrics.discrepancy(model(seqs[keep]), other(seqs[keep]), "kl")
    ref = float((w[keep] * ref).sum())
    vals = []
    for seed in range(12):
        est = laftr.make_estimator("laftr", gates="none", input_model="tokens", metric="kl", num_samples=3000,
                                   seed=seed).fit(model, X)
        vals.append(est(other).item())
    v = torch.tensor(vals)
    se = float(v.std()) / 12**0.5
    assert se > 0 and abs(float(v.mean()) - ref) < 4 * se, (float(v.mean()), ref, se)
    est = laftr.make_estimator("laftr", gates="none", input_model="tokens", metric="kl", num_samples=64,
                               fixed_noise=True).fit(model, X)
    assert est(model).item() == 0.0
    d = est(other)
    grads = torch.autograd.grad(d, list(other.parameters()))
    assert all(gr.abs().sum() > 0 for gr in grads)
    back = laftr.load(laftr.save(est, tmp_path / "none.laftr"))
    assert back.cfg.gates == "none"
    torch.testing.assert_close(back(other), d, rtol=1e-12, atol=0)


class _PaddedNormNet(nn.Module):
    """Right-padded tokens (id 0 = padding_idx: a zero embedding) into a normalization, mean-pooled."""

    def __init__(self, norm: str, eps: float | None) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16, padding_idx=0)
        self.norm = nn.RMSNorm(16, eps=eps) if norm == "rms" else nn.LayerNorm(16, eps=eps or 1e-5)
        self.head = nn.Linear(16, 4)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(idx)).mean(1))


@pytest.mark.parametrize("norm,eps", [("rms", None), ("rms", 1e-6), ("layer", 1e-5)])
def test_padding_positions_do_not_set_the_normalizer_law_or_kfacs_factors(norm, eps):
    """A padding token's zero input normalizes to zero whatever its scale 1/sqrt(eps): left out of the
    normalizer's law (it made laftr 10^5-10^14 x the exact FSD) and of K-FAC's G for the embedding (10^3-10^13 x).
    """
    torch.manual_seed(0)
    X = torch.randint(1, 32, (300, 8))
    lens = torch.randint(3, 9, (300,))
    X[torch.arange(8)[None] >= lens[:, None]] = 0
    model = _PaddedNormNet(norm, eps).double()
    theta = copy.deepcopy(model)
    with torch.no_grad():
        for p in theta.parameters():
            p.add_(1e-3 * torch.randn_like(p))
        theta.emb.weight[0] = 0  # the padding row never moves in training (no gradient)
    exact = float(laftr.exact_fsd(model, theta, X))
    est = laftr.make_estimator("laftr", input_model="tokens", num_samples=512, seed=0).fit(model, X)
    ratio = sum(float(est(theta).detach()) for _ in range(4)) / 4 / exact
    assert 0.5 < ratio < 2.0, ratio
    assert "nu_zero" in est.summary.site_sums["norm"]
    ratio = float(laftr.make_estimator("kfac", unsupported="diag").fit(model, X)(theta).detach()) / exact
    assert 0.5 < ratio < 2.0, ratio
    # without padding nothing changes: no count of zero inputs is kept
    plain = laftr.make_estimator("laftr", input_model="tokens").fit(model, X.clamp_min(1))
    assert set(plain.summary.site_sums["norm"]) == {"nu", "nu2"}


def test_an_activation_of_the_token_ids_is_refused_by_name():
    # ids.clamp(max=V - 1) inside the network was taken for a gate of data: a NotImplementedError from torch's
    # sampler on int64 (laftr), a unit-count mismatch (laftr-exact)
    class Clamped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(12, 4), nn.Linear(24, 3)

        def forward(self, x):
            return self.head(self.emb(x.clamp(max=9)).flatten(1))

    torch.manual_seed(0)
    model, x = Clamped(), torch.randint(0, 12, (40, 6))
    for name, kw in (("laftr", {}), ("laftr", {"gates": "relu"}), ("laftr-exact", {}), ("liftr", {})):
        with pytest.raises(laftr.UnsupportedOpError, match="node 'clamp'.*integer network input.*before the network"):
            # (gates="relu" stores the input model alone: its fit does not run the network, its first call does)
            laftr.make_estimator(name, metric="l2", input_model="tokens", **kw).fit(model, x)(model)
    # the real networks need no linearization: run as they are
    laftr.make_estimator("laftr", metric="l2", input_model="tokens", gates="none").fit(model, x)


class ShiftedIds(nn.Module):
    """``e(ids + offset)``: arithmetic on the token ids before the embedding (an integer buffer, or a constant)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.register_buffer("offset", torch.tensor(3))
        self.e, self.head = nn.Embedding(12, 4), nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        shifted = ids + self.offset if self.how == "buffer" else ids + 3
        return self.head(self.e(shifted).flatten(1))


@pytest.mark.parametrize("how", ["buffer", "constant"])
@pytest.mark.parametrize("name", ["laftr-exact", "liftr-exact"])
def test_the_closed_forms_refuse_arithmetic_on_token_ids(name, how):
    """The closed forms hold token ids as one-hot vectors: ``ids + 3`` was applied to the one-hot vectors
    (laftr-exact 2.33 for an exact FSD of 0.045 on a linear network with a coreset of all the data), and with an
    integer buffer liftr-exact followed since the buffer counts as a constant. Refused by name; the Monte Carlo
    runs the op exactly on the drawn ids (the exact FSD here)."""
    model = ShiftedIds(how)
    X = torch.randint(0, 9, (40, 3), generator=torch.Generator().manual_seed(0))
    theta = perturbed(model, 0.1)
    with pytest.raises(laftr.UnsupportedOpError, match="computes with the token ids before the embedding"):
        laftr.make_estimator(name, input_model="coreset", coreset_size=40).fit(model, X)(theta)
    mc = laftr.make_estimator("laftr", gates="none", input_model="coreset", coreset_size=40, num_samples=40)
    assert mc.fit(model, X)(theta).item() == pytest.approx(laftr.exact_fsd(model, theta, X).item(), rel=1e-9)
