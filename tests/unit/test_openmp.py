"""clipserve.openmp: the serving process's libgomp spin count, set before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clipserve.openmp import SPIN_COUNT, apply_defaults


def test_the_spin_count_is_set_when_the_user_chose_nothing() -> None:
    env: dict[str, str] = {}
    assert apply_defaults(env) is True
    assert env == {"GOMP_SPINCOUNT": SPIN_COUNT}


@pytest.mark.parametrize(
    "chosen", [{"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": ""}]
)
def test_what_the_user_set_wins(chosen: dict[str, str]) -> None:
    env = dict(chosen)
    assert apply_defaults(env) is False
    assert env == chosen


def test_the_command_sets_it_before_torch_is_loaded() -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"}}
    probe = (
        "import sys, os, clipserve.cli; print('torch' in sys.modules, os.environ['GOMP_SPINCOUNT'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["False", SPIN_COUNT]  # libgomp, loaded with torch, reads it
