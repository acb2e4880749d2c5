"""``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` in every mode (laftr.rules.recurrent).

The rule must give what the same recurrence written by hand with ``F.linear``, ``torch.sigmoid``,
``torch.tanh`` and ``*`` gives through laftr's own rules: exactly with theta0's own linearization
(``gates="relu"``) and with the sampled laws where every law is a point (one stored input), and the same
expectation with the sampled laws on real data. Plus: zero at theta0, gradients reach every weight,
estimate / exact -> 1 as theta -> theta0, the real networks, ``linearize="activations"``, LIFTR, the
baselines, save/load, stored floats and the refusals.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import perturbed
from torch import nn

import laftr

T, D_IN, H, D_OUT = 4, 3, 5, 3


class Hand(nn.Module):
    """The recurrence of ``rnn`` written by hand with its weights (the zero state: ``W_hh h + b_hh`` is
    ``b_hh``, and the products with it vanish). Takes ``(B, T, F)``."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.rnn
        seq, dirs = x, 2 if m.bidirectional else 1
        for layer in range(m.num_layers):
            outs = []
            for d in range(dirs):
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                w_hh = getattr(m, "weight_hh" + suffix)
                b_hh = getattr(m, "bias_hh" + suffix, None)
                xw = F.linear(seq, getattr(m, "weight_ih" + suffix), getattr(m, "bias_ih" + suffix, None))
                hs: list[torch.Tensor] = [xw[:, 0, :H]] * T
                h = c = None
                for t in range(T - 1, -1, -1) if d else range(T):
                    if h is not None:
                        hh = F.linear(h, w_hh, b_hh)
                    else:
                        hh = b_hh if b_hh is not None else torch.zeros(w_hh.shape[0], dtype=x.dtype)
                    xt = xw[:, t]
                    if isinstance(m, nn.LSTM):
                        g = xt + hh
                        i, f = torch.sigmoid(g[:, :H]), torch.sigmoid(g[:, H:2 * H])
                        gg, o = torch.tanh(g[:, 2 * H:3 * H]), torch.sigmoid(g[:, 3 * H:])
                        c = i * gg if c is None else f * c + i * gg
                        h = o * torch.tanh(c)
                    elif isinstance(m, nn.GRU):
                        r = torch.sigmoid(xt[:, :H] + hh[..., :H])
                        z = torch.sigmoid(xt[:, H:2 * H] + hh[..., H:2 * H])
                        n = torch.tanh(xt[:, 2 * H:] + r * hh[..., 2 * H:])
                        h = (1 - z) * n if h is None else (1 - z) * n + z * h
                    else:
                        h = (torch.relu if m.nonlinearity == "relu" else torch.tanh)(xt + hh)
                    hs[t] = h
                outs.append(torch.stack(hs, 1))
            seq = outs[0] if dirs == 1 else torch.cat(outs, -1)
        return seq


