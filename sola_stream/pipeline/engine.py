"""The block loop: reader -> (stats -> compress -> write -> commit -> propagate) per block -> writer.

Only one decoder block's weights are materialized at a time. Calibration hidden states stay on
the host and are streamed through the block on the compute device in chunks. Every finished
block is committed (resume.py), so an interrupted run resumes at the first unfinished block.
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sola_stream import __version__, faults
from sola_stream.storage import output
from sola_stream.storage.checkpoint import CheckpointReader
from sola_stream.method.block_compress import BlockResult, BudgetError, Share, compress_shares
from sola_stream.pipeline.distributed import SINGLE, Ranks
from sola_stream.errors import InputError, OutputError
from sola_stream.pipeline.memory import PeakMemory, to_host
from sola_stream.nn.build import build_block
from sola_stream.pipeline.overlap import Background, Prefetch
from sola_stream.pipeline.options import CompressOptions
from sola_stream.pipeline.setup import outer_digest, prepare
from sola_stream.storage.input_checks import check_finite_tensors
from sola_stream.storage.runlog import RunLog
from sola_stream.pipeline.resume import RunDir
from sola_stream.pipeline.summary import Summary, block_entry, sola_section, summarize
from sola_stream.pipeline.stop import STOP_FILE, GracefulStop, Interrupted
from sola_stream.pipeline.skeleton import Skeleton
from sola_stream.pipeline.paired import compress_compensated
from sola_stream.phases import phase
from sola_stream.pipeline.state_cache import StateCache, Streams
from sola_stream.pipeline.survey import survey
from sola_stream.pipeline.prime_split import WINDOWS as SPLIT_WINDOWS, choose_split
from sola_stream.pipeline.block_forward import BlockStats, run_block


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


def compress(model: str, out: str, options: CompressOptions, progress: bool = True,
             keep_final_states: bool = False, overwrite: bool = False, shared: dict | None = None,
             ranks: Ranks = SINGLE) -> Summary:
    """Compress `model` into `out`. `shared`: a dict kept across the outputs of one multi-ratio
    run (what they can share is left in it: the survey of --allocation global). `ranks`: this
    process's place in a run of several (torchrun; pipeline/distributed.py): every rank calls
    this with the same arguments, takes its share of the calibration windows, and rank 0 writes."""
    setup = prepare(model, [out], [options], progress, ranks)
    options, plan, fp = setup.options[0], setup.plans[0], setup.fingerprints[0]
    reader, skeleton, family, device, n = setup.reader, setup.skeleton, setup.family, setup.device, setup.n
    windows, probe_ids, batch, planned, t0 = setup.windows, setup.probe_ids, setup.batch, setup.planned, setup.t0
    calib_desc, tokenizer, threads, layers_prefix = setup.calib_desc, setup.tokenizer, setup.threads, setup.layers_prefix
    out_dir = Path(out)
    lead = ranks.rank == 0  # writes the output, the manifest and the log; shows the progress
    progress = progress and lead

    with ExitStack() as stack:
        run = ranks.first(lambda: stack.enter_context(RunDir(out_dir, fp, planned, overwrite, ranks.world)),
                          share=RunDir.shared)
        if not lead:
            run = RunDir.follow(out_dir, fp, planned, run, ranks.world)
        stop, mem = stack.enter_context(GracefulStop(run.dir / STOP_FILE)), stack.enter_context(PeakMemory())
        summary = dict(options=options, t0=t0, n=n, device=device, spilled=plan.spill, threads=threads, mem=mem)
        if run.finished:
            return summarize(out_dir, start=n, final_states=None, **summary)
        log = RunLog(out_dir) if lead else None
        outer = outer_digest(reader, layers_prefix)
        start = run.next_block
        if log:
            log.write("start", block=start, blocks=n, version=__version__, device=str(device), threads=threads,
                      options=options.result_options(device), calibration=calib_desc, spill=plan.spill,
                      **({"ranks": ranks.world} if ranks.active else {}))
        ranks.check(lambda: _verify(run, start, outer, reader, family, progress, log, ranks.rank))
        cache = Streams(run.dir, plan.spill, options.two_streams, ranks.rank, ranks.world)
        commits = Background("commit")
        final = None
        try:
            if start < n:
                _check_manifest(run, start, n, options)
                if run.manifest["states"] is None:  # a fresh run: embed the windows
                    target = cache.create((len(windows), options.seqlen, skeleton.hidden_size))
                    kwargs = ranks.everywhere(lambda: embed_windows(skeleton, windows, batch, target,
                                                                    cache.main.release)[1])
                    budgets = importance = None
                    if options.allocation == "global":  # the survey overwrites the states: embedded again
                        budgets, importance = _budgets(skeleton, target, kwargs, options, device, batch, cache,
                                                       progress, log, shared, ranks, probe_ids,
                                                       lambda i: _obey(stop, ranks, run, log, out_dir, i, n, survey=True))
                        embed_windows(skeleton, windows, batch, target, cache.main.release)
                    states = _merged(ranks.check(cache.take_first()))
                    ranks.first(lambda: run.commit_start(outer, states, budgets, importance))
                else:
                    kwargs = skeleton.embed(windows[:1])[1]
                    budgets, importance = run.manifest.get("budgets"), run.manifest.get("importance")
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
                                       budget=budgets[i] if budgets else None,
                                       importance=importance[i] if importance else None, ranks=ranks)
                del block_weights
                faults.hit("block_compressed")
                commits.wait()  # block i-1's commit is done with the states about to be replaced
                swap = cache.take_target(i + 1)  # this block's outputs become the next one's inputs
                persist = swap if not last else None
                entry = block_entry(i, result, digest)
                rss, gpu = mem.reset()
                record = {"block": i, "seconds": round(time.time() - t_block, 3), "peak_host_rss_bytes": rss,
                          "peak_gpu_allocated_bytes": gpu, "kept_fraction": result.kept_params / result.dense_params,
                          "layers": result.specs, "whitened_error": entry["whitened_error"]}
                if not ranks.active:  # the commit overlaps the next block
                    commits.start(lambda i=i, t=result.tensors, e=entry, p=persist, r=record:
                                  _commit(run, out_dir, family, i, t, e, p, lambda: log.write("block", **r)))
                else:  # every rank's states made durable, then rank 0 commits them with the block
                    states = _merged(ranks.check(persist)) if persist else None
                    ranks.first(lambda: _commit(run, out_dir, family, i, result.tensors, entry,
                                                (lambda: states) if persist else None,
                                                lambda: log.write("block", **record)))
                bar.set_postfix(kept=f"{result.kept_params / result.dense_params:.3f}")
                if not last:
                    _obey(stop, ranks, run, log, out_dir, i, n, before=lambda: (commits.wait(), bar.close()))
            commits.wait()
            if keep_final_states and start < n:
                final = cache.main.source.clone()  # this rank's windows
        finally:
            commits.wait(quiet=True)  # a commit in flight completes before the lock is released
            cache.close()
        ranks.first(lambda: _finish(run, out_dir, options, calib_desc, reader, skeleton, tokenizer, fp, log, t0))
    return summarize(out_dir, start=start, final_states=final, **summary)


def _obey(stop: GracefulStop, ranks: Ranks, run: RunDir, log: RunLog | None, out_dir: Path, i: int, n: int,
          survey: bool = False, before=None) -> None:
    """A stop asked of any rank is every rank's (a collective: every rank calls it at the same
    point): after block i of the compressing pass, or of the survey pass (`survey`: nothing is
    committed yet, and the resumed run surveys again from the first block)."""
    if not ranks.agree(stop.requested):
        return
    if before is not None:
        before()
    if log:
        (run.dir / STOP_FILE).unlink(missing_ok=True)  # obeyed: the resumed run goes on
        log.write("stopped", **({"survey_block": i} if survey else {"after_block": i}))
    raise stopped(str(out_dir), i, n, survey)


def stopped(where: str, i: int, n: int, survey: bool) -> Interrupted:
    """The error of a run stopped after block i of the survey pass (`survey`) or of the compressing pass."""
    if survey:
        return Interrupted(f"{where}: stopped in the survey pass after block {i} of {n} (no block is committed "
                           "yet; the survey starts over); run the same command again to resume")
    return Interrupted(f"{where}: stopped after block {i} of {n} (blocks 0..{i} are committed); "
                       "run the same command again to resume")


def _verify(run: RunDir, start: int, outer: str, reader: CheckpointReader, family, progress: bool, log,
            rank: int) -> None:
    """Before a resume, what the manifest records is checked (each rank its own states files;
    rank 0 everything else), and rank 0 removes what a crash left behind."""
    if rank:
        if start:
            run.verify_states(rank)
        return
    if start:
        t_verify = time.time()
        verify = tqdm(total=start, desc="verify", unit="block", disable=not progress)
        run.verify(outer, lambda i: reader.digest(family.block_prefix(i)), torch.get_num_threads(), verify.update)
        verify.close()
        log.write("verified", blocks=start, seconds=round(time.time() - t_verify, 3))
    run.cleanup_orphans()


def _check_manifest(run: RunDir, start: int, n: int, options: CompressOptions) -> None:
    """What a resume needs from the manifest beyond its types (resume.py checks those)."""
    if run.manifest["states"] is None and start:
        raise OutputError(f"{run.dir / 'manifest.json'}: damaged run manifest (no calibration states "
                          f"recorded for block {start}); run with --overwrite to start over")
    if start and options.two_streams and "original_sha256" not in run.manifest["states"]:
        raise OutputError(f"{run.dir / 'manifest.json'}: damaged run manifest (no original-model states "
                          f"recorded for block {start}); run with --overwrite to start over")
    budgets, weights = run.manifest.get("budgets"), run.manifest.get("importance")
    if start and ((options.allocation == "global") != (budgets is not None and len(budgets) == n)
                  or (options.allocation == "global" and bool(options.probe_windows))
                  != (weights is not None and len(weights) == n)):
        raise OutputError(f"{run.dir / 'manifest.json'}: damaged run manifest (block budgets or layer weights of "
                          f"the model-wide allocation missing or not {n}); run with --overwrite to start over")


def _merged(by_rank: list[dict[str, str]]) -> dict:
    """States checksums by stream: one SHA-256 in one process, a list by rank in several."""
    if len(by_rank) == 1:
        return by_rank[0]
    return {stream: [h[stream] for h in by_rank] for stream in by_rank[0]}


def _finish(run: RunDir, out_dir: Path, options: CompressOptions, calib_desc: str, reader: CheckpointReader,
            skeleton: Skeleton, tokenizer, fp: dict, log: RunLog, t0: float) -> None:
    family = skeleton.family
    sola = sola_section(options, calib_desc, run.manifest, reader, family, fp)
    log.write("done", seconds=round(time.time() - t0, 3), achieved_ratio_blocks=sola["achieved_ratio_blocks"],
              achieved_ratio_model=sola["achieved_ratio_model"])
    run.complete("config.json", output.finish(out_dir, reader, skeleton.num_blocks, family.layers_path + ".",
                                              type(skeleton.model), type(tokenizer).__name__, sola))


def _commit(run: RunDir, out_dir: Path, family, i: int, tensors: dict, entry: dict, persist, logged) -> None:
    """Block i made durable: shard, next block's states, manifest (docs/RESUME.md); then logged."""
    entry["shard_sha256"] = output.write_block(out_dir, i, family.block_prefix(i), tensors)
    faults.hit("block_written")
    run.commit_block(i, entry, persist)
    faults.hit("block_committed")
    logged()


