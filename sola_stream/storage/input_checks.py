"""Checks of an input model's config.json against sane bounds and against its own tensors.

They run before any output exists, so a config that disagrees with the checkpoint (fewer or more
layers, other widths) is a one-line error instead of a silently truncated model, a traceback, or
minutes spent building a billion empty layers.
"""
from __future__ import annotations

import re

from sola_stream.errors import InputError

# integer fields of a transformer config: (smallest, largest) accepted
INT_BOUNDS = {
    "num_hidden_layers": (1, 4096),
    "hidden_size": (1, 1 << 20),
    "intermediate_size": (1, 1 << 22),
    "num_attention_heads": (1, 1 << 14),
    "num_key_value_heads": (1, 1 << 14),
    "head_dim": (1, 1 << 16),
    "vocab_size": (1, 1 << 24),
    "max_position_embeddings": (1, 1 << 31),
}
REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def check_config(cfg: dict, where: str) -> None:
    """Types and bounds of the fields this tool relies on (before transformers sees them)."""
    for key in REQUIRED:
        if key not in cfg:
            raise InputError(f"{where}: missing {key!r}")
    for key, (lo, hi) in INT_BOUNDS.items():
        if key not in cfg or (cfg[key] is None and key in ("head_dim", "num_key_value_heads")):
            continue
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{where}: {key} must be an integer, not {value!r}")
        if not lo <= value <= hi:
            raise InputError(f"{where}: {key}={value} is out of range [{lo}, {hi}]")
    dtype = cfg.get("torch_dtype", cfg.get("dtype"))
    if dtype is not None and not isinstance(dtype, str):
        raise InputError(f"{where}: torch_dtype must be a string, not {dtype!r}")


def check_layer_count(names, layers_path: str, num_layers: int, where: str) -> None:
    """The checkpoint holds exactly blocks 0..num_layers-1 under `layers_path`."""
    pattern = re.compile(re.escape(layers_path) + r"\.(\d+)\.")
    found = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    if found == set(range(num_layers)):
        return
    extra = sorted(found - set(range(num_layers)))
    missing = sorted(set(range(num_layers)) - found)
    held = f"blocks {min(found)}..{max(found)} ({len(found)} blocks)" if found else "no blocks"
    detail = f"block {extra[0]} is beyond it" if extra else f"block {missing[0]} is missing"
    raise InputError(f"{where}: num_hidden_layers={num_layers} but the checkpoint holds {held} under "
                     f"{layers_path!r}; {detail}")


def check_tensors(expected: dict[str, tuple[int, ...]], actual: dict[str, tuple[int, ...]], prefix: str,
                  where: str) -> None:
    """Names and shapes of a checkpoint part (`actual`) against the model built from config.json."""
    for name in sorted(expected):
        if name not in actual:
            raise InputError(f"{where}: tensor {prefix + name!r} missing from the checkpoint")
    for name in sorted(actual):
        if name not in expected:
            raise InputError(f"{where}: unexpected tensor {prefix + name!r} (not part of the model config.json describes)")
        if tuple(actual[name]) != tuple(expected[name]):
            raise InputError(f"{where}: tensor {prefix + name!r} has shape {tuple(actual[name])}, config.json "
                             f"implies {tuple(expected[name])}")


def check_finite_tensors(tensors: dict, reader, prefix: str) -> None:
    """A block's floating-point tensors (names relative to `prefix`) hold no NaN/Inf; InputError
    naming the shard and the tensor otherwise."""
    import torch

    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"{reader.path / reader.weight_map[prefix + name]}: tensor {prefix + name!r} has NaN or Inf")
