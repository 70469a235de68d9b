"""A local collection survives its process being SIGKILLed in the middle of a save.

A real child process builds a collection and saves it after every step; the parent kills it
with SIGKILL at a chosen point of a save (the child announces the point on its stdout and then
blocks, so the kill lands exactly there; no sleeps), then loads the directory and must find the
last *complete* save, intact and searchable, and no leftovers. A last case kills a free-running
loop of large saves as soon as a save has started, wherever that save then is.
"""

from __future__ import annotations

import selectors
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clipserve.index.manager import CollectionManager

WAIT = 180.0  # bound on waiting for the child; never reached when the test passes

CHILD = r"""
import sys
from pathlib import Path

import numpy as np

from clipserve.index import snapshot
from clipserve.index.manager import CollectionManager

root, kind, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
n, dim, steps = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def block(where):
    say("blocked " + where)
    sys.stdin.read()  # the parent never writes: wait here to be killed


calls = {"table": 0}
real_table, real_json = snapshot.write_table, snapshot.write_json_atomic


def table_then_block(folder, snap):  # the 2nd save dies with vectors.npy half written
    calls["table"] += 1
    if calls["table"] < 2:
        return real_table(folder, snap)
    with (folder / snapshot.VECTORS).open("wb") as f:
        f.write(b"\x93NUMPY" + bytes(1 << 16))
        f.flush()
    block("mid-vectors")


def json_then_block(path, data):  # the 2nd save dies at its commit point
    if path.name == "manifest.json" and data.get("generation") == 2:
        if mode == "torn-manifest":
            path.with_name(".manifest.json.tmp").write_text('{"format": 1, "gener')
        block(mode)
    return real_json(path, data)


if mode == "mid-vectors":
    snapshot.write_table = table_then_block
elif mode in ("before-commit", "torn-manifest"):
    snapshot.write_json_atomic = json_then_block

manager = CollectionManager(root)
store = manager.create("big", dim=dim, index=kind)
for step in range(1, steps + 1):
    data = np.random.default_rng(step).standard_normal((n, dim)).astype(np.float32)
    store.add([f"s{step}-{i}" for i in range(n)], data, [{"step": step}] * n)
    if step > 1:
        store.delete([f"s{step - 1}-{i}" for i in range(10)])
    say(f"saving {step}")
    store.save()
    say(f"saved {step}")
block("done")
"""


@pytest.fixture
def child(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:  # a failed assertion must not leave a child behind
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)


def start(
    started: list[subprocess.Popen[str]],
    root: Path,
    kind: str,
    mode: str,
    n: int,
    dim: int,
    steps: int,
) -> subprocess.Popen[str]:
    script = root.parent / "child.py"
    script.write_text(CHILD)
    err = (root.parent / "child.err").open("w")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root), kind, mode, str(n), str(dim), str(steps)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
    )
    started.append(proc)
    return proc


def read_until(proc: subprocess.Popen[str], stop: str, err: Path) -> list[str]:
    """Lines of the child's stdout up to and including one that starts with ``stop``."""
    assert proc.stdout is not None
    lines: list[str] = []
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            assert sel.select(WAIT), f"child silent for {WAIT} s; stderr: {err.read_text()[-2000:]}"
            line = proc.stdout.readline()
            assert line, f"child exited early; stderr: {err.read_text()[-2000:]}"
            lines.append(line.strip())
            if line.startswith(stop):
                return lines


def kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()  # SIGKILL: no handler, no clean-up, no flush
    assert proc.wait(WAIT) == -9


def check_state(root: Path, n: int, dim: int, step: int) -> None:
    """The collection holds exactly the state after ``step`` and keeps working."""
    with CollectionManager(root) as manager:
        store = manager.get("big")
        assert len(store) == n * step - 10 * (step - 1)
        data = np.random.default_rng(step).standard_normal((n, dim)).astype(np.float32)
        hit = store.search(data[17], top_k=1)[0]
        assert (hit.id, hit.metadata) == (f"s{step}-17", {"step": step})
        assert hit.score == pytest.approx(1.0, abs=1e-4)
        if step > 1:
            old = np.random.default_rng(step - 1).standard_normal((n, dim)).astype(np.float32)
            assert store.search(old[3], top_k=1)[0].id != f"s{step - 1}-3", "deleted stays deleted"
        folder = root / "big"
        assert sorted(p.name for p in folder.iterdir()) == [f"gen-{step:08d}", "manifest.json"]
        store.add(["after"], data[:1] + 1)
        store.save()  # the next save after a crash works
    with CollectionManager(root) as manager:
        assert len(manager.get("big")) == n * step - 10 * (step - 1) + 1


@pytest.mark.parametrize("mode", ["mid-vectors", "before-commit", "torn-manifest"])
def test_a_kill_inside_a_save_keeps_the_last_complete_save(
    tmp_path: Path, child: list[subprocess.Popen[str]], mode: str
) -> None:
    root, n, dim = tmp_path / "data", 2_000, 32
    proc = start(child, root, "hnsw", mode, n, dim, steps=3)
    lines = read_until(proc, "blocked", tmp_path / "child.err")
    assert lines == ["saving 1", "saved 1", "saving 2", f"blocked {mode}"]
    kill(proc)
    check_state(root, n, dim, step=1)


@pytest.mark.slow
def test_a_kill_at_any_point_of_large_saves_keeps_a_complete_state(
    tmp_path: Path, child: list[subprocess.Popen[str]]
) -> None:
    root, n, dim = tmp_path / "data", 40_000, 128
    proc = start(child, root, "flat", "free-running", n, dim, steps=4)
    lines = read_until(proc, "saving 3", tmp_path / "child.err")
    kill(proc)  # at once: the 3rd save (about 60 MB of vectors) is in progress or just done
    assert lines[-1] == "saving 3"
    with CollectionManager(root) as manager:
        size = len(manager.get("big"))
    done = {n * s - 10 * (s - 1): s for s in (2, 3)}
    assert size in done, f"{size} items is neither the 2nd nor the 3rd save"
    print("killed during save 3; loaded the state of save", done[size])
    check_state(root, n, dim, step=done[size])