def _compress_one(i: int, weights: dict[str, torch.Tensor], skeleton: Skeleton, streams: Streams, kwargs: dict,
                  options: CompressOptions, device: torch.device, batch: int, commits: Background,
                  need_outputs: bool = True, budget: int | None = None, importance: dict | None = None,
                  ranks: Ranks = SINGLE) -> BlockResult:
    """Statistics, compression and propagation of block i (`budget`: its parameters, from a
    model-wide allocation, `importance` its layers' weights there; `ranks`: statistics summed and
    decompositions shared over them). The next block's inputs go to the caches' targets (in RAM
    the same tensors, overwritten chunk by chunk)."""
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
                    skeleton.meta_block(i), weights, family,
                    (options.method, options.ratio, options.prime_ratio, budget, False, None, importance),
                    kwargs, device, batch, x.source, cache.source, x_out, streams.begin_pass, streams.release, storage,
                    lambda t, what: _check_finite(t, f"calibration states in block {i} ({prefix}*), {what}"))
            except FloatingPointError as exc:
                raise InputError(f"calibration states in block {i} ({prefix}*): NaN or Inf values: {exc}") from None
            except ValueError as exc:
                raise InputError(f"block {i} ({prefix}*): {exc}") from None
    else:
        result = _plain(i, weights, skeleton, cache, target, kwargs, options, device, batch, commits, storage, budget,
                        importance, ranks)
    if not keep_original and need_outputs:
        with phase("propagation"):
            cblock = build_block(skeleton.meta_block(i), result.tensors, result.specs, device, torch.float32)
            commits.wait()
            cache.begin_pass()
            ranks.everywhere(lambda b=cblock: _forward(b, cache.source, kwargs, device, batch, target, cache.release,
                                                       f"calibration states after compressed block {i}"))
            del cblock
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _plain(i: int, weights: dict[str, torch.Tensor], skeleton: Skeleton, cache: StateCache, target: torch.Tensor,
           kwargs: dict, options: CompressOptions, device: torch.device, batch: int, commits: Background,
           storage: torch.dtype, budget: int | None, importance: dict | None, ranks: Ranks) -> BlockResult:
    """The plain fit: one statistics pass through the original block (carrying the states to
    the next block too with --propagate original), then the block's compression."""
    stats = statistics(i, weights, skeleton, cache, target, kwargs, options, device, batch, commits, ranks)
    return fit_blocks(i, weights, skeleton, stats, kwargs, options, [Share(options.ratio, budget, importance)], device,
                      batch, storage, ranks)[0]


