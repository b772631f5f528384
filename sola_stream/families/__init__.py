"""Model-family adapters: where the blocks live and what their linear layers are called.

The engine asks an adapter; it never names a family. Attention, rotary embeddings, norms and
masks are run by the family's own transformers classes (see pipeline/skeleton.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from sola_stream.errors import InputError


@dataclass(frozen=True)
class Adapter:
    """Names inside one decoder block of a gated-FFN transformer family."""

    family: str
    layers_path: str = "model.layers"  # the ModuleList of decoder blocks in the CausalLM
    norm_path: str = "model.norm"  # final norm, applied after the last block
    head_path: str = "lm_head"
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # share one input
    out_proj: str = "self_attn.o_proj"
    ffn_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # share one input; neurons are their rows
    ffn_out: str = "mlp.down_proj"  # its input columns are the FFN neurons

    @property
    def linears(self) -> tuple[str, ...]:
        return (*self.qkv, self.out_proj, *self.ffn_in, self.ffn_out)

    def block_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."


# One adapter per family. LLaMA, Mistral and Qwen2 (with q/k/v biases) share the module names;
# they are still separate entries so a family that differs gets its own without touching others.
ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter(family="llama"),
    "mistral": Adapter(family="mistral"),
    "qwen2": Adapter(family="qwen2"),
    "qwen3": Adapter(family="qwen3"),
}


OUTPUT_PREFIX = "sola_"  # model_type of an output: "sola_" + the family's (see modeling_sola.py)


def base_model_type(cfg: dict):
    """The family of a config.json: an output's "sola_llama" is "llama"."""
    model_type = cfg.get("model_type")
    if isinstance(model_type, str) and model_type.startswith(OUTPUT_PREFIX) and "sola" in cfg:
        return model_type[len(OUTPUT_PREFIX):]
    return model_type


def adapter_for_dict(cfg: dict, where: str = "config.json") -> Adapter:
    return adapter_for(SimpleNamespace(model_type=base_model_type(cfg)), where)


def adapter_for(config, where: str = "config.json") -> Adapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise InputError(
            f"{where}: unsupported architecture model_type={model_type!r} "
            f"(supported: {', '.join(sorted(ADAPTERS))})"
        )
    return ADAPTERS[model_type]
