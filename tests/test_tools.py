"""tools/make_synthetic_checkpoint.py: real configs' shapes, N blocks, loadable and compressible."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import sola_stream
from conftest import ROOT_TOOLS
from make_synthetic_checkpoint import block_shapes, make_checkpoint
from sola_stream.storage.checkpoint import CheckpointReader
from sola_stream.pipeline.engine import CompressOptions, compress
from sola_stream.families import family_for, family_for_dict, transformers_config
from sola_stream.pipeline.plan import Shapes


# published parameter counts (embeddings and head included, a tied head once, Gemma 3's vision
# tower included): read off the meta model built from each config, as `plan` does
PUBLISHED = {"llama-2-7b": 6.74e9, "llama-2-70b": 68.98e9, "mistral-7b": 7.24e9, "llama-3.2-1b": 1.24e9,
             "llama-3.1-405b": 405.85e9, "qwen2.5-7b": 7.62e9, "qwen2.5-72b": 72.7e9, "gemma-2-9b": 9.24e9,
             "phi-3-mini-4k": 3.82e9, "gemma-3-27b": 27.4e9, "mixtral-8x7b": 46.7e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_configs_give_published_parameter_counts(name):
    cfg = json.loads((ROOT_TOOLS / "configs" / f"{name}.json").read_text())
    s = Shapes.from_config(cfg)
    params = s.blocks * s.block_params + s.outer_params
    assert abs(params - PUBLISHED[name]) / PUBLISHED[name] < 0.005, (name, params)
    family = family_for(transformers_config(cfg))  # experts counted
    shapes = block_shapes(cfg)  # what the tool writes
    assert s.block_params == sum(torch.Size(shapes[n + ".weight"]).numel() for n in family.linears)


# real configs at a test-friendly width, one per family layout
SMALL = dict(hidden_size=128, intermediate_size=448, num_attention_heads=4, num_key_value_heads=1, vocab_size=1000,
             num_local_experts=4)


@pytest.mark.parametrize("name", ["mistral-7b", "qwen2.5-7b", "phi-3-mini-4k", "gemma-2-9b", "gemma-3-27b", "mixtral-8x7b"])
def test_synthetic_checkpoint_compresses_and_loads(tmp_path, name):
    cfg = json.loads((ROOT_TOOLS / "configs" / f"{name}.json").read_text())
    if "text_config" in cfg:
        cfg["text_config"].update(SMALL, head_dim=32)
        cfg["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        cfg["mm_tokens_per_image"] = 4
    else:
        cfg.update(SMALL, **({"head_dim": 32} if "head_dim" in cfg else {}))
        cfg.update({k: 0 for k in ("pad_token_id", "bos_token_id", "eos_token_id") if cfg.get(k, 0) >= 1000})
    small = tmp_path / "config.json"
    small.write_text(json.dumps(cfg))
    model = make_checkpoint(small, blocks=3, out=tmp_path / "synthetic", tokenizer_vocab=500)
    reader = CheckpointReader(model)
    assert len(reader.files) == 4  # one shard per block + the outer one
    layers = family_for_dict(cfg).layers_path
    with safe_open(str(reader.files[0]), framework="pt") as fh:
        assert all(fh.get_tensor(k).dtype == torch.bfloat16 for k in fh.keys())
        assert all(k.startswith(layers + ".0.") for k in fh.keys())
    s = compress(str(model), str(tmp_path / "out"), CompressOptions(ratio=0.3, nsamples=4, seqlen=64),
                 progress=False)
    assert abs(s.achieved_ratio_blocks - 0.3) <= 0.005
    m = sola_stream.load(tmp_path / "out")
    out = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
