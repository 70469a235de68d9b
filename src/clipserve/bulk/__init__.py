"""Bulk embedding (``clipserve embed``): a folder, CSV/JSONL table or webdataset shards in,
clip-retrieval's layout of ``.npy`` shards and Parquet metadata out, resumable.

* :mod:`~clipserve.bulk.records` and :mod:`~clipserve.bulk.sources` /
  :mod:`~clipserve.bulk.webdataset` read the rows in a deterministic order;
* :mod:`~clipserve.bulk.embedders` embeds them in this process or through a service;
* :mod:`~clipserve.bulk.writer` writes shards atomically behind the :class:`Sink` protocol;
* :mod:`~clipserve.bulk.runner` runs the job; :mod:`~clipserve.bulk.report` shows it.
"""

from clipserve.bulk.embedders import Embedder, ItemError, LocalEmbedder, RemoteEmbedder, embed_each
from clipserve.bulk.records import BulkInputError, Record, Source
from clipserve.bulk.report import BulkSummary
from clipserve.bulk.runner import DEFAULT_SHARD_SIZE, BulkJob, BulkRun, embed_chunk, run
from clipserve.bulk.sources import FolderSource, TableSource, open_source
from clipserve.bulk.webdataset import TarSource
from clipserve.bulk.writer import Failure, FileSink, Manifest, Shard, Sink, metadata_table

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "BulkInputError",
    "BulkJob",
    "BulkRun",
    "BulkSummary",
    "Embedder",
    "Failure",
    "FileSink",
    "FolderSource",
    "ItemError",
    "LocalEmbedder",
    "Manifest",
    "Record",
    "RemoteEmbedder",
    "Shard",
    "Sink",
    "Source",
    "TableSource",
    "TarSource",
    "embed_chunk",
    "embed_each",
    "metadata_table",
    "open_source",
    "run",
]
