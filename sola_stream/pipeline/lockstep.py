"""Several ratios from one statistics pass per block: `--ratio R1,R2,... --propagate original`.

When the original model's states are propagated, block i of every ratio sees the same inputs, so
one statistics pass (which also carries the states to the next block) feeds every ratio's fit,
and each candidate split's whitening and spectra are made once for all of them (engine.fit_blocks).
Each output stays a run of its own (fingerprint, manifest, lock, resume state: the same as a run
of that ratio alone, which can resume it); the first output at the smallest next block owns the
states cache and the others hard-link the states it persists. A resume starts at the smallest next
block, and outputs already past a block skip its commit. One process, the plain fit
(docs/USING.md: the decision and what is not shared otherwise).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sola_stream import __version__, faults
from sola_stream.method.block_compress import Share
from sola_stream.pipeline.distributed import SINGLE, Ranks
from sola_stream.pipeline.engine import (_budgets, _check_manifest, _commit, _finish, _verify, compress, embed_windows,
                                         fit_blocks, statistics, stopped)
from sola_stream.pipeline.memory import PeakMemory
from sola_stream.pipeline.options import CompressOptions
from sola_stream.pipeline.overlap import Background, Prefetch
from sola_stream.pipeline.resume import RunDir
from sola_stream.pipeline.setup import outer_digest, prepare
from sola_stream.pipeline.state_cache import Streams
from sola_stream.pipeline.stop import STOP_FILE, GracefulStop
from sola_stream.pipeline.summary import Summary, block_entry, summarize
from sola_stream.storage.atomic import atomic_write
from sola_stream.storage.input_checks import check_finite_tensors
from sola_stream.storage.runlog import RunLog


def applies(options_list: list[CompressOptions], ranks: Ranks = SINGLE) -> bool:
    """Whether these outputs (one per ratio) share their statistics passes."""
    first = options_list[0]
    return len(options_list) > 1 and first.propagate == "original" and first.fit == "plain" and not ranks.active


@dataclass
class _Output:
    dir: Path
    options: CompressOptions
    plan: object
    fp: dict
    run: RunDir
    start: int = 0
    log: RunLog | None = None
    budgets: list | None = None
    importance: list | None = None


def compress_lockstep(model: str, outs: list[str], options_list: list[CompressOptions], progress: bool = True,
                      overwrite: bool = False, shared: dict | None = None) -> list[Summary]:
    """Compress `model` once per ratio (`options_list`, differing only in their ratio) into `outs`."""
    setup = prepare(model, outs, options_list, progress)
    shared = {} if shared is None else shared
    if not setup.together:  # the budgets hold one ratio's pass, not all of them at once
        print("sola-stream: the memory budgets do not hold every ratio's compressed blocks of one statistics "
              "pass; the ratios run one after the other", file=sys.stderr)
        return [compress(model, out, options, progress=progress, overwrite=overwrite, shared=shared)
                for out, options in zip(outs, options_list)]
    reader, skeleton, family, device, n = setup.reader, setup.skeleton, setup.family, setup.device, setup.n
    with ExitStack() as stack:
        mem = stack.enter_context(PeakMemory())
        outputs = [_Output(Path(o), opts, plan, fp, stack.enter_context(RunDir(Path(o), fp, setup.planned, overwrite)))
                   for o, opts, plan, fp in zip(outs, setup.options, setup.plans, setup.fingerprints)]
        pending = [o for o in outputs if not o.run.finished]
        stop = stack.enter_context(GracefulStop())  # signals; the stop files of every output are checked below
        outer = outer_digest(reader, setup.layers_prefix)
        for o in pending:
            o.start, o.log = o.run.next_block, RunLog(o.dir)
            o.log.write("start", block=o.start, blocks=n, version=__version__, device=str(device),
                        threads=setup.threads, options=o.options.result_options(device),
                        calibration=setup.calib_desc, spill=setup.together_spill,
                        lockstep=[str(p.dir) for p in outputs])
            _verify(o.run, o.start, outer, reader, family, progress, o.log, 0)
            if o.start < n:
                _check_manifest(o.run, o.start, n, o.options)
            o.budgets, o.importance = o.run.manifest.get("budgets"), o.run.manifest.get("importance")
        working = [o for o in pending if o.start < n]
        if working:
            _run_blocks(setup, working, _Stop(stop, pending), outer, progress, shared, mem)
        for o in pending:
            _finish(o.run, o.dir, o.options, setup.calib_desc, reader, skeleton, setup.tokenizer, o.fp, o.log, setup.t0)
        return [summarize(o.dir, options=o.options, t0=setup.t0, n=n, device=device,
                          start=o.start if o in pending else n, final_states=None, spilled=setup.together_spill,
                          threads=setup.threads, mem=mem) for o in outputs]


def _run_blocks(setup, working: list[_Output], requested, outer: str, progress: bool, shared: dict,
                mem: PeakMemory) -> None:
    """The survey (for the fresh outputs) and the blocks from the smallest next block on."""
    skeleton, device, n, batch, first = setup.skeleton, setup.device, setup.n, setup.batch, setup.options[0]
    begin = min(o.start for o in working)
    fresh = [o for o in working if o.run.manifest["states"] is None]  # a new run (at block 0)
    lead = fresh[0] if fresh else next(o for o in working if o.start == begin)  # owns the states cache
    cache = Streams(lead.run.dir, setup.together_spill, False)
    commits = Background("commit")
    try:
        if fresh:  # embed the windows (again after a survey, which overwrites them)
            target = cache.create((len(setup.windows), first.seqlen, skeleton.hidden_size))
            kwargs = embed_windows(skeleton, setup.windows, batch, target, cache.main.release)[1]
            if first.allocation == "global":
                for o in fresh:  # one survey for all (shared); each output its own budgets
                    o.budgets, o.importance = _budgets(
                        skeleton, target, kwargs, o.options, device, batch, cache, progress, o.log, shared, SINGLE,
                        setup.probe_ids, lambda i: _obey(requested, working, commits, None, i, n, survey=True))
                embed_windows(skeleton, setup.windows, batch, target, cache.main.release)
            hashes = cache.take_first()()
            for o in fresh:
                if o is not lead:
                    _link_states(lead.run, o.run, 0, hashes)
                o.run.commit_start(outer, hashes, o.budgets, o.importance)
        else:
            kwargs = skeleton.embed(setup.windows[:1])[1]
            cache.open(begin)
        weights = Prefetch(setup.reader, skeleton, device)
        bar = tqdm(range(begin, n), desc="compress", unit="block", disable=not progress, initial=begin, total=n)
        if setup.plans[0].seconds_per_block:  # until the first block ends, tqdm has no rate of its own
            bar.set_postfix_str(f"planned ETA {bar.format_interval(setup.plans[0].seconds_per_block * (n - begin))}")
        mem.reset()
        for i in bar:
            t_block, last = time.time(), i == n - 1
            active = [o for o in working if o.start <= i]
            block_weights, digest = weights.get(i, i + 1 if not last else None)
            prefix = skeleton.family.block_prefix(i)
            check_finite_tensors(block_weights, skeleton.reader, prefix)
            storage = block_weights[skeleton.family.linears[0] + ".weight"].dtype
            target = cache.main.begin_block(i)
            stats = statistics(i, block_weights, skeleton, cache.main, target, kwargs[i], first, device, batch, commits,
                               SINGLE)
            shares = [Share(o.options.ratio, o.budgets[i] if o.budgets else None,
                            o.importance[i] if o.importance else None) for o in active]
            results = fit_blocks(i, block_weights, skeleton, stats, kwargs[i], first, shares, device, batch, storage,
                                 SINGLE)
            del block_weights, stats
            if device.type == "cuda":
                torch.cuda.empty_cache()
            faults.hit("block_compressed")
            commits.wait()
            persist = cache.take_target(i + 1) if not last else None
            rss, gpu = mem.reset()
            record = {"seconds": round(time.time() - t_block, 3), "peak_host_rss_bytes": rss,
                      "peak_gpu_allocated_bytes": gpu}
            commits.start(lambda i=i, a=active, r=results, p=persist, d=digest, c=record:
                          _commit_all(setup, lead, a, r, i, p, d, c))
            bar.set_postfix_str(" ".join(f"{r.kept_params / r.dense_params:.3f}" for r in results))
            del results, persist  # the commit holds them; block i+1's fits would hold them too long
            if not last:
                _obey(requested, working, commits, bar, i, n)
        commits.wait()
    finally:
        commits.wait(quiet=True)  # a commit in flight completes before the locks are released
        cache.close()


def _commit_all(setup, lead: _Output, active: list[_Output], results: list, i: int, persist, digest: str,
                record: dict) -> None:
    """Block i committed to every output that has not committed it yet: the lead persists the
    next block's states, the others link them (then their manifests record the same SHA-256)."""
    hashes: dict = {}

    def persist_lead():
        hashes.update(persist())
        return hashes

    # the lead (at the smallest next block, so always active) first: the others link what it persists
    for o, result in sorted(zip(active, results), key=lambda pair: pair[0] is not lead):
        states = None if persist is None else persist_lead if o is lead else \
            (lambda o=o: (_link_states(lead.run, o.run, i + 1, hashes), hashes)[1])
        entry = block_entry(i, result, digest)
        logged = {"block": i, **record, "kept_fraction": result.kept_params / result.dense_params,
                  "layers": result.specs, "whitened_error": entry["whitened_error"], "shared_statistics": True}
        _commit(o.run, o.dir, setup.family, i, result.tensors, entry, states,
                lambda o=o, r=logged: o.log.write("block", **r))


