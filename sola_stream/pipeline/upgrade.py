"""`sola-stream upgrade OUTPUT`: make an output of version 0.1 self-contained.

Version 0.1 wrote config.json with the family's own model_type, so transformers loaded such an
output without an error and with random weights in place of the factored layers. Upgrading
writes modeling_sola.py beside it, points config.json's auto_map at it (model_type
"sola_<family>") and adds the ownership marker; tensors are not touched.
"""
from __future__ import annotations

import json

from sola_stream.families import OUTPUT_PREFIX, family_for_dict
from sola_stream.storage.checkpoint import INDEX_NAME, CheckpointReader
from sola_stream.storage.atomic import atomic_copy
from sola_stream.errors import InputError
from sola_stream.storage.ownership import MARKER, finish_output, read_marker
from sola_stream.pipeline.setup import load_tokenizer
from sola_stream.storage.output import MODELING_FILE, MODELING_SOURCE, TOKENIZER_CONFIG, output_config, pin_tokenizer_class
from sola_stream.storage.sola_section import check_sola_section
from sola_stream.pipeline.skeleton import Skeleton


def upgrade(path: str) -> str:
    """Upgrade the output at `path` in place; returns what was done (one line)."""
    reader = CheckpointReader(path)
    where = str(reader.path / "config.json")
    config = reader.config_dict
    if "sola" not in config:
        raise InputError(f"{where}: no 'sola' section (not a sola_stream output)")
    if str(config.get("model_type", "")).startswith(OUTPUT_PREFIX):
        return f"{path}: already self-contained (model_type {config['model_type']}); nothing to do"
    if (reader.path / MARKER).exists():
        read_marker(reader.path)  # a damaged marker is refused before anything changes
    family_for_dict(config, where)  # an unknown family is refused before anything is read
    skeleton = Skeleton(reader)  # config, shapes and outer tensors checked
    family = skeleton.family
    sola = dict(check_sola_section(config["sola"], skeleton.num_blocks, family.linears, where))
    sola.update(base_model_type=family.name, layers_path=family.layers_path,
                input_groups=family.shared_inputs)
    base = {k: v for k, v in config.items() if k != "sola"}
    data = (json.dumps(output_config(base, type(skeleton.model), sola), indent=2) + "\n").encode()
    atomic_copy(MODELING_SOURCE, reader.path / MODELING_FILE)
    pin_tokenizer_class(reader.path, type(load_tokenizer(reader.path, skeleton.config)).__name__)
    names = sorted({*reader.weight_map.values(), INDEX_NAME, "config.json", MODELING_FILE, TOKENIZER_CONFIG,
                    *(p.name for p in reader.extra_files())})
    finish_output(reader.path, names, {}, "config.json", data)
    return f"{path}: upgraded (model_type {OUTPUT_PREFIX + family.name}, {MODELING_FILE} written, {MARKER} added)"
