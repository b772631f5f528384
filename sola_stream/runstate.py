"""Per-block commit, resume, locking and graceful stop for one output directory.

While a run is unfinished its output directory holds `.sola-run/`:
- `lock`: the pid and host of the process writing the directory (created with O_EXCL).
- `manifest.json`: the run's fingerprint and one entry per finished block (the commit record).
- `states-NNNNN.safetensors`: the calibration states entering block NNNNN (float32), so that a
  resumed run starts there without replaying finished blocks.
Commit order per block: shard (temp name, fsync, rename) -> next states (same) -> manifest
(same; this is the commit point) -> the previous states file is deleted. A crash anywhere leaves
the last committed block's states and manifest intact; see docs/RESUME.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import threading
from pathlib import Path

import psutil
import torch

from . import __version__
from .checkpoint import CheckpointReader, atomic_save_tensors, atomic_write_json, fsync_dir
from .errors import OutputError, SolaError
from .states import states_file

RUN_DIR = ".sola-run"
MANIFEST = "manifest.json"
LOCK = "lock"
EXIT_INTERRUPTED = 75  # sysexits EX_TEMPFAIL: stopped at a safe point, run the same command to resume
_HASH_EDGE = 1 << 20  # bytes hashed at each end of an input file (with its header and size)


class Interrupted(SolaError):
    exit_code = EXIT_INTERRUPTED


def file_fingerprint(path: Path) -> dict:
    """Name, size and a SHA-256 over the safetensors header and the first and last MiB.
    Hashing whole 140 GB checkpoints on every resume would cost minutes; any rewrite of a
    shard changes its header offsets, size or edges."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        h.update(head)
        if len(head) == 8:
            h.update(fh.read(min(int.from_bytes(head, "little"), 100 << 20)))
        fh.seek(0)
        h.update(fh.read(_HASH_EDGE))
        fh.seek(max(0, size - _HASH_EDGE))
        h.update(fh.read(_HASH_EDGE))
    return {"name": path.name, "size": size, "sha256_header_edges": h.hexdigest()}


def fingerprint(reader: CheckpointReader, options: dict, calib_sha256: str) -> dict:
    return {
        "package_version": __version__,
        "input_files": [file_fingerprint(p) for p in reader.files],
        "config_sha256": hashlib.sha256(json.dumps(reader.config_dict, sort_keys=True).encode()).hexdigest(),
        "calibration_sha256": calib_sha256,
        "options": options,
    }


class RunDir:
    """The `.sola-run` state of one output directory; use as a context manager (holds the lock)."""

    def __init__(self, out_dir: Path, fp: dict, overwrite: bool = False):
        self.out_dir, self.fp = out_dir, fp
        self.dir = out_dir / RUN_DIR
        self._check_output(overwrite)
        # a finished output of this same run: nothing to lock or resume
        self.finished = not (self.dir / MANIFEST).is_file() and _finished_output(out_dir)
        if self.finished:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        self.manifest = self._load_or_create_manifest()

    # -- opening -------------------------------------------------------------------------------
    def _check_output(self, overwrite: bool) -> None:
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: exists and is not a directory")
        if not out.is_dir() or not any(out.iterdir()):
            return
        ours = (self.dir / MANIFEST).is_file() or _finished_output(out)
        if not ours:
            raise OutputError(f"{out}: directory holds files that are not a sola-stream run; "
                              "choose a new or empty output directory")
        if overwrite:
            self._refuse_if_locked()
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            return
        if not (self.dir / MANIFEST).is_file():  # finished earlier
            sola = json.loads((out / "config.json").read_text())["sola"]
            if sola.get("fingerprint") != self.fp:
                raise OutputError(f"{out}: holds a finished run with a different model or options; "
                                  "use --overwrite to start over")

    def _refuse_if_locked(self) -> None:
        holder = _lock_holder(self.dir / LOCK)
        if holder and _alive(holder):
            raise OutputError(f"{self.out_dir}: locked by running process pid {holder['pid']} on {holder['host']}")

    def _lock(self) -> None:
        path = self.dir / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(path)
                if holder and _alive(holder):
                    raise OutputError(f"{self.out_dir}: locked by running process pid {holder['pid']} "
                                      f"on {holder['host']} ({path})") from None
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
                fh.flush()
                os.fsync(fh.fileno())
            self._locked = True
            return
        raise OutputError(f"{path}: cannot take the lock")

    def _load_or_create_manifest(self) -> dict:
        path = self.dir / MANIFEST
        if path.is_file():
            manifest = json.loads(path.read_text())
            if manifest.get("fingerprint") != self.fp:
                self.release()
                diff = _first_difference(manifest.get("fingerprint", {}), self.fp)
                raise OutputError(f"{self.out_dir}: holds an unfinished run of a different model or options "
                                  f"({diff}); run the same command to resume, or --overwrite to start over")
            return manifest
        manifest = {"format_version": 1, "fingerprint": self.fp, "blocks": []}
        atomic_write_json(path, manifest)
        return manifest

    # -- progress ------------------------------------------------------------------------------
    @property
    def next_block(self) -> int:
        return len(self.manifest["blocks"])

    def states_path(self, block: int) -> Path:
        return states_file(self.dir, block)

    def commit_block(self, index: int, entry: dict, persist_states) -> None:
        """Called after block `index`'s shard is durable: `persist_states()` makes the next
        block's states durable (None after the last block), then the manifest commits."""
        if persist_states is not None:
            persist_states()
        self.manifest["blocks"].append(entry)
        atomic_write_json(self.dir / MANIFEST, self.manifest)
        self.states_path(index).unlink(missing_ok=True)

    def cleanup_orphans(self) -> None:
        """Temp files and uncommitted states left by a crash (they are rewritten anyway)."""
        for p in self.dir.glob("states-*.safetensors"):
            if p != self.states_path(self.next_block):
                p.unlink()
        for p in [*self.dir.glob(".*.tmp"), *self.out_dir.glob(".*.tmp")]:
            p.unlink()

    def complete(self) -> None:
        """The output is final (config.json written): drop the run state."""
        shutil.rmtree(self.dir)
        fsync_dir(self.out_dir)
        self._locked = False

    def release(self) -> None:
        if getattr(self, "_locked", False):
            (self.dir / LOCK).unlink(missing_ok=True)
            self._locked = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _finished_output(out: Path) -> bool:
    try:
        return "sola" in json.loads((out / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _lock_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: cannot check, assume it runs
    pid = holder.get("pid")
    if not isinstance(pid, int) or not psutil.pid_exists(pid):
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _first_difference(old: dict, new: dict, path: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                return _first_difference(a, b, f"{path}{key}.")
            return f"{path}{key} was {_short(a)}, now {_short(b)}"
    return "fingerprint differs"


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) < 80 else s[:77] + "..."


class GracefulStop:
    """SIGTERM/SIGINT set a flag that the block loop checks at safe points; a second signal
    stops at once (the last committed block still resumes)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
