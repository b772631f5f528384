"""An exclusive lock on an output directory, held by the kernel (flock on an open file).

The lock belongs to the open file, not to the file's existence: it ends when the process ends
(kill -9 included), so there is no stale lock to take over and no race between processes that
find one. The file holds the holder's pid and host, for the refusal message only. On local file
systems flock is exact; on NFS, Linux turns it into a whole-file POSIX lock that the server
arbitrates (NFSv4, or v3 with lockd), so two machines sharing the directory exclude each other
too. A file system that cannot lock gives a one-line error instead of an unlocked run.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from sola_stream.errors import OutputError


class DirLock:
    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        self._fd: int | None = None

    def acquire(self) -> "DirLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"{self.path}: cannot create the lock file ({exc.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    raise OutputError(f"{self.what}: locked by {holder(self.path)} ({self.path})") from None
                raise OutputError(f"{self.path}: the file system cannot lock files ({exc.strerror}); "
                                  "use an output directory on a local or NFS file system") from None
            # the file may have been removed (run finished) between open and lock: lock the new one
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the file, then unlock (closing the descriptor releases the lock). Removing it
        while still holding it is safe: a process that opened the old file finds it locked, or,
        once unlocked, no longer at this path (`acquire` checks), and starts again."""
        if self._fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


def holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"running process pid {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another running process"


def is_locked(path: Path) -> bool:
    """Whether a live process holds the lock at `path` (probes without taking it for long)."""
    if not path.is_file():
        return False
    try:
        lock = DirLock(path, str(path)).acquire()
    except OutputError:
        return True
    lock.release()
    return False