def _link_states(source: RunDir, dest: RunDir, block: int, hashes: dict) -> None:
    """The states of `block` that `source` persisted (`hashes`: by stream), made durable in `dest`
    too, atomically: a hard link (one file on disk), or a copy where the two directories cannot
    share one."""
    for stream in hashes:
        src = source.states_path(block, stream)
        if not src.is_file():  # a bug, not an input: the lead persisted it just before
            raise RuntimeError(f"{src}: the states to share are missing")
        atomic_write(dest.states_path(block, stream), lambda tmp, src=src: _link_or_copy(src, tmp))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class _Stop:
    """A stop asked by a signal or by the stop file of any unfinished output."""

    def __init__(self, signals: GracefulStop, outputs: list[_Output]):
        self.signals, self.files = signals, [o.run.dir / STOP_FILE for o in outputs]

    def __call__(self) -> bool:
        return self.signals.requested or any(f.exists() for f in self.files)

    def obeyed(self) -> None:  # the resumed run goes on
        for f in self.files:
            f.unlink(missing_ok=True)


def _obey(requested: _Stop, outputs: list[_Output], commits: Background, bar, i: int, n: int,
          survey: bool = False) -> None:
    """After block i (of the survey: `survey`), every output stops at the same point."""
    if not requested():
        return
    commits.wait()
    if bar is not None:
        bar.close()
    requested.obeyed()
    for o in outputs:
        if o.start <= i or survey:
            o.log.write("stopped", **({"survey_block": i} if survey else {"after_block": i}))
    raise stopped(", ".join(str(o.dir) for o in outputs), i, n, survey)
