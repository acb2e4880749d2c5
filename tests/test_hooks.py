"""Forward hooks and pruning masks: what torch.fx's graph does not run.

The traced estimators (``laftr``, ``laftr-exact``, ``liftr``, ``kfac``, ``diag-fisher``) run the network's
torch.fx graph with each stream's parameters, which calls no hook. A hook that changes an output was ignored
(0.1 x the exact FSD, silently), and ``torch.nn.utils.prune``'s pre-hook, which sets ``weight = weight_orig *
weight_mask`` before each call, made every fit fail with ``KeyError: '0.weight'``. Pruned tensors are now
computed per stream from their originals; hooks that change what the network computes are refused by name;
hooks that only read are accepted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as prune
from cases import perturbed
from torch import nn

import laftr
from laftr.errors import UnsupportedOpError

pytestmark = pytest.mark.usefixtures("float64")

TRACED = ("laftr", "laftr-exact", "liftr", "kfac", "diag-fisher")


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _pruned(moved: float = 0.0) -> nn.Sequential:
    """A network with 30 % of its first weight pruned, then (optionally) moved: same mask, other values."""
    model = _net()
    prune.l1_unstructured(model[0], "weight", amount=0.3)
    if moved:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(moved * torch.randn(p.shape, generator=g))
    return model


def _data(n: int = 40) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(1))


def test_a_pruned_network_is_the_network_with_the_mask_applied():
    """Through the real networks (``gates="none"`` on every stored input) the estimate is the exact FSD, mask
    included; theta0's own linearization tends to it; the gradient reaches ``weight_orig`` only where the mask
    keeps a weight; a summary saves and loads."""
    model, X = _pruned(), _data()
    assert "0.weight_orig" in dict(model.named_parameters()) and "0.weight" not in dict(model.named_parameters())
    other = _pruned(0.1)
    exact = laftr.exact_fsd(model, other, X)
    every = {"input_model": "coreset", "coreset_size": len(X), "num_samples": len(X)}
    est = laftr.make_estimator("laftr", gates="none", **every).fit(model, X)
    torch.testing.assert_close(est(other), exact, rtol=1e-10, atol=0)
    own = laftr.make_estimator("laftr", gates="relu", **every).fit(model, X)
    near = _pruned(1e-4)
    assert float(own(near) / laftr.exact_fsd(model, near, X)) == pytest.approx(1, abs=1e-3)
    d = laftr.make_estimator("laftr").fit(model, X)(other)
    (g,) = torch.autograd.grad(d, [other[0].weight_orig])
    mask = other[0].weight_mask
    assert bool((g[mask == 0] == 0).all()) and bool((g[mask == 1] != 0).any())
    back = laftr.io.from_bytes(laftr.io.to_bytes(est))
    assert float(back(other)) == float(est(other))
    assert float(laftr.make_estimator("laftr-exact").fit(model, X)(model)) == 0.0


def test_kfac_names_a_pruned_layer_and_takes_it_diagonally():
    model, X = _pruned(), _data()
    with pytest.raises(UnsupportedOpError, match=r"layer '0'.*pruned.*prune.remove"):
        laftr.make_estimator("kfac").fit(model, X)
    est = laftr.make_estimator("kfac", unsupported="diag").fit(model, X)
    assert float(est(_pruned(0.1))) > 0


@pytest.mark.parametrize("kind", ["output hook", "activation hook", "input pre-hook", "global hook"])
def test_a_hook_that_changes_the_network_is_refused(kind):
    """A hook that scales a layer's output, or changes its input, is refused by every traced estimator,
    naming the module; the estimators that run the module itself take it into account. (A hook on the ReLU,
    a module with a rule, passed the check: the graph's forward mode ran the module itself, hooks included,
    while the estimates apply its rule; laftr and laftr-exact gave the unhooked network's estimates, 0.25 x
    the exact FSD.)"""
    model, X = _net(), _data()
    if kind == "output hook":
        handle = model[0].register_forward_hook(lambda m, args, out: 3 * out)
    elif kind == "activation hook":
        handle = model[1].register_forward_hook(lambda m, args, out: 3 * out)
    elif kind == "input pre-hook":
        handle = model[2].register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, args, out: 2 * out if isinstance(m, nn.Linear) else None)
    try:
        where = {"output hook": r"\(on 0\)", "activation hook": r"\(on 1\)", "input pre-hook": r"\(on 2\)",
                 "global hook": r"\(on every module \(global hooks\)\)"}[kind]
        for method in TRACED:
            with pytest.raises(UnsupportedOpError, match=rf"forward hooks that change what it computes {where}"):
                laftr.make_estimator(method).fit(model, X)
        other = perturbed(model, 0.1)
        exact = laftr.exact_fsd(model, other, X)
        subset = laftr.make_estimator("subset", coreset_size=len(X)).fit(model, X)
        torch.testing.assert_close(subset(other), exact, rtol=1e-10, atol=0)
        ntk = laftr.make_estimator("ntk", coreset_size=len(X)).fit(model, X)
        near = perturbed(model, 1e-4)
        assert float(ntk(near) / laftr.exact_fsd(model, near, X)) == pytest.approx(1, abs=1e-3)
    finally:
        handle.remove()


def test_a_hook_that_only_reads_is_accepted():
    """A hook recording activations (it returns None) changes nothing: accepted, same estimate as without."""
    model, X = _net(), _data()
    seen = []
    handle = model[1].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    other = perturbed(model, 0.1)
    try:
        with_hook = {m: float(laftr.make_estimator(m, seed=3).fit(model, X)(other)) for m in TRACED}
    finally:
        handle.remove()
    assert seen
    without = {m: float(laftr.make_estimator(m, seed=3).fit(model, X)(other)) for m in TRACED}
    assert with_hook == without


def test_ntk_does_not_take_its_traced_path_past_a_hook():
    """ntk runs the module itself, hooks included, but falls back on the traced graph where an op has no
    forward mode (MultiheadAttention's fused kernel): with a hook that changes the output that fallback would
    ignore it. It is not taken; here the last fallback (reverse mode twice) fails too, and the error names
    the hook among the reasons."""

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, _ = self.att(x, x, x, need_weights=False)
            return self.head(y.mean(1))

    torch.manual_seed(0)
    model, X = Attn(), torch.randn(12, 5, 8, generator=torch.Generator().manual_seed(1))
    near = perturbed(model, 1e-4)
    est = laftr.make_estimator("ntk", coreset_size=12).fit(model, X)
    assert float(est(near) / laftr.exact_fsd(model, near, X)) == pytest.approx(1, abs=1e-2)
    handle = model.head.register_forward_hook(lambda m, args, out: 3 * out)
    try:
        est = laftr.make_estimator("ntk", coreset_size=12).fit(model, X)
        with pytest.raises(UnsupportedOpError, match=r"forward hooks \(on head\)"):
            est(perturbed(model, 1e-4))  # (the copy keeps the hook)
    finally:
        handle.remove()