def statistics(i: int, weights: dict[str, torch.Tensor], skeleton: Skeleton, cache: StateCache, target: torch.Tensor,
               kwargs: dict, options: CompressOptions, device: torch.device, batch: int, commits: Background,
               ranks: Ranks) -> tuple[dict, dict, torch.Tensor]:
    """Block i's statistics pass through the original block: (covariances, neuron scores, the
    windows the split choice compares candidates on)."""
    family = skeleton.family
    prefix = family.block_prefix(i)
    with phase("weights in"):
        block = build_block(skeleton.meta_block(i), weights, None, device, torch.float32)
    keep_original = options.propagate == "original"
    stats = BlockStats(block, family, stop_early=not keep_original)
    # the split choice compares candidates on the block's inputs: with --propagate original the
    # statistics pass overwrites them (in RAM) with the original block's outputs, so copy them first
    compared = cache.source[:_first_windows(ranks, options.nsamples, SPLIT_WINDOWS)]
    if keep_original and options.prime_choices:
        compared = compared.clone()
    if keep_original:
        commits.wait()  # the previous commit may still be reading these states
    with phase("statistics"):  # with --propagate original, outputs one rank's windows may make non-finite
        ranks.everywhere(lambda b=block: _forward(b, cache.source, kwargs, device, batch,
                                                  target if keep_original else None, cache.release,
                                                  f"calibration states in block {i} ({prefix}*)"))
    stats.remove()
    del block
    ranks.sum_statistics(stats.cov, stats.abs_sum, stats.tokens)  # every window's, on every rank
    # the statistics pass may stop before the block's output; a Gram matrix's diagonal shows any
    # NaN/Inf (method/decompose.py). No loop variable: it would hold the last (largest)
    # covariance through the whole decomposition.
    for key in stats.cov:
        _check_finite(stats.cov[key].diagonal(), f"calibration states in block {i} ({prefix}*), {key} statistics")
    covs, scores = stats.cov, stats.neuron_scores()
    if options.decompose_on == "host":  # the plan found the device too small for them
        covs, scores = to_host(covs), to_host(scores)
    return covs, scores, compared


