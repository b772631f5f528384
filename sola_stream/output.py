"""The compressed model directory: one shard per block as soon as it is done, then the rest.

Layout: `model-block-NNNNN.safetensors` per decoder block, `model-outer.safetensors` for the
tensors outside the blocks (embeddings, final norm, untied head), `model.safetensors.index.json`,
`config.json` (the input's, plus a `sola` section) and the input's tokenizer files.
config.json is written last: a directory without it is not a finished model.
"""
from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from .checkpoint import CheckpointReader, atomic_save_tensors, atomic_write_json, copy_extra_files, write_index

OUTER_SHARD = "model-outer.safetensors"


def block_shard_name(index: int) -> str:
    return f"model-block-{index:05d}.safetensors"


def write_block(out_dir: Path, index: int, prefix: str, tensors: dict) -> None:
    atomic_save_tensors(out_dir / block_shard_name(index), {prefix + k: v for k, v in tensors.items()})


def model_params(reader: CheckpointReader) -> int:
    total = 0
    for name in reader.weight_map:
        numel = 1
        for d in reader.shape(name):
            numel *= d
        total += numel
    return total


def finish(out_dir: Path, reader: CheckpointReader, num_blocks: int, layers_prefix: str, sola: dict) -> None:
    """Everything after the last block: outer shard, index, tokenizer files, then config.json."""
    outer = {n: reader.get(n) for n in reader.weight_map if not n.startswith(layers_prefix)}
    atomic_save_tensors(out_dir / OUTER_SHARD, outer)
    weight_map = {n: OUTER_SHARD for n in outer}
    for i in range(num_blocks):
        with safe_open(str(out_dir / block_shard_name(i)), framework="pt") as fh:
            weight_map.update({n: block_shard_name(i) for n in fh.keys()})
    write_index(out_dir, weight_map)
    copy_extra_files(reader, out_dir)
    config = dict(reader.config_dict)
    config["sola"] = sola
    atomic_write_json(out_dir / "config.json", config)
