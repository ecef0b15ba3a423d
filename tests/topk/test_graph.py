"""Graph forms, duplicate groups, in-degrees and hubs, against brute-force constructions."""

from __future__ import annotations

import numpy as np
import pytest

import allknn
from conftest import clustered_with_duplicates


@pytest.fixture(scope="module")
def result():
    X = clustered_with_duplicates(300, 8, seed=12)
    return allknn.neighbors(X, 6, min_similarity=0.3)  # some rows have fewer than 6 neighbours


def _lists(res):
    return [{int(j): float(s) for j, s in zip(res.indices[i], res.similarities[i], strict=True) if j >= 0}
            for i in range(len(res))]


def _dense(res, kind, weight, combine="max"):
    lists, n = _lists(res), len(res)
    want = np.full((n, res.n_corpus), np.nan)
    for i in range(n):
        for j in range(res.n_corpus):
            ends = [lists[i].get(j)] if kind == "knn" else [lists[i].get(j), lists[j].get(i)]
            values = [v for v in ends if v is not None]
            if (kind == "mutual" and len(values) < 2) or not values:
                continue
            value = max(values) if combine == "max" else float(np.mean(values))
            want[i, j] = {"similarity": value, "distance": max(1 - value, 0.0), "connectivity": 1.0}[weight]
    return want


@pytest.mark.parametrize("kind", ["knn", "mutual", "union"])
@pytest.mark.parametrize("weight", ["similarity", "distance", "connectivity"])
def test_graph_forms_equal_brute_force(result, kind, weight):
    graph = result.graph(kind, weight)
    want = _dense(result, kind, weight)
    stored = np.full(want.shape, np.nan)
    coo = graph.tocoo()
    stored[coo.row, coo.col] = coo.data  # explicit zeros (duplicates' distance) are stored
    np.testing.assert_allclose(stored, want, rtol=0, atol=1e-7)
    assert graph.has_sorted_indices
    if kind != "knn":
        assert (graph != graph.T).nnz == 0


def test_union_mean_of_edited_values(result):
    edited = allknn.topk.result.TopK(result.indices, result.similarities * np.float32(0.5), result.n_corpus,
                                     result.params)
    edited.similarities[: len(result) // 2] = result.similarities[: len(result) // 2]  # ends now differ
    stored = edited.graph("union", combine="mean").toarray()
    want = np.nan_to_num(_dense(edited, "union", "similarity", combine="mean"))
    np.testing.assert_allclose(stored, want, atol=1e-7)


def test_duplicate_groups_are_components_of_close_edges():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 5)).astype(np.float32)
    X[[3, 17, 40]] = X[3]
    X[[8, 9]] = X[8] * np.float32(2)  # a scaled copy is the same direction
    X[50] = X[51] + np.float32(1e-2)
    res = allknn.neighbors(X, 4)
    groups = res.duplicate_groups()
    assert [g.tolist() for g in groups] == [[3, 17, 40], [8, 9]]
    near = res.duplicate_groups(threshold=0.999)
    assert [50, 51] in [g.tolist() for g in near]
    with pytest.raises(ValueError, match=r"threshold must lie in \[-1, 1\]"):
        res.duplicate_groups(threshold=1.5)


def test_in_degree_and_hubs(result):
    degree = result.in_degree()
    want = np.zeros(result.n_corpus, dtype=np.int64)
    for row in result.indices:
        for j in row[row >= 0]:
            want[j] += 1
    np.testing.assert_array_equal(degree, want)
    top = result.hubs(top=5)
    ranked = sorted(range(result.n_corpus), key=lambda j: (-want[j], j))[:5]
    assert top.rows.tolist() == ranked and top.in_degree.tolist() == [want[j] for j in ranked]
    centred = want - want.mean()
    assert top.skew == pytest.approx(np.mean(centred**3) / np.mean(centred**2) ** 1.5)


def test_query_results_have_the_knn_form_only(result):
    X = clustered_with_duplicates(100, 8, seed=2)
    res = allknn.neighbors(X, 3, queries=X[:10] + 0.5)
    assert res.graph().shape == (10, 100)
    with pytest.raises(ValueError, match="kind='mutual' needs a self-join"):
        res.graph("mutual")
    with pytest.raises(ValueError, match="kind must be one of"):
        result.graph("full")


def test_to_networkx_with_ids(result):
    networkx = pytest.importorskip("networkx")
    ids = [f"item{i}" for i in range(result.n_corpus)]
    graph = result.to_networkx("mutual", ids=ids)
    assert isinstance(graph, networkx.Graph) and not graph.is_directed()
    mutual = result.graph("mutual").tocoo()
    assert graph.number_of_edges() == mutual.nnz // 2
    i, j = int(mutual.row[0]), int(mutual.col[0])
    assert graph[ids[i]][ids[j]]["weight"] == pytest.approx(mutual.data[0])
    assert result.to_networkx().is_directed()


def test_cli_writes_the_edge_list(tmp_path, result):
    import pandas as pd

    import allknn.cli

    result.save(tmp_path / "n.npz")
    for kind in ("knn", "mutual"):
        out = tmp_path / f"{kind}.parquet"
        assert allknn.cli.main(["graph", str(tmp_path / "n.npz"), "--kind", kind, "-o", str(out)]) == 0
        edges = pd.read_parquet(out)
        want = result.graph(kind).tocoo()
        once = want.row < want.col if kind == "mutual" else np.ones(want.nnz, bool)
        assert len(edges) == int(once.sum())
        assert set(zip(edges.source, edges.target, strict=True)) == set(zip(want.row[once], want.col[once],
                                                                             strict=True))


def test_cli_edge_lists_carry_the_ids_a_parquet_result_keeps(tmp_path, result):
    pytest.importorskip("pyarrow")
    import pandas as pd

    import allknn.cli

    ids = [f"item-{i}" for i in range(result.n_corpus)]
    result.save(tmp_path / "n.parquet", ids=ids)
    assert allknn.cli.main(["graph", str(tmp_path / "n.parquet"), "-o", str(tmp_path / "e.parquet")]) == 0
    edges = pd.read_parquet(tmp_path / "e.parquet")
    want = result.graph().tocoo()
    assert set(zip(edges.source, edges.target, strict=True)) == {
        (ids[i], ids[j]) for i, j in zip(want.row, want.col, strict=True)}
