"""OpenMP defaults for a serving process, applied before torch is imported.

torch's CPU operators run on libgomp teams. Between two parallel regions a worker spins for
``GOMP_SPINCOUNT`` iterations (300,000 by default, with ``OMP_WAIT_POLICY`` unset) before it
sleeps. A benchmark loop never notices; a server does: its event loop, tokenizer and the clients
on the same cores preempt the team's master thread, and the workers then spin on nothing. On 2
cores (ViT-B/32 texts, 32 concurrent single requests, one run against the default, twice) a spin
count of 10,000 served 83-91 texts per server CPU-second against 74 and 6-15% more texts per
second, with single-request latency unchanged (23 ms p50); ``OMP_WAIT_POLICY=PASSIVE`` (no spin)
saved as much CPU but made a single request 45% slower (every region waits for a futex wake-up).

libgomp reads its environment once, when it is loaded (with torch), so :func:`apply_defaults`
must run first: the ``clipserve`` command calls it before importing anything else. A value the
user set (``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``) always wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_COUNT = "10000"


def apply_defaults(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set ``GOMP_SPINCOUNT`` in ``environ`` (default ``os.environ``) unless the user chose a
    spin count or a wait policy; True when it did."""
    env = os.environ if environ is None else environ
    if "GOMP_SPINCOUNT" in env or "OMP_WAIT_POLICY" in env:
        return False
    env["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True
