"""On-disk format: atomic JSON, generations, leftovers, the SQLite table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipserve.index import snapshot as disk
from clipserve.index.table import TableSnapshot


def test_write_json_atomic_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    disk.write_json_atomic(path, {"a": 1})
    disk.write_json_atomic(path, {"a": 2, "b": [1]})
    assert disk.read_json(path) == {"a": 2, "b": [1]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_a_failed_generation_leaves_nothing_and_keeps_the_previous(tmp_path: Path) -> None:
    first = disk.write_generation(tmp_path, 1, lambda f: (f / "x").write_bytes(b"one"))
    assert first == tmp_path / "gen-00000001"

    def broken(folder: Path) -> None:
        (folder / "x").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        disk.write_generation(tmp_path, 2, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen-00000001"]
    assert (first / "x").read_bytes() == b"one"


def test_remove_leftovers_keeps_only_the_named_generation(tmp_path: Path) -> None:
    for name in ("gen-00000001", "gen-00000002", ".gen-00000003.tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / ".manifest.json.tmp").write_text("{")
    (tmp_path / "manifest.json").write_text("{}")
    disk.remove_leftovers(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen-00000002", "manifest.json"]


def test_table_round_trip_through_sqlite_and_npy(tmp_path: Path) -> None:
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
    items = [(0, "a", {"k": "ü"}), (3, 'q"\n', {"n": [1, None]})]
    disk.write_table(tmp_path, TableSnapshot(vectors, items, [1]))
    back = disk.read_table(tmp_path, 3, [1])
    assert back.items == items
    assert back.retired == [1]
    assert np.array_equal(back.vectors, vectors)
    with pytest.raises(ValueError, match=r"not \(n, 4\)"):
        disk.read_table(tmp_path, 4, [])


def test_index_file_names_are_checked(tmp_path: Path) -> None:
    disk.write_files(tmp_path, {"hnsw.faiss": b"1"})
    assert disk.read_files(tmp_path) == {"hnsw.faiss": b"1"}
    for bad in ("../x", ".hidden", "items.sqlite"):
        with pytest.raises(ValueError, match="invalid index file name"):
            disk.write_files(tmp_path, {bad: b""})