def fit_blocks(i: int, weights: dict[str, torch.Tensor], skeleton: Skeleton, stats: tuple[dict, dict, torch.Tensor],
               kwargs: dict, options: CompressOptions, shares: list[Share], device: torch.device, batch: int,
               storage: torch.dtype, ranks: Ranks) -> list[BlockResult]:
    """Block i compressed from its statistics (`statistics`) once per share (an output's ratio or
    budget: several in lockstep, pipeline/lockstep.py), at options.prime_ratio or at each share's
    best of options.prime_choices. Each split's whitening and spectra are made once for all shares
    (method/block_compress.py compress_shares), and the original block is run once to compare them."""
    family = skeleton.family
    prefix = family.block_prefix(i)
    covs, scores, compared = stats

    def fit(split: float, covs=covs) -> list:
        return compress_shares(weights, covs, scores, family, options.method, split, storage, shares,
                               spread=ranks.spread())

    try:
        if not options.prime_choices:
            results = fit(options.prime_ratio)
            for result in results:
                if isinstance(result, BudgetError):
                    raise result
            return results
        # each candidate split gets its own view of the statistics (a layout consumes the FFN's)
        chosen = choose_split(
            options.prime_choices, lambda s: fit(s, dict(covs)),
            lambda tensors, specs: build_block(skeleton.meta_block(i), tensors if specs else weights, specs, device,
                                               torch.float32),
            compared, kwargs, device, batch, ranks,
            f"calibration states in block {i} ({prefix}*), prime split choice",
            [f"ratio {share.ratio:g}" for share in shares] if len(shares) > 1 else None)
        for result, split, _ in chosen:
            result.prime_split = split
        return [result for result, _, _ in chosen]
    except ValueError as exc:
        raise InputError(f"block {i} ({prefix}*): {exc}") from None


