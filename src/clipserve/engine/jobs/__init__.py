"""Jobs: long batch work (scoring, embedding) run in chunks, in this process or through Redis."""

from clipserve.engine.jobs.records import ChunkResult, JobKind, JobSpec, JobState, JobStatus
from clipserve.engine.jobs.service import Jobs

__all__ = ["ChunkResult", "JobKind", "JobSpec", "JobState", "JobStatus", "Jobs"]
