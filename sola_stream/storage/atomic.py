"""Files that are complete or absent: every write goes to a temporary name, is fsynced, then
renamed into place, so a file that has its final name is always whole. Plus SHA-256 of files and
one-line errors for failed writes."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from sola_stream import faults
from sola_stream.errors import OutputError


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# safetensors creates files readable by the owner only; outputs get the usual umask permissions
FILE_MODE = 0o666 & ~_umask()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def atomic_write(path: Path, write_tmp, fault: str | None = None) -> None:
    """`write_tmp(tmp_path)` writes the content under a temp name; it is then fsynced with the
    usual permissions and renamed over `path` (the rename is the only visible step). Any failure
    to write (disk full, read-only, a library's own error type) is one OutputError."""
    tmp = temp_name(path)
    try:
        write_tmp(tmp)
        if fault:
            faults.hit(fault)
        with open(tmp, "rb+") as fh:
            os.fchmod(fh.fileno(), FILE_MODE)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, SafetensorError) as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise write_error(path, exc) from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_copy(src: Path, path: Path) -> None:
    """Streamed copy (a large tokenizer file is never held in memory)."""
    atomic_write(path, lambda tmp: shutil.copyfile(src, tmp))


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file written under a temp name, fsynced, renamed. No metadata timestamps."""
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp),
                                             metadata={"format": "pt"}), fault="tensors_written")


_OS_ERROR = re.compile(r"os error (\d+)")


def write_error(path: Path, exc: OSError | SafetensorError) -> OutputError:
    """One line for a failed write. safetensors reports I/O failures as its own exception type with
    the errno only in the text ("... (os error 28)"), so the errno is taken from there too."""
    code = getattr(exc, "errno", None)
    if code is None and (m := _OS_ERROR.search(str(exc))):
        code = int(m.group(1))
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        what = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file size limit exceeded"}[code]
        return OutputError(f"{path}: disk full while writing ({what}); free space and run the same command "
                           "again to resume")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{path}: cannot write (permission denied or read-only file system)")
    if isinstance(exc, OSError):
        return OutputError(f"{path}: cannot write ({exc.strerror or exc})")
    return OutputError(f"{path}: cannot write ({type(exc).__name__}: {exc})")