def _first_windows(ranks: Ranks, windows: int, first: int) -> int:
    """How many of the run's first `first` calibration windows are this process's (its share
    of `windows` starts at its own first window)."""
    share = ranks.share(windows)
    return max(0, min(share.stop, first) - share.start)


def _budgets(skeleton: Skeleton, states: torch.Tensor, kwargs: dict, options: CompressOptions, device, batch: int,
             cache: Streams, progress: bool, log: RunLog | None, shared: dict | None, ranks: Ranks,
             probe_ids: torch.Tensor, after_block=None) -> list[int]:
    """Block budgets of the model-wide allocation; the survey is taken from `shared` when an
    earlier output of the same multi-ratio run made it (else made, and left there)."""
    t0 = time.time()
    cache.begin_pass()  # page release restarts at the first window, for the survey and after it
    try:
        reused = shared is not None and "survey" in shared
        if reused:
            found, seconds = shared["survey"], 0.0
        else:
            found = survey(skeleton, states, kwargs, probe_ids, options, device, batch, cache.main.release,
                           cache.begin_pass, progress, ranks, after_block)
            seconds = round(time.time() - t0, 3)
            if shared is not None:
                shared["survey"] = found
        budgets = found.budgets(options.ratio)
    except ValueError as exc:
        raise InputError(f"--allocation global: {exc}") from None
    if log:
        log.write("survey", seconds=seconds, shared=reused, budgets=budgets, importance=found.importance)
    cache.begin_pass()
    return budgets, found.importance


def _forward(block, states, kwargs, device, batch: int, out, release, what: str) -> None:
    """run_block, its non-finite outputs an InputError that says `what`."""
    try:
        run_block(block, states, kwargs, device, batch, out=out, release=release)
    except FloatingPointError as exc:
        raise InputError(f"{what}: NaN or Inf values: {exc}") from None


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise InputError(f"{what}: NaN or Inf values")

