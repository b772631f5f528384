"""The calibration hidden states entering the current block: the cache and its checkpoint files.

The cache lives in one of two places, chosen from the host-memory budget (plan.py):
- RAM: one float32 tensor, overwritten in place by each block's outputs. After each block it is
  written to `states-NNNNN.safetensors` (the resume checkpoint) straight from its memory, without
  a serialized copy.
- disk (spill): the checkpoint files are the cache. Block i reads states-i through a memory map
  and writes its outputs into a new file that becomes states-(i+1) once fsynced and renamed.
  Mapped pages are dropped after every chunk, so host memory holds about one chunk, whatever the
  size of the cache.
Both use one format: a safetensors file holding one float32 tensor `states` (windows x seqlen x
hidden) whose data starts on a page boundary, so either mode resumes a run of the other.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

import torch

from sola_stream import faults
from sola_stream.storage.atomic import FILE_MODE, atomic_write, file_sha256, fsync_dir, temp_name, write_error
from sola_stream.errors import OutputError

PAGE = mmap.PAGESIZE
TENSOR = "states"


STREAMS = ("states", "original")  # the states the compressed model produces; the original model's


def states_file(run_dir: Path, block: int, stream: str = "states", rank: int = 0, world: int = 1) -> Path:
    """The committed calibration states entering `block`: those the compressed blocks produce
    (`states`), or, for the error-compensating fit, those the original blocks produce (`original`).
    In a run of several processes each holds its share of the windows in its own file."""
    return run_dir / (f"{stream}-{block:05d}.safetensors" if world == 1 else
                      f"{stream}-{block:05d}-rank{rank}of{world}.safetensors")


def _header(shape: tuple[int, ...]) -> bytes:
    """safetensors header (length prefix + JSON padded with spaces) ending on a page boundary."""
    nbytes = 4
    for d in shape:
        nbytes *= d
    meta = {TENSOR: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, nbytes]},
            "__metadata__": {"format": "pt"}}
    body = json.dumps(meta, separators=(",", ":")).encode()
    size = -(-(8 + len(body)) // PAGE) * PAGE - 8
    return size.to_bytes(8, "little") + body.ljust(size, b" ")


def _data_offset_and_shape(path: Path) -> tuple[int, tuple[int, ...]]:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        meta = json.loads(fh.read(n))
    info = meta.get(TENSOR)
    if not info or info.get("dtype") != "F32":
        raise OutputError(f"{path}: not a sola-stream states file; use --overwrite to start over")
    return 8 + n, tuple(info["shape"])


def save_states(path: Path, states: torch.Tensor) -> str:
    """Atomic write of a RAM cache (temp name, fsync, rename) from the tensor's own memory;
    returns the file's SHA-256, computed from the bytes as they are written."""
    h = hashlib.sha256()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            for part in (_header(tuple(states.shape)), memoryview(states.contiguous().numpy()).cast("B")):
                h.update(part)
                fh.write(part)

    atomic_write(path, write, fault="tensors_written")
    return h.hexdigest()


def load_states(path: Path) -> torch.Tensor:
    """A states file read into RAM (float32 tensor)."""
    offset, shape = _data_offset_and_shape(path)
    out = torch.empty(shape, dtype=torch.float32)
    with open(path, "rb") as fh:
        fh.seek(offset)
        view = memoryview(out.numpy()).cast("B")
        if fh.readinto(view) != len(view):
            raise OutputError(f"{path}: truncated states file; use --overwrite to start over")
    return out


