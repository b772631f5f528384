"""The compressed model directory: one shard per block as soon as it is done, then the rest.

Layout: `model-block-NNNNN.safetensors` per decoder block, `model-outer.safetensors` for the
tensors outside the blocks (embeddings, final norm, untied head), `model.safetensors.index.json`,
`config.json` (the input's, plus a `sola` section) and the input's tokenizer files.
config.json is written last: a directory without it is not a finished model.
"""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import (CheckpointReader, atomic_save_tensors, atomic_write_json, copy_extra_files,
                         write_index)
from .compress import BlockResult
from .errors import OutputError

OUTER_SHARD = "model-outer.safetensors"


def block_shard_name(index: int) -> str:
    return f"model-block-{index:05d}.safetensors"


class OutputWriter:
    def __init__(self, out_dir: Path, reader: CheckpointReader, overwrite: bool = False):
        self.out_dir, self.reader = out_dir, reader
        if out_dir.resolve() == reader.path.resolve():
            raise OutputError(f"{out_dir}: output directory is the input model directory")
        if out_dir.exists() and not out_dir.is_dir():
            raise OutputError(f"{out_dir}: exists and is not a directory")
        if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
            raise OutputError(f"{out_dir}: output directory is not empty")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.dense_block_params = 0
        self.kept_block_params = 0

    def write_block(self, index: int, prefix: str, result: BlockResult) -> None:
        shard = block_shard_name(index)
        atomic_save_tensors(self.out_dir / shard, {prefix + k: v for k, v in result.tensors.items()})
        self.weight_map.update({prefix + k: shard for k in result.tensors})
        self.dense_block_params += result.dense_params
        self.kept_block_params += result.kept_params

    def ratio_blocks(self) -> float:
        return 1.0 - self.kept_block_params / self.dense_block_params

    def model_dense_params(self) -> int:
        total = 0
        for name in self.reader.weight_map:
            numel = 1
            for d in self.reader.shape(name):
                numel *= d
            total += numel
        return total

    def model_kept_params(self) -> int:
        return self.model_dense_params() - (self.dense_block_params - self.kept_block_params)

    def ratio_model(self) -> float:
        return 1.0 - self.model_kept_params() / self.model_dense_params()

    def finish(self, sola: dict, layers_prefix: str) -> None:
        outer = {n: self.reader.get(n) for n in self.reader.weight_map if not n.startswith(layers_prefix)}
        atomic_save_tensors(self.out_dir / OUTER_SHARD, outer)
        self.weight_map.update({n: OUTER_SHARD for n in outer})
        write_index(self.out_dir, self.weight_map)
        copy_extra_files(self.reader, self.out_dir)
        config = dict(self.reader.config_dict)
        config["sola"] = sola
        atomic_write_json(self.out_dir / "config.json", config)


def read_sola_section(path: Path) -> dict | None:
    config = json.loads((path / "config.json").read_text())
    return config.get("sola")
