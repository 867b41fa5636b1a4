"""The seeded, re-queryable Brownian source (rexmol.solvers.brownian): exact bridge law, additivity,
reversal, order independence, statistics, per-sample keying, bounded memory, bad input."""
import math
import random

import numpy as np
import pytest
import torch

from rexmol.solvers.brownian import BrownianTree, _join, _Piece, _split


def _piece(tree, s, t):
    inc = tree.increment(s, t)
    return _Piece(inc.W.numpy(), inc.H.numpy(), tree._clock(t) - tree._clock(s))


def test_split_is_the_exact_brownian_bridge_law():
    """_split is linear in (W, H, x1, x2): its covariance must be that of two independent halves."""
    h1, h2 = 0.3, 1.7
    basis = np.eye(4)  # columns: coefficient of W, H, x1, x2
    left, right = _split(_Piece(basis[0], basis[1], h1 + h2), h1, h2, basis[2], basis[3])
    C = np.stack([left.W, left.H, right.W, right.H])
    cov = C @ np.diag([h1 + h2, (h1 + h2) / 12, 1.0, 1.0]) @ C.T
    np.testing.assert_allclose(cov, np.diag([h1, h1 / 12, h2, h2 / 12]), atol=1e-15)
    joined = _join(left, right)
    np.testing.assert_allclose(np.stack([joined.W, joined.H]), basis[:2], atol=1e-15)


CLOCKS = {"identity": None, "rho": lambda t: (t / (1 - t)) ** 2}


@pytest.mark.parametrize("clock", CLOCKS)
def test_reversal_and_additivity(clock):
    tree = BrownianTree(3, 0.05, 0.95, (5, 2), clock=CLOCKS[clock])
    rng = random.Random(0)
    dyadic = [0.05 + 0.9 * k / 16 for k in range(17)]
    points = sorted(set(dyadic[::3] + [rng.uniform(0.05, 0.95) for _ in range(12)] + [0.05, 0.95]))
    fwd, bwd = tree.increment(0.2, 0.7), tree.increment(0.7, 0.2)
    assert torch.equal(bwd.W, -fwd.W) and torch.equal(bwd.H, fwd.H)
    whole = _piece(tree, points[0], points[-1])
    acc = _piece(tree, points[0], points[1])
    for s, t in zip(points[1:], points[2:]):
        acc = _join(acc, _piece(tree, s, t))
    scale = math.sqrt(whole.h)
    assert np.abs(acc.W - whole.W).max() <= 1e-13 * scale
    assert np.abs(acc.H - whole.H).max() <= 1e-13 * scale


def test_additivity_inside_one_leaf():
    """Points closer than the finest level share a leaf; increments must still add up."""
    tree = BrownianTree(4, 0.0, 1.0, (3,), max_depth=3)
    points = [0.26, 0.27, 0.3, 0.31, 0.374, 0.5, 0.61]  # the first five lie in the leaf [0.25, 0.375]
    whole = _piece(tree, points[0], points[-1])
    acc = _piece(tree, points[0], points[1])
    for s, t in zip(points[1:], points[2:]):
        acc = _join(acc, _piece(tree, s, t))
    assert np.abs(acc.W - whole.W).max() <= 1e-14 and np.abs(acc.H - whole.H).max() <= 1e-14


def test_same_answer_in_any_query_order_even_after_cache_eviction():
    rng = random.Random(1)
    pts = sorted(rng.uniform(0.0, 2.0) for _ in range(30)) + [0.0, 0.5, 1.0, 2.0]
    intervals = [tuple(sorted(rng.sample(pts, 2))) for _ in range(40)]
    a = BrownianTree(9, 0.0, 2.0, (4, 3))
    first = [a.increment(s, t) for s, t in intervals]
    b = BrownianTree(9, 0.0, 2.0, (4, 3), cache_size=2)  # recomputes evicted nodes from their ancestors
    order = list(range(len(intervals)))
    rng.shuffle(order)
    second = {}
    for i in order:
        s, t = intervals[i]
        inc = b.increment(t, s)  # reversed orientation too
        second[i] = (-inc.W, inc.H)
    for i, inc in enumerate(first):
        assert torch.equal(inc.W, second[i][0]) and torch.equal(inc.H, second[i][1])
    again = [a.increment(s, t) for s, t in intervals]
    assert all(torch.equal(x.W, y.W) and torch.equal(x.H, y.H) for x, y in zip(first, again))


