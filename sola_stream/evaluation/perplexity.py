"""Perplexity, layer-major on the streaming engine: all windows through block 0, then block 1, ...

Only one block is materialized at a time, so a model larger than the device still evaluates.
Works on dense checkpoints and on sola_stream outputs alike.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from sola_stream.storage.calibration import default_eval_path, read_text, tokenize
from sola_stream.pipeline.cpus import set_threads
from sola_stream.storage.checkpoint import CheckpointReader
from sola_stream.pipeline.engine import embed_windows
from sola_stream.pipeline.setup import load_tokenizer
from sola_stream.pipeline.options import check_device, check_threads
from sola_stream.errors import InputError
from sola_stream.nn.build import build_block
from sola_stream.pipeline.plan import DEFAULT_BATCH_TOKENS
from sola_stream.storage.sola_section import block_specs, build_checked, check_sola_section
from sola_stream.pipeline.skeleton import Skeleton
from sola_stream.pipeline.block_forward import run_block

DEFAULT_EVAL_SEQLEN = 1024


@dataclass
class EvalResult:
    ppl: float
    nll: float
    windows: int
    seqlen: int
    tokens: int
    text: str
    seconds: float


def setup_device(device, threads: int | None, batch_tokens: int | None) -> torch.device:
    """The checked device (auto: CUDA when available), CPU threads set, --batch-tokens checked."""
    if batch_tokens is not None and batch_tokens < 1:
        raise InputError(f"--batch-tokens: {batch_tokens} is not positive")
    check_threads(threads)
    resolved = check_device(str(device))
    set_threads(threads)
    return resolved


def open_model(model: str):
    """(reader, skeleton, tokenizer) of a dense checkpoint or an output, its `sola` section checked."""
    reader = CheckpointReader(model)
    skeleton = Skeleton(reader)
    sola = reader.config_dict.get("sola")
    if sola is not None:
        check_sola_section(sola, skeleton.num_blocks, skeleton.family.linears, str(reader.path / "config.json"))
    return reader, skeleton, load_tokenizer(reader.path, skeleton.config)


def blocks(reader: CheckpointReader, skeleton: Skeleton, device, progress: bool, desc: str = "eval"):
    """(index, block) for every block in order, each built on `device` (float32) only while used:
    layer-major evaluation holds one block at a time."""
    sola = reader.config_dict.get("sola")
    for i in tqdm(range(skeleton.num_blocks), desc=desc, unit="block", disable=not progress):
        tensors = reader.tensors(skeleton.family.block_prefix(i))
        block = build_checked(lambda: build_block(skeleton.meta_block(i), tensors, block_specs(sola, i), device,
                                                  torch.float32), str(reader.path), i)
        yield i, block
        del block


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None, where: str) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens from the start of `ids` (the tail is dropped)."""
    n = ids.numel() // seqlen
    if n == 0:
        raise InputError(f"{where}: {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model: str, text_path: str | None = None, seqlen: int = DEFAULT_EVAL_SEQLEN,
               max_windows: int | None = None, device: str | torch.device = "auto", batch_tokens: int | None = None,
               progress: bool = True, threads: int | None = None) -> EvalResult:
    """Perplexity of `model` on non-overlapping `seqlen`-token windows of `text_path` (default: the
    shipped WikiText-2 test split), one block in memory at a time (see the module docstring)."""
    t0 = time.time()
    if seqlen < 2:
        raise InputError(f"--seqlen: {seqlen} is too short (at least 2 tokens: one predicts the next)")
    if max_windows is not None and max_windows < 1:
        raise InputError(f"--max-windows: {max_windows} is not positive")
    device = setup_device(device, threads, batch_tokens)
    text_path = text_path or str(default_eval_path())
    reader, skeleton, tokenizer = open_model(model)
    path = Path(text_path)
    if not path.is_file():
        raise InputError(f"{path}: evaluation text not found")
    ids = tokenize(tokenizer, read_text(path, "evaluation text"), add_special_tokens=True)
    windows = eval_windows(ids, seqlen, max_windows, str(path))
    batch = max(1, (batch_tokens or DEFAULT_BATCH_TOKENS[torch.device(device).type]) // seqlen)
    states, kwargs = embed_windows(skeleton, windows, batch)
    for i, block in blocks(reader, skeleton, device, progress):
        run_block(block, states, kwargs[i], device, batch, out=states)
    nll_sum, count = 0.0, 0
    for w in range(len(windows)):  # one window at a time: logits are seqlen x vocab
        logits = skeleton.logits(states[w:w + 1]).float()[0, :-1]
        target = windows[w, 1:]
        nll_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        count += target.numel()
    nll = nll_sum / count
    return EvalResult(ppl=math.exp(nll), nll=nll, windows=len(windows), seqlen=seqlen, tokens=count,
                      text=str(path), seconds=time.time() - t0)
