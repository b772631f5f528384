"""Building a compressed block from its tensors, and the parameter count of a layer spec.

The layers themselves (FactoredLinear, NeuronSplitLinear) and the layout of their tensors live in
modeling_sola.py, the file every output directory carries for transformers' trust_remote_code
loading: one implementation for the package and for the outputs.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from sola_stream.nn.modeling_sola import FactoredLinear, NeuronSplitLinear, dense_linear, weight_shapes


def _dense_or_factored(tensors: dict[str, torch.Tensor], prefix: str, bias: torch.Tensor | None) -> nn.Module:
    if prefix + "weight" in tensors:
        return dense_linear(tensors[prefix + "weight"], bias)
    return FactoredLinear(tensors[prefix + "lowrank.a"], tensors[prefix + "lowrank.b"], bias)


def layer_from_tensors(spec: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The module for one linear layer, from its tensors (names relative to the layer)."""
    if "prime" not in spec:
        return _dense_or_factored(tensors, "", tensors.get("bias"))
    prime_bias = tensors.get("prime.bias")
    prime = dense_linear(tensors["prime.weight"], prime_bias)
    marginal = _dense_or_factored(tensors, "marginal.", tensors.get("marginal.bias"))
    return NeuronSplitLinear(prime, marginal, spec["split"], spec.get("chunks", 1))


def check_layer_shapes(spec: dict, m: int, n: int, stored: dict[str, tuple[int, ...]], prefix: str) -> None:
    """The stored weight tensors of a layer (names relative to it) match its spec and its
    original m x n shape; ValueError naming the tensor otherwise."""
    for key, shape in weight_shapes(spec, m, n).items():
        if key not in stored:
            raise ValueError(f"tensor {prefix + key!r} missing (layer spec {spec})")
        if tuple(stored[key]) != shape:
            raise ValueError(f"tensor {prefix + key!r} has shape {tuple(stored[key])}, its layer spec {spec} "
                             f"implies {shape}")


def build_block(meta_block: nn.Module, tensors: dict[str, torch.Tensor], layer_specs: dict | None,
                device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """A ready block from an empty (meta) one, its tensors (names relative to the block) and,
    for a compressed block, the per-layer specs. Tensors that do not match the specs and the
    block's shapes raise ValueError naming the tensor."""
    block = copy.deepcopy(meta_block)
    tensors = dict(tensors)
    for name, spec in (layer_specs or {}).items():
        if spec.get("rank") is None and "prime" not in spec:
            continue  # dense layer: loaded below as the family's own nn.Linear
        prefix = name + "."
        own = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
        meta = block.get_submodule(name)
        check_layer_shapes(spec, meta.out_features, meta.in_features, {k: tuple(v.shape) for k, v in own.items()},
                           prefix)
        block.set_submodule(name, layer_from_tensors(spec, own))
    try:
        block.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as exc:  # size mismatch of a dense tensor
        raise ValueError(" ".join(str(exc).split())) from None
    missing = [n for n, p in block.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"block tensors lack {missing[0]!r}")
    return block.to(device=device, dtype=dtype).eval().requires_grad_(False)


def linear_params(spec: dict | None, m: int, n: int) -> int:
    """Weight parameters a layer of original shape m x n stores under `spec`."""
    if spec is None:
        return m * n
    rank, prime = spec.get("rank"), spec.get("prime", 0)
    if spec.get("split") == "out":
        prime *= spec.get("chunks", 1)  # a fused layer keeps each prime neuron's row in every chunk
        rest = (m - prime) * n if rank is None else rank * (m - prime + n)
        return prime * n + rest
    if spec.get("split") == "in":
        rest = m * (n - prime) if rank is None else rank * (m + n - prime)
        return prime * m + rest
    return m * n if rank is None else rank * (m + n)
