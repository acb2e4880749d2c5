"""laftr.training: the batch order of each schedule, one training function against a loop written out by hand,
the penalty and step hook, the head loss, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from laftr.errors import UsageError
from laftr.training import batch_order, head_loss, train


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_epochs_are_permutations_cut_into_batches_with_a_short_last_one():
    epochs = [list(b) for _, b in batch_order(10, 4, _gen(), epochs=3)]
    assert len(epochs) == 3
    for batches in epochs:
        assert [len(b) for b in batches] == [4, 4, 2]
        assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1]))
    again = [list(b) for _, b in batch_order(10, 4, _gen(), epochs=3)]
    assert all(torch.equal(a, b) for ea, eb in zip(epochs, again) for a, b in zip(ea, eb))
    g = _gen()  # the draws are the generator's randperms, nothing else
    assert torch.equal(torch.cat(epochs[0]), torch.randperm(10, generator=g))


def test_steps_are_full_batches_with_a_fresh_permutation_when_too_few_are_left():
    ((count, it),) = list(batch_order(10, 4, _gen(), steps=5))
    batches = list(it)
    assert count == 5
    assert [len(b) for b in batches] == [4] * 5
    g = _gen()
    p1, p2, p3 = (torch.randperm(10, generator=g) for _ in range(3))
    want = [p1[:4], p1[4:8], p2[:4], p2[4:8], p3[:4]]  # 2 left of each permutation: a new one
    assert all(torch.equal(a, b) for a, b in zip(batches, want))
    ((_, big),) = list(batch_order(3, 5, _gen(), steps=2))  # batch larger than the data: all of it each step
    assert [sorted(b.tolist()) for b in big] == [[0, 1, 2], [0, 1, 2]]


def test_steps_draw_each_permutation_when_it_is_needed():
    """A penalty drawing from the same generator between steps keeps its place in the stream."""
    g, ref = _gen(), _gen()
    ((_, it),) = list(batch_order(6, 4, g, steps=2))
    first = next(it)
    extra = torch.randint(10, (3,), generator=g)  # e.g. a penalty's batch
    second = next(it)
    p1 = torch.randperm(6, generator=ref)
    assert torch.equal(first, p1[:4])
    assert torch.equal(extra, torch.randint(10, (3,), generator=ref))
    assert torch.equal(second, torch.randperm(6, generator=ref)[:4])


def test_full_batch_draws_nothing():
    g = _gen()
    state = g.get_state()
    assert [[b.tolist() for b in e] for _, e in batch_order(5, 2, g, epochs=2, full_batch=True)] == [
        [list(range(5))]] * 2
    assert torch.equal(g.get_state(), state)
    assert len(list(batch_order(5, 2, None, epochs=1, full_batch=True))) == 1


@pytest.mark.parametrize("kw,match", [({}, "epochs or as steps"), ({"epochs": 1, "steps": 2}, "epochs or as steps"),
                                      ({"steps": 2, "full_batch": True}, "full_batch"),
                                      ({"epochs": 1, "gen": None}, "torch.Generator")])
def test_bad_schedules_are_refused(kw, match):
    kw = {"gen": _gen(), **kw}
    gen = kw.pop("gen")
    with pytest.raises(UsageError, match=match):
        list(batch_order(10, 4, gen, **kw))
    with pytest.raises(UsageError, match="n >= 1"):
        list(batch_order(0, 4, _gen(), epochs=1))


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    X, Y = torch.randn(23, 3, generator=_gen(1)), torch.randint(0, 2, (23,), generator=_gen(2))
    return model, X, Y


def test_train_equals_the_loop_written_out():
    """Same batches, loss, penalty, zero_grad / backward / step order: the same parameters, bit for bit."""
    model, X, Y = _problem()
    ref = copy.deepcopy(model)
    anchor = [p.detach().clone() for p in model.parameters()]

    def penalty(m: nn.Module) -> torch.Tensor:
        return 0.1 * sum(((p - a) ** 2).sum() for p, a in zip(m.parameters(), anchor))

    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    steps_seen: list[int] = []
    hist = train(model, lambda b: head_loss(model(X[b]), Y[b], [1, 3]), len(X), opt, batch_size=8, gen=_gen(7),
                 epochs=2, penalty=penalty, on_step=steps_seen.append)
    opt_r, g, losses, pens = torch.optim.Adam(ref.parameters(), lr=0.01), _gen(7), [], []
    for _ in range(2):
        perm = torch.randperm(len(X), generator=g)
        ep_l, ep_p = [], []
        for i in range(0, len(X), 8):
            b = perm[i:i + 8]
            loss = F.cross_entropy(ref(X[b])[:, [1, 3]], Y[b])
            pen = penalty(ref)
            opt_r.zero_grad()
            (loss + pen).backward()
            opt_r.step()
            ep_l.append(float(loss.detach()))
            ep_p.append(float(pen.detach()))
        losses.append(sum(ep_l) / len(ep_l))
        pens.append(sum(ep_p) / len(ep_p))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert steps_seen == list(range(1, 7)) and model.training
    assert hist == {"loss": losses, "penalty": pens}


def test_steps_schedule_gives_one_history_entry():
    model, X, Y = _problem()
    hist = train(model, lambda b: head_loss(model(X[b]), Y[b]), len(X), torch.optim.SGD(model.parameters(), 0.1),
                 batch_size=5, gen=_gen(), steps=7)
    assert len(hist["loss"]) == len(hist["penalty"]) == 1 and hist["penalty"] == [0.0]


def test_head_loss_is_cross_entropy_over_the_head():
    logits, y = torch.randn(6, 5, generator=_gen()), torch.tensor([0, 1, 2, 0, 1, 2])
    want = F.cross_entropy(logits[:, [4, 0, 2]], y)
    assert torch.equal(head_loss(logits, y, [4, 0, 2]), want)
    assert torch.equal(head_loss(logits, y, torch.tensor([4, 0, 2])), want)
    torch.testing.assert_close(head_loss(logits, y, [4, 0, 2], reduction="sum"), 6 * want)
    assert torch.equal(head_loss(logits, y), F.cross_entropy(logits, y))


def test_a_loss_that_is_not_finite_stops_training():
    model, X, Y = _problem()
    with pytest.raises(FloatingPointError, match="nan"):
        train(model, lambda b: model(X[b]).sum() * float("nan"), len(X), torch.optim.SGD(model.parameters(), 0.1),
              batch_size=5, gen=_gen(), epochs=1)
