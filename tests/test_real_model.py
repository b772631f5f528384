"""A small version of the SmolLM2-135M comparison (docs/BENCHMARKS.md has the full one):
SoLA must beat SVD-LLM at the same achieved ratio on held-out WikiText-2 test text."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

import sola_stream
from conftest import WIKI_TEST, needs_zeroshot
from sola_stream.evaluation.perplexity import perplexity

CALIB = dict(nsamples=16, seqlen=512)
EVAL = dict(seqlen=512, max_windows=8)


@pytest.fixture(scope="module")
def results(smollm2, tmp_path_factory):
    base = tmp_path_factory.mktemp("smol")
    out = {"dense": (perplexity(str(smollm2), str(WIKI_TEST), progress=False, **EVAL), None)}
    for method in ("sola", "svd-llm"):
        # the API's defaults are the CLI's (sola: --prime-ratio auto, model-wide allocation and probe)
        s = sola_stream.compress(smollm2, base / method, method=method, ratio=0.3, progress=False, **CALIB)
        out[method] = (perplexity(str(base / method), str(WIKI_TEST), progress=False, **EVAL), s)
    return out, base


def test_sola_beats_svd_llm_at_30_percent(results):
    res, _ = results
    dense, sola, svdllm = res["dense"][0].ppl, res["sola"][0].ppl, res["svd-llm"][0].ppl
    print(f"ppl dense {dense:.2f} sola {sola:.2f} svd-llm {svdllm:.2f}")
    assert 10 < dense < 40  # a trained model, evaluated correctly
    assert dense < sola < svdllm
    assert sola < 0.8 * svdllm  # a clear margin, not noise (measured: see docs/BENCHMARKS.md)
    for method in ("sola", "svd-llm"):
        s = res[method][1]
        assert abs(s.achieved_ratio_blocks - 0.3) <= 0.005
        assert 0.15 < s.achieved_ratio_model < s.achieved_ratio_blocks  # embeddings are not compressed


def test_compressed_smollm2_generates(results, smollm2):
    _, base = results
    tok = AutoTokenizer.from_pretrained(base / "sola", trust_remote_code=True)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    chat = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        dense = sola_stream.load(smollm2)
        answer = dense.generate(**chat, max_new_tokens=12, do_sample=False)
        assert "Paris" in tok.decode(answer[0, chat["input_ids"].shape[1]:])  # the loader on a dense dir
        model = sola_stream.load(base / "sola")
        ids = tok("The capital of France is", return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=12, do_sample=False)
        # greedy generation agrees with the compressed model's own full forward pass
        logits = model(gen[:, :-1]).logits[0, ids["input_ids"].shape[1] - 1:]
    new = gen[0, ids["input_ids"].shape[1]:]
    text = tok.decode(new, skip_special_tokens=True)
    print("generated:", repr(text))
    assert new.numel() == 12 and text.strip()
    assert torch.equal(logits.argmax(-1), new)


def test_compressed_smollm2_loads_with_transformers_alone(results, tmp_path):
    """The real model's output through AutoModelForCausalLM (trust_remote_code, in a process where
    sola_stream cannot be imported) gives sola_stream.load's logits."""
    from test_transformers_loading import IDS, load_in_child

    _, base = results
    with torch.no_grad():
        ref = sola_stream.load(base / "sola")(torch.tensor(IDS)).logits[0]
    report = load_in_child(base / "sola", tmp_path)
    assert "trust_remote_code=True" in report["without_trust"]
    torch.testing.assert_close(torch.tensor(report["logits"]), ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(torch.tensor(report["resaved_logits"]), torch.tensor(report["logits"]))


@needs_zeroshot
def test_streamed_zero_shot_agrees_with_lm_eval(results, smollm2, tmp_path):
    """The first 100 documents of each of the seven tasks, dense and SoLA 30%: the streamed
    evaluator's acc and acc_norm equal lm-evaluation-harness's (through the shipped task configs,
    the output loaded by transformers with trust_remote_code) within 0.005."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from conftest import ZEROSHOT
    from sola_stream.evaluation.lmeval_tasks import write_tasks
    from sola_stream.evaluation.tasks import TASKS
    from sola_stream.evaluation.zeroshot import zero_shot

    data = ZEROSHOT
    write_tasks(str(data), str(tmp_path / "tasks"))
    _, base = results
    for model in (smollm2, base / "sola"):
        ours = zero_shot(str(model), list(TASKS), str(data), limit=100, device="cpu", progress=False)
        theirs = simple_evaluate(model="hf", model_args=f"pretrained={model},trust_remote_code=True,dtype=float32",
                                 tasks=[f"{t}_local" for t in TASKS], limit=100, batch_size=16, device="cpu",
                                 task_manager=TaskManager(include_path=str(tmp_path / "tasks")))["results"]
        for name in TASKS:
            row = theirs[f"{name}_local"]
            print(model.name, name, vars(ours.tasks[name]), {k: v for k, v in row.items() if "stderr" not in k})
            assert ours.tasks[name].n == 100
            assert abs(ours.tasks[name].acc - row["acc,none"]) <= 0.005, (model, name)
            if "acc_norm,none" in row:
                assert abs(ours.tasks[name].acc_norm - row["acc_norm,none"]) <= 0.005, (model, name)
