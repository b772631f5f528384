"""tools/make_synthetic_checkpoint.py: real configs' shapes, N blocks, loadable and compressible."""
from __future__ import annotations

import json

import torch
from safetensors import safe_open

import sola_stream
from conftest import ROOT_TOOLS
from make_synthetic_checkpoint import block_shapes, make_checkpoint
from sola_stream.storage.checkpoint import CheckpointReader
from sola_stream.pipeline.engine import CompressOptions, compress
from sola_stream.pipeline.plan import Shapes


def test_real_configs_give_published_parameter_counts():
    # decoder-block linear parameters x blocks + embeddings/head: 6.74 B, 68.98 B and 7.24 B
    expected = {"llama-2-7b": 6.74e9, "llama-2-70b": 68.98e9, "mistral-7b": 7.24e9}
    for name, total in expected.items():
        cfg = json.loads((ROOT_TOOLS / "configs" / f"{name}.json").read_text())
        s = Shapes.from_config(cfg)
        per_block = sum(torch.Size(shape).numel() for shape in block_shapes(cfg).values())
        params = cfg["num_hidden_layers"] * per_block + s.outer_params
        assert abs(params - total) / total < 0.005, (name, params)
        assert s.block_params == per_block - 2 * s.hidden  # the plan counts what the tool writes


def test_synthetic_checkpoint_compresses_and_loads(tmp_path):
    cfg = json.loads((ROOT_TOOLS / "configs" / "mistral-7b.json").read_text())
    cfg.update(hidden_size=128, intermediate_size=448, num_attention_heads=4, num_key_value_heads=1,
               vocab_size=1000)  # mistral's layout at a test-friendly width
    small = tmp_path / "config.json"
    small.write_text(json.dumps(cfg))
    model = make_checkpoint(small, blocks=3, out=tmp_path / "synthetic", tokenizer_vocab=500)
    reader = CheckpointReader(model)
    assert len(reader.files) == 4  # one shard per block + the outer one
    with safe_open(str(reader.files[0]), framework="pt") as fh:
        assert fh.get_tensor("model.layers.0.mlp.gate_proj.weight").dtype == torch.bfloat16
    s = compress(str(model), str(tmp_path / "out"), CompressOptions(ratio=0.3, nsamples=4, seqlen=64),
                 progress=False)
    assert abs(s.achieved_ratio_blocks - 0.3) <= 0.005
    m = sola_stream.load(tmp_path / "out")
    out = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
