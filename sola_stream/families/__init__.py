"""Model families: the one place that knows how a family's decoder block is built.

A family is described, not coded: which linear layers read one input (one covariance serves
them), which rows and columns are the FFN neurons (a fused gate_up layer stacks two neuron blocks
on dim 0), its experts if any, where the blocks, final norm and head live, how the head
post-processes logits, and how checkpoint tensor names map to module names.
The statistics hooks, the block compression, the planner and the tools iterate over the
description; the description is checked against the family's own block (built on the meta device
by transformers) when a model is opened. Attention, rotary embeddings, norms and masks are run by
the family's own transformers classes. To add a family, see docs/DESIGN.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from sola_stream.errors import InputError
from sola_stream.nn import attention


@dataclass(frozen=True)
class InputGroup:
    """Linear layers of a block that read the same input, in forward order of the groups."""

    key: str  # names the group's covariance in statistics, logs and run files
    linears: tuple[str, ...]  # module names relative to the block


@dataclass(frozen=True)
class Neurons:
    """The FFN neurons: output rows of `rows` layers and input columns of `cols`."""

    rows: tuple[str, ...]  # e.g. gate_proj and up_proj, or the fused gate_up_proj
    cols: str  # e.g. down_proj: its input is the neurons' activations
    chunks: int = 1  # neuron blocks stacked on dim 0 of each rows layer (a fused gate_up: 2)


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts FFN. transformers 5 runs all experts from stacked 3-D weights; blocks
    are built with that module replaced by nn.Experts (one gated FFN of linear layers `gate`,
    `up`, `down` per expert), so each expert is compressed like any FFN."""

    path: str  # the family's experts module in a block
    count: str  # text config attribute holding the number of experts
    stored: tuple[str, str, str]  # the checkpoint's per-expert gate, up and down layer names


