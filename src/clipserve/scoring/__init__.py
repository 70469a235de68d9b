"""Batch scoring of CSV/JSONL files (``clipserve score``), in this process or through a service.

* :mod:`~clipserve.scoring.rows` reads the input (column aliases, relative paths);
* :mod:`~clipserve.scoring.scorers` scores pairs locally (the engine) or remotely (the HTTP batch
  API) behind one :class:`Scorer` interface;
* :mod:`~clipserve.scoring.output` writes CSV/JSONL; :mod:`~clipserve.scoring.stats` summarises;
* :mod:`~clipserve.scoring.job` runs the whole job; :mod:`~clipserve.scoring.report` draws it.
"""

from clipserve.scoring.job import ScoringJob, choose_models, run, run_job, score_rows
from clipserve.scoring.output import CsvRowWriter, JsonlRowWriter, PreviewWriter, open_writer
from clipserve.scoring.rows import InputRow, InputTable, ScoringInputError
from clipserve.scoring.scorers import LocalScorer, RemoteScorer, Scorer, ServiceUnreachableError
from clipserve.scoring.stats import JobSummary, ScoreStats, pearson, spearman

__all__ = [
    "CsvRowWriter",
    "InputRow",
    "InputTable",
    "JobSummary",
    "JsonlRowWriter",
    "LocalScorer",
    "PreviewWriter",
    "RemoteScorer",
    "ScoreStats",
    "Scorer",
    "ScoringInputError",
    "ScoringJob",
    "ServiceUnreachableError",
    "choose_models",
    "open_writer",
    "pearson",
    "run",
    "run_job",
    "score_rows",
    "spearman",
]
