"""The task contract of tiled engines: any split, order or repetition of a
plan's tasks, each part into its own state and the states merged, gives
the engine's own result (what checkpoints, Dask tasks and GPU batches rely
on). Within one state every candidate is offered once (a task is not run
twice into the same state: a retried task starts a fresh partial state)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse

from allknn.engines import ENGINES, Job, check_options
from allknn.engines.tasks import TiledEngine
from allknn.kernels.topk import EMPTY_KEY, merge_states, new_state, thresholds_of
from allknn.rows import normalize_rows
from conftest import clustered_with_duplicates

TILED = sorted(name for name, engine in ENGINES.items() if isinstance(engine, TiledEngine))


def test_the_exact_engine_is_tiled():
    assert "exact" in TILED


def _job(X, k, *, queries=None):
    corpus = normalize_rows(X, name="X", block_rows=64, invalid="raise")
    query_rows = corpus if queries is None else normalize_rows(queries, name="queries", block_rows=64,
                                                               invalid="raise")
    return Job(queries=query_rows, corpus=corpus, k=k, self_join=queries is None, exclude_self=True,
               threads=1, budget=2**28, block_rows=64, options=check_options({}))


def _sorted(keys):
    return np.sort(keys, axis=1)


def _inputs():
    dense = clustered_with_duplicates(520, 12, seed=5)
    sparse = scipy.sparse.random(450, 300, density=0.03, random_state=5, format="csr", dtype=np.float32)
    sparse = sparse + scipy.sparse.csr_matrix((np.ones(450, np.float32), (np.arange(450), np.zeros(450))),
                                              shape=(450, 300))  # no empty row
    return {"dense": (dense, None), "dense-query": (dense, dense[::3] + 0.25),
            "sparse": (scipy.sparse.csr_matrix(sparse), None)}


@pytest.mark.parametrize("name", TILED)
@pytest.mark.parametrize("case", sorted(_inputs()))
def test_split_shuffled_and_repeated_tasks_merge_to_the_search(name, case):
    X, Q = _inputs()[case]
    engine, k = ENGINES[name], 6
    refusal = engine.refusal(_job(X, k, queries=Q))
    if refusal is not None:
        pytest.skip(f"{name} {refusal}")
    whole = engine.search(_job(X, k, queries=Q)).keys
    job = _job(X, k, queries=Q)
    rng = np.random.default_rng(1)
    with engine.plan(job, None) as plan:
        assert len(plan.tasks) > 3
        parts = [*np.array_split(rng.permutation(len(plan.tasks)), 3), rng.choice(len(plan.tasks), 3)]
        states = []
        for part in parts:  # the last part repeats three tasks
            keys, thresholds = new_state(plan.n_queries, k)
            plan.run(keys, thresholds, threads=2, tasks=[plan.tasks[i] for i in part])
            states.append(keys)
        left = merge_states(merge_states(merge_states(states[0], states[1]), states[2]), states[3])
        right = merge_states(states[3], merge_states(states[0], merge_states(states[2], states[1])))
        assert np.array_equal(left, right)
        assert np.array_equal(merge_states(left, left), left)
        keys, thresholds = left.copy(), thresholds_of(left)
        plan.complete(keys, thresholds, threads=1)
    assert np.array_equal(_sorted(keys), _sorted(whole))


def test_merge_states_keeps_the_best_distinct_keys():
    a = np.array([[1, 5, 9], [EMPTY_KEY, EMPTY_KEY, 4]], dtype=np.int64)
    b = np.array([[9, 7, 2], [EMPTY_KEY, 4, 3]], dtype=np.int64)
    merged = merge_states(a, b)
    assert merged.tolist() == [[5, 7, 9], [EMPTY_KEY, 3, 4]]
    assert np.array_equal(thresholds_of(merged), thresholds_of(np.sort(merged, axis=1)))


@pytest.mark.parametrize("seed", range(3))
def test_merge_states_takes_the_largest_distinct_keys_of_each_row(seed):
    """Random states with repeated keys (a task run twice), empty slots and
    rows with fewer than k keys: each merged row is the k largest distinct
    keys of both, ascending, led by empty slots."""
    rng = np.random.default_rng(seed)
    n, k = 200, 7
    pool = rng.integers(-(2**62), 2**62, size=12)  # few values: many repeats across the two states
    a, b = rng.choice(pool, size=(n, k)), rng.choice(pool, size=(n, k))
    a[rng.random((n, k)) < 0.3] = EMPTY_KEY
    b[:20] = EMPTY_KEY
    merged = merge_states(a, b)
    for row in range(n):
        distinct = sorted(set(a[row].tolist()) | set(b[row].tolist()) - {EMPTY_KEY})[-k:]
        assert merged[row].tolist() == [EMPTY_KEY] * (k - len(distinct)) + distinct


def test_renumber_gives_the_ids_and_drops_the_placeholders():
    """Each kept key gets ``ids[local]`` with its similarity unchanged; a
    placeholder or an empty slot becomes an empty slot."""
    from allknn.kernels.topk import floored_state, key_ids, key_similarities, renumber

    rng = np.random.default_rng(4)
    n, k = 50, 6
    similarities = rng.choice(np.linspace(-1, 1, 7, dtype=np.float32), size=(n, k))
    local = rng.integers(0, 30, size=(n, k))
    keys = floored_state(similarities.ravel(), 1)[0].reshape(n, k) - local - 1 + np.int64(2**32)
    placeholders = rng.random((n, k)) < 0.25
    keys[placeholders] = floored_state(similarities[placeholders], 1)[0][:, 0]
    keys[:5] = EMPTY_KEY
    ids = np.sort(rng.choice(10**6, size=30, replace=False)).astype(np.int64)
    before = keys.copy()
    out = renumber(keys, ids)
    assert out is keys
    gone = placeholders | (np.arange(n) < 5)[:, None]
    assert (keys[gone] == EMPTY_KEY).all()
    assert np.array_equal(key_ids(keys[~gone]), ids[key_ids(before[~gone])])
    assert np.array_equal(key_similarities(keys[~gone]), key_similarities(before[~gone]))


def test_block_pairs_with_floors_merge_to_the_self_join():
    """The Dask engine's tasks: two blocks' own joins and their pair (both
    sides offered), with or without the own joins' thresholds as floors,
    merge to the self-join of both blocks; the floors keep fewer keys."""
    from allknn.engines.exact.plans import PairPlan, SelfJoinPlan
    from allknn.kernels.topk import floored_state, renumber

    X = clustered_with_duplicates(700, 10, seed=8)
    k, cut = 5, 300
    whole = ENGINES["exact"].search(_job(X, k)).keys
    rows = normalize_rows(X, name="X", block_rows=64, invalid="raise")
    own, floors = [], []
    for a, b in ((0, cut), (cut, 700)):
        keys, thresholds = new_state(b - a, k)
        SelfJoinPlan(rows.rows[a:b], rows.norms[a:b], block_rows=64).run(keys, thresholds, threads=1)
        keys[keys != EMPTY_KEY] -= a  # local id j is row a + j: the key's low half is 2**32 - 1 - id
        own.append(keys)
        floors.append(thresholds)
    kept = {}
    for floored in (False, True):
        keys, thresholds = floored_state(np.concatenate(floors), k) if floored else new_state(700, k)
        PairPlan(rows.rows[:cut], rows.rows[cut:], rows.norms[:cut], rows.norms[cut:], block_rows=64).run(
            keys, thresholds, threads=2)
        renumber(keys, np.arange(700, dtype=np.int64))  # the placeholders left go
        assert np.array_equal(_sorted(merge_states(np.concatenate(own), keys)), _sorted(whole))
        kept[floored] = int((keys != EMPTY_KEY).sum())
    assert kept[True] < kept[False]


@pytest.mark.parametrize("seed", range(4))
def test_merging_a_locally_numbered_floored_state_is_merge_states(seed):
    """:func:`merge_found` (the cluster's probing, one pass) equals the
    placeholders removed, the local ids replaced (:func:`renumber`) and :func:`merge_states`."""
    from allknn.kernels.topk import floored_state, key_similarities, merge_found, renumber

    rng = np.random.default_rng(seed)
    k, n = 5, 40
    values = rng.choice(np.linspace(-1, 1, 9, dtype=np.float32), size=(n, 30))  # ties and repeats

    def state_of(similarities, ids):
        keys = new_state(len(similarities), k)[0]
        for row, (values_row, ids_row) in enumerate(zip(similarities, ids, strict=True)):
            order = np.lexsort((ids_row, -values_row))[:k]
            bits = floored_state(values_row[order], 1)[0][:, 0]  # keys of these similarities, id EMPTY_ID
            keys[row, : order.size] = bits - np.int64(ids_row[order] + 1) + np.int64(2**32)
        return np.sort(keys, axis=1)

    ids = np.sort(rng.choice(1000, size=30, replace=False))
    keys = state_of(values[:, :12], np.tile(ids[:12], (n, 1)))
    keys[::7] = EMPTY_KEY  # rows with nothing yet
    rows = np.sort(rng.choice(n, size=25, replace=False))
    floors = key_similarities(keys[rows, 0])
    found, _ = floored_state(floors, k)  # placeholders at the floors, as the probing's tiles start
    local = state_of(values[rows, 8:], np.tile(np.arange(22), (rows.size, 1)))  # overlaps the kept ids
    local = local[:, ::-1].copy()  # any order
    enters = local > found[:, :1]
    found[:, : enters.shape[1]] = np.where(enters, local, found[:, : enters.shape[1]])
    before, want = keys.copy(), keys.copy()
    want[rows] = merge_states(keys[rows], renumber(found.copy(), ids[8:].astype(np.int64)))
    merge_found(keys, rows, found, ids[8:].astype(np.int64))
    assert np.array_equal(keys, want)
    assert (np.diff(keys, axis=1) >= 0).all()  # sorted: column 0 is each row's worst
    changed = (keys != before).any(axis=1)
    assert changed[rows].sum() > 10 and not changed[np.setdiff1d(np.arange(n), rows)].any()
    assert len(np.unique(key_similarities(keys[keys != EMPTY_KEY]))) > 3
