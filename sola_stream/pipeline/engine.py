"""The block loop: reader -> (stats -> compress -> write -> commit -> propagate) per block -> writer.

Only one decoder block's weights are materialized at a time. Calibration hidden states stay on
the host and are streamed through the block on the compute device in chunks. Every finished
block is committed (resume.py), so an interrupted run resumes at the first unfinished block.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from sola_stream import __version__, faults
from sola_stream.storage import output
from sola_stream.storage.calibration import TOKENIZE_PIECE_CHARS, calibration_windows, read_calibration_text, text_hash, tokenize
from sola_stream.storage.checkpoint import CheckpointReader
from sola_stream.method.block_compress import BlockResult, compress_block
from sola_stream.pipeline.cpus import set_threads
from sola_stream.errors import InputError, OutputError
from sola_stream.pipeline.memory import PeakMemory, release_free_memory, to_host
from sola_stream.nn.build import build_block
from sola_stream.pipeline.overlap import Background, Prefetch
from sola_stream.pipeline.plan import available_host_memory, make_plan
from sola_stream.pipeline.options import CompressOptions
from sola_stream.storage.input_checks import check_finite_tensors
from sola_stream.storage.runlog import RunLog
from sola_stream.pipeline.resume import RunDir, fingerprint
from sola_stream.storage.sola_section import FORMAT_VERSION as SECTION_VERSION
from sola_stream.pipeline.stop import GracefulStop, Interrupted
from sola_stream.pipeline.skeleton import Skeleton
from sola_stream.pipeline.paired import compress_compensated
from sola_stream.phases import phase
from sola_stream.pipeline.state_cache import StateCache, Streams
from sola_stream.pipeline.survey import survey
from sola_stream.pipeline.block_forward import BlockStats, run_block


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


def load_tokenizer(path: Path, config=None):
    """The checkpoint's tokenizer. `config`: the model's transformers config, given so that an
    output's config.json (model_type "sola_<family>", remote code) is never read for it."""
    try:
        return AutoTokenizer.from_pretrained(str(path), **({"config": config} if config is not None else {}))
    except Exception as exc:
        raise InputError(f"{path}: tokenizer missing or unreadable ({type(exc).__name__}: {exc})") from None


def embed_windows(skeleton: Skeleton, windows: torch.Tensor, batch: int, out: torch.Tensor | None = None,
                  release=None) -> tuple[torch.Tensor, dict[int, dict]]:
    """First block's inputs for all windows (float32, written into `out` or a new tensor, chunk by
    chunk) and the per-block kwargs, captured with batch 1 so they broadcast over any chunk size."""
    first, kwargs = skeleton.embed(windows[:1])
    if out is None:
        out = torch.empty((len(windows), windows.shape[1], first.shape[-1]), dtype=torch.float32)
    for s in range(0, len(windows), batch):
        chunk = skeleton.embed(windows[s:s + batch])[0]
        _check_finite(chunk, f"calibration states after the embeddings (windows {s}..{s + len(chunk) - 1})")
        out[s:s + batch].copy_(chunk)
        if release is not None:
            release(s + batch)
    return out, kwargs


def check_paths(model_dir: Path, out_dir: Path) -> None:
    """The output may not be, hold or sit inside the input model (nothing may touch the input)."""
    src, dst = model_dir.resolve(), out_dir.resolve()
    if src == dst:
        raise OutputError(f"{out_dir}: output directory is the input model directory")
    if src.is_relative_to(dst):
        raise OutputError(f"{out_dir}: output directory contains the input model ({model_dir})")
    if dst.is_relative_to(src):
        raise OutputError(f"{out_dir}: output directory is inside the input model directory ({model_dir})")


def blocks_ratio(options: CompressOptions, reader: CheckpointReader, family, n: int) -> CompressOptions:
    """A ratio of the whole model restated as the ratio of the block linear weights that removes
    the same number of parameters (only block linears are compressed)."""
    if options.ratio_of == "blocks":
        return options
    linears = sum(math.prod(reader.shape(family.block_prefix(i) + name + ".weight"))
                  for i in range(n) for name in family.linears)
    ratio = options.ratio * output.model_params(reader) / linears
    if ratio >= 1.0:
        raise InputError(f"--ratio {options.ratio} --ratio-of model: the block linear weights are only "
                         f"{linears / output.model_params(reader):.1%} of the model's parameters")
    return replace(options, ratio=ratio, ratio_of="blocks", model_ratio=options.ratio)


def outer_digest(reader: CheckpointReader, layers_prefix: str) -> str:
    return reader.digest("", [n for n in reader.names() if not n.startswith(layers_prefix)])


