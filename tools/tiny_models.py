"""Tiny random models of every supported family (no network), for the tests and tools/bench_families.py."""
from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


# every family sola_stream supports (sola_stream.families.FAMILIES), each with a tiny model in the tests
ALL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3", "mixtral", "qwen2_moe",
                "qwen3_moe")
# per-family settings a tiny model needs (Gemma and Qwen3 default to head_dim 256 and 128; Phi-3 to pad id 32000).
# Gemma's logit soft-cap is set small enough to change a tiny model's logits (|logit| < 1), so a
# streamed evaluation that forgot it would not match the family's own forward.
FAMILY_TINY = {"llama": dict(tie_word_embeddings=True), "phi3": dict(pad_token_id=0), "qwen3": dict(head_dim=16),
               "gemma2": dict(head_dim=16, final_logit_softcapping=0.25),
               "gemma3_text": dict(head_dim=16, final_logit_softcapping=0.25),
               # 4 experts, 2 per token: every expert sees about half the calibration tokens
               "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
               "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=176,
                                 shared_expert_intermediate_size=176),
               "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=176, head_dim=16)}
# multimodal families: the tiny language model goes under text_config, beside a tiny vision tower
MULTIMODAL_TINY = {"gemma3": dict(
    text=dict(head_dim=16),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       image_size=32, patch_size=8), mm_tokens_per_image=4)}


def make_tiny(family: str, out: Path, tokenizer, shards: bool = True, **overrides) -> Path:
    """Save a random tiny model of `family` (a transformers model_type) with the tokenizer to `out`."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if family in MULTIMODAL_TINY:
        extra = dict(MULTIMODAL_TINY[family])
        config = CONFIG_MAPPING[family](text_config={**TINY, **extra.pop("text"), **overrides}, **extra)
    else:
        config = CONFIG_MAPPING[family](**{**TINY, **FAMILY_TINY.get(family, {}), **overrides})
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    # larger weights than the 0.02 init, so blocks do more than pass the residual through
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
    model.save_pretrained(out, max_shard_size="200KB" if shards else "1GB")
    tokenizer.save_pretrained(out)
    return out
