#!/usr/bin/env python
"""Write a random-weight, sharded Hugging Face checkpoint with a real model's shapes.

Compute time and memory of compression depend on the shapes, not on the values, so a 70B-shaped
checkpoint with a few blocks measures what a real 70B run costs per block without downloading
140 GB. Configs of real models are kept in tools/configs/. Tensor names and shapes are those of the
family's own model built from the config on the meta device, so any supported family works.

  python tools/make_synthetic_checkpoint.py --config tools/configs/llama-2-70b.json --blocks 2 \\
      --out models/synthetic-llama-2-70b-2

Output: config.json (num_hidden_layers = --blocks), one safetensors shard per block plus one for
the embeddings/norm/head, model.safetensors.index.json, and a byte-level BPE tokenizer trained on
the shipped calibration text (its vocabulary is smaller than the model's; ids stay in range).
Linear weights are N(0, 1/in_features) so hidden states keep a realistic scale through blocks.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
CALIB_TEXT = ROOT / "sola_stream" / "data" / "wiki.valid.tokens"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def train_tokenizer(vocab_size: int, text_chars: int = 200_000):
    """A byte-level BPE tokenizer trained on the shipped calibration text (seconds, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CALIB_TEXT.read_text(encoding="utf-8")[:text_chars]], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def model_shapes(cfg: dict) -> tuple[str, dict[str, tuple[int, ...]], dict[str, tuple[int, ...]], str]:
    """(blocks prefix, one block's tensor shapes relative to it, the outer tensors' shapes, the input
    embedding's name), read off the family's model built from `cfg` on the meta device: every
    family sola_stream supports."""
    from sola_stream.families import family_for, family_for_dict, meta_model, transformers_config

    config = transformers_config(family_for_dict(cfg).with_blocks(cfg, 1))
    family = family_for(config)
    model = meta_model(config)
    family.prepare(model.get_submodule(family.layers_path)[0])  # experts as per-expert layers
    prefix = family.layers_path + "."
    state = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    block = {n[len(prefix) + 2:]: s for n, s in state.items() if n.startswith(prefix + "0.")}
    outer = {n: s for n, s in state.items() if not n.startswith(prefix)}
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        outer.pop(family.head_path + ".weight", None)
    embed = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    return prefix, block, outer, embed


def block_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of one decoder block (names relative to the block)."""
    return model_shapes(cfg)[1]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    t = torch.empty(shape, dtype=torch.float32)
    for r in range(0, shape[0], 4096):  # in row slabs: bounded float32 temporaries
        t[r:r + 4096].normal_(0.0, shape[1] ** -0.5, generator=gen)
    return t.to(dtype)


def make_checkpoint(config: Path, blocks: int, out: Path, seed: int = 0, tokenizer_vocab: int = 4096) -> Path:
    from sola_stream.families import family_for_dict

    cfg = json.loads(config.read_text())
    cfg = family_for_dict(cfg, str(config)).with_blocks(cfg, blocks)
    dtype = DTYPES[cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"]
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    prefix, block, outer_shapes, embed = model_shapes(cfg)
    text = family_for_dict(cfg).text(cfg)
    h = text["hidden_size"]
    weight_map: dict[str, str] = {}
    total = 0
    n_shards = blocks + 1
    for b in range(blocks):
        name = f"model-{b + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = {f"{prefix}{b}.{k}": random_tensor(s, dtype, gen) for k, s in block.items()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        print(f"block {b + 1}/{blocks} -> {name}", flush=True)
    name = f"model-{n_shards:05d}-of-{n_shards:05d}.safetensors"
    # embeddings scaled so hidden states start at a realistic size; norms 1, heads N(0, 1/h)
    outer = {k: random_tensor(s, dtype, gen) * (h ** 0.5 / 8 if k == embed else 1)
             for k, s in outer_shapes.items()}
    save_file(outer, str(out / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in outer})
    total += sum(t.numel() * t.element_size() for t in outer.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    train_tokenizer(min(tokenizer_vocab, text["vocab_size"])).save_pretrained(out)
    print(f"done: {blocks} blocks of {config.name}, {total / 2**30:.2f} GiB -> {out}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="config.json of the real model (tools/configs/)")
    p.add_argument("--blocks", type=int, default=2, help="decoder blocks to write")
    p.add_argument("--out", required=True, type=Path, help="output checkpoint directory (new)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"error: {args.out} exists and is not empty")
    if args.blocks < 1:
        sys.exit("error: --blocks must be at least 1")
    make_checkpoint(args.config, args.blocks, args.out, args.seed)


if __name__ == "__main__":
    main()