def compress(model: str, out: str, options: CompressOptions, progress: bool = True,
             keep_final_states: bool = False, overwrite: bool = False, shared: dict | None = None) -> Summary:
    """Compress `model` into `out`. `shared`: a dict kept across the outputs of one multi-ratio
    run (what they can share is left in it: the survey of --allocation global)."""
    options.validate()
    t0 = time.time()
    threads = "{} ({})".format(*set_threads(options.threads))
    device = options.resolved_device()
    reader = CheckpointReader(model)
    out_dir = Path(out)
    check_paths(reader.path, out_dir)
    if "sola" in reader.config_dict:
        raise InputError(f"{reader.path / 'config.json'}: is a sola-stream output; compress the original model")
    skeleton = Skeleton(reader)
    family = skeleton.family
    options = blocks_ratio(options, reader, family, skeleton.num_blocks)
    plan = make_plan(reader.config_dict, options, device, measure=progress,  # the bar's first ETA
                     budget_host=None if options.max_host_memory else available_host_memory())
    plan.check()
    options = replace(options, batch_tokens=plan.batch_tokens,
                      decompose_on="host" if plan.decompose_on_host else "device")
    tokenizer = load_tokenizer(reader.path, skeleton.config)
    text, calib_desc = read_calibration_text(options.calib)
    windows = calibration_windows(tokenize(tokenizer, text, False, TOKENIZE_PIECE_CHARS), options.nsamples,
                                  options.seqlen, options.seed, calib_desc)
    calib_sha256 = text_hash(text)
    del text
    release_free_memory()
    batch = max(1, options.batch_tokens // options.seqlen)
    fp = fingerprint(reader, options.result_options(device), calib_sha256)
    n = skeleton.num_blocks
    layers_prefix = family.layers_path + "."

    with RunDir(out_dir, fp, output.planned_files(reader, n), overwrite) as run, GracefulStop() as stop, \
            PeakMemory() as mem:
        summary = dict(options=options, t0=t0, n=n, device=device, spilled=plan.spill, threads=threads, mem=mem)
        if run.finished:
            return _summary(out_dir, start=n, final_states=None, **summary)
        log = RunLog(out_dir)
        outer = outer_digest(reader, layers_prefix)
        start = run.next_block
        log.write("start", block=start, blocks=n, version=__version__, device=str(device), threads=threads,
                  options=options.result_options(device), calibration=calib_desc, spill=plan.spill)
        if start:
            t_verify = time.time()
            verify = tqdm(total=start, desc="verify", unit="block", disable=not progress)
            run.verify(outer, lambda i: reader.digest(family.block_prefix(i)), torch.get_num_threads(), verify.update)
            verify.close()
            log.write("verified", blocks=start, seconds=round(time.time() - t_verify, 3))
        run.cleanup_orphans()
        cache = Streams(run.dir, on_disk=plan.spill, original=options.two_streams)
        commits = Background("commit")
        final = None
        try:
            if start < n:
                if run.manifest["states"] is None and start:
                    raise OutputError(f"{run.dir / 'manifest.json'}: damaged run manifest (no calibration states "
                                      f"recorded for block {start}); run with --overwrite to start over")
                if start and options.two_streams and "original_sha256" not in run.manifest["states"]:
                    raise OutputError(f"{run.dir / 'manifest.json'}: damaged run manifest (no original-model states "
                                      f"recorded for block {start}); run with --overwrite to start over")
                budgets = run.manifest.get("budgets")
                if start and (options.allocation == "global") != (budgets is not None and len(budgets) == n):
                    raise OutputError(f"{run.dir / 'manifest.json'}: damaged run manifest (block budgets of the "
                                      f"model-wide allocation missing or not {n}); run with --overwrite to start over")
                if run.manifest["states"] is None:  # a fresh run: embed the windows
                    target = cache.create((len(windows), options.seqlen, skeleton.hidden_size))
                    kwargs = embed_windows(skeleton, windows, batch, target, cache.main.release)[1]
                    budgets = None
                    if options.allocation == "global":  # the survey overwrites the states: embedded again
                        budgets = _budgets(skeleton, target, kwargs, options, device, batch, cache, progress, log,
                                           shared)
                        embed_windows(skeleton, windows, batch, target, cache.main.release)
                    run.commit_start(outer, cache.take_first()(), budgets)
                else:
                    kwargs = skeleton.embed(windows[:1])[1]
                    cache.open(start)
            weights = Prefetch(reader, skeleton, device)
            bar = tqdm(range(start, n), desc="compress", unit="block", disable=not progress, initial=start, total=n)
            if plan.seconds_per_block:  # until the first block ends, tqdm has no rate of its own
                bar.set_postfix_str(f"planned ETA {bar.format_interval(plan.seconds_per_block * (n - start))}")
            mem.reset()
            for i in bar:
                t_block, last = time.time(), i == n - 1
                block_weights, digest = weights.get(i, i + 1 if not last else None)
                result = _compress_one(i, block_weights, skeleton, cache, kwargs[i], options, device, batch, commits,
                                       need_outputs=not last or keep_final_states,
                                       budget=run.manifest["budgets"][i] if run.manifest.get("budgets") else None)
                del block_weights
                commits.wait()  # block i-1's commit is done with the states about to be replaced
                swap = cache.take_target(i + 1)  # this block's outputs become the next one's inputs
                persist = swap if not last else None
                entry = _block_entry(i, result, digest)
                rss, gpu = mem.reset()
                record = {"block": i, "seconds": round(time.time() - t_block, 3), "peak_host_rss_bytes": rss,
                          "peak_gpu_allocated_bytes": gpu, "kept_fraction": result.kept_params / result.dense_params,
                          "layers": result.specs, "whitened_error": entry["whitened_error"]}
                commits.start(lambda i=i, t=result.tensors, e=entry, p=persist, r=record:
                              _commit(run, out_dir, family, i, t, e, p, lambda: log.write("block", **r)))
                bar.set_postfix(kept=f"{result.kept_params / result.dense_params:.3f}")
                if stop.requested and not last:
                    commits.wait()
                    bar.close()
                    log.write("stopped", after_block=i)
                    raise Interrupted(f"{out_dir}: stopped after block {i} of {n} (blocks 0..{i} are committed); "
                                      "run the same command again to resume")
            commits.wait()
            if keep_final_states and start < n:
                final = cache.main.source.clone()
        finally:
            commits.wait(quiet=True)  # a commit in flight completes before the lock is released
            cache.close()
        sola = _sola_section(options, calib_desc, run.manifest, reader, family, fp)
        log.write("done", seconds=round(time.time() - t0, 3), achieved_ratio_blocks=sola["achieved_ratio_blocks"],
                  achieved_ratio_model=sola["achieved_ratio_model"])
        run.complete("config.json", output.finish(out_dir, reader, n, layers_prefix, type(skeleton.model),
                                                  type(tokenizer).__name__, sola))
    return _summary(out_dir, start=start, final_states=final, **summary)


def _commit(run: RunDir, out_dir: Path, family, i: int, tensors: dict, entry: dict, persist, logged) -> None:
    """Block i made durable: shard, next block's states, manifest (docs/RESUME.md); then logged."""
    entry["shard_sha256"] = output.write_block(out_dir, i, family.block_prefix(i), tensors)
    faults.hit("block_written")
    run.commit_block(i, entry, persist)
    faults.hit("block_committed")
    logged()


def _compress_one(i: int, weights: dict[str, torch.Tensor], skeleton: Skeleton, streams: Streams, kwargs: dict,
                  options: CompressOptions, device: torch.device, batch: int, commits: Background,
                  need_outputs: bool = True, budget: int | None = None) -> BlockResult:
    """Statistics, compression and propagation of block i (`budget`: its parameters, from a
    model-wide allocation). The next block's inputs go to the
    caches' targets (in RAM the same tensors, overwritten chunk by chunk)."""
    family = skeleton.family
    prefix = family.block_prefix(i)
    check_finite_tensors(weights, skeleton.reader, prefix)
    storage = weights[family.linears[0] + ".weight"].dtype
    cache = streams.main
    keep_original = options.propagate == "original"
    target = cache.begin_block(i)
    if options.fit == "compensate":
        commits.wait()  # the previous commit may still be reading the states overwritten here
        x = streams.original if streams.original is not None else cache
        x_out = (x.begin_block(i) if x is not cache else target) if need_outputs else None
        with phase("compensated fit"):
            try:
                result = compress_compensated(
                    skeleton.meta_block(i), weights, family, (options.method, options.ratio, options.prime_ratio, budget),
                    kwargs, device, batch, x.source, cache.source, x_out, streams.begin_pass, streams.release, storage,
                    lambda t, what: _check_finite(t, f"calibration states in block {i} ({prefix}*), {what}"))
            except FloatingPointError as exc:
                raise InputError(f"calibration states in block {i} ({prefix}*): NaN or Inf values: {exc}") from None
            except ValueError as exc:
                raise InputError(f"block {i} ({prefix}*): {exc}") from None
    else:
        result = _plain(i, weights, skeleton, cache, target, kwargs, options, device, batch, commits, storage, budget)
    if not keep_original and need_outputs:
        with phase("propagation"):
            cblock = build_block(skeleton.meta_block(i), result.tensors, result.specs, device, torch.float32)
            commits.wait()
            cache.begin_pass()
            try:
                run_block(cblock, cache.source, kwargs, device, batch, out=target, release=cache.release)
            except FloatingPointError as exc:
                raise InputError(f"calibration states after compressed block {i}: NaN or Inf values: {exc}") from None
            del cblock
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _plain(i: int, weights: dict[str, torch.Tensor], skeleton: Skeleton, cache: StateCache, target: torch.Tensor,
           kwargs: dict, options: CompressOptions, device: torch.device, batch: int, commits: Background,
           storage: torch.dtype, budget: int | None) -> BlockResult:
    """The plain fit: one statistics pass through the original block (carrying the states to
    the next block too with --propagate original), then the block's compression."""
    family = skeleton.family
    prefix = family.block_prefix(i)
    with phase("weights in"):
        block = build_block(skeleton.meta_block(i), weights, None, device, torch.float32)
    keep_original = options.propagate == "original"
    stats = BlockStats(block, family, stop_early=not keep_original)
    if keep_original:
        commits.wait()  # the previous commit may still be reading these states
    with phase("statistics"):
        try:
            run_block(block, cache.source, kwargs, device, batch, out=target if keep_original else None,
                      release=cache.release)
        except FloatingPointError as exc:
            raise InputError(f"calibration states in block {i} ({prefix}*): NaN or Inf values: {exc}") from None
    stats.remove()
    del block
    # the statistics pass may stop before the block's output; a Gram matrix's diagonal shows any
    # NaN/Inf (method/decompose.py). No loop variable: it would hold the last (largest)
    # covariance through the whole decomposition.
    for key in stats.cov:
        _check_finite(stats.cov[key].diagonal(), f"calibration states in block {i} ({prefix}*), {key} statistics")
    covs, scores = stats.cov, stats.neuron_scores()
    if options.decompose_on == "host":  # the plan found the device too small for them
        covs, scores = to_host(covs), to_host(scores)
    try:
        return compress_block(weights, covs, scores, family, options.method,
                              options.ratio, options.prime_ratio, storage, budget)
    except ValueError as exc:
        raise InputError(f"block {i} ({prefix}*): {exc}") from None


def _budgets(skeleton: Skeleton, states: torch.Tensor, kwargs: dict, options: CompressOptions, device, batch: int,
             cache: Streams, progress: bool, log: RunLog, shared: dict | None) -> list[int]:
    """Block budgets of the model-wide allocation; the survey is taken from `shared` when an
    earlier output of the same multi-ratio run made it (else made, and left there)."""
    t0 = time.time()
    cache.begin_pass()  # page release restarts at the first window, for the survey and after it
    try:
        reused = shared is not None and "survey" in shared
        if reused:
            found, seconds = shared["survey"], 0.0
        else:
            found = survey(skeleton, states, kwargs, options, device, batch, cache.main.release, cache.begin_pass,
                           progress)
            seconds = round(time.time() - t0, 3)
            if shared is not None:
                shared["survey"] = found
        budgets = found.budgets(options.ratio)
    except FloatingPointError as exc:
        raise InputError(f"calibration states in the survey pass, {exc}: NaN or Inf values") from None
    except ValueError as exc:
        raise InputError(f"--allocation global: {exc}") from None
    log.write("survey", seconds=seconds, shared=reused, budgets=budgets)
    cache.begin_pass()
    return budgets


def _block_entry(i: int, result: BlockResult, input_sha256: str) -> dict:
    return {"block": i, "shard": output.block_shard_name(i), "input_sha256": input_sha256,
            "dense_params": result.dense_params,
            "kept_params": result.kept_params, "layers": result.specs,
            "whitened_error": {k: round(v, 6) for k, v in result.error.items()}, "damping": result.damping,
            **({"kept_dense_no_tokens": result.starved} if result.starved else {})}


def _sola_section(options: CompressOptions, calib_desc: str, manifest: dict, reader: CheckpointReader,
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
        "blocks": [{"layers": b["layers"], "whitened_error": b["whitened_error"]} for b in blocks],
        "fingerprint": fp,
    }


def _summary(out_dir: Path, options: CompressOptions, t0: float, n: int, device: torch.device, start: int,
             final_states, spilled: bool, threads: str, mem: PeakMemory) -> Summary:
    sola = json.loads((out_dir / "config.json").read_text())["sola"]
    return Summary(output=str(out_dir), method=options.method, target_ratio=options.ratio,
                   achieved_ratio_blocks=sola["achieved_ratio_blocks"],
                   achieved_ratio_model=sola["achieved_ratio_model"], seconds=time.time() - t0, blocks=n,
                   device=str(device), resumed_at=start, final_states=final_states,
                   states_on_disk=spilled, threads=threads, peak_rss=max(mem.overall_rss, mem.peak_rss, mem.sample()),
                   peak_gpu=max(mem.overall_gpu, mem.peak_gpu()[0]))


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise InputError(f"{what}: NaN or Inf values")

