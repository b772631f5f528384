"""Family descriptions (sola_stream.families): every registered family is tested, a description that
does not fit the family's block is a one-line input error, and a block compressed with nothing
dropped (ratio 0, prime split on) computes what the dense block computes in every family, which
checks the neuron bookkeeping (fused gate_up chunks included) against the family's own forward."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ALL_FAMILIES
from sola_stream.errors import InputError
from sola_stream.families import FAMILIES, InputGroup, Neurons, family_for, family_for_dict
from sola_stream.method.block_compress import compress_block
from sola_stream.nn.build import build_block, linear_params
from sola_stream.pipeline.block_forward import BlockStats


def test_every_registered_family_has_a_tiny_model_test():
    assert set(FAMILIES) == set(ALL_FAMILIES)


def test_unsupported_family_lists_the_supported_ones():
    with pytest.raises(InputError) as err:
        family_for_dict({"model_type": "gpt2"}, "m/config.json")
    msg = str(err.value)
    assert "m/config.json" in msg and "gpt2" in msg and all(f in msg for f in FAMILIES) and "\n" not in msg


@pytest.fixture(scope="module")
def llama_block(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    return model.model.layers[0]


@pytest.mark.parametrize("change,expect", [
    (dict(groups=(InputGroup("attn_in", ("self_attn.qkv_proj",)),)), "'self_attn.qkv_proj'"),
    (dict(groups=(InputGroup("x", ("self_attn.q_proj", "mlp.down_proj")),)), "input widths differ"),
    (dict(neurons=Neurons(rows=("mlp.gate_proj",), cols="mlp.down_proj", chunks=2)), "expected 2 x 176 rows"),
    (dict(neurons=Neurons(rows=("input_layernorm",), cols="mlp.down_proj")), "expects nn.Linear"),
])
def test_description_that_does_not_fit_the_block_is_refused(llama_block, change, expect):
    family = dataclasses.replace(FAMILIES["llama"], **change)
    with pytest.raises(InputError) as err:
        family.check(llama_block, "m/config.json")
    assert expect in str(err.value) and str(err.value).startswith("m/config.json: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("family_name", ALL_FAMILIES)
def test_nothing_dropped_reproduces_the_dense_model(tiny_models, family_name):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family_name], dtype=torch.float32).eval()
    family = family_for(model.config)
    layers = model.get_submodule(family.layers_path)
    family.prepare(layers[0])  # experts as one FFN each (their stacked weights split, same outputs)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = BlockStats(layers[0], family)
    with torch.no_grad():
        ref = model(ids).logits
    stats.remove()
    weights = {k: v.clone() for k, v in layers[0].state_dict().items()}
    res = compress_block(weights, dict(stats.cov), stats.neuron_scores(), family, "sola", 0.0, 0.25, torch.float32)
    for g in family.neuron_groups:
        assert all(res.specs[n]["prime"] == round(0.25 * 176) for n in (*g.rows, g.cols))
    assert res.kept_params <= res.dense_params
    assert res.kept_params == sum(linear_params(res.specs[n], *weights[n + ".weight"].shape) for n in family.linears)
    layers[0] = build_block(layers[0], res.tensors, res.specs, "cpu", torch.float32)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


def test_multimodal_checkpoint_compresses_the_text_tower_only(tiny_models, tmp_path):
    """Gemma 3 with a vision tower: its checkpoint names (`language_model.model.layers...`) are read
    under the model's run-time names, the text blocks are compressed, and every other tensor (vision
    tower, projector, embeddings) reaches the output with the same values."""
    import json

    import sola_stream
    from sola_stream.families import runtime_names
    from sola_stream.storage.checkpoint import CheckpointReader

    src, out = tiny_models["gemma3"], tmp_path / "out"
    sola_stream.compress(src, out, ratio=0.3, nsamples=4, seqlen=32, progress=False)
    inp, res = CheckpointReader(src), CheckpointReader(out)
    renames = runtime_names(inp.config_dict, inp.names())
    assert renames["language_model.model.layers.0.mlp.down_proj.weight"] == \
        "model.language_model.layers.0.mlp.down_proj.weight"
    blocks = FAMILIES["gemma3"].layers_path + "."
    others = [n for n in inp.names() if not renames.get(n, n).startswith(blocks)]
    assert any("vision_tower" in n for n in others) and any("multi_modal_projector" in n for n in others)
    for name in others:
        assert torch.equal(res.get(renames.get(name, name)), inp.get(name)), name
    sola = json.loads((out / "config.json").read_text())["sola"]
    assert sola["layers_path"] == FAMILIES["gemma3"].layers_path and abs(sola["achieved_ratio_blocks"] - 0.3) < 0.005
    assert set(sola["blocks"][0]["layers"]) == set(FAMILIES["gemma3"].linears)


@pytest.mark.parametrize("family_name", ["mixtral", "qwen3_moe"])
def test_per_expert_module_computes_what_the_stacked_experts_compute(family_name):
    """nn.Experts (one gated FFN per expert, the form experts are compressed in) reproduces the
    family's own stacked 3-D experts module on the same weights and routing."""
    from transformers import AutoModelForCausalLM as Auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from sola_stream.nn.modeling_sola import Experts

    config = CONFIG_MAPPING[family_name](hidden_size=32, intermediate_size=48, moe_intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         vocab_size=64, num_local_experts=4, num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    moe = Auto.from_config(config).model.layers[0].mlp
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        x = torch.randn(2, 10, 32)
        ref = moe(x)
        ref = ref[0] if isinstance(ref, tuple) else ref
        moe.experts = Experts.from_stacked(moe.experts)
        out = moe(x)
        out = out[0] if isinstance(out, tuple) else out
    assert len(moe.experts) == 4 and "3.down.weight" in dict(moe.experts.named_parameters())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_expert_without_tokens_stays_dense_and_is_reported(tiny_models):
    """An expert no calibration token was routed to has no statistics: it is kept dense, listed in
    the result (the manifest records it), and the block still meets its budget."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"], dtype=torch.float32).eval()
    family = family_for(model.config)
    block = family.prepare(model.model.layers[0])
    stats = BlockStats(block, family)
    with torch.no_grad():
        model(torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0)))
    stats.remove()
    covs, scores = dict(stats.cov), stats.neuron_scores()
    for key in ("expert3_in", "expert3_mid"):  # as if the router never chose expert 3
        covs.pop(key)
    scores.pop("expert3_mid")
    weights = {k: v.clone() for k, v in block.state_dict().items()}
    res = compress_block(weights, covs, scores, family, "sola", 0.3, 0.15, torch.float32)
    assert sorted(res.starved) == ["mlp.experts.3.down", "mlp.experts.3.gate", "mlp.experts.3.up"]
    assert all(res.specs[n] == {"rank": None} for n in res.starved)
    assert "mlp.experts.3.gate.weight" in res.tensors
    assert abs(1 - res.kept_params / res.dense_params - 0.3) < 0.005


def test_engine_attention_repeats_grouped_heads_and_computes_the_same(monkeypatch):
    """Blocks run with nn/attention.py's sdpa (eager families keep eager). Where it repeats grouped
    key/value heads (a GPU in float32: torch has no fused kernel for them there, docs/MEMORY.md)
    the output is the stock sdpa's on the same inputs."""
    from transformers import LlamaConfig
    from sola_stream.families import transformers_config
    from sola_stream.nn import attention
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=97).to_dict()
    config = transformers_config(cfg)
    assert config._attn_implementation == attention.NAME
    from transformers import Gemma2Config
    assert transformers_config(Gemma2Config().to_dict())._attn_implementation == "eager"
    # the predicate: float32 off the CPU repeats; the CPU and half precision do not
    assert attention.repeats_heads(torch.empty(1, device="meta"))
    assert not attention.repeats_heads(torch.empty(1))
    assert not attention.repeats_heads(torch.empty(1, device="meta", dtype=torch.bfloat16))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 97, (3, 33))
    calls = []
    monkeypatch.setattr(attention, "repeats_heads", lambda q: calls.append(q.shape) or True)
    with torch.no_grad():
        repeated = model(ids).logits
        model.config._attn_implementation = "sdpa"  # transformers' own: grouped heads to torch
        stock = model(ids).logits
    assert len(calls) == 2  # every block's attention took the repeating path
    torch.testing.assert_close(repeated, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family_name", ["llama", "mixtral"])
def test_several_ratios_from_one_layout_equal_each_ratio_alone(tiny_models, family_name):
    """compress_shares (several ratios' outputs of a block, pipeline/lockstep.py): each split's
    whitening and spectra are made once for all of them, and each output's tensors are exactly
    those of a layout made for its ratio, budget and layer weights alone; a ratio that leaves no
    room beyond the prime neurons gets its BudgetError."""
    from sola_stream.method.block_compress import BudgetError, Layout, Share, compress_shares
    from sola_stream.phases import listening
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family_name], dtype=torch.float32).eval()
    family = family_for(model.config)
    block = family.prepare(model.get_submodule(family.layers_path)[0])
    stats = BlockStats(block, family)
    with torch.no_grad():
        model(torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0)))
    stats.remove()
    weights = {k: v.to(torch.bfloat16) for k, v in block.state_dict().items()}
    scores = stats.neuron_scores()
    importance = {n: 4.0 ** -k for k, n in enumerate(family.linears)}  # a model-wide allocation's layer weights
    dense = sum(weights[n + ".weight"].numel() for n in family.linears)
    shares = [Share(0.2), Share(0.99), Share(0.4, importance=importance), Share(0.4), Share(0.0, budget=dense // 2)]
    spectra = []
    with listening(lambda name, entering: spectra.append(name) if entering and name == "spectra" else None):
        results = compress_shares(weights, dict(stats.cov), scores, family, "sola", 0.25, torch.bfloat16, shares)
    assert len(spectra) == len(family.linears)  # once per layer, not once per layer and ratio
    assert isinstance(results[1], BudgetError) and "ratio 0.99" in str(results[1])
    for share, got in zip(shares, results):
        if share.ratio == 0.99:
            continue
        with torch.no_grad():  # the reference: a layout of its own for this share, fitted layer by layer
            layout = Layout(weights, dict(stats.cov), scores, family, "sola", share.ratio, 0.25, share.budget,
                            importance=share.importance)
            alone = layout.result(weights, {n: layout.fit(n, weights, torch.bfloat16) for n in family.linears})
        assert got.specs == alone.specs and got.kept_params == alone.kept_params and got.error == alone.error
        assert got.tensors.keys() == alone.tensors.keys()
        assert all(torch.equal(got.tensors[k], alone.tensors[k]) for k in got.tensors), share
    assert results[0].kept_params > results[3].kept_params
    assert results[2].specs != results[3].specs  # the layer weights moved ranks at the same ratio
    assert abs(results[4].kept_params - dense // 2) <= dense * 0.01  # the budget, not the ratio, set it


def test_a_share_that_does_not_fit_frees_the_layout_at_once(tiny_models):
    """A BudgetError is handed back without its traceback: with one, it would keep the layout
    (bases, whitening factors, the covariances: gigabytes on a 70B block's device) in a reference
    cycle until the garbage collector ran."""
    import gc
    import weakref
    from sola_stream.method import block_compress
    from sola_stream.method.block_compress import BudgetError, Share, compress_shares
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    family = family_for(model.config)
    block = model.model.layers[0]
    stats = BlockStats(block, family)
    with torch.no_grad():
        model(torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0)))
    stats.remove()
    weights = {k: v.clone() for k, v in block.state_dict().items()}
    made = []

    class Tracked(block_compress.Layout):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(weakref.ref(self))

    original, block_compress.Layout = block_compress.Layout, Tracked
    gc.disable()
    try:
        results = compress_shares(weights, dict(stats.cov), stats.neuron_scores(), family, "sola", 0.65,
                                  torch.float32, [Share(0.99)])
        assert isinstance(results[0], BudgetError)
        assert made and made[0]() is None  # freed by reference counting alone
    finally:
        gc.enable()
        block_compress.Layout = original
