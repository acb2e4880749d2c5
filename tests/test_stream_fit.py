"""The augmented stream of benchmarks/stream_fit.py: example i does not depend on the sharding or the batch size,
the augmentation is what it says, and fit reads the stream like the materialized data (no processes spawned)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from cases import load_benchmark_script

import laftr
from laftr.models import mlp


@pytest.fixture(scope="module")
def sf():
    module = load_benchmark_script("stream_fit")
    yield module
    sys.modules.pop(module.__name__, None)


def images(m: int = 37) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (m, 28, 28), dtype=np.uint8), rng.integers(0, 10, m).astype(np.int64)


def materialize(stream) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*stream)
    return torch.cat(xs), torch.cat(ys)


def test_example_i_is_the_same_under_any_sharding_and_batch_size(sf):
    imgs, labs = images()
    n = 101  # wraps around the 37 images
    X1, Y1 = materialize(sf.AugmentedStream(imgs, labs, 0, n, 16, seed=3))
    assert X1.shape == (n, 784) and X1.dtype == torch.float32 and Y1.shape == (n,)
    for world, batch in [(2, 16), (2, 7), (3, 50)]:
        parts = [materialize(sf.AugmentedStream(imgs, labs, *sf.shard_range(n, r, world), batch, seed=3))
                 for r in range(world)]
        assert sum(len(p[0]) for p in parts) == n
        assert torch.equal(torch.cat([p[0] for p in parts]), X1)
        assert torch.equal(torch.cat([p[1] for p in parts]), Y1)
    # another seed, other augmentations; labels follow the images (i mod M)
    X2, Y2 = materialize(sf.AugmentedStream(imgs, labs, 0, n, 16, seed=4))
    assert not torch.equal(X1, X2) and torch.equal(Y1, Y2)
    assert torch.equal(Y1, torch.from_numpy(labs[np.arange(n) % len(labs)]))


def test_augmentation_is_a_shift_and_a_flip(sf):
    imgs, _ = images(8)
    dy, dx, flip = sf.augmentations(0, 0, 500)
    assert set(dy.tolist()) == set(range(-2, 3)) == set(dx.tolist()) and 0.4 < flip.float().mean() < 0.6
    dy, dx, flip = dy[:8], dx[:8], flip[:8]
    out = sf.augment(imgs, dy, dx, flip).reshape(8, 28, 28)
    for b in range(8):
        ref = torch.zeros(28, 28)
        src = torch.from_numpy(imgs[b].astype(np.float32)) / 255
        for r in range(28):
            for c in range(28):
                if 0 <= r - dy[b] < 28 and 0 <= c - dx[b] < 28:
                    ref[r, c] = src[r - dy[b], c - dx[b]]
        assert torch.equal(out[b], ref.flip(1) if flip[b] else ref)


def test_fit_reads_the_stream_lazily_like_the_materialized_data(sf):
    imgs, labs = images()
    stream = sf.AugmentedStream(imgs, labs, 0, 90, 32, seed=1)
    it = iter(stream)
    x, y = next(it)  # one batch made on demand, not the stream
    assert x.shape == (32, 784) and len(stream) == 3
    torch.manual_seed(0)
    model = mlp(784, (8,), 10).double()
    X, Y = materialize(stream)
    for name, opts in [("laftr", {"input_model": "gaussian"}), ("kfac", {"fisher": "exact"})]:
        a = laftr.make_estimator(name, **opts).fit(model, stream)._state()[0]
        b = laftr.make_estimator(name, batch_size=32, **opts).fit(model, (X.double(), Y))._state()[0]
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12)
