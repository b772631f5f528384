"""What the outputs of one compression run share, made before any output is opened: the
checkpoint and its skeleton, the calibration windows, and each output's options, plan and
fingerprint (pipeline/engine.py runs one output; pipeline/lockstep.py several ratios at once)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer

from sola_stream.errors import InputError, OutputError
from sola_stream.pipeline.cpus import set_threads
from sola_stream.pipeline.distributed import SINGLE, Ranks
from sola_stream.pipeline.memory import release_free_memory
from sola_stream.pipeline.options import CompressOptions
from sola_stream.pipeline.plan import available_host_memory, make_plan
from sola_stream.pipeline.resume import fingerprint
from sola_stream.pipeline.skeleton import Skeleton
from sola_stream.storage import output
from sola_stream.storage.calibration import (TOKENIZE_PIECE_CHARS, calibration_windows, read_calibration_text,
                                             text_hash, tokenize)
from sola_stream.storage.checkpoint import CheckpointReader


def load_tokenizer(path: Path, config=None):
    """The checkpoint's tokenizer. `config`: the model's transformers config, given so that an
    output's config.json (model_type "sola_<family>", remote code) is never read for it."""
    try:
        return AutoTokenizer.from_pretrained(str(path), **({"config": config} if config is not None else {}))
    except Exception as exc:
        raise InputError(f"{path}: tokenizer missing or unreadable ({type(exc).__name__}: {exc})") from None


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


@dataclass
class Setup:
    """What the outputs of one run share (pipeline/lockstep.py runs several): the model, the
    calibration windows, and each output's options, plan and fingerprint."""
    reader: CheckpointReader
    skeleton: Skeleton
    device: torch.device
    threads: str
    options: list[CompressOptions]
    plans: list
    fingerprints: list[dict]
    tokenizer: object
    calib_desc: str
    windows: torch.Tensor
    probe_ids: torch.Tensor
    batch: int
    planned: list[str]
    t0: float
    together: bool  # the outputs fit in one statistics pass per block (their plans' budgets allow it)
    together_spill: bool  # ... with the calibration cache on disk

    @property
    def family(self):
        return self.skeleton.family

    @property
    def n(self) -> int:
        return self.skeleton.num_blocks

    @property
    def layers_prefix(self) -> str:
        return self.family.layers_path + "."


def prepare(model: str, outs: list[str], options_list: list[CompressOptions], progress: bool,
            ranks: Ranks = SINGLE) -> Setup:
    """Everything before an output is opened, for outputs that differ only in their ratio; with
    several, whether one statistics pass per block can feed them all within the budgets."""
    for options in options_list:
        options.validate()
    first = options_list[0]
    if ranks.active and first.fit == "compensate":
        raise InputError("--fit compensate runs in one process only: it is not yet spread over ranks "
                         "(run it without torchrun)")
    t0 = time.time()
    threads = "{} ({})".format(*set_threads(first.threads, ranks.local_world))
    device = ranks.device(first.resolved_device())
    reader = CheckpointReader(model)
    for out in outs:
        check_paths(reader.path, Path(out))
    if "sola" in reader.config_dict:
        raise InputError(f"{reader.path / 'config.json'}: is a sola-stream output; compress the original model")
    skeleton = Skeleton(reader)
    plans, resolved, together, spill = [], [], len(options_list) > 1, False
    for options in options_list:
        options = blocks_ratio(options, reader, skeleton.family, skeleton.num_blocks)
        limits = dict(budget_host=None if options.max_host_memory else available_host_memory(),
                      ranks=ranks.world, ranks_per_node=ranks.local_world)
        # each output is planned as a run of its ratio alone: its chunk, where its decompositions
        # run, and so its fingerprint and bytes are that run's (which can resume it)
        plan = make_plan(reader.config_dict, options, device, measure=progress and not plans,  # the bar's ETA
                         **limits)
        plan.check()
        plans.append(plan)
        resolved.append(replace(options, batch_tokens=plan.batch_tokens,
                                decompose_on="host" if plan.decompose_on_host else "device"))
        if together:  # one statistics pass for all the ratios holds more (pipeline/lockstep.py)
            joint = make_plan(reader.config_dict, options, device, outputs=len(options_list), **limits)
            together = not joint.problems and (joint.batch_tokens, joint.decompose_on_host) == \
                (plan.batch_tokens, plan.decompose_on_host)
            spill = spill or joint.spill
    tokenizer = load_tokenizer(reader.path, skeleton.config)
    text, calib_desc = read_calibration_text(first.calib)
    # the survey's probe windows are drawn after the calibration windows and kept out of the
    # statistics (random offsets into the same text: they may share some tokens; pipeline/probe.py)
    windows = calibration_windows(tokenize(tokenizer, text, False, TOKENIZE_PIECE_CHARS), first.nsamples,
                                  first.seqlen, first.seed, calib_desc, extra=first.probe_windows)
    windows, probe_ids = windows[:first.nsamples], windows[first.nsamples:]
    share = ranks.share(len(windows))
    windows = windows[share.start:share.stop]  # this rank's windows (all of them in one process)
    calib_sha256 = text_hash(text)
    del text
    release_free_memory()
    return Setup(reader, skeleton, device, threads, resolved, plans,
                 [fingerprint(reader, o.result_options(device), calib_sha256) for o in resolved], tokenizer,
                 calib_desc, windows, probe_ids, max(1, resolved[0].batch_tokens // first.seqlen),
                 output.planned_files(reader, skeleton.num_blocks), t0, together, spill)
