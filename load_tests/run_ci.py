"""`make load-test-ci`: a headless Locust run against the tiny random model on loopback.

Builds the tiny open_clip model, starts `clipserve serve` on a free loopback port with it as the
default model (and a throw-away collections folder), runs `locust --headless` for `--seconds`
(20) with the locustfile's thresholds, stops the server by its process group and exits with
Locust's code (0: every threshold held). Locust runs in its own process: gevent patches the
standard library of whatever imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--max-fail-ratio", type=float, default=0.01)
    parser.add_argument("--max-p95-ms", type=float, default=5000.0)
    parser.add_argument("--min-rps", type=float, default=1.0)
    args = parser.parse_args()

    from clipserve.testing.servers import clipserve_process
    from clipserve.testing.tiny import build_tiny_open_clip

    with tempfile.TemporaryDirectory(prefix="clipserve-load-") as scratch:
        root = Path(scratch)
        model = build_tiny_open_clip(root / "tiny")
        config = root / "models.json"
        config.write_text(json.dumps({"models": {"tiny": {"model_name": f"local-dir:{model}"}}}))
        env = {
            "CLIPSERVE_DEFAULT_MODEL": "tiny",
            "CLIPSERVE_COLLECTIONS__DATA_DIR": str(root / "collections"),
        }
        with clipserve_process(config, env=env) as (base, _):
            command = [
                sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"),
                "--host", base, "--headless", "--only-summary",
                "-u", str(args.users), "-r", str(args.users), "-t", f"{args.seconds}s",
                "--stop-timeout", "10",
                "--max-fail-ratio", str(args.max_fail_ratio),
                "--max-p95-ms", str(args.max_p95_ms),
                "--min-rps", str(args.min_rps),
            ]  # fmt: skip
            locust_env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            return subprocess.run(command, env=locust_env, timeout=args.seconds + 120).returncode


if __name__ == "__main__":
    sys.exit(main())
