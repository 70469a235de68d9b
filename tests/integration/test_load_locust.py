"""`make load-test-ci`: the Locust run against the tiny model on loopback, with its thresholds
(error rate, p95, requests/s) deciding the exit code. Locust runs in its own processes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).parents[2] / "load_tests" / "run_ci.py"
# Never imported here: gevent patches the standard library of whatever imports locust.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None,
    reason="locust is not installed (pip install locust)",
)


def test_load_test_ci_holds_its_thresholds() -> None:
    result = subprocess.run(
        [sys.executable, str(RUNNER), "--seconds", "15", "--users", "6"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for threshold in ("error rate", "p95 ms", "requests/s"):
        assert f"threshold {threshold}:" in output
    assert "FAILED" not in output
    for name in ("evaluation single", "evaluation batch", "embeddings mix", "score matrix"):
        assert name in output  # every scenario ran


def test_thresholds_fail_the_run() -> None:
    result = subprocess.run(
        [sys.executable, str(RUNNER), "--seconds", "5", "--users", "2", "--min-rps", "1e9"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    assert "threshold requests/s:" in output
    assert "FAILED" in output
