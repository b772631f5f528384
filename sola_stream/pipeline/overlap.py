"""Work that runs beside the block computation: commits (shard and states writes) and reading
the next block's weights from the memory-mapped shards.

Both use one background thread at a time; an exception in it is raised again in the caller at
the next `wait`/`get`, so a full disk or a corrupt shard stops the run with its own message.
"""
from __future__ import annotations

import threading

import torch

from sola_stream.storage.checkpoint import tensors_digest


class Background:
    """At most one background job; `start` waits for the previous one (commits stay in order)."""

    def __init__(self, name: str):
        self.name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.result = None

    def start(self, fn) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(fn,), name=f"sola-{self.name}")
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # re-raised in the caller's thread by wait()
            self._error = exc

    def wait(self, quiet: bool = False):
        """Join the job; raise its exception (unless `quiet`, used while already unwinding)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        err, self._error = self._error, None
        if err is not None and not quiet:
            raise err
        return self.result


class Prefetch:
    """Block tensors read one block ahead: `get(i, next)` returns block i's tensors with their
    digest (checked again on resume) and starts reading block `next` in the background (pinned
    host memory when the device is a GPU, so the copy to the device can be asynchronous)."""

    def __init__(self, reader, skeleton, device: torch.device):
        self.reader, self.skeleton = reader, skeleton
        self.pin = device.type == "cuda"
        self._job = Background("prefetch")
        self._pending: int | None = None

    def _read(self, i: int) -> tuple[dict[str, torch.Tensor], str]:
        tensors = self.reader.tensors(self.skeleton.family.block_prefix(i))
        digest = tensors_digest(tensors)
        return ({k: v.pin_memory() for k, v in tensors.items()} if self.pin else tensors), digest

    def get(self, i: int, following: int | None) -> tuple[dict[str, torch.Tensor], str]:
        if self._pending == i:
            got = self._job.wait()
        else:
            self._job.wait(quiet=True)
            got = self._read(i)
        self._pending = following
        if following is not None:
            self._job.start(lambda: self._read(following))
        return got
