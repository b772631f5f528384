"""The compressed model directory: one shard per block as soon as it is done, then the rest.

Layout: `model-block-NNNNN.safetensors` per decoder block, `model-outer.safetensors` for the
tensors outside the blocks (embeddings, final norm, untied head), `model.safetensors.index.json`,
`config.json` (the input's, plus a `sola` section) and the input's known non-weight files
(tokenizer, generation config, chat template, license; checkpoint.EXTRA_FILES), and the model
card README.md (card.py).
config.json is written last, after every other file and the ownership marker's checksums: a
directory without it is not a finished model, and one with it is complete.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from sola_stream.families import OUTPUT_PREFIX
from sola_stream.storage.card import CARD, EVALS, write_card
from sola_stream.storage.runlog import LOG_NAME
from sola_stream.storage.atomic import atomic_copy, atomic_save_tensors, atomic_write_bytes, atomic_write_json, file_sha256
from sola_stream.storage.checkpoint import FLOAT_DTYPES, INDEX_NAME, CheckpointReader, read_json_object

OUTER_SHARD = "model-outer.safetensors"
MODELING_FILE = "modeling_sola.py"  # the package's own inference layers, for trust_remote_code
MODELING_SOURCE = Path(__file__).parents[1] / "nn" / MODELING_FILE
TOKENIZER_CONFIG = "tokenizer_config.json"


def block_shard_name(index: int) -> str:
    return f"model-block-{index:05d}.safetensors"


def planned_files(reader: CheckpointReader, num_blocks: int) -> list[str]:
    """Every file name a run writes at the top of the output directory."""
    extra = [p.name for p in reader.extra_files()]
    return ([block_shard_name(i) for i in range(num_blocks)] + [OUTER_SHARD, INDEX_NAME, "config.json", MODELING_FILE,
                                                                 LOG_NAME]
            + sorted(set(extra) | {TOKENIZER_CONFIG, CARD, EVALS}))


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


def output_config(input_config: dict, model_class: type, sola: dict) -> dict:
    """The input's config.json made an output's: the `sola` section, and the classes of
    modeling_sola.py for transformers' auto classes (`model_class`: the family's CausalLM class;
    its config class is named separately, as Gemma 3's text model has Gemma3TextConfig).
    model_type becomes "sola_<family>", which transformers only knows through that file."""
    arch, config_name = model_class.__name__, model_class.config_class.__name__
    config = dict(input_config)
    config.update(model_type=OUTPUT_PREFIX + sola["base_model_type"], architectures=[f"Sola{arch}"],
                  auto_map={"AutoConfig": f"{MODELING_FILE[:-3]}.Sola{config_name}",
                            "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.Sola{arch}"},
                  sola=sola)
    return config


def pin_tokenizer_class(out_dir: Path, tokenizer_class: str) -> None:
    """Name the tokenizer class that the input model's own config selects in the output's
    tokenizer_config.json: transformers picks a tokenizer by model_type first, and an output's
    "sola_<family>" is not in its tables, so without this the output would be tokenized by a
    generic class (other special-token handling) and scored differently from the dense model."""
    path = out_dir / TOKENIZER_CONFIG
    config = read_json_object(path, TOKENIZER_CONFIG) if path.is_file() else {}
    config["tokenizer_class"] = tokenizer_class
    atomic_write_bytes(path, (json.dumps(config, indent=2) + "\n").encode())


def finish(out_dir: Path, reader: CheckpointReader, num_blocks: int, layers_prefix: str, model_class: type,
           tokenizer_class: str, sola: dict) -> bytes:
    """Everything after the last block but config.json: outer shard, index, modeling file, extra
    files (the tokenizer class pinned). Returns config.json's content, which the caller writes
    last (after the ownership marker is final)."""
    outer = {n: reader.get(n) for n in reader.weight_map if not n.startswith(layers_prefix)}
    atomic_save_tensors(out_dir / OUTER_SHARD, outer)
    weight_map = {n: OUTER_SHARD for n in outer}
    for i in range(num_blocks):
        with safe_open(str(out_dir / block_shard_name(i)), framework="pt") as fh:
            weight_map.update({n: block_shard_name(i) for n in fh.keys()})
    write_index(out_dir, weight_map)
    atomic_copy(MODELING_SOURCE, out_dir / MODELING_FILE)
    for src in reader.extra_files():
        atomic_copy(src, out_dir / src.name)
    pin_tokenizer_class(out_dir, tokenizer_class)
    config = output_config(reader.config_dict, model_class, sola)
    write_card(out_dir, config)
    return (json.dumps(config, indent=2) + "\n").encode()


def write_index(out_dir: Path, weight_map: dict[str, str]) -> None:
    total = 0
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(out_dir / shard), framework="pt") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                total += numel * FLOAT_DTYPES[sl.get_dtype()].itemsize  # outputs hold float tensors only
    atomic_write_json(out_dir / INDEX_NAME, {
        "metadata": {"total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    })
