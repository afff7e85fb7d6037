"""Gallery neighbour lists stored in a search index (issue 20): DBA and k-reciprocal re-ranking with them equal
the path that searches the gallery against itself on every call; a mismatched list is refused."""

import json

import numpy as np
import pytest
from _run_fixtures import fabricate_folder_model_run

from deepmetric.cli import main
from deepmetric.evaluation import retrieve
from deepmetric.evaluation.index import IndexFormatError, SearchIndex, _sha256
from deepmetric.evaluation.rerank import rerank


def _data(n_q=25, n_g=180, d=12, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(15, d))
    g = (centres[rng.integers(0, 15, n_g)] + 0.6 * rng.normal(size=(n_g, d))).astype(np.float32)
    q = (centres[rng.integers(0, 15, n_q)] + 0.6 * rng.normal(size=(n_q, d))).astype(np.float32)
    return q, g


@pytest.mark.parametrize("method,params", [("kreciprocal", {"k1": 8, "k2": 3}), ("kreciprocal", {}),
                                           ("dba", {"n": 3})])
def test_stored_gallery_lists_give_the_rebuilt_ranking(method, params, tmp_path):
    q, g = _data()
    index = SearchIndex.load(SearchIndex.build(g, neighbour_k=24).save(tmp_path / "idx"))
    res = retrieve(q, gallery=g, k=40)
    rebuilt = rerank(res, method, q, g, **params)
    stored = rerank(res, method, q, g, gallery_neighbours=index.gallery_neighbours, **params)
    assert np.array_equal(stored.neighbour_index.numpy(), rebuilt.neighbour_index.numpy())
    assert np.allclose(stored.neighbour_score.numpy(), rebuilt.neighbour_score.numpy(), rtol=0, atol=1e-6)
    assert not np.array_equal(rebuilt.neighbour_index.numpy(), res.neighbour_index.numpy())  # it re-ranked


def test_one_query_k_reciprocal_with_stored_lists_equals_the_batch_result():
    # V is computed only on the rows a query needs: one query alone gets the same list as in a batch of 25
    q, g = _data()
    lists = SearchIndex.build(g, neighbour_k=20).gallery_neighbours
    res = retrieve(q, gallery=g, k=30)
    batch = rerank(res, "kreciprocal", q, g, gallery_neighbours=lists)
    alone = rerank(retrieve(q[3:4], gallery=g, k=30), "kreciprocal", q[3:4], g, gallery_neighbours=lists)
    single = rerank(retrieve(q[3:4], gallery=g, k=30), "kreciprocal", q[3:4], g)
    assert np.array_equal(alone.neighbour_index.numpy(), single.neighbour_index.numpy())
    assert batch.neighbour_index.shape == (25, 30) and alone.neighbour_index.shape == (1, 30)


def test_short_or_foreign_neighbour_lists_are_refused(tmp_path):
    q, g = _data()
    res = retrieve(q, gallery=g, k=30)
    short = SearchIndex.build(g, neighbour_k=5).gallery_neighbours
    with pytest.raises(ValueError, match="hold 5 entries per item but this re-ranking needs 20"):
        rerank(res, "kreciprocal", q, g, gallery_neighbours=short)
    with pytest.raises(ValueError, match="self-retrieval lists of all 180"):
        rerank(res, "dba", q, g, gallery_neighbours=retrieve(q, k=5))
    # lists of other embeddings, with checksums made to match: refused on load, naming the file
    out = SearchIndex.build(g, neighbour_k=10).save(tmp_path / "idx")
    other = SearchIndex.build(g[::-1].copy(), neighbour_k=10)
    np.save(out / "neighbours_index.npy", other.neighbour_index)
    np.save(out / "neighbours_score.npy", other.neighbour_score)
    meta = json.loads((out / "meta.json").read_text())
    meta["files"].update({name: _sha256(out / name) for name in ("neighbours_index.npy", "neighbours_score.npy")})
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match="neighbours_index.npy: the stored neighbour lists do not belong"):
        SearchIndex.load(out)
    meta["neighbours"]["k"] = 12
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match="meta.json says"):
        SearchIndex.load(out)


def test_search_cli_dba_with_stored_lists_equals_rebuild(tmp_path, capsys):
    images = tmp_path / "images"
    run = fabricate_folder_model_run(tmp_path / "run", images)
    answers = []
    for k in ("32", "0"):
        index = tmp_path / f"idx{k}"
        assert main(["index", "--run", str(run), "--images", str(images), "--output", str(index),
                     "--neighbour-k", k]) == 0
        capsys.readouterr()
        assert main(["search", "--index", str(index), "--query", str(images / "class1" / "0.png"), "--top-k", "4",
                     "--rerank", "dba", "--json"]) == 0
        captured = capsys.readouterr()
        answers.append(json.loads(captured.out))
        assert ("stores no gallery neighbour lists" in captured.err) == (k == "0")
    assert answers[0] == answers[1]
