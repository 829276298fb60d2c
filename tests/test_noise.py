"""Counter-based randomness (tmfast/engine/noise.py): exact, batch-independent, Gaussian enough."""
import math
import random

import pytest
import torch

from tmfast.engine.noise import (MASK32, PURPOSES, counter, draw, hash32, noise_basis, normal_rows, row_keys,
                                 seed_key)


def test_the_tensor_hash_is_the_exact_32_bit_hash():
    """int64 tensors hold 32-bit values and never overflow: the same as Python's unbounded ints."""
    rng = random.Random(0)
    xs = [0, 1, MASK32, MASK32 - 1, 2 ** 31, 2 ** 31 - 1] + [rng.randrange(2 ** 32) for _ in range(2000)]
    out = hash32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert out == [hash32(x) for x in xs]
    assert all(0 <= v <= MASK32 for v in out)
    assert len(set(out)) == len(set(xs))  # a bijection on 32-bit values: no collisions here


def test_seed_keys_cover_the_seed_range():
    keys = [seed_key(s) for s in (0, 1, 2, 2 ** 32, 2 ** 32 + 1, 2 ** 63 - 1)]
    assert all(0 <= k <= MASK32 for k in keys) and len(set(keys)) == len(keys)


def test_a_row_depends_on_its_key_alone():
    """Rows drawn together or apart, in any order, with any batch around them: the same bits."""
    basis = noise_basis(33)
    keys = row_keys(torch.tensor([seed_key(s) for s in (3, 3, 9)]), counter(2, torch.tensor([5, 6, 5]), 1))
    together = normal_rows(keys, basis.words, basis.quantiles)
    apart = torch.stack([normal_rows(keys[i:i + 1], basis.words, basis.quantiles)[0] for i in (2, 0, 1)])
    assert torch.equal(together, apart[[1, 2, 0]])
    assert not torch.equal(together[0], together[1]) and not torch.equal(together[0], together[2])


def test_compiled_draws_equal_eager_draws_bit_for_bit():
    basis = noise_basis(96)
    keys = row_keys(torch.tensor([seed_key(s) for s in range(16)]), counter(0, torch.arange(16) + 7))
    fn = torch.compile(normal_rows, fullgraph=True)
    assert torch.equal(fn(keys, basis.words, basis.quantiles), normal_rows(keys, basis.words, basis.quantiles))


def _stream(seed: int, purpose: str, n_pos: int, slots: int, d: int) -> torch.Tensor:
    """(n_pos, slots, d) unit-variance draws of one sequence."""
    return torch.stack([draw(seed, purpose, range(n_pos), j, d, math.sqrt(d)) for j in range(slots)], dim=1)


def test_noise_statistics():
    """Mean 0, variance 1, no correlation between positions, slots, seeds or purposes, and the
    N(0,1) quantiles, over 1.6 M draws."""
    d = 128
    z = _stream(7, "tail", 400, 16, d)  # 400 positions × 16 slots × 128 components
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 0.01
    assert z.abs().max().item() < 4.5  # the quantile table stops at ±4.3σ
    for q, expect in ((0.5, 0.0), (0.8413, 1.0), (0.9772, 2.0), (0.0228, -2.0)):
        assert abs(torch.quantile(z.flatten()[:2 ** 20], q).item() - expect) < 0.02
    lim = 5 / math.sqrt(d)  # 5σ of a correlation over d components

    def corr(a, b):  # per-row correlation of two (…, d) sets of vectors, the largest
        return ((a * b).mean(-1) / (a.std(-1) * b.std(-1))).abs().max().item()
    assert corr(z[1:], z[:-1]) < lim * 1.6  # adjacent positions (16·399 pairs: the max of many)
    assert corr(z[:, 1:], z[:, :-1]) < lim * 1.6  # adjacent slots
    other_seed = _stream(8, "tail", 400, 16, d)
    assert corr(z, other_seed) < lim * 1.6
    other_purpose = _stream(7, "embryo", 400, 16, d)
    assert corr(z, other_purpose) < lim * 1.6
    # and no component is special: the component means over 6400 rows are all near 0
    assert z.reshape(-1, d).mean(0).abs().max().item() < 5 / math.sqrt(400 * 16)


def test_purposes_and_slots_are_separate_streams():
    d = 16
    base = draw(1, "tail", [10], 0, d, 1.0)
    assert not torch.equal(base, draw(1, "tail", [10], 1, d, 1.0))
    assert not torch.equal(base, draw(1, "history", [10], 0, d, 1.0))
    assert not torch.equal(base, draw(2, "tail", [10], 0, d, 1.0))
    assert torch.equal(base, draw(1, "tail", [10], 0, d, 1.0))
    assert set(PURPOSES) == {"embryo", "history", "tail"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_draws_equal_cpu_draws_bit_for_bit():
    basis, cuda = noise_basis(1024), noise_basis(1024, "cuda")
    keys = row_keys(torch.tensor([seed_key(s) for s in range(64)]), counter(2, torch.arange(64) * 3, 5))
    assert torch.equal(normal_rows(keys.cuda(), cuda.words, cuda.quantiles).cpu(),
                       normal_rows(keys, basis.words, basis.quantiles))