@dataclass(frozen=True)
class Family:
    name: str  # transformers' model_type
    groups: tuple[InputGroup, ...]
    neurons: Neurons | None  # the dense FFN (a shared expert), None in a family of experts only
    layers_path: str = "model.layers"  # the ModuleList of decoder blocks in the CausalLM
    norm_path: str = "model.norm"  # final norm, applied after the last block
    head_path: str = "lm_head"
    logit_softcap: str | None = None  # text config attribute: logits = cap * tanh(logits / cap)
    # sdpa takes is_causal when no mask is given; families whose attention sdpa cannot compute
    # (Gemma 2's soft-capped scores) run eager, with the explicit masks the model builds
    attention: str = "sdpa"
    # multimodal checkpoints: the config.json key holding the language model's own fields (its
    # blocks are compressed; everything else, such as a vision tower, is copied untouched)
    text_config: str | None = None
    experts: Experts | None = None
    expert_neurons: tuple[Neurons, ...] = ()  # one per expert, filled by bind()

    def bind(self, config) -> "Family":
        """The description for one model: a family of experts gets one input group pair and one
        neuron group per expert (their number is in the config)."""
        if self.experts is None:
            return self
        p, count = self.experts.path, getattr(config.get_text_config(), self.experts.count)
        groups, neurons = list(self.groups), []
        for e in range(count):
            gate, up, down = (f"{p}.{e}.{n}" for n in ("gate", "up", "down"))
            groups += [InputGroup(f"expert{e}_in", (gate, up)), InputGroup(f"expert{e}_mid", (down,))]
            neurons.append(Neurons(rows=(gate, up), cols=down))
        return replace(self, groups=tuple(groups), expert_neurons=tuple(neurons))

    def prepare(self, block: nn.Module) -> nn.Module:
        """The block with its stacked experts module replaced by per-expert layers (meta stays meta)."""
        if self.experts is not None:
            from sola_stream.nn.modeling_sola import Experts as PerExpert

            module = block.get_submodule(self.experts.path)
            if not isinstance(module, PerExpert):
                block.set_submodule(self.experts.path, PerExpert.from_stacked(module))
        return block

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for g in self.groups for name in g.linears)

    @property
    def shared_inputs(self) -> list[list[str]]:
        """Groups of two or more layers: their right factors are fused at load (config.json)."""
        return [list(g.linears) for g in self.groups if len(g.linears) > 1]

    @property
    def neuron_groups(self) -> tuple[Neurons, ...]:
        """Every set of FFN neurons of a block: the dense FFN (or shared expert), then one per
        expert. Each is split into prime and marginal neurons on its own scores."""
        return ((self.neurons,) if self.neurons else ()) + self.expert_neurons

    def neuron_key(self, neurons: Neurons) -> str:
        """The input group whose input is these neurons' activations (their scores come from it)."""
        return self.group_of(neurons.cols)

    def group_of(self, linear: str) -> str:
        return next(g.key for g in self.groups if linear in g.linears)

    def text(self, cfg: dict, where: str = "config.json") -> dict:
        """The language model's fields of a config.json dict (the dict itself unless multimodal)."""
        if self.text_config is None:
            return cfg
        sub = cfg.get(self.text_config)
        if not isinstance(sub, dict):
            raise InputError(f"{where}: {self.text_config!r} must be an object holding the language model's fields")
        return sub

    def with_blocks(self, cfg: dict, n: int, where: str = "config.json") -> dict:
        """A config.json dict for the first `n` blocks of its model: per-block lists (such as
        `layer_types`, one entry per block) are cut to match."""
        text = self.text(cfg, where)
        blocks = text.get("num_hidden_layers")
        cut = {k: v[:n] for k, v in text.items() if isinstance(v, list) and len(v) == blocks and k != "architectures"}
        text = {**text, **cut, "num_hidden_layers": n}
        return text if self.text_config is None else {**cfg, self.text_config: text}

    def block_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."

    def check(self, block: nn.Module, where: str) -> None:
        """The description matches the family's block (meta or real): every layer named is an
        nn.Linear, a group's layers share their input width, and the neuron layers agree on the
        neuron count. InputError naming the module and shapes otherwise."""
        def linear(name):
            try:
                m = block.get_submodule(name)
            except AttributeError:
                raise InputError(f"{where}: family {self.name!r} expects a linear layer {name!r} in each block, "
                                 f"the model has none") from None
            if not isinstance(m, nn.Linear):
                raise InputError(f"{where}: {name!r} is a {type(m).__name__}, family {self.name!r} expects nn.Linear")
            return m
        for g in self.groups:
            widths = {n: linear(n).in_features for n in g.linears}
            if len(set(widths.values())) != 1:
                raise InputError(f"{where}: layers {', '.join(widths)} should read one input, but their input widths "
                                 f"differ ({', '.join(map(str, widths.values()))})")
        for neurons in self.neuron_groups:
            count = linear(neurons.cols).in_features
            for name in neurons.rows:
                rows = linear(name).out_features
                if rows != neurons.chunks * count:
                    raise InputError(f"{where}: {name!r} has {rows} output rows, {neurons.cols!r} has {count} input "
                                     f"columns: expected {neurons.chunks} x {count} rows")

    def neuron_count(self, block: nn.Module) -> int:
        """FFN neurons of the block, all experts together."""
        return sum(block.get_submodule(n.cols).in_features for n in self.neuron_groups)


_ATTENTION = (InputGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
              InputGroup("attn_out", ("self_attn.o_proj",)))


def _gated(name: str, **kw) -> Family:
    """The LLaMA block shape: q/k/v on one input, o_proj, gate/up on one input, down_proj."""
    return Family(name=name, groups=_ATTENTION + (
        InputGroup("ffn_in", ("mlp.gate_proj", "mlp.up_proj")),
        InputGroup("ffn_mid", ("mlp.down_proj",))),
        neurons=Neurons(rows=("mlp.gate_proj", "mlp.up_proj"), cols="mlp.down_proj"), **kw)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    _gated("llama"),
    _gated("mistral"),
    _gated("qwen2"),  # q/k/v biases: carried by the layers
    _gated("qwen3"),  # q/k norms: untouched, like every norm
    _gated("gemma2", logit_softcap="final_logit_softcapping", attention="eager"),  # sandwich norms untouched
    _gated("gemma3_text", logit_softcap="final_logit_softcapping"),
    # Gemma 3 with its vision tower (Gemma3ForConditionalGeneration): the text tower is compressed;
    # this class applies no final logit soft-cap (its forward is the reference)
    _gated("gemma3", layers_path="model.language_model.layers", norm_path="model.language_model.norm",
           text_config="text_config"),
    Family(name="mixtral", groups=_ATTENTION, neurons=None,
           experts=Experts("mlp.experts", "num_local_experts", ("w1", "w3", "w2"))),
    Family(name="qwen3_moe", groups=_ATTENTION, neurons=None,
           experts=Experts("mlp.experts", "num_experts", ("gate_proj", "up_proj", "down_proj"))),
    # the shared expert is a dense FFN; its sigmoid gate (mlp.shared_expert_gate) and the router stay dense
    Family(name="qwen2_moe", groups=_ATTENTION + (
        InputGroup("shared_in", ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")),
        InputGroup("shared_mid", ("mlp.shared_expert.down_proj",))),
        neurons=Neurons(rows=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                        cols="mlp.shared_expert.down_proj"),
        experts=Experts("mlp.experts", "num_experts", ("gate_proj", "up_proj", "down_proj"))),
    Family(name="phi3", groups=(  # fused projections: qkv_proj, and gate_up_proj split by chunk(2)
        InputGroup("attn_in", ("self_attn.qkv_proj",)),
        InputGroup("attn_out", ("self_attn.o_proj",)),
        InputGroup("ffn_in", ("mlp.gate_up_proj",)),
        InputGroup("ffn_mid", ("mlp.down_proj",))),
        neurons=Neurons(rows=("mlp.gate_up_proj",), cols="mlp.down_proj", chunks=2)),
)}

