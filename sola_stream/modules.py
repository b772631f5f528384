"""Inference-time layers of a compressed block, and building a block from its tensors.

A compressed block is the family's own block with some nn.Linear children swapped:
- FactoredLinear: W ~ A B, stored as `<name>.lowrank.a` (out x k), `<name>.lowrank.b` (k x in).
- NeuronSplitLinear (SoLA FFN): prime neurons dense under `<name>.prime.weight`, the marginal rest
  under `<name>.marginal.*` (dense `.weight` or `.lowrank.a/b`). gate/up split their output rows,
  down its input columns. Neurons are stored prime-first in all three, so the family's own FFN
  forward (act(gate(x)) * up(x) -> down) works unchanged on the permuted order.

A layer's spec (the `sola.blocks[i].layers` entry in config.json) says which form it takes:
{"rank": k or null (dense), "prime": p (only for neuron-split layers), "split": "out" | "in"}.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F


class LowRank(nn.Module):
    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a, requires_grad=False)
        self.b = nn.Parameter(b, requires_grad=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(F.linear(x, self.b), self.a, bias)


class FactoredLinear(nn.Module):
    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.lowrank = LowRank(a, b)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = b.shape[1], a.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowrank(x, self.bias)


class NeuronSplitLinear(nn.Module):
    """Prime neurons dense, marginal ones in `marginal`; split="out" (gate/up) or "in" (down)."""

    def __init__(self, prime: nn.Linear, marginal: nn.Module, split: str):
        super().__init__()
        self.prime, self.marginal, self.split = prime, marginal, split
        self.n_prime = prime.out_features if split == "out" else prime.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split == "out":
            return torch.cat([self.prime(x), self.marginal(x)], dim=-1)
        return self.prime(x[..., : self.n_prime]) + self.marginal(x[..., self.n_prime:])


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    with torch.device("meta"):
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def _dense_or_factored(tensors: dict[str, torch.Tensor], prefix: str, bias: torch.Tensor | None) -> nn.Module:
    if prefix + "weight" in tensors:
        return _linear(tensors[prefix + "weight"], bias)
    return FactoredLinear(tensors[prefix + "lowrank.a"], tensors[prefix + "lowrank.b"], bias)


def layer_from_tensors(spec: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The module for one linear layer, from its tensors (names relative to the layer)."""
    if "prime" not in spec:
        return _dense_or_factored(tensors, "", tensors.get("bias"))
    prime_bias = tensors.get("prime.bias")
    prime = _linear(tensors["prime.weight"], prime_bias)
    marginal = _dense_or_factored(tensors, "marginal.", tensors.get("marginal.bias"))
    return NeuronSplitLinear(prime, marginal, spec["split"])


def weight_shapes(spec: dict, m: int, n: int) -> dict[str, tuple[int, int]]:
    """The weight tensors (names relative to the layer) a layer of original shape m x n stores
    under `spec`, with their shapes."""
    rank, prime, split = spec.get("rank"), spec.get("prime"), spec.get("split")

    def part(prefix: str, rows: int, cols: int) -> dict[str, tuple[int, int]]:
        if rank is None:
            return {prefix + "weight": (rows, cols)}
        return {prefix + "lowrank.a": (rows, rank), prefix + "lowrank.b": (rank, cols)}

    if prime is None:
        return part("", m, n)
    if split == "out":
        return {"prime.weight": (prime, n), **part("marginal.", m - prime, n)}
    return {"prime.weight": (m, prime), **part("marginal.", m, n - prime)}


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
        rest = (m - prime) * n if rank is None else rank * (m - prime + n)
        return prime * n + rest
    if spec.get("split") == "in":
        rest = m * (n - prime) if rank is None else rank * (m + n - prime)
        return prime * m + rest
    return m * n if rank is None else rank * (m + n)
