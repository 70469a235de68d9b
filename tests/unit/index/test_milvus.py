"""The Milvus store on milvus-lite: escaping end to end, the exact fallback, reloading specs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipserve.errors import IndexBackendError, InvalidInputError

pytest.importorskip("pymilvus", reason="pymilvus is not installed")
pytest.importorskip("milvus_lite", reason="milvus-lite is not installed")

from clipserve.index.milvus import MilvusCatalog  # noqa: E402

TRICKY = ['quote"d', "back\\slash", "it's", "new\nline", "tab\tcr\r", "ü日本", "\\\"'", "a or b"]


@pytest.fixture
def catalog(tmp_path: Path) -> Any:
    cat = MilvusCatalog(str(tmp_path / "m.db"))
    yield cat
    cat.close()


def test_tricky_strings_filter_exactly_and_ids_delete_exactly(catalog: Any) -> None:
    store = catalog.create("t", dim=4)
    data = np.random.default_rng(0).standard_normal((len(TRICKY), 4)).astype(np.float32)
    store.add(TRICKY, data, [{"s": s} for s in TRICKY])
    for s in TRICKY:
        hits = store.search(data[0], top_k=len(TRICKY), filter={"s": s})
        assert [h.id for h in hits] == [s]
    both = store.search(data[0], top_k=5, filter={"s": {"$in": TRICKY[:2]}})
    assert sorted(h.id for h in both) == sorted(TRICKY[:2])
    assert store.delete(TRICKY[:3] + ["absent"]) == 3
    assert len(store) == len(TRICKY) - 3
    assert {h.id for h in store.search(data[0], top_k=5)} == set(TRICKY[3:])


def test_l2_scores_are_euclidean(catalog: Any) -> None:
    store = catalog.create("d", dim=2, metric="l2", params={"index_type": "FLAT"})
    store.add(["o", "p"], np.array([[0, 0], [3, 4]], np.float32))
    assert [(h.id, round(h.score, 5)) for h in store.search([0.0, 0.0], top_k=2)] == [
        ("o", 0.0),
        ("p", 5.0),
    ]


def test_fewer_hits_than_matches_fall_back_to_an_exact_scan(catalog: Any) -> None:
    store = catalog.create("f", dim=4)
    data = np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32)
    store.add([str(i) for i in range(50)], data, [{"g": i % 2} for i in range(50)])
    real = store._client.search
    store._client.search = lambda *a, **k: [real(*a, **k)[0][:1]]  # an ANN that misses
    hits = store.search(data[0], top_k=5, filter={"g": 0})
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    want = [str(i) for i in sorted(range(0, 50, 2), key=lambda i: -(unit[i] @ unit[0]))[:5]]
    assert [h.id for h in hits] == want
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_specs_survive_a_new_client_and_foreign_collections_are_ignored(
    tmp_path: Path,
) -> None:
    uri = str(tmp_path / "m.db")
    cat = MilvusCatalog(uri)
    cat.create("keep-me", dim=3, metric="ip", model="siglip", params={"index_type": "IVF_FLAT"})
    cat._client.create_collection("not_ours", dimension=3)
    cat.close()
    cat = MilvusCatalog(uri)
    try:
        assert cat.names() == ["keep-me"]
        spec = cat.get("keep-me").spec
        assert (spec.dim, spec.metric, spec.model, dict(spec.params)) == (
            3,
            "ip",
            "siglip",
            {"index_type": "IVF_FLAT"},
        )
    finally:
        cat.close()


def test_bad_params_and_kinds(catalog: Any) -> None:
    with pytest.raises(InvalidInputError, match="index_type is one of"):
        catalog.create("x", dim=2, params={"index_type": "DISKANN"})
    with pytest.raises(InvalidInputError, match="only holds index 'milvus'"):
        catalog.create("x", dim=2, index="hnsw")


def test_backend_failures_are_index_backend_errors(catalog: Any) -> None:
    store = catalog.create("e", dim=2)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("server went away")

    store._client.query = boom
    with pytest.raises(IndexBackendError, match="Milvus query failed: server went away"):
        len(store)