class Net(nn.Module):
    """A recurrent layer (or its hand-written twin), mean over the positions, a linear head."""

    def __init__(self, rnn: nn.RNNBase, hand: bool = False) -> None:
        super().__init__()
        self.rnn = rnn
        self.hand = Hand(rnn) if hand else None  # the same weights (tied)
        self.head = nn.Linear(H * (2 if rnn.bidirectional else 1), D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hand is not None:
            y = self.hand(x)
        elif self.rnn.batch_first:
            y = self.rnn(x)[0]
        else:
            y = self.rnn(x.transpose(0, 1))[0].transpose(0, 1)
        return self.head(y.mean(1))


def _twins(rnn: nn.RNNBase, step: float = 0.2) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """The network, its hand-written twin (same weights), and both moved by ``step`` (the same way)."""
    a = Net(rnn).double()
    b = Net(rnn, hand=True).double()
    b.head = a.head
    far = perturbed(a, step)
    far_b = Net(far.rnn, hand=True).double()
    far_b.head = far.head
    return a, b, far, far_b


def _inputs(n: int = 30, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, T, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _assert_same_expectation(pairs, X: torch.Tensor) -> None:
    """Sampled-law estimates of two (network, moved network) pairs agree within 4 standard errors."""
    stats = []
    for net, other in pairs:
        est = laftr.make_estimator("laftr", num_samples=4000, seed=5).fit(net, X)
        v = torch.stack([est(other).detach() for _ in range(5)])
        stats.append((v.mean(), v.std() / 5 ** 0.5))
    (m1, s1), (m2, s2) = stats
    assert abs(float(m1 - m2)) < 4 * float((s1 ** 2 + s2 ** 2).sqrt()), stats


LAYERS = [
    (nn.LSTM, {}), (nn.GRU, {}), (nn.RNN, {}), (nn.RNN, {"nonlinearity": "relu"}),
    (nn.LSTM, {"num_layers": 2, "bidirectional": True}), (nn.GRU, {"bias": False, "bidirectional": True}),
    (nn.LSTM, {"batch_first": False}),
]


@pytest.mark.parametrize(("cls", "kw"), LAYERS, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_the_layer_is_its_recurrence_written_by_hand(cls, kw):
    torch.manual_seed(0)
    rnn = cls(D_IN, H, **{"batch_first": True, **kw}).double()
    a, b, far, far_b = _twins(rnn)
    X = _inputs()
    torch.testing.assert_close(a(X), b(X), rtol=1e-12, atol=1e-14)
    relu_rnn = kw.get("nonlinearity") == "relu"
    for gates in ("relu", "bernoulli"):
        # with one stored input every sampled law is a point: the draws are the same whatever their order
        opts = {"input_model": "coreset", "coreset_size": 1, "num_samples": 3} if gates == "bernoulli" else {}
        data = X[:1] if gates == "bernoulli" else X
        if gates == "bernoulli" and relu_rnn:
            with pytest.raises(laftr.UnsupportedOpError, match="two-point law"):
                laftr.make_estimator("laftr", gates=gates, **opts).fit(a, data)(far)
            continue
        est = laftr.make_estimator("laftr", gates=gates, seed=3, **opts).fit(a, data)
        twin = laftr.make_estimator("laftr", gates=gates, seed=3, **opts).fit(b, data)
        got = est(far)
        torch.testing.assert_close(got, twin(far_b), rtol=1e-10, atol=1e-14)
        assert float(est(a)) == 0.0 and float(got) > 0
        names = [n for n, _ in far.rnn.named_parameters()]
        grads = torch.autograd.grad(got, [p for _, p in far.rnn.named_parameters()])
        assert all(bool(g.abs().sum() > 0) for g in grads), [n for n, g in zip(names, grads) if not g.any()]


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_sampled_laws_have_the_hand_written_expectation(cls):
    """On real data the laws are not points: the rule draws one tangent per unit, position and gate of its one
    site, the twin one per gate site; same laws, independent draws, so the same expectation."""
    torch.manual_seed(0)
    a, b, far, far_b = _twins(cls(D_IN, H, batch_first=True).double(), 0.3)
    _assert_same_expectation(((a, far), (b, far_b)), _inputs(200))


def test_theta0s_own_linearization_tends_to_the_exact_fsd():
    torch.manual_seed(0)
    model, X = Net(nn.LSTM(D_IN, H, batch_first=True, num_layers=2)).double(), _inputs(20)
    est = laftr.make_estimator("laftr", gates="relu", input_model="coreset", coreset_size=len(X),
                               num_samples=len(X)).fit(model, X)
    errors = []
    for step in (1e-2, 1e-3, 1e-4):
        near = perturbed(model, step, seed=2)
        errors.append(abs(float(est(near)) / float(laftr.exact_fsd(model, near, X)) - 1))
    assert errors[-1] < 1e-3 and errors[-1] < errors[0], errors


def test_real_networks_activations_liftr_and_baselines_run_it(tmp_path):
    """``gates="none"`` and ``linearize="activations"`` run the layer exactly (on a coreset of every input:
    the exact FSD); LIFTR anchors its inputs; the summary stores (c, r) moments per unit, saves and loads;
    K-FAC (its parameters diagonal) and the diagonal Fisher run through it."""
    torch.manual_seed(0)
    model, X = Net(nn.LSTM(D_IN, H, batch_first=True)).double(), _inputs(20)
    gru = Net(nn.GRU(D_IN, H, batch_first=True)).double()
    lstm_ntk = laftr.make_estimator("ntk", coreset_size=8).fit(model, X)
    assert float(lstm_ntk(perturbed(model, 0.2))) > 0
    model = gru
    far = perturbed(model, 0.2)
    want = laftr.exact_fsd(model, far, X)
    for opts in ({"gates": "none"}, {"linearize": "activations", "gates": "relu"}):
        est = laftr.make_estimator("laftr", input_model="coreset", coreset_size=len(X), num_samples=len(X),
                                   **opts).fit(model, X)
        torch.testing.assert_close(est(far), want, rtol=1e-10, atol=1e-14)
    est = laftr.make_estimator("laftr", input_model="diag", seed=1).fit(model, X)
    site = est.summary.site_sums["rnn"]
    assert sorted(site) == ["c", "cc", "cr", "r", "rr"] and tuple(site["c"].shape) == (1, 1, T, 3 * H)
    assert est.stored_floats() == 5 * T * 3 * H + 2 * T * D_IN
    loaded = laftr.load(laftr.save(est, tmp_path / "gru.laftr"))
    first = est(far)
    assert float(first) > 0
    torch.testing.assert_close(laftr.make_estimator("laftr", input_model="diag", seed=1).fit(model, X)(far),
                               first)
    assert float(loaded(far)) > 0 and float(loaded(model)) == 0.0
    # the NTK's jvp runs through the rule's exact pass (PyTorch's fused LSTM kernel has no forward-mode AD)
    for name, opts in (("liftr", {}), ("kfac", {"unsupported": "diag"}), ("diag-fisher", {}),
                       ("ntk", {"coreset_size": 8})):
        fitted = laftr.make_estimator(name, **opts).fit(model, X)
        assert abs(float(fitted(model))) < 1e-12 and float(fitted(far)) > 0, name


def test_dropout_between_layers_is_off_also_in_training_mode():
    """As every dropout while estimating: a network in training mode (a regularizer inside a training loop)
    gets the estimate of the same network in evaluation mode, in the exact pass and the linearized ones."""
    torch.manual_seed(0)
    model, X = Net(nn.LSTM(D_IN, H, num_layers=2, dropout=0.5, batch_first=True)).double(), _inputs(20)
    far = perturbed(model, 0.2)
    for opts in ({"gates": "none"}, {"gates": "relu"}, {}):
        est = laftr.make_estimator("laftr", seed=2, fixed_noise=True, **opts).fit(model, X)
        want = est(far.eval())
        torch.testing.assert_close(est(far.train()), want, rtol=0, atol=0)
        torch.testing.assert_close(est(far.train()), want, rtol=0, atol=0)


def test_what_the_rule_refuses_is_named():
    X = _inputs(10)
    with pytest.raises(ValueError, match="unknown cell 'rnn'"):
        laftr.models.lstm(7, 3, cell="rnn")
    with pytest.raises(ValueError, match="d_model must be a positive integer"):
        laftr.models.lstm(7, 3, d_model=0)

    class WithState(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(D_IN, H, batch_first=True)
            self.register_buffer("h0", torch.zeros(1, 1, H))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x, self.h0.expand(-1, x.shape[0], -1).contiguous())[0].mean(1)

    with pytest.raises(laftr.UnsupportedOpError, match="initial state"):
        laftr.make_estimator("laftr").fit(WithState().double(), X)
    proj = Net(nn.LSTM(D_IN, 2 * H, batch_first=True, proj_size=H)).double()
    with pytest.raises(laftr.UnsupportedOpError, match="proj_size"):
        laftr.make_estimator("laftr").fit(proj, X)
    with pytest.raises(laftr.UnsupportedOpError, match="no closed form for a recurrent layer"):
        plain = Net(nn.RNN(D_IN, H, batch_first=True)).double()
        laftr.make_estimator("laftr-exact").fit(plain, X)(plain)


class Cells(nn.Module):
    """The one-layer ``rnn`` as a loop of its cell (``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell``) with the
    same weights, the state passed on whole; ``h0``: a constant initial state instead of None (zeros)."""

    def __init__(self, rnn: nn.RNNBase, h0: float | None = None) -> None:
        super().__init__()
        kind = type(rnn)
        cls = {nn.LSTM: nn.LSTMCell, nn.GRU: nn.GRUCell, nn.RNN: nn.RNNCell}[kind]
        kw = {"nonlinearity": rnn.nonlinearity} if kind is nn.RNN else {}
        self.cell = cls(D_IN, H, bias=rnn.bias, **kw).double()
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                if hasattr(rnn, name + "_l0"):
                    getattr(self.cell, name).copy_(getattr(rnn, name + "_l0"))
        self.head = nn.Linear(H, D_OUT).double()
        self.lstm = kind is nn.LSTM
        self.register_buffer("h0", None if h0 is None else torch.full((1, H), h0, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = None
        if self.h0 is not None:
            h = self.h0.expand(x.shape[0], -1)
            state = (h, h) if self.lstm else h
        hs = []
        for t in range(T):
            state = self.cell(x[:, t], state)
            hs.append(state[0] if self.lstm else state)
        return self.head(torch.stack(hs, 1).mean(1))


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_a_loop_of_cells_is_the_layer(cls, tmp_path):
    """Each call of the cell is one step of the layer's rule: theta0's own linearization, the real networks,
    linearize="activations" and point laws give the layer's estimates (1e-10); sampled laws on real data the
    same expectation; LIFTR and the baselines run; zero at theta0 and gradients reach the cell's weights."""
    torch.manual_seed(0)
    rnn = cls(D_IN, H, batch_first=True).double()
    layer = Net(rnn).double()
    cells = Cells(rnn)
    cells.head.load_state_dict(layer.head.state_dict())
    far = perturbed(layer, 0.2)
    far_cells = Cells(far.rnn)
    far_cells.head.load_state_dict(far.head.state_dict())
    X = _inputs()
    torch.testing.assert_close(cells(X), layer(X), rtol=1e-12, atol=1e-14)
    point = {"input_model": "coreset", "coreset_size": 1, "num_samples": 3}
    for cfg, data in (({"gates": "relu"}, X), ({"gates": "none"}, X), ({"linearize": "activations"}, X),
                      (point, X[:1])):
        a = laftr.make_estimator("laftr", seed=3, **cfg).fit(layer, data)(far)
        est = laftr.make_estimator("laftr", seed=3, **cfg).fit(cells, data)
        got = est(far_cells)
        torch.testing.assert_close(got, a, rtol=1e-10, atol=1e-14, msg=str(cfg))
        assert float(est(cells)) == 0.0
    grads = torch.autograd.grad(got, list(far_cells.cell.parameters()))
    assert all(bool(g.abs().sum() > 0) for g in grads)
    # saved and loaded: the same draws and stored floats; the layer's one site holds what the T cell sites do
    est = laftr.make_estimator("laftr", fixed_noise=True, seed=3).fit(cells, X)
    back = laftr.load(laftr.save(est, tmp_path / "cells.laftr"))
    torch.testing.assert_close(back(far_cells), est(far_cells), rtol=0, atol=0)
    assert back.stored_floats() == est.stored_floats() == laftr.make_estimator("laftr").fit(layer, X).stored_floats()
    X = _inputs(200)
    _assert_same_expectation(((layer, far), (cells, far_cells)), X)
    for name, kw in (("liftr", {}), ("kfac", {"unsupported": "diag"}), ("diag-fisher", {}), ("ntk", {})):
        est = laftr.make_estimator(name, **kw).fit(cells, X)
        assert float(est(cells)) == 0.0 and float(est(far_cells)) > 0, name


def test_a_cell_with_a_constant_initial_state_tends_to_the_exact_fsd():
    torch.manual_seed(0)
    rnn = nn.LSTM(D_IN, H, batch_first=True).double()
    model = Cells(rnn, h0=0.3)
    X = _inputs(40)
    est = laftr.make_estimator("laftr", gates="relu", input_model="coreset", coreset_size=40,
                               num_samples=40).fit(model, X)
    errs = []
    for step in (1e-2, 1e-3):
        other = perturbed(model, step)
        errs.append(abs(float(est(other)) / float(laftr.exact_fsd(model, other, X)) - 1))
    assert errs[1] < 0.3 * errs[0] and errs[1] < 1e-2, errs
