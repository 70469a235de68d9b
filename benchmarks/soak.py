"""Soak and overload on loopback, bounded in time: does the service refuse honestly under 10x the
load it can sustain, lose nothing, keep its memory stable, and recover?

    .venv/bin/python benchmarks/soak.py [--model tiny] [--phase-s 20] [--overload 10]

It needs ``wrk`` (Debian: ``apt-get install wrk``): a load generator in C, so that the client,
which shares the machine with the server, can really offer ten times what the server sustains
(a Python client cannot on 2 cores). Phases, against one ``clipserve serve`` process (random-weight
model, ``--max-queue-size`` 64, ``--max-concurrent-requests`` 96), each a ``wrk`` run cycling
through distinct single-evaluation requests (image + text):

1. ``measure``  - ``--clients`` connections: the sustainable rate;
2. ``overload`` - ``--overload`` x as many connections (each sends its next request as soon as it
   is answered, so refusals come back and are retried at once: demand stays far above capacity);
3. ``normal``   - ``--clients`` connections again.

For each phase: requests answered, accepted (200), refused (429/503), failed (any other status),
lost (time-outs and broken connections), accepted p50/p99 latency, and the server's RSS at the end
(and its peak during overload). "lost" and "failed" must be 0.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from clipserve.bench import bench_registry, jpeg_uri, sample_pairs, server

SINGLE = "/evaluator/v1/evaluation/single"
IMAGE_SIZE = 128

# Cycles through the request bodies in $SOAK_BODIES (one JSON per line); counts statuses per
# thread and prints them, with wrk's summary, in lines `done()` writes.
_LUA = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  statuses = {}
  requests = {}
  for line in io.lines(os.getenv("SOAK_BODIES")) do
    requests[#requests + 1] = wrk.format("POST", os.getenv("SOAK_PATH"),
      {["Content-Type"] = "application/json"}, line)
  end
  next_request = math.random(#requests)
end
function request()
  next_request = next_request % #requests + 1
  return requests[next_request]
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + n
    end
  end
  for status, n in pairs(total) do io.write(string.format("STATUS %d %d\n", status, n)) end
  local e = summary.errors
  io.write(string.format("SUMMARY %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    e.connect, e.read, e.write, e.timeout, e.status))
end
"""


@dataclass
class Phase:
    name: str
    connections: int
    seconds: float
    statuses: dict[int, int] = field(default_factory=dict)
    answered: int = 0
    duration_s: float = 0.0
    lost: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    rss_mb: float = 0.0

    @property
    def accepted(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def refused(self) -> int:
        return self.statuses.get(429, 0) + self.statuses.get(503, 0)

    @property
    def failed(self) -> int:
        return sum(self.statuses.values()) - self.accepted - self.refused

    def row(self) -> str:
        rate = self.answered / self.duration_s if self.duration_s else 0.0
        return (
            f"{self.name:<9} {self.connections:>5} {rate:>9.1f} {self.answered:>7} "
            f"{self.accepted:>8} {self.refused:>8} {self.failed:>6} {self.lost:>5} "
            f"{self.accepted / self.duration_s if self.duration_s else 0:>8.1f} "
            f"{self.p50_ms:>7.0f} {self.p99_ms:>7.0f} {self.rss_mb:>8.1f}"
        )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _latency_ms(text: str, percentile: str) -> float:
    match = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\b", text, re.MULTILINE)
    if match is None:
        return 0.0
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def run_wrk(url: str, script: Path, bodies: Path, phase: Phase) -> Phase:
    result = subprocess.run(
        [
            "wrk",
            f"-t{min(2, phase.connections)}",
            f"-c{phase.connections}",
            f"-d{phase.seconds:g}s",
            "--timeout",
            "30s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        env={"SOAK_BODIES": str(bodies), "SOAK_PATH": SINGLE, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    for line in result.stdout.splitlines():
        parts = line.split()
        if parts[:1] == ["STATUS"]:
            phase.statuses[int(parts[1])] = int(parts[2])
        elif parts[:1] == ["SUMMARY"]:
            requests, duration_us, connect, read, write, timeout, _status = map(int, parts[1:])
            phase.answered = requests - timeout
            phase.duration_s = duration_us / 1e6
            phase.lost = connect + read + write + timeout
    phase.p50_ms = _latency_ms(result.stdout, "50")  # of every answer, refusals included
    phase.p99_ms = _latency_ms(result.stdout, "99")
    return phase


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "vit-b-32"])
    parser.add_argument("--phase-s", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--overload", type=int, default=10, help="overload factor")
    parser.add_argument("--clients", type=int, default=16, help="connections at normal load")
    parser.add_argument("--max-queue-size", type=int, default=64)
    parser.add_argument(
        "--max-concurrent-requests", type=int, default=96, help="0: no limit (refuse after parsing)"
    )
    parser.add_argument("--pairs", type=int, default=64, help="distinct requests, cycled")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("benchmarks/soak.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="clipserve-soak-") as tmp:
        workdir = Path(tmp)
        config = workdir / "models.json"
        config.write_text(json.dumps(bench_registry([args.model], workdir)))
        bodies = workdir / "bodies.jsonl"
        bodies.write_text(
            "".join(
                json.dumps(
                    {
                        "image_input": jpeg_uri(img),
                        "text_prompt": text,
                        "model_config_name": args.model,
                    }
                )
                + "\n"
                for img, text in sample_pairs(args.pairs, size=IMAGE_SIZE)
            )
        )
        script = workdir / "soak.lua"
        script.write_text(_LUA)
        extra = ["--max-queue-size", str(args.max_queue_size)]
        if args.max_concurrent_requests:
            extra += ["--max-concurrent-requests", str(args.max_concurrent_requests)]
        with server(config, args.model, max_batch_size=32, device="cpu", extra=extra) as running:
            start_rss = rss_mb(running.pid)
            phases = [
                Phase("measure", args.clients, args.phase_s),
                Phase("overload", args.clients * args.overload, args.phase_s),
                Phase("normal", args.clients, args.phase_s),
            ]
            peak = [0.0]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.25):
                    peak[0] = max(peak[0], rss_mb(running.pid))

            for phase in phases:
                sampler = threading.Thread(target=sample, daemon=True)
                stop.clear()
                sampler.start()
                run_wrk(running.url, script, bodies, phase)
                stop.set()
                sampler.join()
                time.sleep(1.0)  # let the queue drain before reading memory
                phase.rss_mb = rss_mb(running.pid)
            health = httpx.get(running.url + "/health", timeout=10).json()

    print(
        f"model {args.model}, {args.phase_s:g} s per phase, max_queue_size {args.max_queue_size}, "
        f"max_concurrent_requests {args.max_concurrent_requests or 'none'}, "
        f"{args.pairs} distinct {IMAGE_SIZE}px pairs"
    )
    print(
        f"{'phase':<9} {'conns':>5} {'answers/s':>9} {'answers':>7} {'accepted':>8} "
        f"{'refused':>8} {'failed':>6} {'lost':>5} {'ok/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'RSS MiB':>8}"
    )
    for phase in phases:
        print(phase.row())
    print(f"server RSS: {start_rss:.1f} MiB at start, peak {peak[0]:.1f} MiB")
    print(
        f"after: status {health['status']}, queue {health['queue_size']}, "
        f"in flight {health['inflight_batches']}"
    )
    bad = sum(p.lost + p.failed for p in phases)
    print("nothing lost or failed" if bad == 0 else f"{bad} requests lost or failed")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
