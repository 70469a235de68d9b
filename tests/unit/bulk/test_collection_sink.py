"""`clipserve embed --collection`: the vectors go into a local collection too, row keys as ids
with their paths and captions as metadata; a resumed run upserts (no duplicates); a model
mismatch and a missing collection are refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.unit.bulk.conftest import CAPTIONS
from tests.unit.bulk.test_runner import run

import clipserve
from clipserve.bulk.records import BulkInputError
from clipserve.config import Settings
from clipserve.index import CollectionManager


def test_a_run_fills_a_collection_and_a_rerun_upserts(
    make_settings: Callable[..., Settings], tiny_registry: dict[str, Any], photo_dir: Path
) -> None:
    settings = make_settings(tiny_registry)
    data = settings.collections.data_dir
    with CollectionManager(data) as manager:
        manager.create("pics", dim=32, model="tiny")
    job = {"source": str(photo_dir), "model": "tiny", "shard_size": 3, "collection": "pics"}
    summary, _ = run(settings, output=photo_dir.parent / "out", **job)
    assert summary.embedded == 4
    run(settings, output=photo_dir.parent / "again", **job)  # the same keys: replaced
    with CollectionManager(data) as manager:
        store = manager.get("pics")
        assert len(store) == 4
        with clipserve.load_model("tiny", settings=settings) as model:
            query = model.embed_images([str(photo_dir / "coffee.jpg")])[0]
        (best, *_) = store.search(query, top_k=2)
    assert best.id == "coffee.jpg"
    assert best.score == pytest.approx(1.0, abs=1e-5)
    assert best.metadata["caption"] == CAPTIONS["coffee"]
    assert best.metadata["image_path"] == str(photo_dir / "coffee.jpg")


def test_the_collection_must_exist_and_hold_the_same_models_vectors(
    make_settings: Callable[..., Settings], tiny_registry: dict[str, Any], photo_dir: Path
) -> None:
    settings = make_settings(tiny_registry)
    with CollectionManager(settings.collections.data_dir) as manager:
        manager.create("other", dim=32, model="tiny-hf")
    with pytest.raises(BulkInputError, match="collection 'nope' does not exist"):
        run(settings, source=str(photo_dir), output=photo_dir.parent / "a", collection="nope")
    with pytest.raises(BulkInputError, match="embeddings of model 'tiny-hf', not 'tiny'"):
        run(
            settings,
            source=str(photo_dir),
            output=photo_dir.parent / "b",
            model="tiny",
            collection="other",
        )
    assert not np.any([p.exists() for p in (photo_dir.parent / "b" / "img_emb").glob("*.npy")])
