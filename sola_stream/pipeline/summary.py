"""What a finished compression reports: the run's summary, each block's manifest entry, and
the `sola` section of the output's config.json (storage/sola_section.py checks it on load)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sola_stream import __version__
from sola_stream.method.block_compress import BlockResult
from sola_stream.pipeline.memory import PeakMemory
from sola_stream.pipeline.options import CompressOptions
from sola_stream.storage import output
from sola_stream.storage.checkpoint import CheckpointReader
from sola_stream.storage.sola_section import FORMAT_VERSION as SECTION_VERSION


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
    threads: str = ""  # CPU threads used and what chose the number
    final_states: torch.Tensor | None = None  # last block's outputs, when asked for (tests, analysis)
    states_on_disk: bool = False  # calibration states spilled to memory-mapped files
    peak_rss: int = 0  # bytes, host, sampled over the whole call
    peak_gpu: int = 0  # bytes allocated by torch on the GPU (0 without CUDA)



def block_entry(i: int, result: BlockResult, input_sha256: str) -> dict:
    return {"block": i, "shard": output.block_shard_name(i), "input_sha256": input_sha256,
            "dense_params": result.dense_params,
            "kept_params": result.kept_params, "layers": result.specs,
            "whitened_error": {k: round(v, 6) for k, v in result.error.items()}, "damping": result.damping,
            **({"kept_dense_no_tokens": result.starved} if result.starved else {}),
            **({"prime_split": result.prime_split} if result.prime_split is not None else {})}


def sola_section(options: CompressOptions, calib_desc: str, manifest: dict, reader: CheckpointReader,
                  family, fp: dict) -> dict:
    blocks = manifest["blocks"]
    dense = sum(b["dense_params"] for b in blocks)
    kept = sum(b["kept_params"] for b in blocks)
    model_dense = output.model_params(reader)
    model_kept = model_dense - (dense - kept)
    return {
        "format_version": SECTION_VERSION,
        "package_version": __version__,
        "base_model_type": family.name,
        "layers_path": family.layers_path,
        "method": options.method,
        "ratio": options.ratio,
        "prime_ratio": options.prime_ratio if options.method == "sola" else 0.0,
        "ratio_definition": "fraction of decoder-block linear weight parameters removed",
        "target_ratio_model": options.model_ratio,
        "achieved_ratio_blocks": 1.0 - kept / dense,
        "achieved_ratio_model": 1.0 - model_kept / model_dense,
        "params": {"blocks_dense": dense, "blocks_kept": kept, "model_dense": model_dense, "model_kept": model_kept},
        "calibration": {"source": calib_desc, "sha256": fp["calibration_sha256"], "nsamples": options.nsamples,
                        "seqlen": options.seqlen, "seed": options.seed},
        "propagate": options.propagate,
        "fit": options.fit,
        "allocation": options.allocation,
        "linears": list(family.linears),
        "input_groups": family.shared_inputs,  # layers sharing one input (fused at load)
        **({"experts_path": family.experts.path} if family.experts else {}),  # per-expert layers (nn.Experts)
        **({"prime_choices": list(options.prime_choices)} if options.prime_choices else {}),
        "blocks": [{"layers": b["layers"], "whitened_error": b["whitened_error"],
                    **({"prime_split": b["prime_split"]} if "prime_split" in b else {})} for b in blocks],
        "fingerprint": fp,
    }


def summarize(out_dir: Path, options: CompressOptions, t0: float, n: int, device: torch.device, start: int,
             final_states, spilled: bool, threads: str, mem: PeakMemory) -> Summary:
    sola = json.loads((out_dir / "config.json").read_text())["sola"]
    return Summary(output=str(out_dir), method=options.method, target_ratio=options.ratio,
                   achieved_ratio_blocks=sola["achieved_ratio_blocks"],
                   achieved_ratio_model=sola["achieved_ratio_model"], seconds=time.time() - t0, blocks=n,
                   device=str(device), resumed_at=start, final_states=final_states,
                   states_on_disk=spilled, threads=threads, peak_rss=max(mem.overall_rss, mem.peak_rss, mem.sample()),
                   peak_gpu=max(mem.overall_gpu, mem.peak_gpu()[0]))
