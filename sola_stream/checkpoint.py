"""Reading and writing Hugging Face checkpoint directories (safetensors). Knows nothing of SoLA.

Reading memory-maps the shards with safe_open: a tensor is read only when asked for.
Writing puts every file under a temporary name, fsyncs it, then renames it into place, so a
file that has its final name is always complete.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import faults
from .errors import InputError, OutputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files of a checkpoint directory that are not weights or config: copied to the output as they are.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_NOT_COPIED = {"config.json", INDEX_NAME, "pytorch_model.bin.index.json"}


def resolve_model_path(model: str) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (safetensors and tokenizer only)."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/")) or model.count("/") != 1:
        raise InputError(f"{model}: not a checkpoint directory (and not a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # offline, unknown repo, auth: one line is enough
        raise InputError(f"{model}: cannot download from the hub ({type(exc).__name__}: {exc})") from None


class CheckpointReader:
    """Lazy, memory-mapped access to the tensors of one checkpoint directory."""

    def __init__(self, model: str | os.PathLike):
        self.path = resolve_model_path(str(model))
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise InputError(f"{config_file}: missing config.json")
        try:
            self.config_dict = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{config_file}: not valid JSON ({exc})") from None
        self._handles: dict[str, object] = {}
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise InputError(f"{index}: not a valid safetensors index ({exc})") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).is_file():
                    raise InputError(f"{self.path / shard}: shard named in {INDEX_NAME} is missing")
            for shard in sorted(set(weight_map.values())):
                names = set(self._open(shard).keys())
                absent = sorted(n for n, f in weight_map.items() if f == shard and n not in names)
                if absent:
                    raise InputError(f"{self.path / shard}: index names tensor {absent[0]!r} that is not in this shard")
            return weight_map
        single = self.path / SINGLE_NAME
        if single.is_file():
            return {name: SINGLE_NAME for name in self._open(SINGLE_NAME).keys()}
        raise InputError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors checkpoints are read)")

    def _open(self, shard: str):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise InputError(f"{self.path / shard}: unreadable safetensors file ({exc})") from None
        return self._handles[shard]

    @property
    def files(self) -> list[Path]:
        return [self.path / s for s in sorted(set(self.weight_map.values()))]

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.weight_map if n.startswith(prefix))

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise InputError(f"{self.path}: tensor {name!r} not found")
        shard = self.weight_map[name]
        try:
            return self._open(shard).get_tensor(name)
        except Exception as exc:
            raise InputError(f"{self.path / shard}: cannot read tensor {name!r} ({exc})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.weight_map[name]).get_slice(name).get_shape())

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors under `prefix`, keyed by the name relative to it (copies in RAM). The shard
        maps are dropped afterwards: pages of a mapped 140 GB checkpoint would otherwise stay
        resident and count against the host-memory budget."""
        out = {n[len(prefix):]: self.get(n) for n in self.names(prefix)}
        self._handles.clear()
        return out

    def extra_files(self) -> list[Path]:
        """Tokenizer, generation config and other non-weight files to carry to an output."""
        return sorted(
            p for p in self.path.iterdir()
            if p.is_file() and p.name not in _NOT_COPIED and not p.name.endswith(_WEIGHT_SUFFIXES)
            and not p.name.startswith(".")
        )


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


def atomic_write(path: Path, write_tmp, fault: str | None = None) -> None:
    """`write_tmp(tmp_path)` writes the content under a temp name; it is then fsynced with the
    usual permissions and renamed over `path` (the rename is the only visible step)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write_tmp(tmp)
        if fault:
            faults.hit(fault)
        with open(tmp, "rb+") as fh:
            os.fchmod(fh.fileno(), FILE_MODE)
            os.fsync(fh.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file written under a temp name, fsynced, renamed. No metadata timestamps."""
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp),
                                             metadata={"format": "pt"}), fault="tensors_written")


def write_index(out_dir: Path, weight_map: dict[str, str]) -> None:
    total = 0
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(out_dir / shard), framework="pt") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                total += numel * _dtype_size(sl.get_dtype())
    atomic_write_json(out_dir / INDEX_NAME, {
        "metadata": {"total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    })


def copy_extra_files(reader: CheckpointReader, out_dir: Path) -> None:
    for src in reader.extra_files():
        atomic_write_bytes(out_dir / src.name, src.read_bytes())


def write_error(path: Path, exc: OSError) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"{path}: disk full while writing (no space left on device); free space and run "
                           "the same command again to resume")
    return OutputError(f"{path}: cannot write ({exc.strerror or exc})")


def _dtype_size(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
            "I16": 2, "U16": 2}.get(dtype, 1)
