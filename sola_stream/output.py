"""The compressed model directory: one shard per block as soon as it is done, then the rest.

Layout: `model-block-NNNNN.safetensors` per decoder block, `model-outer.safetensors` for the
tensors outside the blocks (embeddings, final norm, untied head), `model.safetensors.index.json`,
`config.json` (the input's, plus a `sola` section) and the input's known non-weight files
(tokenizer, generation config, chat template, license, readme; checkpoint.EXTRA_FILES).
config.json is written last, after every other file and the ownership marker's checksums: a
directory without it is not a finished model, and one with it is complete.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from .checkpoint import INDEX_NAME, CheckpointReader, atomic_copy, atomic_save_tensors, file_sha256, write_index

OUTER_SHARD = "model-outer.safetensors"


def block_shard_name(index: int) -> str:
    return f"model-block-{index:05d}.safetensors"


def planned_files(reader: CheckpointReader, num_blocks: int) -> list[str]:
    """Every file name a run writes at the top of the output directory."""
    return ([block_shard_name(i) for i in range(num_blocks)] + [OUTER_SHARD, INDEX_NAME, "config.json"]
            + [p.name for p in reader.extra_files()])


def write_block(out_dir: Path, index: int, prefix: str, tensors: dict) -> str:
    """The block's shard, made durable; returns its SHA-256 (recorded in the run manifest)."""
    path = out_dir / block_shard_name(index)
    atomic_save_tensors(path, {prefix + k: v for k, v in tensors.items()})
    return file_sha256(path)


def model_params(reader: CheckpointReader) -> int:
    total = 0
    for name in reader.weight_map:
        numel = 1
        for d in reader.shape(name):
            numel *= d
        total += numel
    return total


def finish(out_dir: Path, reader: CheckpointReader, num_blocks: int, layers_prefix: str, sola: dict) -> bytes:
    """Everything after the last block but config.json: outer shard, index, extra files. Returns
    config.json's content, which the caller writes last (after the ownership marker is final)."""
    outer = {n: reader.get(n) for n in reader.weight_map if not n.startswith(layers_prefix)}
    atomic_save_tensors(out_dir / OUTER_SHARD, outer)
    weight_map = {n: OUTER_SHARD for n in outer}
    for i in range(num_blocks):
        with safe_open(str(out_dir / block_shard_name(i)), framework="pt") as fh:
            weight_map.update({n: block_shard_name(i) for n in fh.keys()})
    write_index(out_dir, weight_map)
    for src in reader.extra_files():
        atomic_copy(src, out_dir / src.name)
    config = dict(reader.config_dict)
    config["sola"] = sola
    return (json.dumps(config, indent=2) + "\n").encode()
