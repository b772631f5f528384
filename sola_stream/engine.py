"""The block loop: reader -> (stats -> compress -> write -> commit -> propagate) per block -> writer.

Only one decoder block's weights are materialized at a time. Calibration hidden states stay on
the host and are streamed through the block on the compute device in chunks. Every finished
block is committed (runstate.py), so an interrupted run resumes at the first unfinished block.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from . import __version__, faults, output
from .calibration import (DEFAULT_NSAMPLES, DEFAULT_SEED, DEFAULT_SEQLEN, calibration_windows,
                          read_calibration_text, text_hash, tokenize)
from .checkpoint import CheckpointReader
from .compress import METHODS, BlockResult, compress_block
from .errors import InputError, OutputError
from .modules import build_block
from .runstate import GracefulStop, Interrupted, RunDir, fingerprint
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
        if self.nsamples < 1 or self.seqlen < 2 or self.batch_tokens < 1:
            raise InputError("--nsamples, --seqlen and --batch-tokens must be positive (seqlen >= 2)")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def result_options(self, device: torch.device) -> dict:
        """Every option that changes the output bytes (the run fingerprint)."""
        opts = asdict(self)
        opts.pop("calib")  # its content is fingerprinted by hash instead
        opts["device"] = device.type
        if self.method != "sola":
            opts["prime_ratio"] = 0.0
        return opts


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
    resumed_at: int = 0  # first block computed by this call (0: a fresh run)
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


def compress(model: str, out: str, options: CompressOptions, progress: bool = True,
             keep_final_states: bool = False, overwrite: bool = False) -> Summary:
    options.validate()
    t0 = time.time()
    device = options.resolved_device()
    reader = CheckpointReader(model)
    skeleton = Skeleton(reader)
    adapter = skeleton.adapter
    out_dir = Path(out)
    if out_dir.resolve() == reader.path.resolve():
        raise OutputError(f"{out_dir}: output directory is the input model directory")
    tokenizer = load_tokenizer(reader.path)
    text, calib_desc = read_calibration_text(options.calib)
    windows = calibration_windows(tokenize(tokenizer, text, add_special_tokens=False), options.nsamples,
                                  options.seqlen, options.seed, calib_desc)
    batch = max(1, options.batch_tokens // options.seqlen)
    fp = fingerprint(reader, options.result_options(device), text_hash(text))

    with RunDir(out_dir, fp, overwrite) as run, GracefulStop() as stop:
        if run.finished:
            return _summary(out_dir, options, t0, skeleton.num_blocks, device, skeleton.num_blocks, None)
        run.cleanup_orphans()
        start = run.next_block
        if start < skeleton.num_blocks:
            states, kwargs = embed_windows(skeleton, windows[:1], 1) if start else embed_windows(skeleton, windows, batch)
            if start:
                states = run.load_states()
            else:
                _check_finite(states, "calibration states after the embeddings")
                run.save_initial_states(states)
        bar = tqdm(range(start, skeleton.num_blocks), desc="compress", unit="block", disable=not progress,
                   initial=start, total=skeleton.num_blocks)
        for i in bar:
            result = _compress_one(i, reader, skeleton, states, kwargs[i], options, device, batch)
            output.write_block(out_dir, i, adapter.block_prefix(i), result.tensors)
            faults.hit("block_written")
            last = i == skeleton.num_blocks - 1
            run.commit_block(i, _block_entry(i, result), None if last and not keep_final_states else states)
            faults.hit("block_committed")
            bar.set_postfix(kept=f"{result.kept_params / result.dense_params:.3f}")
            if stop.requested and not last:
                bar.close()
                raise Interrupted(f"{out_dir}: stopped by signal after block {i} of {skeleton.num_blocks}; "
                                  "run the same command again to resume")
        sola = _sola_section(options, calib_desc, run.manifest, reader, adapter, fp)
        output.finish(out_dir, reader, skeleton.num_blocks, adapter.layers_path + ".", sola)
        faults.hit("config_written")
        run.complete()
    final = states if keep_final_states and start < skeleton.num_blocks else None
    return _summary(out_dir, options, t0, skeleton.num_blocks, device, start, final)


def _compress_one(i: int, reader: CheckpointReader, skeleton: Skeleton, states: torch.Tensor, kwargs: dict,
                  options: CompressOptions, device: torch.device, batch: int) -> BlockResult:
    """Statistics, compression and propagation of block i. `states` are replaced in place by the
    next block's inputs (one copy of the states at any time)."""
    adapter = skeleton.adapter
    prefix = adapter.block_prefix(i)
    weights = reader.tensors(prefix)
    _check_finite_weights(weights, reader, prefix)
    storage = weights[adapter.linears[0] + ".weight"].dtype
    block = build_block(skeleton.meta_block(i), weights, None, device, torch.float32)
    stats = BlockStats(block, adapter)
    keep_original = options.propagate == "original"
    try:
        run_block(block, states, kwargs, device, batch, out=states if keep_original else None)
    except FloatingPointError as exc:
        raise InputError(f"calibration states in block {i} ({prefix}*): NaN or Inf values: {exc}") from None
    stats.remove()
    del block
    result = compress_block(weights, stats.cov, stats.neuron_scores(), adapter, options.method,
                            options.ratio, options.prime_ratio, storage)
    del stats
    if not keep_original:
        cblock = build_block(skeleton.meta_block(i), result.tensors, result.specs, device, torch.float32)
        try:
            run_block(cblock, states, kwargs, device, batch, out=states)
        except FloatingPointError as exc:
            raise InputError(f"calibration states after compressed block {i}: NaN or Inf values: {exc}") from None
        del cblock
    _check_finite(states, f"calibration states after block {i}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _block_entry(i: int, result: BlockResult) -> dict:
    return {"block": i, "shard": output.block_shard_name(i), "dense_params": result.dense_params,
            "kept_params": result.kept_params, "layers": result.specs,
            "whitened_error": {k: round(v, 6) for k, v in result.error.items()}, "damping": result.damping}


def _sola_section(options: CompressOptions, calib_desc: str, manifest: dict, reader: CheckpointReader,
                  adapter, fp: dict) -> dict:
    blocks = manifest["blocks"]
    dense = sum(b["dense_params"] for b in blocks)
    kept = sum(b["kept_params"] for b in blocks)
    model_dense = output.model_params(reader)
    model_kept = model_dense - (dense - kept)
    return {
        "format_version": 1,
        "package_version": __version__,
        "method": options.method,
        "ratio": options.ratio,
        "prime_ratio": options.prime_ratio if options.method == "sola" else 0.0,
        "ratio_definition": "fraction of decoder-block linear weight parameters removed",
        "achieved_ratio_blocks": 1.0 - kept / dense,
        "achieved_ratio_model": 1.0 - model_kept / model_dense,
        "params": {"blocks_dense": dense, "blocks_kept": kept, "model_dense": model_dense, "model_kept": model_kept},
        "calibration": {"source": calib_desc, "sha256": fp["calibration_sha256"], "nsamples": options.nsamples,
                        "seqlen": options.seqlen, "seed": options.seed},
        "propagate": options.propagate,
        "linears": list(adapter.linears),
        "blocks": [{"layers": b["layers"], "whitened_error": b["whitened_error"]} for b in blocks],
        "fingerprint": fp,
    }


def _summary(out_dir: Path, options: CompressOptions, t0: float, n: int, device: torch.device, start: int,
             final_states) -> Summary:
    sola = json.loads((out_dir / "config.json").read_text())["sola"]
    return Summary(output=str(out_dir), method=options.method, target_ratio=options.ratio,
                   achieved_ratio_blocks=sola["achieved_ratio_blocks"],
                   achieved_ratio_model=sola["achieved_ratio_model"], seconds=time.time() - t0, blocks=n,
                   device=str(device), resumed_at=start, final_states=final_states)


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise InputError(f"{what}: NaN or Inf values")


def _check_finite_weights(weights: dict[str, torch.Tensor], reader: CheckpointReader, prefix: str) -> None:
    for name, t in weights.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"{reader.path / reader.weight_map[prefix + name]}: tensor {prefix + name!r} has NaN or Inf")
