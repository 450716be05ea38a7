"""Property-based tests: scoring and retrieval never crash and equal the dense reference, over
shapes, dtypes, block sizes, ties and k."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tracin
from tracin.scoring._maths import Neighbors, lr_weighted_sum, merge_top_k, top_k
from tracin.store._store import FeatureStore

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def score_matrices(draw):
    q = draw(st.integers(1, 5))
    n = draw(st.integers(1, 40))
    ties = draw(st.booleans())  # small integers give many ties
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    scores = rng.integers(-3, 4, size=(q, n)).astype(float) if ties else rng.normal(size=(q, n))
    k = draw(st.integers(1, n))
    return scores, k


@FAST
@given(score_matrices(), st.booleans())
def test_top_k_equals_a_stable_sort(data, largest):
    scores, k = data
    got = top_k(scores, k, largest=largest)
    order = np.argsort(-scores if largest else scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(got.indices, order)
    np.testing.assert_array_equal(got.scores, np.take_along_axis(scores, order, 1))


@FAST
@given(score_matrices(), st.integers(1, 9), st.booleans())
def test_blockwise_merge_equals_dense(data, block, largest):
    scores, k = data
    best = None
    for start in range(0, scores.shape[1], block):
        part = scores[:, start : start + block]
        nb = top_k(part, min(k, part.shape[1]), largest=largest)
        nb = Neighbors(nb.indices + start, nb.scores)
        best = nb if best is None else merge_top_k(best, nb, k, largest)
    dense = top_k(scores, k, largest=largest)
    np.testing.assert_array_equal(best.indices, dense.indices)
    np.testing.assert_array_equal(best.scores, dense.scores)


@FAST
@given(st.lists(st.floats(0.001, 10), min_size=1, max_size=4), st.integers(0, 1000))
def test_lr_weighted_sum(lrs, seed):
    terms = np.random.default_rng(seed).normal(size=(len(lrs), 3, 4))
    got = lr_weighted_sum(zip(lrs, terms, strict=True))
    np.testing.assert_allclose(got, np.einsum("c,cij->ij", np.array(lrs), terms), rtol=1e-12)


def stored_run(n, dims, block_rows, lrs, dtype, seed, ties=False):
    """A Run over a synthetic in-memory store (no model): the scoring path alone."""
    from tracin._run import Run
    from tracin.gradients._engines import RunConfig
    from tracin.projection._config import ProjectionConfig

    rng = np.random.default_rng(seed)
    store = FeatureStore(None)
    ids = tuple(f"c{i}" for i in range(len(lrs)))

    def draw(rows):  # small integers make many tied scores
        x = rng.integers(-2, 3, size=(rows, dims)) if ties else rng.normal(size=(rows, dims))
        return x.astype(dtype)

    feats = {c: draw(n) for c in ids}
    queries = {c: draw(3) for c in ids}
    for c in ids:
        for split, rows in (("train", feats[c]), ("q", queries[c])):
            for b, start in enumerate(range(0, len(rows), block_rows)):
                block = rows[start : start + block_rows]
                store.write_block(split, c, b, block, (block.astype(float) ** 2).sum(1))
    config = RunConfig((), ProjectionConfig("gaussian", dims), dtype, block_rows, 8)
    run = Run(config=config, ckpt_ids=ids, lrs=tuple(lrs), n_train=n, store=store,
              split_rows={"train": n, "q": 3})  # fmt: skip
    dense = sum(lr * queries[c].astype(float) @ feats[c].astype(float).T
                for lr, c in zip(lrs, ids, strict=True))  # fmt: skip
    return run, dense


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 50),
    dims=st.integers(1, 12),
    block_rows=st.integers(1, 16),
    lrs=st.lists(st.floats(0.01, 2), min_size=1, max_size=3),
    dtype=st.sampled_from(["float32", "float16", "float64"]),
    seed=st.integers(0, 1000),
    k=st.integers(1, 50),
    ties=st.booleans(),
)
def test_store_scoring_equals_dense(n, dims, block_rows, lrs, dtype, seed, k, ties):
    if ties:
        lrs = [1.0] * len(lrs)  # integer scores stay exact, so ties stay ties
    run, dense = stored_run(n, dims, block_rows, lrs, dtype, seed, ties)
    tol = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-5}[dtype]
    np.testing.assert_allclose(run.influence("q"), dense, rtol=tol, atol=tol * np.abs(dense).max())
    if k > n:
        with pytest.raises(tracin.ConfigError, match=f"k={k}"):
            run.neighbors("q", k)
        return
    props, opps = run.neighbors("q", k, relevance="tracin")  # the raw score (default: cosine)
    scores = run.influence("q")
    np.testing.assert_array_equal(props.indices, top_k(scores, k).indices)
    np.testing.assert_array_equal(opps.indices, top_k(scores, k, largest=False).indices)
