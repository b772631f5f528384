"""Streamed zero-shot scoring: the task definitions equal lm-evaluation-harness's (through the
shipped task configs), the streamed log-likelihoods equal an in-memory forward, and the states
may spill to disk without changing a score."""
from __future__ import annotations

import json

import pytest
import torch

import sola_stream
from sola_stream.cli import main
from sola_stream.pipeline.engine import CompressOptions, compress
from sola_stream.errors import InputError
from sola_stream.evaluation.lmeval_tasks import write_tasks
from sola_stream.evaluation.perplexity import open_model
from sola_stream.evaluation.tasks import TASKS, load_task, parse_tasks
from sola_stream.evaluation.zeroshot import encode_pair, loglikelihoods, zero_shot

from conftest import ZEROSHOT as DATA, make_tiny, needs_zeroshot

pytestmark = needs_zeroshot


@pytest.fixture(scope="module")
def lm_tasks(tmp_path_factory):
    out = tmp_path_factory.mktemp("lmtasks")
    write_tasks(str(DATA), str(out))
    return out


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory, tiny_tokenizer):
    base = tmp_path_factory.mktemp("zs")
    model = make_tiny("qwen2", base / "qwen2", tiny_tokenizer)
    compress(str(model), str(base / "out"), CompressOptions(ratio=0.3, nsamples=4, seqlen=32), progress=False)
    return base / "out"


def test_task_requests_equal_lm_eval_harness(lm_tasks):
    """Every (context, continuation) request and gold answer of the first 25 documents of each task,
    as the harness builds them from the shipped configs."""
    from lm_eval.tasks import TaskManager

    harness = TaskManager(include_path=str(lm_tasks)).load([f"{t}_local" for t in TASKS])["tasks"]
    for name in TASKS:
        task = harness[f"{name}_local"]
        task.build_all_requests(limit=25, rank=0, world_size=1)
        theirs = [inst.arguments for inst in sorted(task.instances, key=lambda x: (x.doc_id, x.idx))]
        docs = load_task(name, DATA, 25)
        ours = [(c, t) for d in docs for c, t in zip(d.contexts, d.continuations)]
        assert ours == theirs, name
        gold = [task.doc_to_text(doc) if name == "winogrande" else task.doc_to_target(doc)
                for doc in list(task.test_docs())[:25]]
        assert [d.gold for d in docs] == gold, name
        choices = [task.doc_to_choice(doc) for doc in list(task.test_docs())[:25]]
        assert [d.choices for d in docs] == choices, name  # what acc_norm divides by


def test_streamed_loglikelihoods_equal_an_in_memory_forward(tiny_out):
    reader, skeleton, tokenizer = open_model(str(tiny_out))
    docs = load_task("hellaswag", DATA, 3) + load_task("winogrande", DATA, 3)
    pairs = [encode_pair(tokenizer, c, t) for d in docs for c, t in zip(d.contexts, d.continuations)]
    streamed, spilled = loglikelihoods(str(tiny_out), pairs, skeleton, reader, torch.device("cpu"), 256, None,
                                       progress=False)
    assert not spilled and len({len(c) + len(t) for c, t in pairs}) > 3  # several lengths, several chunks
    model = sola_stream.load(tiny_out)
    with torch.no_grad():
        for (ctx, cont), ll in zip(pairs, streamed):
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(model(ids[:, :-1]).logits[0, -len(cont):], -1)
            assert abs(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()) - ll) < 1e-3


def test_spilled_states_give_the_same_scores(tiny_out):
    tasks = ["arc_easy", "boolq"]
    ram = zero_shot(str(tiny_out), tasks, str(DATA), limit=4, device="cpu", batch_tokens=512, progress=False)
    disk = zero_shot(str(tiny_out), tasks, str(DATA), limit=4, device="cpu", batch_tokens=512,
                     max_host_memory=1e-6, progress=False)
    assert disk.spilled and not ram.spilled
    assert {k: vars(v) for k, v in disk.tasks.items()} == {k: vars(v) for k, v in ram.tasks.items()}


def test_eval_tasks_cli_json_and_errors(tiny_out, capsys, tmp_path):
    assert main(["eval", str(tiny_out), "--tasks", "all", "--data", str(DATA), "--limit", "2", "--no-progress",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["tasks"]) == set(TASKS)
    for score in out["tasks"].values():
        assert set(score) == {"acc", "acc_norm", "n"} and score["n"] == 2 and 0 <= score["acc"] <= 1
    assert abs(out["mean_acc_norm"] - sum(s["acc_norm"] for s in out["tasks"].values()) / 7) < 1e-12
    for argv, named in ([["--tasks", "piqa,nope", "--data", str(DATA)], "nope"],
                        [["--tasks", "piqa"], "--data"],
                        [["--tasks", "piqa", "--data", str(tmp_path)], "piqa-valid.jsonl"],
                        [["--tasks", "piqa", "--data", str(DATA), "--limit", "0"], "--limit"]):
        assert main(["eval", str(tiny_out), *argv, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sola-stream: error:") and "\n" not in err and named in err, err
    with pytest.raises(InputError):
        parse_tasks("")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ARC-Easy-test.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(InputError, match="line 1"):
        load_task("arc_easy", bad)
