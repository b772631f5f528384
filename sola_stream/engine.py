"""The block loop: reader -> (stats -> compress -> write -> propagate) per block -> writer.

Only one decoder block's weights are materialized at a time. Calibration hidden states stay on
the host and are streamed through the block on the compute device in chunks.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from . import __version__
from .calibration import (DEFAULT_NSAMPLES, DEFAULT_SEED, DEFAULT_SEQLEN, calibration_windows,
                          read_calibration_text, text_hash, tokenize)
from .checkpoint import CheckpointReader
from .compress import METHODS, BlockResult, compress_block
from .errors import InputError
from .modules import build_block
from .output import OutputWriter
from .skeleton import Skeleton
from .stats import BlockStats, run_block

PROPAGATE = ("compressed", "original")


@dataclass
class CompressOptions:
    method: str = "sola"
    ratio: float = 0.2
    prime_ratio: float = 0.15
    calib: str | None = None
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_SEQLEN
    seed: int = DEFAULT_SEED
    device: str = "auto"
    propagate: str = "compressed"
    batch_tokens: int = 8192  # tokens per forward chunk through a block

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--method: {self.method!r} is not one of {', '.join(METHODS)}")
        if not 0.0 < self.ratio < 1.0:
            raise InputError(f"--ratio: {self.ratio} is out of range (0, 1)")
        if not 0.0 <= self.prime_ratio < 1.0:
            raise InputError(f"--prime-ratio: {self.prime_ratio} is out of range [0, 1)")
        if self.propagate not in PROPAGATE:
            raise InputError(f"--propagate: {self.propagate!r} is not one of {', '.join(PROPAGATE)}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise InputError(f"--device: {self.device!r} is not cpu, cuda or cuda:N")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"--device {self.device}: CUDA is not available on this machine")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class Summary:
    output: str
    method: str
    target_ratio: float
    achieved_ratio_blocks: float
    achieved_ratio_model: float
    seconds: float
    blocks: int
    device: str
    report: list[dict] = field(default_factory=list)
    final_states: torch.Tensor | None = None  # last block's outputs, when asked for (tests, analysis)


def load_tokenizer(path: Path):
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise InputError(f"{path}: tokenizer missing or unreadable ({type(exc).__name__}: {exc})") from None


def embed_windows(skeleton: Skeleton, windows: torch.Tensor, batch: int) -> tuple[torch.Tensor, dict[int, dict]]:
    """First block's inputs for all windows (on the host, float32) and per-block kwargs.
    The kwargs are captured with batch 1 so they broadcast over any chunk size."""
    _, kwargs = skeleton.embed(windows[:1])
    chunks = [skeleton.embed(windows[s:s + batch])[0].float() for s in range(0, len(windows), batch)]
    return torch.cat(chunks), kwargs


def compress(model: str, output: str, options: CompressOptions, progress: bool = True,
             keep_final_states: bool = False) -> Summary:
    options.validate()
    t0 = time.time()
    device = options.resolved_device()
    reader = CheckpointReader(model)
    skeleton = Skeleton(reader)
    adapter = skeleton.adapter
    tokenizer = load_tokenizer(reader.path)
    text, calib_desc = read_calibration_text(options.calib)
    ids = tokenize(tokenizer, text, add_special_tokens=False)
    windows = calibration_windows(ids, options.nsamples, options.seqlen, options.seed, calib_desc)
    batch = max(1, options.batch_tokens // options.seqlen)
    writer = OutputWriter(Path(output), reader)
    states, kwargs = embed_windows(skeleton, windows, batch)
    _check_finite(states, "calibration states after the embeddings")

    report: list[dict] = []
    bar = tqdm(range(skeleton.num_blocks), desc="compress", unit="block", disable=not progress)
    for i in bar:
        prefix = adapter.block_prefix(i)
        weights = reader.tensors(prefix)
        _check_finite_weights(weights, reader, prefix)
        storage = weights[adapter.linears[0] + ".weight"].dtype
        block = build_block(skeleton.meta_block(i), weights, None, device, torch.float32)
        stats = BlockStats(block, adapter)
        # one copy of the states: the original block's outputs replace them only when propagating those
        keep_original = options.propagate == "original"
        run_block(block, states, kwargs[i], device, batch, out=states if keep_original else None)
        stats.remove()
        del block
        result = compress_block(weights, stats.cov, stats.neuron_scores(), adapter, options.method,
                                options.ratio, options.prime_ratio, storage)
        del stats
        writer.write_block(i, prefix, result)
        if not keep_original:
            cblock = build_block(skeleton.meta_block(i), result.tensors, result.specs, device, torch.float32)
            run_block(cblock, states, kwargs[i], device, batch, out=states)
            del cblock
        _check_finite(states, f"calibration states after block {i}")
        report.append(_block_report(i, result))
        bar.set_postfix(kept=f"{result.kept_params / result.dense_params:.3f}")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    writer.finish(_sola_section(options, calib_desc, text, report, writer, reader, adapter),
                  adapter.layers_path + ".")
    summary = Summary(output=str(writer.out_dir), method=options.method, target_ratio=options.ratio,
                      achieved_ratio_blocks=writer.ratio_blocks(), achieved_ratio_model=writer.ratio_model(),
                      seconds=time.time() - t0, blocks=skeleton.num_blocks, device=str(device), report=report,
                      final_states=states if keep_final_states else None)
    return summary


def _block_report(i: int, result: BlockResult) -> dict:
    return {"block": i, "dense_params": result.dense_params, "kept_params": result.kept_params,
            "layers": result.specs, "whitened_error": {k: round(v, 6) for k, v in result.error.items()},
            "damping": result.damping}


def _sola_section(options: CompressOptions, calib_desc: str, text: str, report: list[dict],
                  writer: OutputWriter, reader: CheckpointReader, adapter) -> dict:
    opts = asdict(options)
    return {
        "format_version": 1,
        "package_version": __version__,
        "method": options.method,
        "ratio": options.ratio,
        "prime_ratio": options.prime_ratio if options.method == "sola" else 0.0,
        "ratio_definition": "fraction of decoder-block linear weight parameters removed",
        "achieved_ratio_blocks": writer.ratio_blocks(),
        "achieved_ratio_model": writer.ratio_model(),
        "params": {"blocks_dense": writer.dense_block_params, "blocks_kept": writer.kept_block_params,
                   "model_dense": writer.model_dense_params(), "model_kept": writer.model_kept_params()},
        "calibration": {"source": calib_desc, "sha256": text_hash(text), "nsamples": options.nsamples,
                        "seqlen": options.seqlen, "seed": options.seed},
        "propagate": options.propagate,
        "options": {k: opts[k] for k in ("batch_tokens",)},
        "linears": list(adapter.linears),
        "blocks": [{"layers": r["layers"], "whitened_error": r["whitened_error"]} for r in report],
    }


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise InputError(f"{what}: NaN or Inf values")


def _check_finite_weights(weights: dict[str, torch.Tensor], reader: CheckpointReader, prefix: str) -> None:
    for name, t in weights.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"{reader.path / reader.weight_map[prefix + name]}: tensor {prefix + name!r} has NaN or Inf")
