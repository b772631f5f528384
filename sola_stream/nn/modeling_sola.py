"""Compressed-model layers and transformers classes for sola_stream outputs.

This file is copied unchanged into every output directory, beside config.json, whose `auto_map`
points at it: `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` then needs
transformers and torch only. The sola_stream package imports its inference layers from here, so
the two can never drift apart.

A compressed block is the family's own block with some nn.Linear children swapped:
- FactoredLinear: W ~ A B, stored as `<name>.lowrank.a` (out x k), `<name>.lowrank.b` (k x in).
- NeuronSplitLinear (SoLA FFN): prime neurons dense under `<name>.prime.weight`, the marginal rest
  under `<name>.marginal.*` (dense `.weight` or `.lowrank.a/b`). gate/up split their output rows,
  down its input columns. Neurons are stored prime-first in all three, so the family's own FFN
  forward (act(gate(x)) * up(x) -> down) works unchanged on the permuted order. A fused layer
  (Phi-3's gate_up, split by the family with chunk(2)) stacks `chunks` neuron blocks: its prime
  rows hold each chunk's prime neurons in turn, and its output is put back chunk by chunk, each
  chunk prime-first.
A layer's spec (config.json `sola.blocks[i].layers[name]`) says which form it takes:
{"rank": k or null (dense), "prime": p (only for neuron-split layers), "split": "out" | "in",
"chunks": c (fused output-split layers only; 1 when absent)}.

Classes: `Sola<X>` for any transformers class `<X>` that is a family's config, `...ForCausalLM` or
`...ForConditionalGeneration` (e.g. SolaLlamaForCausalLM, SolaGemma3TextConfig), made on first use
(PEP 562 module __getattr__).
Their model_type is "sola_<family>", which transformers does not know without this file: loading
an output without trust_remote_code fails loudly instead of returning random weights.
"""
import torch
import transformers
from torch import nn
from torch.nn import functional as F


