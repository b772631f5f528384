"""Reading Hugging Face checkpoint directories (safetensors). Knows nothing of SoLA.

Reading memory-maps the shards with safe_open: a tensor is read only when asked for. Everything
a checkpoint directory says is untrusted: JSON files must be objects of the expected types, shard
names must stay inside the directory, tensors must be float, and only known non-weight files
(tokenizer, generation config, chat template, license) are ever copied to an output.
Writing is storage/atomic.py's.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open

from sola_stream.errors import InputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Non-weight files carried to an output, by exact name: nothing else is ever copied (no Python
# code, no file reached through a symlink that leaves the model's directory).
EXTRA_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json",
               "chat_template.jinja", "chat_template.json", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE",
               "USE_POLICY.md")  # not README.md: the output gets its own model card (storage/card.py)
MAX_JSON_BYTES = 64 << 20  # config.json / index.json larger than this are refused, not parsed
MAX_EXTRA_BYTES = 1 << 30  # a tokenizer file larger than this is not a tokenizer file
# the tensor dtypes a checkpoint may hold (safetensors names); others are refused
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_json_object(path: Path, what: str = "JSON file") -> dict:
    """A JSON file that must hold an object: one-line errors for missing, huge, malformed, other types."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise InputError(f"{path}: {size} bytes, too large for a {what} (limit {MAX_JSON_BYTES >> 20} MiB)")
        obj = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: a {what} must be a JSON object, not {type(obj).__name__}")
    return obj


def confinement_root(path: Path) -> Path:
    """The directory that a checkpoint's files may resolve into: the model directory itself, or for a
    Hugging Face hub cache snapshot (`models--org--name/snapshots/REV`) the repository's cache folder,
    whose `blobs/` hold the files that the snapshot's symlinks point to."""
    real = path.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        return real.parent.parent
    return real


# what a compress run downloads for a hub id: weights, configs, tokenizer files, licence
HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "LICENSE*")


