"""Build a torch CausalLM from a sola_stream output directory (or any dense checkpoint)."""
from __future__ import annotations

import warnings

import torch

from sola_stream.families import family_for, meta_model
from sola_stream.storage.checkpoint import CheckpointReader
from sola_stream.errors import InputError
from sola_stream.nn.modeling_sola import fuse_shared_inputs
from sola_stream.nn.build import build_block
from sola_stream.storage.sola_section import block_specs, build_checked, check_sola_section
from sola_stream.pipeline.skeleton import load_config, load_outer


def load(path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The whole model in memory, compressed layers as FactoredLinear / NeuronSplitLinear modules.
    Works with `generate`. dtype defaults to float32."""
    dtype = dtype or torch.float32
    reader = CheckpointReader(path)
    sola = reader.config_dict.get("sola")
    config = load_config(reader)
    family = family_for(config, str(reader.path / "config.json"))
    model = meta_model(config, str(reader.path / "config.json"), dtype)
    layers = model.get_submodule(family.layers_path)
    if sola is not None:
        check_sola_section(sola, len(layers), family.linears, str(reader.path / "config.json"))
        if "base_model_type" not in sola:
            warnings.warn(f"{reader.path}: written by sola_stream 0.1, which transformers cannot load by itself; "
                          f"run `sola-stream upgrade {reader.path}` to make it self-contained", stacklevel=2)
    for i in range(len(layers)):
        tensors = reader.tensors(family.block_prefix(i))
        layers[i] = build_checked(lambda: build_block(family.prepare(layers[i]), tensors, block_specs(sola, i), device, dtype),
                                  str(reader.path), i)
    load_outer(model, reader, family, config, dtype)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise InputError(f"{reader.path}: tensor {missing[0]!r} missing")
    model = model.to(device=device, dtype=dtype).eval()
    if sola is not None and "layers_path" in sola:
        fuse_shared_inputs(model, sola)  # as transformers' loading through modeling_sola.py does
    return model
