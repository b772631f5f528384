"""The `sola` section of an output's config.json, checked before anything uses it.

It is data a user can edit, so `eval`, `load` and `inspect` refuse a section whose types or
values are not what this version writes, with one line naming the field.
"""
from __future__ import annotations

from numbers import Real

from sola_stream.method.block_compress import METHODS
from sola_stream.errors import InputError

FORMAT_VERSION = 1


def check_sola_section(sola, num_blocks: int, linears: tuple[str, ...], where: str) -> dict:
    """The section itself, after its checks; InputError naming the first bad field."""
    def bad(field: str, why: str):
        raise InputError(f"{where}: sola.{field} {why} (edited or damaged; recompress the model)")

    if not isinstance(sola, dict):
        bad("", "is not an object")
    if sola.get("format_version") != FORMAT_VERSION:
        bad("format_version", f"is {sola.get('format_version')!r}, this version reads {FORMAT_VERSION}")
    if sola.get("method") not in METHODS:
        bad("method", f"is {sola.get('method')!r}, not one of {', '.join(METHODS)}")
    for key in ("ratio", "prime_ratio", "achieved_ratio_blocks", "achieved_ratio_model"):
        value = sola.get(key)
        if not isinstance(value, Real) or isinstance(value, bool) or not -1.0 <= value <= 1.0:
            bad(key, f"is {value!r}, not a number in [-1, 1]")
    for key in ("base_model_type", "layers_path", "experts_path"):  # absent in 0.1 outputs / dense families
        if key in sola and not isinstance(sola[key], str):
            bad(key, f"is {sola[key]!r}, not a string")
    choices = sola.get("prime_choices", [])  # --prime-ratio auto (absent before 0.3)
    if not isinstance(choices, list) or not all(_fraction(c) for c in choices):
        bad("prime_choices", f"is {choices!r}, not a list of numbers in [0, 1)")
    groups = sola.get("input_groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, list) and all(n in linears for n in g) for g in groups):
        bad("input_groups", "must list groups of this family's linear layers")
    blocks = sola.get("blocks")
    if not isinstance(blocks, list) or len(blocks) != num_blocks:
        bad("blocks", f"must list {num_blocks} blocks")
    for i, block in enumerate(blocks):
        layers = block.get("layers") if isinstance(block, dict) else None
        if not isinstance(layers, dict):
            bad(f"blocks[{i}].layers", "is not an object")
        if "prime_split" in block and not _fraction(block["prime_split"]):
            bad(f"blocks[{i}].prime_split", f"is {block['prime_split']!r}, not a number in [0, 1)")
        for name, spec in layers.items():
            field = f"blocks[{i}].layers[{name!r}]"
            if name not in linears:
                bad(field, f"names no linear layer of this family ({', '.join(linears)})")
            if not isinstance(spec, dict):
                bad(field, "is not an object")
            rank, prime, split = spec.get("rank"), spec.get("prime"), spec.get("split")
            if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
                bad(field + ".rank", f"is {rank!r}, not a positive integer or null")
            if prime is not None and (not isinstance(prime, int) or isinstance(prime, bool) or prime < 1):
                bad(field + ".prime", f"is {prime!r}, not a positive integer")
            if (prime is None) != (split is None) or split not in (None, "out", "in"):
                bad(field + ".split", f"is {split!r}; 'out' or 'in' with a prime count, else absent")
            chunks = spec.get("chunks", 1)
            if not isinstance(chunks, int) or isinstance(chunks, bool) or not 1 <= chunks <= 64 or \
                    (chunks > 1 and split != "out"):
                bad(field + ".chunks", f"is {chunks!r}, not an integer in [1, 64] (above 1 only with split 'out')")
    return sola


def _fraction(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and 0.0 <= value < 1.0


def block_specs(sola: dict | None, index: int) -> dict | None:
    """Layer specs of block `index` (None for a dense checkpoint)."""
    return None if not sola else sola["blocks"][index]["layers"]


def build_checked(build, where: str, index: int):
    """`build()` (nn/build.build_block) with its ValueError as a one-line input error."""
    try:
        return build()
    except ValueError as exc:
        raise InputError(f"{where}: block {index}: {exc}") from None