def resolve_model_path(model: str, patterns=HUB_PATTERNS) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (only the files `patterns` match)."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/")) or model.count("/") != 1:
        raise InputError(f"{model}: not a checkpoint directory (and not a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=list(patterns)))
    except Exception as exc:  # offline, unknown repo, auth: one line is enough
        raise InputError(f"{model}: cannot download from the hub ({type(exc).__name__}: {exc})") from None


def read_config(model: str) -> tuple[dict, Path]:
    """config.json of a checkpoint directory, a config file itself, or a hub id (only config.json
    is downloaded), and where it was read. JSON-level checks only: `check_config` does the fields."""
    path = Path(model)
    if not path.is_file():
        path = resolve_model_path(model, ("config.json",)) / "config.json"
        if not path.is_file():
            raise InputError(f"{path}: no config.json")
    return read_json_object(path, "config.json"), path


def _shard_name(name, index: Path) -> str:
    """A shard name from an index: a plain relative path that stays inside the model directory."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise InputError(f"{index}: shard name {name!r} is not a relative file name")
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not name.endswith(".safetensors"):
        raise InputError(f"{index}: shard name {name!r} leaves the model directory or is not a .safetensors file")
    return name


class CheckpointReader:
    """Lazy, memory-mapped access to the tensors of one checkpoint directory."""

    def __init__(self, model: str | os.PathLike):
        self.path = resolve_model_path(str(model))
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise InputError(f"{config_file}: missing config.json")
        self.config_dict = read_json_object(config_file, "config.json")
        self._handles: dict[str, object] = {}
        self._layouts: dict[str, dict] = {}
        self.weight_map = self._weight_map()
        self._stored: dict[str, str] = {}  # name -> name in the file, where rename() changed it
        self._check_dtypes()

    def rename(self, renames: dict[str, str]) -> None:
        """Show tensors under other names from now on: {name in the file: new name}. The family
        seam uses it so that every reader of a model sees its run-time module names."""
        if not renames:
            return
        new = {renames.get(n, n): s for n, s in self.weight_map.items()}
        if len(new) != len(self.weight_map):
            raise InputError(f"{self.path}: two tensors would have the same name after the family's renaming")
        self._stored = {renames.get(n, n): self._stored.get(n, n) for n in self.weight_map}
        self.weight_map = new

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = read_json_object(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputError(f"{index}: no 'weight_map' object naming tensors and their shards")
            for name, shard in weight_map.items():
                _shard_name(shard, index)
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

    def _check_dtypes(self) -> None:
        for name in sorted(self.weight_map):
            dtype = self._slice(name).get_dtype()
            if dtype not in FLOAT_DTYPES:
                raise InputError(f"{self.path / self.weight_map[name]}: tensor {name!r} has dtype {dtype}; only "
                                 "float tensors (F32, F16, BF16, F64) are read (quantized checkpoints are not supported)")

    def _open(self, shard: str):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise InputError(f"{self.path / shard}: unreadable safetensors file ({exc})") from None
        return self._handles[shard]

    def _slice(self, name: str):
        try:
            return self._open(self.weight_map[name]).get_slice(self._stored.get(name, name))
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{self.path / self.weight_map[name]}: cannot read tensor {name!r} ({exc})") from None

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
            return self._open(shard).get_tensor(self._stored.get(name, name))
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{self.path / shard}: cannot read tensor {name!r} ({exc})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def nbytes(self, name: str) -> int:
        sl = self._slice(name)
        numel = 1
        for d in sl.get_shape():
            numel *= d
        return numel * FLOAT_DTYPES[sl.get_dtype()].itemsize

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors under `prefix`, keyed by the name relative to it (copies in RAM). The shard
        maps are dropped afterwards: pages of a mapped 140 GB checkpoint would otherwise stay
        resident and count against the host-memory budget."""
        out = {n[len(prefix):]: self.get(n) for n in self.names(prefix)}
        self._handles.clear()
        return out

    def _layout(self, shard: str) -> dict:
        """name -> (dtype, shape, start, end) with absolute byte offsets, from the shard's header
        (already validated by safe_open when the reader opened it)."""
        if shard not in self._layouts:
            with open(self.path / shard, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            self._layouts[shard] = {k: (v["dtype"], tuple(v["shape"]), 8 + n + v["data_offsets"][0],
                                        8 + n + v["data_offsets"][1])
                                    for k, v in header.items() if k != "__metadata__"}
        return self._layouts[shard]

    def digest(self, prefix: str, names: list[str] | None = None) -> str:
        """tensors_digest(self.tensors(prefix)) (or of `names`, relative to `prefix`), computed from
        the files' bytes in chunks: no tensor copies, so resume verification can run on several
        threads in bounded memory."""
        h = hashlib.sha256()
        for name in sorted(self.names(prefix) if names is None else names):
            shard = self.weight_map[name]
            dtype, shape, start, end = self._layout(shard)[self._stored.get(name, name)]
            h.update(f"{name[len(prefix):]}|{FLOAT_DTYPES[dtype]}|{shape}\n".encode())
            with open(self.path / shard, "rb") as fh:
                fh.seek(start)
                left = end - start
                while left > 0:
                    chunk = fh.read(min(left, 8 << 20))
                    if not chunk:
                        raise InputError(f"{self.path / shard}: truncated while reading tensor {name!r}")
                    h.update(chunk)
                    left -= len(chunk)
        return h.hexdigest()

    def extra_files(self) -> list[Path]:
        """The known non-weight files (EXTRA_FILES) present, each a regular file that resolves inside
        the model directory (or its hub cache repository) and is not absurdly large."""
        root = confinement_root(self.path)
        found = []
        for name in EXTRA_FILES:
            p = self.path / name
            if not p.exists() and not p.is_symlink():
                continue
            real = p.resolve()
            if not real.is_relative_to(root):
                raise InputError(f"{p}: links to {real}, outside the model directory; refusing to copy it")
            if not real.is_file():
                raise InputError(f"{p}: not a regular file")
            if real.stat().st_size > MAX_EXTRA_BYTES:
                raise InputError(f"{p}: {real.stat().st_size} bytes, too large for a {name}")
            found.append(p)
        return found


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of `tensors` (sorted by name): any content
    change of an input block is detected, not only its size or header."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()
