"""K-FAC and diag-Fisher on transformers: embeddings and self-attention projections as tapped linear layers.

Each claim is checked against a dense or brute-force computation on tiny float64 models (d_model 8, 2 heads,
vocabulary 7, sequences of 3 tokens or fewer).
"""

from __future__ import annotations

import pytest
import torch
from cases import perturbed
from summary_files import forge, split
from test_baselines import dense_ggn, param_delta
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

import laftr
import laftr.models
from laftr.errors import SummaryFileError, UnsupportedOpError
from laftr.estimators.curvature import curvature_batches
from laftr.metrics import discrepancy

pytestmark = [
    pytest.mark.usefixtures("float64"),
    # torch.func has no batching rule for CPU flash attention yet (a slower fallback, same values)
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]

VOCAB, D, HEADS, CLASSES = 7, 8, 2, 3


def _jitter(model: nn.Module, scale: float = 0.5, seed: int = 3) -> nn.Module:
    """Move every parameter off its initial value (LayerNorm gains not 1, embeddings not tiny), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def _transformer(seq: int) -> nn.Module:
    """``laftr.models.transformer`` with ``nn.MultiheadAttention`` (causal), one block, jittered parameters."""
    model = laftr.models.transformer(VOCAB, seq, CLASSES, d_model=D, heads=HEADS, blocks=1, d_mlp=16,
                                     attention="mha")
    return _jitter(model)


class TinyLM(nn.Module):
    """Embedding (+ a learned positional embedding), one ``nn.MultiheadAttention``, LayerNorm and a GELU MLP.

    Args:
        padding_idx: the embedding's padding row.
        attention: ``self`` (query is key is value), ``cross`` (keys and values from another projection of the
            input) or ``kdim`` (cross-attention with keys and values of another width: separate q/k/v weights).
        pos: whether to add a learned positional embedding (a bare ``nn.Parameter``).
    """

    def __init__(self, padding_idx: int | None = None, attention: str = "self", pos: bool = True,
                 seq: int = 3) -> None:
        super().__init__()
        self.attention = attention
        self.embed = nn.Embedding(VOCAB, D, padding_idx=padding_idx)
        self.pos = nn.Parameter(0.3 * torch.randn(seq, D)) if pos else None
        kv = 4 if attention == "kdim" else D
        self.kv = nn.Linear(D, kv) if attention != "self" else None
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True, kdim=kv, vdim=kv)
        self.ln = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.pos is not None:
            h = h + self.pos
        if self.kv is None:
            a = self.attn(h, h, h, need_weights=False)[0]
        else:
            m = self.kv(h)
            a = self.attn(h, m, m, need_weights=False)[0]
        h = self.ln(h + a)
        h = h + self.mlp(h)
        return self.head(h.mean(1))


def _tokens(n: int, seq: int, seed: int = 0, distinct: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if distinct:
        return torch.stack([torch.randperm(VOCAB, generator=g)[:seq] for _ in range(n)])
    return torch.randint(0, VOCAB, (n, seq), generator=g)


def _kfac(**kw):
    kw.setdefault("fisher", "exact")
    kw.setdefault("unsupported", "diag")
    return laftr.make_estimator("kfac", **kw)


def _kfac_block(est, layer) -> tuple[torch.Tensor, list[str]]:
    """K-FAC's matrix for one layer, in the order of its parameters' flattened entries (weight, then bias)."""
    A, G = est.A[layer.name], est.G[layer.name]
    if layer.kind == "embedding":  # weight (V, d), entry (v, j) at v * d + j: diag(A) (x) G
        return torch.kron(torch.diag(A), G), [layer.weight_name]
    # weight (d_out, d_in) with the bias as column d_in: entry (o, i) of [W | b] at o * k + i in kron(G, A)
    k, d_in = A.shape[0], layer.d_in
    order = [o * k + i for o in range(layer.d_out) for i in range(d_in)]
    names = [layer.weight_name]
    if layer.bias:
        order += [o * k + d_in for o in range(layer.d_out)]
        names.append(layer.bias_name)
    K = torch.kron(G, A)
    return K[order][:, order], names


def _indices(slices: dict[str, slice], names: list[str]) -> torch.Tensor:
    return torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("metric", ["l2", "kl", "l2-probs"])
def test_kfac_single_example_single_position_equals_dense_ggn_blocks(metric):
    """One example of one token: every tapped layer's Kronecker block is its dense Gauss-Newton block.

    The Gauss-Newton block of a layer applied at T positions is ``sum_s (sum_t a_t (x) g_ts)(sum_t' a_t' (x)
    g_t's)^T``; K-FAC replaces it by ``(mean_t a_t a_t^T) (x) (sum_s sum_t g_ts g_ts^T)`` averaged over examples
    separately. With one example and one position the two are the same product ``a a^T (x) sum_s g_s g_s^T``, and
    ``sum_s g_s g_s^T = J^T H J`` exactly for ``fisher="exact"``. For the embedding ``a`` is the one-hot token, so
    ``A`` is ``e_t e_t^T``: its diagonal is all of it. (With one position the attention pattern is the constant 1,
    so q and k receive no gradient: their rows of the in_proj block are zero on both sides; the factors on
    several positions are checked below.)
    """
    model = _transformer(seq=1)
    X = torch.tensor([[4]])
    G, slices = dense_ggn(model, X, metric)
    est = _kfac(metric=metric).fit(model, X)
    names = {layer.name: layer.kind for layer in est.layers}
    assert names == {"embed": "embedding", "blocks.0.attn.mha.in_proj": "linear",
                     "blocks.0.attn.mha.out_proj": "linear", "blocks.0.mlp.0": "linear", "blocks.0.mlp.2": "linear",
                     "head": "linear"}
    assert est.A["embed"].shape == (VOCAB,)
    for layer in est.layers:
        K, params = _kfac_block(est, layer)
        i = _indices(slices, params)
        dense = G[i][:, i]
        assert dense.abs().max() > 1e-6, layer.name
        torch.testing.assert_close(K, dense, rtol=1e-9, atol=1e-12, msg=lambda m, n=layer.name: f"{n}: {m}")
    # the embedding's block lives on the row of token 4 only; the fallback parameters get the dense diagonal
    i = _indices(slices, ["embed.weight"]).view(VOCAB, D)
    assert G[i[4]][:, i[4]].abs().max() > 1e-6 and G[i[3]][:, i[3]].abs().max() == 0
    assert sorted(est.diag) == sorted(["pos", "blocks.0.ln1.weight", "blocks.0.ln1.bias", "blocks.0.ln2.weight",
                                       "blocks.0.ln2.bias", "ln.weight", "ln.bias"])
    for n, v in est.diag.items():
        torch.testing.assert_close(v.reshape(-1), G.diagonal()[slices[n]], rtol=1e-9, atol=1e-12)
    # and the estimate is the block-diagonal quadratic form
    other = perturbed(model, 0.2)
    delta = param_delta(model, other)
    truth = 0.0
    for layer in est.layers:
        i = _indices(slices, _kfac_block(est, layer)[1])
        truth = truth + 0.5 * delta[i] @ G[i][:, i] @ delta[i]
    for n in est.diag:
        i = _indices(slices, [n])
        truth = truth + 0.5 * (G.diagonal()[i] * delta[i] ** 2).sum()
    torch.testing.assert_close(est(other), truth, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("metric", ["kl", "l2"])
def test_kfac_factors_on_several_positions_follow_the_positions_convention(metric):
    """With T = 3 positions: ``A = mean_x (1/T) sum_t a_t a_t^T`` (the embedding's: token frequencies) and
    ``G = mean_x sum_t sum_s g_ts g_ts^T`` with g_ts the gradient w.r.t. the layer's output at position t.

    The per-position gradients are recovered by brute force from dense parameter Jacobians: for the embedding,
    with distinct tokens in an example, the Jacobian's row ``tok_t`` is g_t; for the attention input projection
    ``J = sum_t g_t [x_t; 1]^T`` with the three inputs ``x_t`` linearly independent, so ``g_t`` solves it.
    """
    T = 3
    model = _transformer(seq=T)
    X = _tokens(4, T, seed=1, distinct=True)
    est = _kfac(metric=metric).fit(model, X)
    mha = "blocks.0.attn.mha."
    params = {n: p.detach() for n, p in model.named_parameters()}
    wrt = ("embed.weight", mha + "in_proj_weight", mha + "in_proj_bias")
    seen: list[torch.Tensor] = []
    hook = model.blocks[0].ln1.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    E = D
    A_emb, G_emb = torch.zeros(VOCAB), torch.zeros(D, D)
    A_in, G_in = torch.zeros(E + 1, E + 1), torch.zeros(3 * E, 3 * E)
    try:
        for x in X:
            seen.clear()
            z0 = model(x[None])[0].detach()
            a = torch.cat([seen[0][0], torch.ones(T, 1)], 1)  # (T, E + 1): the in_proj inputs with the ones column
            H = torch.autograd.functional.hessian(lambda z, z0=z0: discrepancy(z0[None], z[None], metric)[0], z0)

            def out(p, x=x):
                return functional_call(model, {**params, **p}, (x[None],))[0]

            J = jacrev(out)({n: params[n] for n in wrt})
            for t in range(T):
                g = J["embed.weight"][:, x[t]]  # (K, d)
                G_emb += g.T @ H @ g
            A_emb += torch.bincount(x, minlength=VOCAB).to(A_emb.dtype) / T
            Jw = torch.cat([J[mha + "in_proj_weight"], J[mha + "in_proj_bias"][..., None]], -1)  # (K, 3E, E + 1)
            per = Jw @ torch.linalg.pinv(a)  # (K, 3E, T): column t is g_t
            torch.testing.assert_close(per @ a, Jw, rtol=1e-9, atol=1e-12)  # the decomposition is exact
            for t in range(T):
                G_in += per[:, :, t].T @ H @ per[:, :, t]
            A_in += a.T @ a / T
    finally:
        hook.remove()
    n = len(X)
    torch.testing.assert_close(est.A["embed"], A_emb / n, rtol=1e-12, atol=0)
    torch.testing.assert_close(est.G["embed"], G_emb / n, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(est.A[mha + "in_proj"], A_in / n, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(est.G[mha + "in_proj"], G_in / n, rtol=1e-9, atol=1e-12)
    # q, k and v all receive gradient here (unlike with one position)
    for part in range(3):
        blk = G_in[part * E:(part + 1) * E, part * E:(part + 1) * E]
        assert blk.abs().max() > 1e-8, part


@pytest.mark.parametrize("name", ["kfac", "diag-fisher"])
def test_estimate_is_a_quadratic_form_vanishing_at_theta0(name):
    model = TinyLM(padding_idx=0)
    _jitter(model, 0.3)
    X = _tokens(10, 3, seed=2)
    kw = {"unsupported": "diag"} if name == "kfac" else {}
    est = laftr.make_estimator(name, metric="kl", **kw).fit(model, X)
    assert est(model).item() == 0.0
    one, two = perturbed(model, 0.1), perturbed(model, 0.2)  # the same noise (same seed), twice as large
    d1, d2 = est(one), est(two)
    assert d1.item() > 0
    torch.testing.assert_close(d2, 4 * d1, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------- diag-fisher
def _brute_force_squares(model: nn.Module, X: torch.Tensor, W: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sum_b sum_s (d/dtheta W[b, :, s] . z(x_b))^2`` with torch.func.vmap of per-example gradients."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def wz(p, x, w):
        return functional_call(model, (p, buffers), (x[None],))[0] @ w

    per_example = vmap(grad(wz), in_dims=(None, 0, 0))
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for s in range(W.shape[2]):
        gs = per_example(params, X, W[:, :, s])
        for n in acc:
            acc[n] += gs[n].pow(2).sum(0)
    return acc


# every example has 3 tokens; examples 1, 2, 4 repeat a token; token 6 never occurs
_REPEATS = torch.tensor([[0, 1, 2], [3, 3, 1], [2, 4, 4], [5, 0, 5], [1, 1, 1], [4, 2, 0]])


_MODELS = {"transformer-mha": lambda: _transformer(seq=3), "padding-idx": lambda: _jitter(TinyLM(padding_idx=1), 0.3),
           "cross-attention": lambda: _jitter(TinyLM(attention="cross"), 0.3)}


@pytest.mark.parametrize("which,fisher,metric", [
    ("transformer-mha", "exact", "kl"), ("transformer-mha", "exact", "l2"), ("transformer-mha", "mc", "kl"),
    ("padding-idx", "exact", "kl"), ("cross-attention", "mc", "kl"),
])
def test_diag_fisher_equals_brute_force_per_example_squared_gradients(which, fisher, metric):
    """diag-Fisher's diagonal is the mean of per-example squared gradients on the output vectors it drew: the
    tapped layers (embedding with repeated tokens, in_proj, out_proj, Linear) and the vmap fallback (positional
    embedding, LayerNorm; a cross-attention's input projection) alike."""
    model = _MODELS[which]()
    X = _REPEATS
    est = laftr.make_estimator("diag-fisher", metric=metric, fisher=fisher, num_label_samples=3, batch_size=4,
                               seed=5).fit(model, X)
    # the same output vectors as the fit drew (same seed, same batches)
    W = torch.cat([w for _, w in curvature_batches(model, X, est.config, None, "test")])
    truth = _brute_force_squares(model, X, W)
    assert sorted(est.diag) == sorted(truth)
    for n, v in truth.items():
        torch.testing.assert_close(est.diag[n], v / len(X), rtol=1e-9, atol=1e-13, msg=lambda m, n=n: f"{n}: {m}")
    emb = est.diag["embed.weight"]
    assert emb[6].abs().max() == 0 and emb[0].abs().max() > 0  # a token that never occurs has no gradient
    if isinstance(model, TinyLM) and model.embed.padding_idx is not None:
        assert emb[1].abs().max() == 0  # the padding row: PyTorch gives it no gradient
    prefix = "blocks.0.attn.mha." if not isinstance(model, TinyLM) else "attn."
    assert est.diag[prefix + "in_proj_weight"].abs().max() > 0


# ---------------------------------------------------------------------- the life cycle on a small transformer
@pytest.mark.parametrize("name", ["kfac", "diag-fisher"])
def test_fit_evaluate_save_load_on_a_small_transformer(tmp_path, name):
    model = _jitter(TinyLM(padding_idx=0), 0.3)
    X = _tokens(20, 3, seed=4)
    Y = torch.randint(0, CLASSES, (20,), generator=torch.Generator().manual_seed(5))
    loader = DataLoader(TensorDataset(X, Y), batch_size=8)  # int64 tokens through the estimator's data path
    kw = {"unsupported": "diag"} if name == "kfac" else {}
    est = laftr.make_estimator(name, metric="kl", num_label_samples=2, seed=1, **kw).fit(model, loader)
    other = perturbed(model, 0.1)
    d = est(other)
    assert d.item() > 0 and torch.isfinite(d)
    g = torch.autograd.grad(d, [other.embed.weight, other.attn.in_proj_weight])
    assert all(t.abs().max() > 0 for t in g)
    P = sum(p.numel() for p in model.parameters())
    if name == "kfac":
        E = D
        assert {n: tuple(a.shape) for n, a in est.A.items()} == {
            "embed": (VOCAB,), "attn.in_proj": (E + 1, E + 1), "attn.out_proj": (E + 1, E + 1),
            "mlp.0": (D + 1, D + 1), "mlp.2": (17, 17), "head": (D + 1, D + 1)}
        assert est.G["attn.in_proj"].shape == (3 * E, 3 * E)
        assert sorted(est.diag) == ["ln.bias", "ln.weight", "pos"]
        expect = (VOCAB + D**2) + ((E + 1) ** 2 + (3 * E) ** 2) + ((E + 1) ** 2 + E**2) + ((D + 1) ** 2 + 16**2) \
            + (17**2 + D**2) + ((D + 1) ** 2 + CLASSES**2) + (3 * D + 2 * D)
        assert est.stored_floats() == expect
        # the embedding's input factor: token frequencies per position, the padding token's set to zero
        freq = torch.bincount(X.reshape(-1), minlength=VOCAB).to(torch.float64) / X.numel()
        freq[0] = 0
        assert (X == 0).any()
        torch.testing.assert_close(est.A["embed"], freq, rtol=1e-12, atol=0)
    else:
        assert est.stored_floats() == P
    path = laftr.save(est, tmp_path / f"{name}.laftr")
    back = laftr.load(path)
    assert type(back) is type(est) and back.stored_floats() == est.stored_floats()
    torch.testing.assert_close(back(other), d.detach(), rtol=1e-12, atol=0)
    assert back(model).item() == 0.0
    # batch size does not matter (per-example statistics)
    again = laftr.make_estimator(name, metric="kl", fisher="exact", **kw).fit(model, X)
    whole = laftr.make_estimator(name, metric="kl", fisher="exact", batch_size=3, **kw).fit(model, X)
    torch.testing.assert_close(whole(other), again(other), rtol=1e-10, atol=0)


def test_kfac_file_with_a_bad_embedding_factor_is_refused(tmp_path):
    est = _kfac(metric="kl").fit(_jitter(TinyLM()), _tokens(6, 3))
    path = laftr.save(est, tmp_path / "k.laftr")
    assert laftr.load(path).stored_floats() == est.stored_floats()
    tensors, meta = split(path.read_bytes())
    tensors["state/A/embed"] = torch.ones(VOCAB + 1)  # one token too many: a clear error, not a silent mismatch
    path.write_bytes(forge(tensors, meta))  # hashes right for the bad factor: K-FAC's own check must refuse it
    with pytest.raises(SummaryFileError, match="'embed'.*wrong shapes"):
        laftr.load(path)


# ---------------------------------------------------------------------- what stays unsupported
@pytest.mark.parametrize("name", ["kfac", "diag-fisher"])
def test_cross_attention_and_separate_projections_fall_back_to_the_diagonal(name):
    X = _tokens(6, 3)
    for attention in ("cross", "kdim"):
        model = _jitter(TinyLM(attention=attention), 0.3)
        kw = {"unsupported": "diag"} if name == "kfac" else {}
        est = laftr.make_estimator(name, metric="kl", fisher="exact", **kw).fit(model, X)
        if name == "kfac":
            assert "attn.in_proj" not in est.A and "attn.out_proj" in est.A
            own = [n for n, p in model.attn.named_parameters(recurse=False)]
            assert sorted(est.diag) == sorted(["pos", "ln.weight", "ln.bias"] + [f"attn.{n}" for n in own])
        assert est(perturbed(model, 0.1)).item() > 0


def test_unsupported_error_names_the_layer_and_why():
    X = _tokens(4, 3)
    with pytest.raises(UnsupportedOpError, match=r"'attn' \(MultiheadAttention.*cross-attention"):
        _kfac(unsupported="error").fit(_jitter(TinyLM(attention="cross", pos=False)), X)
    with pytest.raises(UnsupportedOpError, match=r"'attn' \(MultiheadAttention.*separate q/k/v"):
        _kfac(unsupported="error").fit(_jitter(TinyLM(attention="kdim", pos=False)), X)
    # the learned positional embedding (a bare parameter of the root module) and LayerNorm are named too
    with pytest.raises(UnsupportedOpError, match=r"'\(root\)' \(TinyLM, trainable parameters \['pos'\]\)"):
        _kfac(unsupported="error").fit(_jitter(TinyLM()), X)
    with pytest.raises(UnsupportedOpError, match=r"'ln' \(LayerNorm, trainable parameters \['ln.weight', 'ln.bias'\]"):
        _kfac(unsupported="error").fit(_jitter(TinyLM(pos=False)), X)
    # with the LayerNorm frozen, everything left is tapped
    model = _jitter(TinyLM(pos=False))
    model.ln.requires_grad_(False)
    est = _kfac(unsupported="error").fit(model, X)
    assert est.diag == {} and set(est.A) == {"embed", "attn.in_proj", "attn.out_proj", "mlp.0", "mlp.2", "head"}
