"""Shared fixtures: tiny random models (no network) with a real trained-on-the-fly tokenizer,
and the real SmolLM2-135M checkpoint when available (built by tools/make_smollm2.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT_TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(ROOT_TOOLS))
from make_synthetic_checkpoint import train_tokenizer  # noqa: E402  (shared with the tool)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SOLA_SHARED", ROOT.parent / "shared"))
WIKI_TEST = SHARED / "data" / "wikitext-2" / "wiki.test.raw"
CALIB_TEXT = ROOT / "sola_stream" / "data" / "wiki.valid.tokens"
SMOLLM2 = Path(os.environ.get("SOLA_SMOLLM2", ROOT / "models" / "smollm2-135m"))

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def output_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file of an output directory, keyed by name, except the run log (its
    timestamps and timings differ between runs that write byte-identical models)."""
    import hashlib

    from sola_stream.storage.runlog import LOG_NAME

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.is_file() and p.name != LOG_NAME}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(TINY["vocab_size"])


def make_tiny(family: str, out: Path, tokenizer, shards: bool = True, **overrides) -> Path:
    """Save a random tiny model of `family` (llama, mistral, qwen2, qwen3) with the tokenizer to `out`."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_cls, model_cls = classes[family]
    params = {**TINY, **overrides}
    if family == "llama":
        params.setdefault("tie_word_embeddings", True)
    config = config_cls(**params)
    torch.manual_seed(1234)
    model = model_cls(config).to(torch.bfloat16)
    # larger weights than the 0.02 init, so blocks do more than pass the residual through
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
    model.save_pretrained(out, max_shard_size="200KB" if shards else "1GB")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer):
    base = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny(f, base / f, tiny_tokenizer) for f in ("llama", "mistral", "qwen2")}


@pytest.fixture(scope="session")
def smollm2():
    if not (SMOLLM2 / "config.json").is_file():
        if os.environ.get("CI"):  # CI builds it in .ci/run: missing there is a failure, not a skip
            pytest.fail(f"SmolLM2 checkpoint not found at {SMOLLM2}")
        pytest.skip(f"SmolLM2 checkpoint not found at {SMOLLM2} (build it with tools/make_smollm2.py)")
    return SMOLLM2