OUTPUT_PREFIX = "sola_"  # model_type of an output: "sola_" + the family's (see modeling_sola.py)


def base_model_type(cfg: dict):
    """The family of a config.json: an output's "sola_llama" is "llama"."""
    model_type = cfg.get("model_type")
    if isinstance(model_type, str) and model_type.startswith(OUTPUT_PREFIX) and "sola" in cfg:
        return model_type[len(OUTPUT_PREFIX):]
    return model_type


def family_for_dict(cfg: dict, where: str = "config.json") -> Family:
    return family_for(SimpleNamespace(model_type=base_model_type(cfg)), where)


def family_for(config, where: str = "config.json") -> Family:
    """The family of a transformers config (or anything with a model_type), bound to the config
    when it has one (experts counted)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise InputError(f"{where}: unsupported architecture model_type={model_type!r} "
                         f"(supported: {', '.join(sorted(FAMILIES))})")
    family = FAMILIES[model_type]
    return family.bind(config) if hasattr(config, "get_text_config") else family


def transformers_config(cfg: dict, where: str = "config.json"):
    """The family's transformers config from a config.json dict (an output's "sola_<family>" is
    read as its family's), with the family's attention implementation."""
    family = family_for_dict(cfg, where)
    try:
        config = CONFIG_MAPPING[family.name].from_dict(
            {k: v for k, v in cfg.items() if k not in ("model_type", "auto_map")})
    except Exception as exc:
        raise InputError(f"{where}: cannot be read as a transformers config ({type(exc).__name__}: {exc})") from None
    # sdpa runs as nn/attention.py's variant (grouped heads repeated where torch needs it)
    config._attn_implementation = attention.NAME if family.attention == "sdpa" else family.attention
    return config


def meta_model(config, where: str = "config.json", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The family's CausalLM for `config` with parameters on the meta device (no memory)."""
    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # e.g. widths that do not divide into heads
        raise InputError(f"{where}: cannot build the model it describes ({type(exc).__name__}: {exc})") from None


def runtime_names(cfg: dict, names, where: str = "config.json") -> dict[str, str]:
    """{checkpoint tensor name: run-time module name} for the names that differ: the family's own
    loading renames (transformers' conversion mapping; e.g. Gemma 3's `language_model.model.layers`
    are the model's `model.language_model.layers`). Tensors that transformers would convert, not
    just rename (per-expert weights stacked into one), are refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    family = family_for_dict(cfg, where)
    model = meta_model(transformers_config(family.with_blocks(cfg, 1, where), where), where)
    rules = get_model_conversion_mapping(model) or []
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    experts = None
    if family.experts is not None:  # per-expert 2-D weights, read as nn.Experts' layers
        x = family.experts
        stored = "|".join(re.escape(n) for n in x.stored)
        experts = re.compile(rf"^(.*\.{re.escape(x.path)}\.\d+\.)({stored})(\.weight)$")
        ours = dict(zip(x.stored, ("gate", "up", "down")))
    out = {}
    for name in names:
        new, _ = rename_source_key(name, renamings, [], model.base_model_prefix, None)
        hit = experts.match(new) if experts else None
        if hit:
            new = hit.group(1) + ours[hit.group(2)] + hit.group(3)
        elif rename_source_key(name, renamings, converters, model.base_model_prefix, None)[1] is not None:
            raise InputError(f"{where}: tensor {name!r} is stored in a layout sola_stream cannot read yet")
        if new != name:
            out[name] = new
    return out
