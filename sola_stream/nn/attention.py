"""transformers' sdpa attention, with grouped key/value heads repeated where torch has no fused
kernel that takes them.

Without a mask, transformers hands grouped heads to torch (`enable_gqa`). On a GPU in float32,
the engine's compute dtype, torch's flash and cuDNN kernels do not run (half precision only)
and its memory-efficient kernel does not take grouped heads, so torch falls back to its math
kernel, which materializes every head's seqlen x seqlen scores: a LLaMA-2-70B block ran out of a
24 GiB cap on an H200 there (docs/BENCHMARKS.md, "70B on a GPU"). Repeating the key/value heads
first (2 x tokens x hidden floats more, counted by the plan) lets the memory-efficient kernel
run. On the CPU, torch's flash kernel takes grouped heads in float32: nothing changes there.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

NAME = "sola_sdpa"
_HALF = (torch.float16, torch.bfloat16)


def repeats_heads(query: torch.Tensor) -> bool:
    """Whether grouped key/value heads are repeated before torch's sdpa sees them."""
    return query.device.type != "cpu" and query.dtype not in _HALF


class _Ungrouped:
    """The attention module as sdpa_attention_forward sees it once its heads are repeated: one
    query head per key/value head, every other attribute the module's own."""

    num_key_value_groups = 1

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)


def sola_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and repeats_heads(query):
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        module = _Ungrouped(module)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, sola_sdpa_forward)
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