class LowRank(nn.Module):
    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a, requires_grad=False)
        self.b = nn.Parameter(b, requires_grad=False)

    def forward(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        return F.linear(F.linear(x, self.b), self.a, bias)


class SharedInput:
    """Layers that read the same input (q/k/v, gate/up) run their right-hand factors as one
    matmul: the first layer called with a new input computes x @ [R_1; R_2; ...]^T, the others
    take their slice of it. R are the layers' right factors (and a split layer's prime rows);
    the concatenation is made at load (a buffer of the block, not in the file), and the layers'
    own parameters become views of it, so nothing is stored twice."""

    def __init__(self, owner: nn.Module, name: str, sizes: list):
        self.owner, self.name, self.sizes = owner, name, sizes
        self._x = self._parts = None
        self._pending: set = set()

    def take(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._parts is None or self._x is not x or index not in self._pending:
            self._x, self._parts = x, F.linear(x, getattr(self.owner, self.name)).split(self.sizes, dim=-1)
            self._pending = set(range(len(self.sizes)))
        self._pending.discard(index)
        part = self._parts[index]
        if not self._pending:
            self._x = self._parts = None
        return part


class FactoredLinear(nn.Module):
    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias=None):
        super().__init__()
        self.lowrank = LowRank(a, b)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = b.shape[1], a.shape[0]
        self.shared = None  # (SharedInput, index) once fused

    def right(self) -> list:
        return [self.lowrank.b]

    def from_right(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.lowrank.a, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            return self.from_right(self.shared[0].take(x, self.shared[1]))
        return self.lowrank(x, self.bias)


class NeuronSplitLinear(nn.Module):
    """Prime neurons dense, marginal ones in `marginal`; split="out" (gate/up) or "in" (down).
    An output split over `chunks` stacked neuron blocks returns [prime_1, marginal_1, prime_2, ...]."""

    def __init__(self, prime: nn.Linear, marginal: nn.Module, split: str, chunks: int = 1):
        super().__init__()
        self.prime, self.marginal, self.split, self.chunks = prime, marginal, split, chunks
        self.n_prime = prime.out_features if split == "out" else prime.in_features
        self.shared = None

    def right(self) -> list:
        """Rows applied to the input (output split only): the prime rows, then the marginal part's
        right factor or its dense rows."""
        m = self.marginal
        return [self.prime.weight, m.lowrank.b if isinstance(m, FactoredLinear) else m.weight]

    def _merge(self, yp: torch.Tensor, ym: torch.Tensor) -> torch.Tensor:
        if self.chunks == 1:
            return torch.cat([yp, ym], dim=-1)
        c = self.chunks
        return torch.cat([yp.unflatten(-1, (c, -1)), ym.unflatten(-1, (c, -1))], dim=-1).flatten(-2)

    def from_right(self, z: torch.Tensor) -> torch.Tensor:
        zp, zm = z[..., : self.n_prime], z[..., self.n_prime:]
        if self.prime.bias is not None:
            zp = zp + self.prime.bias
        if isinstance(self.marginal, FactoredLinear):
            zm = self.marginal.from_right(zm)
        elif self.marginal.bias is not None:
            zm = zm + self.marginal.bias
        return self._merge(zp, zm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            return self.from_right(self.shared[0].take(x, self.shared[1]))
        if self.split == "out":
            return self._merge(self.prime(x), self.marginal(x))
        return self.prime(x[..., : self.n_prime]) + self.marginal(x[..., self.n_prime:])


class ExpertMLP(nn.Module):
    """One expert of a mixture-of-experts block as a gated FFN of its own linear layers, so each
    can be compressed like a dense FFN. Named gate/up/down (not gate_proj...): transformers would
    otherwise take `experts.N.gate_proj.weight` for a checkpoint to stack into 3-D weights."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, act_fn):
        super().__init__()
        self.gate, self.up, self.down, self.act_fn = gate, up, down, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act_fn(self.gate(x)) * self.up(x))


class Experts(nn.ModuleList):
    """Per-expert modules in place of a family's stacked-weight experts module (transformers 5
    keeps all experts in 3-D tensors): the same call, experts(hidden, top_k_index, top_k_weights),
    and the same routing arithmetic (each expert's output weighted and added to its tokens)."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, top_k_pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    @classmethod
    def empty_like(cls, module: nn.Module) -> "Experts":
        """Per-expert layers with uninitialized weights of a stacked module's shapes, dtype and
        device (from_pretrained fills them from the shards)."""
        gate_up, down = module.gate_up_proj, module.down_proj
        inter, like = gate_up.shape[1] // 2, {"dtype": gate_up.dtype, "device": gate_up.device}
        return cls(ExpertMLP(*(dense_linear(torch.empty(s, **like), None) for s in
                               ((inter, gate_up.shape[2]), (inter, gate_up.shape[2]), tuple(down.shape[1:]))),
                             module.act_fn) for _ in range(gate_up.shape[0]))

    @classmethod
    def from_stacked(cls, module: nn.Module) -> "Experts":
        """From a stacked module (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I], `act_fn`): its
        weights split per expert (views, no copy; meta stays meta)."""
        gate_up, down = module.gate_up_proj, module.down_proj
        inter = gate_up.shape[1] // 2
        return cls(ExpertMLP(dense_linear(gate_up[e, :inter], None), dense_linear(gate_up[e, inter:], None),
                             dense_linear(down[e], None), module.act_fn) for e in range(gate_up.shape[0]))


def fuse_shared_inputs(model: nn.Module, sola: dict) -> int:
    """Fuse the right factors of each input group of `sola["input_groups"]` whose layers are all
    compressed (FactoredLinear, or NeuronSplitLinear splitting outputs). Returns the groups fused."""
    fused = 0
    for block in model.get_submodule(sola["layers_path"]):
        for g, names in enumerate(sola.get("input_groups", [])):
            layers = [block.get_submodule(n) for n in names]
            if len(layers) < 2 or not all(isinstance(m, FactoredLinear) or
                                          (isinstance(m, NeuronSplitLinear) and m.split == "out") for m in layers):
                continue
            pieces = [p for m in layers for p in m.right()]
            weight = torch.cat([p.detach() for p in pieces])
            name = f"_sola_shared_input_{g}"
            block.register_buffer(name, weight, persistent=False)
            start = 0
            for p in pieces:  # the layers' parameters become views of the concatenation
                p.data = weight[start:start + p.shape[0]]
                start += p.shape[0]
            shared = SharedInput(block, name, [sum(p.shape[0] for p in m.right()) for m in layers])
            for i, m in enumerate(layers):
                m.shared = (shared, i)
            fused += 1
    return fused


def weight_shapes(spec: dict, m: int, n: int) -> dict:
    """The weight tensors (names relative to the layer) a layer of original shape m x n stores
    under `spec`, with their shapes."""
    rank, prime, split = spec.get("rank"), spec.get("prime"), spec.get("split")

    def part(prefix, rows, cols):
        if rank is None:
            return {prefix + "weight": (rows, cols)}
        return {prefix + "lowrank.a": (rows, rank), prefix + "lowrank.b": (rank, cols)}

    if prime is None:
        return part("", m, n)
    if split == "out":
        prime *= spec.get("chunks", 1)
        return {"prime.weight": (prime, n), **part("marginal.", m - prime, n)}
    return {"prime.weight": (m, prime), **part("marginal.", m, n - prime)}


def empty_layer(spec: dict, linear: nn.Linear) -> nn.Module:
    """The compressed form of `linear` under `spec`, with uninitialized parameters of the stored
    shapes, dtype and device of `linear` (from_pretrained fills them from the shards). A bias
    stays with the output rows it belongs to; an input split keeps it on the prime part."""
    m, n = linear.out_features, linear.in_features
    like = {"dtype": linear.weight.dtype, "device": linear.weight.device}
    weights = {k: torch.empty(s, **like) for k, s in weight_shapes(spec, m, n).items()}

    def bias(rows, wanted=linear.bias is not None):
        return torch.empty(rows, **like) if wanted else None

    def dense_or_factored(prefix, b):
        if prefix + "weight" in weights:
            return dense_linear(weights[prefix + "weight"], b)
        return FactoredLinear(weights[prefix + "lowrank.a"], weights[prefix + "lowrank.b"], b)

    if "prime" not in spec:
        return dense_or_factored("", bias(m))
    if spec["split"] == "out":
        p = spec["prime"] * spec.get("chunks", 1)
        return NeuronSplitLinear(dense_linear(weights["prime.weight"], bias(p)),
                                 dense_or_factored("marginal.", bias(m - p)), "out", spec.get("chunks", 1))
    return NeuronSplitLinear(dense_linear(weights["prime.weight"], bias(m)), dense_or_factored("marginal.", None), "in")


def dense_linear(weight: torch.Tensor, bias) -> nn.Linear:
    with torch.device("meta"):
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def compress_layers(model: nn.Module, sola: dict) -> None:
    """Swap the linear layers of `model`'s blocks for their compressed forms (config.json `sola`)."""
    blocks = model.get_submodule(sola["layers_path"])
    for block, entry in zip(blocks, sola["blocks"]):
        if "experts_path" in sola:  # per-expert layers in place of the family's stacked experts
            block.set_submodule(sola["experts_path"], Experts.empty_like(block.get_submodule(sola["experts_path"])))
        for name, spec in entry["layers"].items():
            if spec.get("rank") is not None or "prime" in spec:
                block.set_submodule(name, empty_layer(spec, block.get_submodule(name)))


class _SolaMixin:
    """A family's CausalLM whose blocks take the compressed forms named in `config.sola`."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        compress_layers(self, config.sola)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        fuse_shared_inputs(model, model.config.sola)
        return model


_CLASSES: dict = {}


def _make(name: str):
    """Sola<X>Config from transformers' <X>Config, Sola<Family>ForCausalLM from <Family>ForCausalLM
    (whose config class is Sola + its base's config class name: Gemma 3's text model has
    Gemma3TextConfig)."""
    if name in _CLASSES:
        return _CLASSES[name]
    if name.endswith("Config"):
        base_config = getattr(transformers, name[len("Sola"):])
        cls = type(name, (base_config,), {"model_type": "sola_" + base_config.model_type, "__module__": __name__})
    else:
        base_model = getattr(transformers, name[len("Sola"):])
        config_cls = _make("Sola" + base_model.config_class.__name__)
        cls = type(name, (_SolaMixin, base_model), {"config_class": config_cls, "__module__": __name__})
    _CLASSES[name] = cls
    return cls


def __getattr__(name: str):
    if name.startswith("Sola") and name.endswith(("ForCausalLM", "ForConditionalGeneration", "Config")) and \
            len(name) > len("SolaConfig"):
        try:
            return _make(name)
        except AttributeError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