@pytest.mark.parametrize("clock", CLOCKS)
def test_statistics(clock):
    """n = 20000 independent paths: mean 0, Var W = h, Var H = h/12, no correlation between W and H nor
    between disjoint increments. Tolerance: 5 standard errors (variance: 5 sqrt(2/n) = 5% relative)."""
    n = 20_000
    tree = BrownianTree(2024, 0.1, 0.9, (n,), clock=CLOCKS[clock], max_depth=12)
    f = tree._clock
    intervals = [(0.1, 0.9), (0.1, 0.5), (0.2345, 0.6789), (0.6789, 0.8), (0.4, 0.40001)]
    incs = []
    for s, t in intervals:
        h = f(t) - f(s)
        W, H = (v.numpy() for v in tree.increment(s, t))
        incs.append(W)
        se = 5 / math.sqrt(n)
        assert abs(W.mean()) <= se * math.sqrt(h)
        assert abs(H.mean()) <= se * math.sqrt(h / 12)
        assert abs(W.var() / h - 1) <= 5 * math.sqrt(2 / n)
        assert abs(H.var() / (h / 12) - 1) <= 5 * math.sqrt(2 / n)
        assert abs(np.corrcoef(W, H)[0, 1]) <= se
    assert abs(np.corrcoef(incs[2], incs[3])[0, 1]) <= 5 / math.sqrt(n)  # adjacent, disjoint
    assert abs(np.corrcoef(incs[1], incs[3])[0, 1]) <= 5 / math.sqrt(n)


def test_seeds_and_per_sample_paths():
    a = BrownianTree(5, 0.0, 1.0, (6, 2)).increment(0.1, 0.8)
    b = BrownianTree(5, 0.0, 1.0, (6, 2)).increment(0.1, 0.8)
    c = BrownianTree(6, 0.0, 1.0, (6, 2)).increment(0.1, 0.8)
    assert torch.equal(a.W, b.W) and torch.equal(a.H, b.H)
    assert (a.W - c.W).abs().min() > 0
    chunk = BrownianTree(5, 0.0, 1.0, (4, 2), sample_offset=2).increment(0.1, 0.8)  # samples 2..5 alone
    torch.testing.assert_close(chunk.W, a.W[2:], rtol=0, atol=1e-15)
    torch.testing.assert_close(chunk.H, a.H[2:], rtol=0, atol=1e-15)
    rows = a.W.numpy()
    assert abs(np.corrcoef(rows[:, 0], rows[:, 1])[0, 1]) < 0.999  # rows are not copies of each other
    assert len({float(v) for v in rows[:, 0]}) == 6


def test_dyadic_grid_points_are_tree_nodes_and_memory_is_bounded():
    """A uniform grid of 2^k steps hits tree nodes exactly (no descent to the finest level), and the held
    state is bounded by the cache whatever the number of steps."""
    tree = BrownianTree(1, 0.2, 0.8, (3, 4))
    n = 64
    grid = [0.2 + (0.8 - 0.2) * i / n for i in range(n)] + [0.8]
    for s, t in zip(grid, grid[1:]):
        tree.increment(s, t)
    assert max(c.bit_length() - 1 for c in tree._cache) == 6
    small = tree.nbytes()
    rng = random.Random(3)
    points = sorted(rng.uniform(0.2, 0.8) for _ in range(10 * n))
    for s, t in zip(points, points[1:]):
        tree.increment(s, t)
        tree.increment(t, s)
    assert tree.n_cached <= tree.cache_size
    per_node = 2 * 3 * 4 * 8
    assert tree.nbytes() <= (2 + tree.cache_size + 4) * per_node < 10 * small


def test_snapping_to_dyadic_points():
    tree = BrownianTree(1, 0.0, 3.0, (2,))
    exact = tree.increment(0.75, 1.5)
    nudged = tree.increment(math.nextafter(0.75, 1.0), math.nextafter(1.5, 0.0))
    assert torch.equal(exact.W, nudged.W) and torch.equal(exact.H, nudged.H)
    assert torch.equal(tree.increment(1.0, 1.0).W, torch.zeros(2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seed=None), "seed must be an integer"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(seed=True), "seed must be an integer"),
        (dict(seed=-1), r"seed must lie in"),
        (dict(t0=1.0, t1=1.0), "t0 < t1"),
        (dict(t1=float("inf")), "t0 < t1"),
        (dict(shape=()), "shape must be"),
        (dict(shape=(0, 3)), "shape must be"),
        (dict(max_depth=0), "max_depth"),
        (dict(clock=lambda t: -t), "clock must be increasing"),
        (dict(clock=lambda t: 1 / (1 - t), t1=1.0), "not finite"),
        (dict(sample_offset=-2), "sample_offset"),
    ],
)
def test_bad_construction(kwargs, match):
    args = dict(seed=0, t0=0.0, t1=1.0, shape=(2,))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        BrownianTree(args.pop("seed"), args.pop("t0"), args.pop("t1"), args.pop("shape"), **args)


def test_bad_queries():
    tree = BrownianTree(0, 0.0, 1.0, (2,))
    with pytest.raises(ValueError, match="outside"):
        tree.increment(-0.1, 0.5)
    with pytest.raises(ValueError, match="outside"):
        tree.increment(0.5, 1.5)
    wiggly = BrownianTree(0, 0.0, 1.0, (2,), clock=lambda t: t + 0.8 * math.sin(4 * math.pi * t))
    with pytest.raises(ValueError, match="clock must be increasing"):  # increasing end to end, not inside
        wiggly.increment(0.2, 0.9)
