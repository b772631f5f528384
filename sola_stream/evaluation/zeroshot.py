"""Zero-shot multiple-choice accuracy, layer-major on the streaming engine.

Every request (one per choice of every document, tasks.py) goes through block 0, then block 1,
..., with one block materialized at a time, so a model larger than the device is scored too.
Requests are tokenized exactly as lm-evaluation-harness's HF model does (context and continuation
encoded without special tokens; trailing spaces of the context moved to the continuation; the
continuation's tokens are those of the whole string after the context's), sorted by length and
packed into right-padded chunks of about `batch_tokens` tokens (causal attention: padding after
a request never changes its logits). The states of all chunks stay in host RAM, or in
memory-mapped files when they exceed the host budget. Scores: lm-eval's acc and acc_norm.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch.nn import functional as F

from sola_stream.evaluation.perplexity import blocks, open_model, setup_device
from sola_stream.pipeline.plan import DEFAULT_BATCH_TOKENS, GIB
from sola_stream.pipeline.state_cache import MappedStates
from sola_stream.pipeline.block_forward import run_block
from sola_stream.evaluation.tasks import TASKS, Doc, load_task


@dataclass
class TaskScore:
    acc: float
    acc_norm: float
    n: int


@dataclass
class ZeroShotResult:
    tasks: dict[str, TaskScore]
    seconds: float
    requests: int
    tokens: int
    spilled: bool

    @property
    def mean_acc_norm(self) -> float:
        return sum(t.acc_norm for t in self.tasks.values()) / len(self.tasks)

    @property
    def mean_acc(self) -> float:
        return sum(t.acc for t in self.tasks.values()) / len(self.tasks)

    def as_dict(self) -> dict:
        return {"tasks": {k: vars(v) for k, v in self.tasks.items()}, "mean_acc": self.mean_acc,
                "mean_acc_norm": self.mean_acc_norm, "requests": self.requests, "tokens": self.tokens,
                "seconds": self.seconds}


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HFLM._encode_pair (no special tokens, as its default for causal models)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def _chunks(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Request indices sorted by length, grouped so that rows x padded length <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            groups.append(current)
            current = []
        current.append(i)
    return groups + [current] if current else groups


@torch.no_grad()
def loglikelihoods(model: str, pairs: list[tuple[list[int], list[int]]], skeleton, reader, device: torch.device,
                   batch_tokens: int, max_host_memory: float | None, progress: bool) -> tuple[list[float], bool]:
    """Summed log-probabilities of each continuation given its context, streamed layer-major."""
    max_len = int(getattr(skeleton.config, "max_position_embeddings", 2048) or 2048)
    inputs, targets = [], []
    for ctx, cont in pairs:
        whole = (ctx + cont)[-(max_len + 1):]
        inputs.append(whole[:-1])
        targets.append(cont)
    groups = _chunks([len(x) for x in inputs], batch_tokens)
    hidden = skeleton.hidden_size
    need = sum(4 * len(g) * len(inputs[g[-1]]) * hidden for g in groups)
    budget = (max_host_memory * GIB) if max_host_memory else psutil.virtual_memory().available
    spill = need > budget / 2
    tmp = tempfile.TemporaryDirectory(prefix="sola-zeroshot-") if spill else None
    states, kwargs, maps = [], [], []
    for g, group in enumerate(groups):
        length = len(inputs[group[-1]])
        ids = torch.zeros((len(group), length), dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, :len(inputs[i])] = torch.tensor(inputs[i])
        first, kw = skeleton.embed(ids)
        if spill:
            maps.append(MappedStates(Path(tmp.name) / f"chunk-{g}.safetensors", tuple(first.shape)))
            maps[-1].tensor.copy_(first)
            maps[-1].release(len(group))
            states.append(maps[-1].tensor)
        else:
            states.append(first.float().clone())
        kwargs.append(kw)
    for b, block in blocks(reader, skeleton, device, progress, desc="zero-shot"):
        for g, group in enumerate(groups):
            run_block(block, states[g], kwargs[g][b], device, len(group), out=states[g])
            if spill:
                maps[g].release(len(group))
    scores = [0.0] * len(pairs)
    for g, group in enumerate(groups):
        for row, i in enumerate(group):
            n, k = len(inputs[i]), len(targets[i])
            logits = skeleton.logits(states[g][row:row + 1, n - k:n]).float()[0]
            target = torch.tensor(targets[i])
            scores[i] = float(F.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum())
    for m in maps:
        m.close()
    if tmp is not None:
        tmp.cleanup()
    return scores, spill


def score(docs: list[Doc], lls: list[float]) -> TaskScore:
    """lm-eval's acc and acc_norm (ties go to the first choice, as numpy's argmax)."""
    acc = acc_norm = 0
    pos = 0
    for doc in docs:
        ll = lls[pos:pos + len(doc.choices)]
        pos += len(doc.choices)
        best = max(range(len(ll)), key=lambda j: (ll[j], -j))
        norm = [ll[j] / len(doc.choices[j]) for j in range(len(ll))]
        best_norm = max(range(len(ll)), key=lambda j: (norm[j], -j))
        acc += best == doc.gold
        acc_norm += best_norm == doc.gold
    return TaskScore(acc=acc / len(docs), acc_norm=acc_norm / len(docs), n=len(docs))


def zero_shot(model: str, tasks: list[str], data: str, limit: int | None = None, device: str = "auto",
              batch_tokens: int | None = None, max_host_memory: float | None = None, threads: int | None = None,
              progress: bool = True) -> ZeroShotResult:
    """Accuracy of `model` (dense checkpoint or output) on `tasks` read from the folder `data`."""
    t0 = time.time()
    device = setup_device(device, threads, batch_tokens)
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}")
    docs = {name: load_task(name, Path(data), limit) for name in tasks}
    reader, skeleton, tokenizer = open_model(model)
    pairs = [encode_pair(tokenizer, ctx, cont) for name in tasks for d in docs[name]
             for ctx, cont in zip(d.contexts, d.continuations)]
    lls, spilled = loglikelihoods(model, pairs, skeleton, reader, device,
                                  batch_tokens or DEFAULT_BATCH_TOKENS[device.type], max_host_memory, progress)
    result, pos = {}, 0
    for name in tasks:
        count = sum(len(d.choices) for d in docs[name])
        result[name] = score(docs[name], lls[pos:pos + count])
        pos += count
    return ZeroShotResult(tasks=result, seconds=time.time() - t0, requests=len(pairs),
                          tokens=sum(len(c) + len(t) for c, t in pairs), spilled=spilled)
