"""Kill a write at each of its file operations in turn.

    python -m tests.index.crash SPEC.json

runs the write SPEC names once per crash point, each time on a fresh copy of its folder, in a
child process that kills itself (SIGKILL: no cleanup runs) at its N-th file operation, for
N = 1, 2, ... until a run gets through. Every call that changes the file system counts as one
step: opening a file for writing, each write to it, fsync, rename and replace, a hard link,
unlink, rmdir, mkdir, and FAISS writing an index file. A write is torn: the step writes half its bytes, then
dies; so is an index file FAISS writes.

SPEC: {"op": a name in OPS, "before": the folder to copy (absent: none), "trials": the folder
of the copies, "args": the op's}. It writes `<trials>/done.json`, the number of steps a whole
run took. `crash_every_step` runs it and then judges every copy: the tests and
`benchmarks/reliability.py` call it.

The children are forked from this process before it has run any model arithmetic, so no
thread pool is copied half-alive into them.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np

import tests.helpers  # noqa: F401  (registers the stand-in backbone the tiny model uses)
from lightningdot.errors import DataError
from lightningdot.index.folder import IndexFolder
from lightningdot.index.storage import STAGING
from lightningdot.index.vector import VectorIndex

ROOT = Path(__file__).resolve().parents[2]


class Injector:
    """Counts the file operations of this process and, at the `crash_at`-th, kills it
    (`fault="kill"`) or makes the operation fail as a full disk does (`fault="enospc"`: the
    process goes on, its error handling runs)."""

    def __init__(self, crash_at: int, fault: str = "kill") -> None:
        self.crash_at, self.fault, self.steps, self.fired = crash_at, fault, 0, False

    def step(self) -> bool:
        """Count a step; True when it is the one to crash at (the caller then calls `die`)."""
        self.steps += 1
        return self.steps == self.crash_at

    def die(self) -> None:
        self.fired = True
        if self.fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    def install(self) -> None:
        for name in ("replace", "rename", "unlink", "remove", "rmdir", "mkdir", "fsync", "link"):
            setattr(os, name, self._before(getattr(os, name)))
        os.open = self._os_open(os.open)
        builtins.open = io.open = self._open(io.open)
        faiss.write_index = self._write_index(faiss.write_index)

    def _before(self, real):
        def op(*args, **kwargs):
            if self.step():
                self.die()
            return real(*args, **kwargs)

        return op

    def _os_open(self, real):
        def op(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and self.step():
                self.die()
            return real(path, flags, *args, **kwargs)

        return op

    def _open(self, real):
        def op(file, mode="r", *args, **kwargs):
            writing = any(c in mode for c in "wax+")
            if writing and self.step():
                self.die()
            f = real(file, mode, *args, **kwargs)
            return TornFile(f, self) if writing else f

        return op

    def _write_index(self, real):
        def op(index, path, *args):
            crash = self.step()
            real(index, path, *args)
            if crash:
                os.truncate(path, os.path.getsize(path) // 2)
                self.die()

        return op


class TornFile:
    """A file whose crashing write writes half its bytes first."""

    def __init__(self, f, injector: Injector) -> None:
        self._f, self._injector = f, injector

    def write(self, data):
        if self._injector.step():
            self._f.write(data[: len(data) // 2])
            self._f.flush()
            self._injector.die()
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __iter__(self):
        return iter(self._f)


def run_add(folder: Path, images: str, annotations: str | None = None) -> None:
    from lightningdot.index.build import add_images

    add_images(folder, Path(images), Path(annotations) if annotations else None)


def run_upload(folder: Path, files: list[str]) -> None:
    from lightningdot.retrieval import Retriever

    uploads = [(Path(f).name, Path(f).read_bytes()) for f in files]
    Retriever.open(folder, mmap=False).add_uploads(uploads)


def run_build(folder: Path, images: str, annotations: str | None, model: str) -> None:
    from lightningdot.index.build import index_images

    index_images(folder, Path(images), Path(annotations) if annotations else None, model=model)


def run_sync(folder: Path, images: str) -> None:
    from lightningdot.index.sync import sync_images

    sync_images(folder, Path(images))


def run_delete(folder: Path, ids: list[str]) -> None:
    """Delete those of `ids` still in the index (so that running it again finishes it)."""
    index = IndexFolder.load(folder)
    present = [i for i in ids if index.image_index.row(i) is not None]
    if present:
        index.delete(present)


def run_update(folder: Path, image_id: str, fields: dict) -> None:
    IndexFolder.load(folder).update_fields(image_id, fields)


def run_compact(folder: Path) -> None:
    IndexFolder.load(folder).compact()


OPS = {
    "add": run_add,
    "upload": run_upload,
    "build": run_build,
    "delete": run_delete,
    "update": run_update,
    "sync": run_sync,
    "compact": run_compact,
}


def trial(spec: dict, crash_at: int) -> bool:
    """One run, failed at step `crash_at`; True when it got through before that step."""
    folder = Path(spec["trials"]) / f"crash-{crash_at:03d}"
    if spec.get("before"):
        shutil.copytree(spec["before"], folder)
    pid = os.fork()
    if pid == 0:
        _child(spec, folder, crash_at)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return False
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    if code == 0:
        shutil.rmtree(folder)  # the run that got through: the test makes its own reference
        return True
    if code in (FAILED_AS_INJECTED, ABSORBED):
        return False
    raise SystemExit(f"step {crash_at}: the write failed without being made to ({status})")


FAILED_AS_INJECTED, ABSORBED = 3, 4  # exit codes: the write raised the fault; it went on


def _child(spec: dict, folder: Path, crash_at: int) -> None:
    import torch

    torch.set_num_threads(1)
    injector = Injector(crash_at, spec.get("fault", "kill"))
    injector.install()
    try:
        OPS[spec["op"]](folder, **spec["args"])
    except BaseException as e:
        if injector.fired and isinstance(e, OSError):
            os._exit(FAILED_AS_INJECTED)
        print(f"step {crash_at}: {type(e).__name__}: {e}", file=sys.stderr)
        os._exit(1)
    os._exit(ABSORBED if injector.fired else 0)


def state(folder: Path):
    """What a reader of the folder sees (None: no index), after opening it (which tidies)."""
    try:
        index = IndexFolder.load(folder)
    except DataError:
        return None

    def part(ix: VectorIndex | None):
        if ix is None:
            return None
        items = [ix.items[row] for row in ix.live_rows()]  # deleted ones are not seen
        return json.dumps(items, sort_keys=True), ix.index.reconstruct_n(0, len(ix))

    return part(index.image_index), part(index.caption_index), index.manifest.roots


def same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    for x, y in zip(a[:2], b[:2], strict=True):
        if (x is None) != (y is None):
            return False
        if x is not None and (x[0] != y[0] or x[1].shape != y[1].shape):
            return False  # a compaction keeps what is seen and drops rows
        if x is not None and not np.allclose(x[1], y[1], atol=1e-5):
            return False
    return a[2] == b[2]


def files(folder: Path, staged: bool = True) -> list[str]:
    """Everything under the folder but its lock files (a writer makes them, and they stay, empty:
    not leftovers), version folders under one name (a build run again after it got through
    commits the same parts as the next version); without `staged`, not what a sync staged for
    its rerun either (kept on purpose until the sync commits)."""
    if not folder.exists():
        return []
    locks = {".lock", ".add.lock"}  # the second: taken on a folder of the older layout
    paths = (str(p.relative_to(folder)) for p in folder.rglob("*") if p.name not in locks)
    paths = (p for p in paths if staged or p.split("/")[0] != STAGING)
    return sorted(re.sub(r"^v\d+", "v_", p) for p in paths)


def crash_every_step(
    tmp_path: Path, op: str, before: Path | None, fault: str = "kill", **args
) -> dict[str, list]:
    """Run `op` failed (`fault`, see `Injector`) at each step in turn, on copies of the folder
    `before`; then open every copy and run `op` on it again. Returns the crash steps by what
    they left: "old" or "new" (the state before or after the write), "broken" (neither),
    "orphans" (files the opening did not sweep, but a sync's staging), "unfinished" (running
    the write again did not reach the new state, files and all)."""
    tmp_path = tmp_path / fault
    tmp_path.mkdir(parents=True)
    spec = {"op": op, "before": str(before) if before else None, "trials": str(tmp_path / "t")}
    spec["fault"] = fault
    spec["args"] = args
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run = subprocess.run(
        [sys.executable, "-m", "tests.index.crash", str(tmp_path / "spec.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    steps = json.loads((tmp_path / "t" / "done.json").read_text())["steps"]
    old_ref, new_ref = tmp_path / "old", tmp_path / "new"
    if before is not None:
        shutil.copytree(before, old_ref)
        shutil.copytree(before, new_ref)
    OPS[op](new_ref, **args)
    old, new = state(old_ref), state(new_ref)
    if new is None or same(old, new):
        raise RuntimeError(f"{op} changed nothing")
    found: dict[str, list] = {k: [] for k in ("old", "new", "broken", "orphans", "unfinished")}
    for n in range(1, steps + 1):
        trial = tmp_path / "t" / f"crash-{n:03d}"
        seen = state(trial)
        kind = "old" if same(seen, old) else "new" if same(seen, new) else "broken"
        found[kind].append(n)
        ref = old_ref if kind == "old" else new_ref
        if kind != "broken" and seen is not None and files(trial, False) != files(ref, False):
            found["orphans"].append(n)
        OPS[op](trial, **args)  # the write run again
        if not (same(state(trial), new) and files(trial) == files(new_ref)):
            found["unfinished"].append(n)
    return found


def main(spec_file: str) -> None:
    import lightningdot.index.build  # noqa: F401  (imported once here, not in every child)
    import lightningdot.retrieval  # noqa: F401

    spec = json.loads(Path(spec_file).read_text())
    Path(spec["trials"]).mkdir(parents=True, exist_ok=True)
    crash_at = 1
    while not trial(spec, crash_at):
        crash_at += 1
    (Path(spec["trials"]) / "done.json").write_text(json.dumps({"steps": crash_at - 1}))


if __name__ == "__main__":
    main(sys.argv[1])