class MappedStates:
    """A states file mapped into memory; `release` drops the pages of finished windows.

    With `shape`, a new file under a temp name that `persist` renames to `final` (errors name
    the final file); `close` deletes it if it was never persisted (an error path)."""

    def __init__(self, path: Path, shape: tuple[int, ...] | None = None, final: Path | None = None):
        self.path, self.final = path, final
        if shape is not None:  # a new file of this shape, its blocks allocated now: a full disk is
            header = _header(shape)  # an error here, not a SIGBUS when a mapped page is first written
            try:
                with open(path, "wb") as fh:
                    fh.write(header)
                    os.posix_fallocate(fh.fileno(), 0, len(header) + 4 * _numel(shape))
            except OSError as exc:
                path.unlink(missing_ok=True)
                raise write_error(final or path, exc) from None
            offset = len(header)
        else:
            offset, shape = _data_offset_and_shape(path)
        self.offset, self.shape = offset, shape
        self._fh = open(path, "r+b")
        size = offset + 4 * _numel(shape)
        if os.fstat(self._fh.fileno()).st_size < size:
            raise OutputError(f"{path}: truncated states file; use --overwrite to start over")
        self._mm = mmap.mmap(self._fh.fileno(), size)
        self.tensor = torch.frombuffer(self._mm, dtype=torch.float32, count=_numel(shape),
                                       offset=offset).view(shape)
        self._window_bytes = 4 * _numel(shape[1:])
        self._released = offset - offset % PAGE

    def release(self, upto_window: int) -> None:
        """Drop mapped pages before window `upto_window` (data stays in the file/page cache)."""
        end = self.offset + upto_window * self._window_bytes
        end -= end % PAGE
        if end > self._released:
            self._mm.madvise(mmap.MADV_DONTNEED, self._released, end - self._released)
            self._released = end

    def rewind(self) -> None:
        self._released = self.offset - self.offset % PAGE

    def persist(self, path: Path) -> str:
        """fsync this (temp) file, rename it to `path`; returns its SHA-256."""
        try:
            self._mm.flush()
            faults.hit("tensors_written")
            os.fchmod(self._fh.fileno(), FILE_MODE)
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise write_error(path, exc) from None
        os.replace(self.path, path)
        fsync_dir(path.parent)
        self.path, self.final = path, None
        return file_sha256(path)

    def close(self) -> None:
        if self._mm is not None:
            del self.tensor
            self._mm.close()
            self._fh.close()
            self._mm = None
        if self.final is not None:  # never persisted: a temp file as large as the cache
            self.path.unlink(missing_ok=True)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class StateCache:
    """Inputs of the current block (`source`) and where its outputs go (`target`).

    RAM: source and target are the same tensor (outputs overwrite inputs chunk by chunk).
    Disk: source is the committed states file of this block, target a new temp file.
    """

    def __init__(self, run_dir: Path, on_disk: bool, stream: str = "states", rank: int = 0, world: int = 1):
        self.dir, self.on_disk, self.stream, self.rank, self.world = run_dir, on_disk, stream, rank, world
        self._ram: torch.Tensor | None = None
        self._src: MappedStates | None = None
        self._dst: MappedStates | None = None

    def path(self, block: int) -> Path:
        return states_file(self.dir, block, self.stream, self.rank, self.world)

    # -- the states of a block ------------------------------------------------------------------
    def create(self, block: int, shape: tuple[int, ...]) -> torch.Tensor:
        """An empty target for block `block`'s inputs (filled by the caller, then `persist`)."""
        if not self.on_disk:
            self._ram = torch.empty(shape, dtype=torch.float32)
            return self._ram
        self._dst = MappedStates(temp_name(self.path(block)), shape, final=self.path(block))
        return self._dst.tensor

    def open(self, block: int) -> None:
        """Resume: the committed states of `block` become the source."""
        if self.on_disk:
            self._src = MappedStates(self.path(block))
        else:
            self._ram = load_states(self.path(block))

    @property
    def source(self) -> torch.Tensor:
        return self._ram if not self.on_disk else self._src.tensor

    def begin_block(self, block: int) -> torch.Tensor:
        """The target for this block's outputs (the next block's inputs)."""
        if not self.on_disk:
            return self._ram
        if self._dst is None:
            self._dst = MappedStates(temp_name(self.path(block + 1)), self._src.shape, final=self.path(block + 1))
        self.begin_pass()
        return self._dst.tensor

    def begin_pass(self) -> None:
        """Before each pass over the windows: page release starts again from the first window."""
        for m in (self._src, self._dst):
            if m is not None:
                m.rewind()

    def release(self, upto_window: int) -> None:
        for m in (self._src, self._dst):
            if m is not None:
                m.release(upto_window)

    def take_target(self, block: int):
        """The outputs of this block become the next block's source; returns the function that
        makes them durable as states-`block` and returns their SHA-256 (run by the commit, possibly in the background:
        in RAM mode it only reads the tensor, which must not be written until it returns). The
        previous commit must have finished: it may still be writing the source being replaced."""
        if not self.on_disk:
            ram = self._ram
            return lambda: save_states(self.path(block), ram)
        done, self._dst = self._dst, None
        if self._src is not None:
            self._src.close()
        self._src = done
        return lambda: done.persist(self.path(block))

    def close(self) -> None:
        for m in (self._src, self._dst):
            if m is not None:
                m.close()
        self._src = self._dst = None


class Streams:
    """The calibration states a run carries: always the compressed model's (`main`), and for the
    error-compensating fit with compressed propagation the original model's too (`original`),
    both windows x seqlen x hidden, cached and checkpointed the same way."""

    def __init__(self, run_dir: Path, on_disk: bool, original: bool, rank: int = 0, world: int = 1):
        self.main = StateCache(run_dir, on_disk, "states", rank, world)
        self.original = StateCache(run_dir, on_disk, "original", rank, world) if original else None
        self.caches = {c.stream: c for c in (self.main, self.original) if c is not None}

    def create(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Block 0's states (the embeddings, the same in both streams), for the caller to fill
        before `take_first`."""
        self._first = self.main.create(0, shape)
        return self._first

    def take_first(self):
        """As `take_target(0)`, once the first states are filled: the original stream gets a copy."""
        if self.original is not None:
            self.original.create(0, tuple(self._first.shape)).copy_(self._first)
        self._first = None
        return self.take_target(0)

    def open(self, block: int) -> None:
        for c in self.caches.values():
            c.open(block)

    def begin_pass(self) -> None:
        for c in self.caches.values():
            c.begin_pass()

    def release(self, upto_window: int) -> None:
        for c in self.caches.values():
            c.release(upto_window)

    def take_target(self, block: int):
        """As StateCache.take_target, for every stream: the returned function makes them durable
        and returns their SHA-256 by stream name."""
        persist = {name: c.take_target(block) for name, c in self.caches.items()}
        return lambda: {name: p() for name, p in persist.items()}

    def close(self) -> None:
        for c in self.caches.values():
            c.close()
