"""Real servers for tests, on loopback: a free port, and Debian's ``redis-server``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port nothing listens on right now (for a server about to start, or a URL that must
    find nobody)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisUnavailableError(RuntimeError):
    """``redis-server`` is not installed or did not start (tests skip, saying which)."""


@dataclass
class RedisServer:
    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Stop it now (a test of Redis going away); stopping twice is harmless."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@contextmanager
def redis_server(directory: Path, *, start_timeout_s: float = 10.0) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` on a free loopback port, without persistence, stopped (by its
    process id) on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailableError(
            "redis-server is not installed (Debian package redis-server; .ci/run installs it)"
        )
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(directory)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    server = RedisServer(f"redis://127.0.0.1:{port}/0", process)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RedisUnavailableError(
                    f"redis-server could not start (exit code {process.poll()})"
                )
            time.sleep(0.05)
        yield server
    finally:
        server.stop()


@contextmanager
def clipserve_process(
    config: Path,
    *,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    log_level: str = "warning",
    ready_path: str = "/evaluator/health",
    timeout_s: float = 90.0,
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A real ``clipserve serve`` process on a free loopback port (``HF_HUB_OFFLINE=1``, plus
    ``env``), once ``ready_path`` answers 200; yields its URL and process (its output on a
    pipe: read it after the process ends), killed by its id on exit if still running."""
    port = free_port()
    command = [sys.executable, "-m", "clipserve", "serve", "--config", str(config)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", log_level, *args]
    process = subprocess.Popen(
        command,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: its workers are stopped with it
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if process.poll() is not None:
                output = process.stdout.read() if process.stdout else ""
                raise RuntimeError(f"the server exited early ({process.returncode}):\n{output}")
            try:
                if httpx.get(base + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready within {timeout_s:g} s")
            time.sleep(0.1)  # polling a starting process; no result depends on it
        yield base, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        # Worker processes (--workers N) outlive a killed supervisor: kill its group too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
