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

from .calibration import read_text, tokenize
from .checkpoint import CheckpointReader
from .engine import embed_windows, load_tokenizer
from .errors import InputError
from .modules import build_block
from .plan import DEFAULT_BATCH_TOKENS
from .section import block_specs, build_checked, check_sola_section
from .skeleton import Skeleton
from .stats import run_block

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


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None, where: str) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens from the start of `ids` (the tail is dropped)."""
    n = ids.numel() // seqlen
    if n == 0:
        raise InputError(f"{where}: {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model: str, text_path: str, seqlen: int = DEFAULT_EVAL_SEQLEN, max_windows: int | None = None,
               device: str | torch.device = "cpu", batch_tokens: int | None = None,
               progress: bool = True) -> EvalResult:
    t0 = time.time()
    reader = CheckpointReader(model)
    skeleton = Skeleton(reader)
    sola = reader.config_dict.get("sola")
    if sola is not None:
        check_sola_section(sola, skeleton.num_blocks, skeleton.adapter.linears, str(reader.path / "config.json"))
    path = Path(text_path)
    if not path.is_file():
        raise InputError(f"{path}: evaluation text not found")
    tokenizer = load_tokenizer(reader.path)
    ids = tokenize(tokenizer, read_text(path, "evaluation text"), add_special_tokens=True)
    windows = eval_windows(ids, seqlen, max_windows, str(path))
    batch = max(1, (batch_tokens or DEFAULT_BATCH_TOKENS[torch.device(device).type]) // seqlen)
    states, kwargs = embed_windows(skeleton, windows, batch)
    for i in tqdm(range(skeleton.num_blocks), desc="eval", unit="block", disable=not progress):
        tensors = reader.tensors(skeleton.adapter.block_prefix(i))
        block = build_checked(lambda: build_block(skeleton.meta_block(i), tensors, block_specs(sola, i), device,
                                                  torch.float32), str(reader.path), i)
        run_block(block, states, kwargs[i], device, batch, out=states)
        del block
    nll_sum, count = 0.0, 0
    for w in range(len(windows)):  # one window at a time: logits are seqlen x vocab
        logits = skeleton.logits(states[w:w + 1]).float()[0, :-1]
        target = windows[w, 1:]
        nll_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        count += target.numel()
    nll = nll_sum / count
    return EvalResult(ppl=math.exp(nll), nll=nll, windows=len(windows), seqlen=seqlen, tokens=count,
                      text=str(path), seconds=time.time() - t0)
