"""The on-disk format of a local collection, and crash-safe saving.

One collection directory holds::

    manifest.json          name, model, metric, index, dim, params, generation, size
    gen-00000007/          the snapshot the manifest names (immutable once written)
        items.sqlite       table items(slot INTEGER PRIMARY KEY, id TEXT UNIQUE, metadata TEXT)
        vectors.npy        float32 (slots, dim): row = slot (deleted rows are zeros)
        state.json         retired slots, the index's state (training, calibration...)
        <index files>      e.g. ivfpq.faiss, hnsw.faiss, scann.*

A save writes generation N+1 into ``.gen-0000000N+1.tmp/``, fsyncs every file and the folder,
renames it to ``gen-...``, fsyncs the parent, and only then replaces ``manifest.json``
(temp file, fsync, rename, fsync the folder). The manifest's rename is the commit point: a
crash before it leaves the previous generation named and intact, a crash after it leaves the
new one; leftovers (temp folders, unnamed generations) are removed when the collection opens.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clipserve.index.table import TableSnapshot

MANIFEST = "manifest.json"
FORMAT = 1
ITEMS = "items.sqlite"
VECTORS = "vectors.npy"
STATE = "state.json"


def generation_dir(directory: Path, number: int) -> Path:
    return directory / f"gen-{number:08d}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old file or the new, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def write_generation(directory: Path, number: int, write: Callable[[Path], None]) -> Path:
    """Build generation ``number`` with ``write(folder)`` and make it durable under its final
    name (not yet committed: the caller then writes the manifest)."""
    tmp = directory / f".gen-{number:08d}.tmp"
    final = generation_dir(directory, number)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for path in tmp.iterdir():
            fsync_file(path)
        fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)  # an uncommitted leftover of a crashed save
        os.rename(tmp, final)
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_leftovers(directory: Path, keep: int) -> None:
    """Delete every generation but ``keep`` and every temp file or folder."""
    for path in directory.iterdir():
        name = path.name
        stale_gen = name.startswith("gen-") and name != generation_dir(directory, keep).name
        if stale_gen or name.endswith(".tmp"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


# --- the table -------------------------------------------------------------------------------


def write_table(folder: Path, snap: TableSnapshot) -> None:
    with (folder / VECTORS).open("wb") as f:
        np.save(f, snap.vectors, allow_pickle=False)
    con = sqlite3.connect(folder / ITEMS)
    try:
        con.execute("PRAGMA journal_mode=OFF")  # a fresh file, fsynced by write_generation
        con.execute("PRAGMA synchronous=OFF")
        con.execute(
            "CREATE TABLE items (slot INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,"
            " metadata TEXT NOT NULL)"
        )
        con.executemany(
            "INSERT INTO items VALUES (?, ?, ?)",
            (
                (slot, item_id, json.dumps(meta, separators=(",", ":"), ensure_ascii=False))
                for slot, item_id, meta in snap.items
            ),
        )
        con.commit()
    finally:
        con.close()


def read_table(folder: Path, dim: int, retired: list[int]) -> TableSnapshot:
    vectors = np.load(folder / VECTORS, allow_pickle=False)
    if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"{VECTORS} holds {vectors.dtype} {vectors.shape}, not (n, {dim})")
    con = sqlite3.connect(f"file:{folder / ITEMS}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT slot, id, metadata FROM items ORDER BY slot").fetchall()
    finally:
        con.close()
    items = [(int(slot), str(item_id), json.loads(meta)) for slot, item_id, meta in rows]
    if items and items[-1][0] >= len(vectors):
        raise ValueError(f"{ITEMS} names slot {items[-1][0]} beyond {len(vectors)} vectors")
    return TableSnapshot(vectors, items, retired)


def write_files(folder: Path, files: Mapping[str, bytes]) -> None:
    for name, blob in files.items():
        if "/" in name or name.startswith(".") or name in (ITEMS, VECTORS, STATE):
            raise ValueError(f"invalid index file name {name!r}")
        (folder / name).write_bytes(blob)


def read_files(folder: Path) -> dict[str, bytes]:
    """The index's files: everything in the generation but the table and the state."""
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.name not in (ITEMS, VECTORS, STATE)
    }
