"""Outputs load with transformers alone (trust_remote_code, the modeling_sola.py they carry), in a
process where sola_stream cannot be imported: same logits as sola_stream.load, bfloat16,
device_map="auto", generate, pipeline, save_pretrained; and without trust_remote_code they fail
loudly instead of loading random weights."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import sola_stream
from sola_stream.pipeline.engine import CompressOptions, compress
from sola_stream.storage.output import MODELING_SOURCE

from conftest import ALL_FAMILIES, make_tiny

FAMILIES = list(ALL_FAMILIES)
IDS = [[1, 5, 9, 20, 7, 33, 2, 11]]

CHILD = r"""
import json, sys
sys.modules["sola_stream"] = None  # the package cannot be imported in this process
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

out, resaved, ids = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
report = {}
try:
    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    report["without_trust"] = "loaded"
except ValueError as exc:
    report["without_trust"] = str(exc)
m = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
with torch.no_grad():
    report["logits"] = m(ids).logits[0].tolist()
report["class"] = type(m).__name__
report["generate"] = m.generate(ids, max_new_tokens=4, do_sample=False)[0].tolist()
m.save_pretrained(resaved)
again = AutoModelForCausalLM.from_pretrained(resaved, trust_remote_code=True, dtype=torch.float32)
with torch.no_grad():
    report["resaved_logits"] = again(ids).logits[0].tolist()
bf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16, device_map="auto")
report["bf16_dtype"] = str(next(bf.parameters()).dtype)
with torch.no_grad():
    report["bf16_logits"] = bf(ids).logits[0].float().tolist()
report["tokenizer"] = type(AutoTokenizer.from_pretrained(out, trust_remote_code=True)).__name__
pipe = pipeline("text-generation", model=out, trust_remote_code=True)
report["pipeline"] = pipe("the history of", max_new_tokens=5, do_sample=False)[0]["generated_text"]
print(json.dumps(report))
"""


def load_in_child(out, tmp_path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(out), str(tmp_path / "resaved"), json.dumps(IDS)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family,method", [(f, "sola") for f in FAMILIES] + [("llama", "svd-llm")])
def test_output_loads_with_transformers_alone(tiny_tokenizer, tmp_path, family, method):
    model = make_tiny(family, tmp_path / family, tiny_tokenizer)
    out = tmp_path / "out"
    compress(str(model), str(out), CompressOptions(method=method, ratio=0.3, nsamples=4, seqlen=32), progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"sola_{family}" and (out / "modeling_sola.py").is_file()
    assert (out / "modeling_sola.py").read_bytes() == MODELING_SOURCE.read_bytes()  # one source of truth
    with torch.no_grad():
        ref = sola_stream.load(out)(torch.tensor(IDS)).logits[0]

    report = load_in_child(out, tmp_path)
    assert "trust_remote_code=True" in report["without_trust"], report["without_trust"]
    assert report["class"] == config["architectures"][0]
    logits = torch.tensor(report["logits"])
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    # the same weights (a mixture of experts may differ in the last float bit between two loads)
    torch.testing.assert_close(torch.tensor(report["resaved_logits"]), logits, rtol=0, atol=1e-5)
    assert report["bf16_dtype"] == "torch.bfloat16"
    assert (torch.tensor(report["bf16_logits"]) - ref).abs().max() < 0.1 * ref.abs().max()
    generated = report["generate"]
    assert generated[:len(IDS[0])] == IDS[0] and len(generated) == len(IDS[0]) + 4
    # greedy decoding follows the model's own argmax (the factored layers run inside generate)
    assert generated[len(IDS[0])] == int(ref[-1].argmax())
    assert report["pipeline"].startswith("the history of") and len(report["pipeline"]) > len("the history of")
    from transformers import AutoTokenizer

    assert report["tokenizer"] == type(AutoTokenizer.from_pretrained(model)).__name__  # tokenized like the dense


def test_output_of_version_01_is_upgraded_in_place(tiny_tokenizer, tmp_path, capsys):
    """An output as version 0.1 wrote it (the family's model_type, no modeling file, no marker):
    sola_stream.load warns how to upgrade; `sola-stream upgrade` makes it load with transformers
    alone, tensors untouched; a second upgrade is a no-op."""
    from sola_stream.cli import main
    from sola_stream.storage.ownership import MARKER
    from sola_stream.storage.runlog import LOG_NAME

    model = make_tiny("llama", tmp_path / "llama", tiny_tokenizer)
    out = tmp_path / "out"
    compress(str(model), str(out), CompressOptions(ratio=0.3, nsamples=4, seqlen=32), progress=False)
    config = json.loads((out / "config.json").read_text())
    for key in ("auto_map", "architectures"):
        config.pop(key)
    config["model_type"] = "llama"
    for key in ("base_model_type", "layers_path"):
        config["sola"].pop(key)
    (out / "config.json").write_text(json.dumps(config))
    for name in ("modeling_sola.py", MARKER, LOG_NAME):
        (out / name).unlink()
    shards = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    with pytest.warns(UserWarning, match="sola-stream upgrade"):
        ref = sola_stream.load(out)
    with torch.no_grad():
        ref = ref(torch.tensor(IDS)).logits[0]

    assert main(["upgrade", str(out)]) == 0
    assert "upgraded" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == shards
    report = load_in_child(out, tmp_path)
    torch.testing.assert_close(torch.tensor(report["logits"]), ref, rtol=1e-5, atol=1e-5)
    assert json.loads((out / MARKER).read_text())["complete"]
    assert main(["upgrade", str(out)]) == 0 and "nothing to do" in capsys.readouterr().out


def test_shared_input_factors_run_as_one_matmul(tiny_tokenizer, tmp_path):
    """svd-llm factors every layer: q/k/v and gate/up fuse at load (one right-hand matmul per
    group, parameters become views of one buffer, nothing added to the state dict), with the
    logits of the unfused layers."""
    from sola_stream.nn.modeling_sola import FactoredLinear, NeuronSplitLinear

    model = make_tiny("llama", tmp_path / "llama", tiny_tokenizer)
    for method in ("svd-llm", "sola"):
        out = tmp_path / method
        compress(str(model), str(out), CompressOptions(method=method, ratio=0.4, nsamples=4, seqlen=32),
                 progress=False)
        m = sola_stream.load(out)
        layers = [mod for mod in m.modules() if isinstance(mod, (FactoredLinear, NeuronSplitLinear))]
        fused = [mod for mod in layers if mod.shared is not None]
        if method == "svd-llm":
            assert len(fused) == 5 * 3  # q, k, v, gate, up in every block
        assert fused and all(not n.startswith("model.layers.0._sola") for n in m.state_dict())
        buffers = {n: b for n, b in m.named_buffers() if "_sola_shared_input" in n}
        assert buffers and fused[0].right()[0].data_ptr() >= min(b.data_ptr() for b in buffers.values())
        ids = torch.tensor(IDS)
        with torch.no_grad():
            joint = m(ids).logits
            for mod in fused:
                mod.shared = None
            separate = m(ids).logits
        torch.testing.assert_close(joint, separate, rtol=1e-5, atol=1e-5)
