"""Vector-index benchmark: build speed, query latency, recall@10 and memory per index kind.

    .venv/bin/python benchmarks/index_bench.py                      # 100k x 512, every kind
    .venv/bin/python benchmarks/index_bench.py --n 20000 --kinds flat,hnsw --data gaussian

For each kind it creates a collection (in a temporary directory), adds ``--n`` vectors in
batches of ``--batch`` (so training, calibration and rebuilds happen as they would in service),
then times ``--queries`` single-query searches (top 10) and measures recall@10 against exact
search (the ``flat`` results). ``--data clustered`` (default) draws unit vectors around 1,000
random centres, a rough stand-in for real embeddings; ``--data gaussian`` is the worst case
for every approximate index. Memory is what the store reports (``info().memory_bytes``) and the
growth of the process' resident set while the collection was built.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipserve.index.base import IndexKind, VectorStore
from clipserve.index.manager import CollectionManager

K = 10


@dataclass(frozen=True, slots=True)
class Row:
    kind: str
    build_s: float
    items_per_s: float
    p50_ms: float
    p99_ms: float
    recall: float
    store_mb: float | None
    rss_mb: float
    note: str


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_data(n: int, dim: int, queries: int, kind: str, seed: int = 0) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        data = rng.standard_normal((n, dim), dtype=np.float32)
        qs = rng.standard_normal((queries, dim), dtype=np.float32)
    else:
        centres = rng.standard_normal((1_000, dim), dtype=np.float32)
        noise = 0.6

        def around(count: int) -> Any:
            picks = rng.integers(0, len(centres), count)
            return centres[picks] + noise * rng.standard_normal((count, dim), dtype=np.float32)

        data, qs = around(n), around(queries)
    return data, qs


def open_store(kind: str, root: Path, dim: int) -> tuple[Any, VectorStore]:
    if kind == "milvus":
        from clipserve.index.milvus import MilvusCatalog

        catalog: Any = MilvusCatalog(str(root / "milvus.db"))
        return catalog, catalog.create("bench", dim=dim)
    manager = CollectionManager(root / "data")
    index: IndexKind = kind  # type: ignore[assignment]
    return manager, manager.create("bench", dim=dim, index=index)


def run_kind(
    kind: str, data: Any, queries: Any, batch: int, truth: list[list[str]] | None
) -> tuple[Row, list[list[str]]]:
    root = Path(tempfile.mkdtemp(prefix=f"index-bench-{kind}-"))
    gc.collect()
    before = rss_mb()
    catalog, store = open_store(kind, root, data.shape[1])
    try:
        start = time.perf_counter()
        for at in range(0, len(data), batch):
            chunk = data[at : at + batch]
            ids = [str(i) for i in range(at, at + len(chunk))]
            store.add(ids, chunk, [{"shard": i % 8} for i in range(at, at + len(chunk))])
        store.save()
        build = time.perf_counter() - start
        grown = rss_mb() - before
        for q in queries[:10]:  # warm-up
            store.search(q, top_k=K)
        latencies, found = [], []
        for q in queries:
            t = time.perf_counter()
            hits = store.search(q, top_k=K)
            latencies.append((time.perf_counter() - t) * 1000)
            found.append([h.id for h in hits])
        info = store.info()
    finally:
        catalog.close()
        shutil.rmtree(root, ignore_errors=True)
    recall = 1.0
    if truth is not None:
        recall = sum(len(set(f) & set(t)) for f, t in zip(found, truth, strict=True)) / (
            K * len(truth)
        )
    p = info.params
    note = ", ".join(
        f"{k}={p[k]}"
        for k in (
            "index_type",
            "nlist",
            "m",
            "nprobe",
            "rerank",
            "ef_search",
            "num_leaves",
            "leaves_to_search",
        )
        if k in p
    )
    row = Row(
        kind,
        build,
        len(data) / build,
        float(np.percentile(latencies, 50)),
        float(np.percentile(latencies, 99)),
        recall,
        None if info.memory_bytes is None else info.memory_bytes / 2**20,
        grown,
        note or ("exact" if kind == "flat" else "untrained"),
    )
    return row, found


def table(rows: list[Row], title: str) -> str:
    head = (
        "| index | build s | items/s | p50 ms | p99 ms | recall@10 | store MB | RSS +MB | params |"
    )
    lines = [title, "", head, "|" + "---|" * 9]
    for r in rows:
        store_mb = "n/a" if r.store_mb is None else f"{r.store_mb:.0f}"
        lines.append(
            f"| {r.kind} | {r.build_s:.1f} | {r.items_per_s:,.0f} | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {r.recall:.3f} | {store_mb} | {r.rss_mb:.0f} | {r.note} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--data", choices=["clustered", "gaussian"], default="clustered")
    parser.add_argument("--kinds", default="flat,ivf-pq,hnsw,scann,milvus")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if "flat" in kinds:
        kinds.remove("flat")
    kinds.insert(0, "flat")  # exact search first: the others' ground truth
    data, queries = make_data(args.n, args.dim, args.queries, args.data)
    rows: list[Row] = []
    truth: list[list[str]] | None = None
    for kind in kinds:
        print(f"... {kind}", flush=True)
        row, found = run_kind(kind, data, queries, args.batch, truth)
        if kind == "flat":
            truth = found
        rows.append(row)
    title = (
        f"{args.n:,} x {args.dim} {args.data} vectors (cosine), {args.queries} single queries, "
        f"top {K}, added in batches of {args.batch:,}"
    )
    print(table(rows, title))


if __name__ == "__main__":
    main()
