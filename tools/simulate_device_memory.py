#!/usr/bin/env python
"""Device memory of a compression run, simulated on a machine without a GPU.

The engine's own per-block code (sola_stream.pipeline.engine._compress_one: weights in,
statistics, whitening, spectra, allocation, factors, propagation; the survey of --allocation
global; the paired passes of --fit compensate) runs for K blocks of a full-size config under
PyTorch's FakeTensorMode on a fake `cuda` device: tensors have shapes, dtypes and devices but no
storage, so a 70B block "runs" in seconds. The weights are fake too (no checkpoint on disk).
torch.distributed._tools.mem_tracker.MemTracker counts the live device bytes after every
operation; each byte is attributed to the innermost step announced by sola_stream.phases.

What fake tensors do not show is added from documented sizes (WORKSPACES below): the solvers'
workspaces during each Cholesky/eigh call, the cuBLAS workspaces and the CUDA context. Not
modelled: the caching allocator's rounding and fragmentation (allocated bytes, not reserved).
Values are unknown under fake tensors, so every `.item()`-like read gets a stand-in (finite
checks pass, Cholesky succeeds undamped, spectra halve every tenth of their length) and rank
allocation runs on those.

    python tools/simulate_device_memory.py --config tools/configs/llama-2-70b.json --gpu-cap 24 \\
        --nsamples 128 --seqlen 2048 --blocks 1 --json

With --json the last line of stdout is one object: peak_gib (simulated, workspaces included),
plan_gib (the planner's prediction for the same run), phases (step -> simulated GiB), plan_phases,
batch_tokens, and the workspace terms with their sources.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend
from torch.nn import functional as F

from sola_stream.cli import prime_ratio_arg
from sola_stream.pipeline.options import AUTO_CHOICES, prime_options
from sola_stream.errors import InputError
from sola_stream.families import family_for_dict, meta_model, transformers_config
from sola_stream.method.block_compress import Share
from sola_stream.pipeline import engine
from sola_stream.pipeline.distributed import SINGLE
from sola_stream.pipeline.options import CompressOptions
from sola_stream.pipeline.overlap import Background
from sola_stream.phases import listening
from sola_stream.pipeline.plan import (CUBLAS_WORKSPACES, CUDA_CONTEXT, GIB, eigh_workspace, make_plan,
                                       potrf_workspace)
from sola_stream.pipeline.skeleton import Skeleton
from sola_stream.pipeline.state_cache import Streams
from sola_stream.pipeline.survey import survey

aten = torch.ops.aten
# deepcopy of a module reads fake tensors' data pointers (null) to decide how to copy: harmless here
warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")


def _fake_gpu() -> torch.device:
    """The simulated GPU: a PrivateUse1 device named "fakegpu". A CPU build of PyTorch has no
    CUDA device guard, so its Python bindings (indexing, .to) refuse any tensor on "cuda", fake or
    not; PrivateUse1 takes a dummy guard. The engine treats both alike (it names "cuda" only to
    empty the caching allocator, which changes no allocated byte)."""
    if torch._C._get_privateuse1_backend_name() != "fakegpu":
        _setup_privateuseone_for_python_backend("fakegpu")
    return torch.device("fakegpu", 0)


GPU = _fake_gpu()

# Memory the fake tensors do not show, with where each size comes from (the planner's constants).
WORKSPACES = {
    "CUDA context": (CUDA_CONTEXT, "outside torch's allocator; the planner's constant (sola_stream/pipeline/plan.py)"),
    "cuBLAS workspaces": (CUBLAS_WORKSPACES, "PyTorch's defaults: CUBLAS_WORKSPACE_CONFIG :4096:2:16:8 (8.125 MiB) for "
                                  "cuBLAS, plus the 32 MiB cuBLASLt workspace on sm90 (aten/src/ATen/cuda/CUDABlas.cpp)"),
    "eigh": (None, "4n^2 + 6n + 1 doubles and 3 + 5n ints with vectors: 4n^2 measured through torch 2.11 on an "
                   "H200 (tools/bench_solver_memory.py; cuSOLVER documents no formula, only *_bufferSize), "
                   "LAPACK dsyevd's linear terms; 2n + 1 doubles for values only (LAPACK's minimum)"),
    "cholesky": (None, "a 256-column panel, 256 n elements (an assumption: LAPACK dpotrf needs no workspace; "
                       "cuSOLVER documents no size for potrf's)"),
}


def solver_workspace(func, args, kwargs) -> int:
    """Bytes a solver call holds beside its inputs and outputs (WORKSPACES)."""
    a = args[0]
    if func in (aten._linalg_eigh.default, aten.linalg_eigh.default):
        vectors = kwargs.get("compute_v", args[2] if len(args) > 2 else True)
        return eigh_workspace(a.shape[-1], vectors, a.element_size())
    if func is aten.linalg_cholesky_ex.default:
        return potrf_workspace(a.shape[-1], a.element_size())
    return 0


class FakeCheckpoint:
    """A checkpoint reader (the interface Skeleton and the engine use) whose tensors are fake:
    names and shapes of the model `cfg` describes, in its storage dtype, nothing on disk."""

    def __init__(self, cfg: dict, where: str, mode: FakeTensorMode):
        self.path, self.mode = Path(where), mode
        self.config_dict = cfg
        family = family_for_dict(cfg, where)
        model = meta_model(transformers_config(cfg, where), where)
        dtype = getattr(torch, str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"), None)
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16  # as the plan reads it
        head = family.head_path + ".weight"
        tied = cfg.get("tie_word_embeddings", False)
        self._shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if not (tied and n == head)}
        self._dtype = dtype
        self.weight_map = {n: "fake.safetensors" for n in self._shapes}

    def rename(self, renames: dict[str, str]) -> None:
        if renames:
            raise InputError(f"{self.path}: fake checkpoints use run-time names already")

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self._shapes if n.startswith(prefix)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        with self.mode:
            return torch.empty(self._shapes[name], dtype=self._dtype)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {n[len(prefix):]: self.get(n) for n in self.names(prefix)}


class _GpuKernels(TorchFunctionMode):
    """Attention as CUDA runs it for the engine's float32 blocks: the memory-efficient kernel
    (outputs and a float32 log-sum-exp per query; no score matrix). The fake device would otherwise
    take the math fallback, which materializes heads x seq x seq scores."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].device == GPU:
            q, v = args[0], args[2]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            # a boolean mask is turned into an additive one of q's dtype first
            additive = q.new_empty(mask.shape) if mask is not None and mask.dtype == torch.bool else None
            out = q.new_empty(q.shape[:-1] + v.shape[-1:])
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            del lse, additive  # freed as the kernel returns; counted while alive
            return out
        return func(*args, **kwargs)


class _StandInValues(TorchDispatchMode):
    """Python values read from fake tensors (`.item()`, `bool()`, `float()`): finite checks pass,
    solver info is 0, any float is 1.0."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 0)
        return func(*args, **(kwargs or {}))


def _stand_in_list(t: torch.Tensor):
    """`.tolist()` of a fake tensor: a spectrum halving every tenth of its length (rank allocation
    runs on it: every layer gets factored, at ranks like those of real weights)."""
    if t.dim() == 0:
        return 1.0 if t.is_floating_point() else 0
    if t.dim() == 1:
        n = t.shape[0]
        return [2.0 ** (-10 * k / n) for k in range(n)] if t.is_floating_point() else list(range(n))
    return [_stand_in_list(row) for row in t]


def _apply_no_swap(self: nn.Module, fn, recurse: bool = True):
    """nn.Module._apply without swap_tensors (which refuses fake parameters: they carry weakrefs):
    each parameter and buffer is replaced by fn of it, as .to() does for real tensors."""
    if recurse:
        for child in self.children():
            child._apply(fn)
    with torch.no_grad():
        for key, p in self._parameters.items():
            if p is not None:
                self._parameters[key] = nn.Parameter(fn(p), requires_grad=p.requires_grad)
        for key, b in self._buffers.items():
            if b is not None:
                self._buffers[key] = fn(b)
    return self


class PhaseMemory(MemTracker):
    """MemTracker that also keeps, for each step (sola_stream.phases; nested steps
    joined by " / "), the peak of live CUDA bytes plus the workspace of the solver call running."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.peaks: dict[str, int] = {}
        self.cublas_used = False

    def step(self, name: str, entering: bool) -> None:
        if entering:
            self.stack.append(name)
        else:
            self.stack.pop()
        self._note(0)

    # Per-module statistics are not used (and refuse a block run once per chunk): every device
    # tensor, parameters included, is the output of an operation and tracked as such.
    def _pre_fw_hook(self, module, inputs) -> None:
        pass

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        pass

    def live(self) -> int:
        return self._curr_mem_snap.get(GPU, {}).get("Total", 0)

    def _note(self, extra: int) -> None:
        key = " / ".join(self.stack) or "between steps"
        self.peaks[key] = max(self.peaks.get(key, 0), self.live() + extra)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        res = super().__torch_dispatch__(func, types, args, kwargs)
        if args and isinstance(args[0], torch.Tensor) and args[0].device == GPU:
            self.cublas_used = True
            self._note(solver_workspace(func, args, kwargs or {}))
        return res


def fake_mode() -> FakeTensorMode:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.cache_enabled = False  # its cached views crashed (segfault) on PrivateUse1 tensors; costs only speed
    return mode


@contextmanager
def fake_gpu(mode: FakeTensorMode):
    """Inside, everything created is fake, GPU is a device and reads of values get stand-ins;
    yields the PhaseMemory tracker."""
    saved_apply, saved_tolist = nn.Module._apply, FakeTensor.tolist
    with ExitStack() as stack:
        stack.enter_context(mode)
        tracker = stack.enter_context(PhaseMemory())
        stack.enter_context(_StandInValues())
        stack.enter_context(_GpuKernels())
        stack.enter_context(listening(tracker.step))
        nn.Module._apply = _apply_no_swap
        FakeTensor.tolist = _stand_in_list
        try:
            yield tracker
        finally:
            nn.Module._apply, FakeTensor.tolist = saved_apply, saved_tolist


def with_blocks(cfg: dict, blocks: int, where: str) -> dict:
    return family_for_dict(cfg, where).with_blocks(cfg, blocks, where)


def simulate(cfg: dict, options: CompressOptions, gpu_cap_gib: float, blocks: int = 1,
             where: str = "config.json", ratios: tuple[float, ...] = ()) -> dict:
    """Simulated device memory of `blocks` blocks of the run (module docstring), beside the plan.
    `ratios`: several outputs in lockstep (pipeline/lockstep.py; needs --propagate original): one
    statistics pass per block, then every ratio's fit (engine.fit_blocks)."""
    cap = int(gpu_cap_gib * GIB)
    if ratios and options.propagate != "original":
        raise InputError("--ratios: several ratios run in lockstep only with --propagate original")
    plan = make_plan(cfg, options, torch.device("cuda"), budget_device=cap, budget_host=2**62,
                     outputs=max(1, len(ratios)))
    options = replace(options, batch_tokens=plan.batch_tokens,
                      decompose_on="host" if plan.decompose_on_host else "device")
    batch = max(1, plan.batch_tokens // options.seqlen)
    small = with_blocks(cfg, blocks, where)
    mode = fake_mode()
    reader = FakeCheckpoint(small, where, mode)
    with _StandInValues():  # its meta blocks stay real meta tensors (fake ones broke later forwards)
        skeleton = Skeleton(reader)
    with tempfile.TemporaryDirectory() as tmp, fake_gpu(mode) as tracker:
        windows = torch.zeros((options.nsamples, options.seqlen), dtype=torch.long)
        streams = Streams(Path(tmp), on_disk=False, original=options.two_streams)
        target = streams.create((options.nsamples, options.seqlen, skeleton.hidden_size))
        kwargs = engine.embed_windows(skeleton, windows, batch, target)[1]
        budgets = None
        if options.allocation == "global" and options.method == "sola":
            probe_ids = torch.zeros((options.probe_windows, options.seqlen), dtype=torch.long)
            found = survey(skeleton, target, kwargs, probe_ids, options, GPU, batch, progress=False)
            budgets = [found.budgets(r) for r in ratios] if ratios else found.budgets(options.ratio)
        streams.take_first()
        commits = Background("commit")
        for i in range(blocks):
            weights = reader.tensors(skeleton.family.block_prefix(i))
            if ratios:  # as pipeline/lockstep.py does it
                stats = engine.statistics(i, weights, skeleton, streams.main, streams.main.begin_block(i), kwargs[i],
                                          options, GPU, batch, commits, SINGLE)
                shares = [Share(r, budgets[k][i] if budgets else None) for k, r in enumerate(ratios)]
                engine.fit_blocks(i, weights, skeleton, stats, kwargs[i], options, shares, GPU, batch,
                                  weights[skeleton.family.linears[0] + ".weight"].dtype, SINGLE)
                del stats
            else:
                engine._compress_one(i, weights, skeleton, streams, kwargs[i], options, GPU, batch, commits,
                                     budget=budgets[i] if budgets else None)
            commits.wait()
            streams.take_target(i + 1)
        used_cublas = tracker.cublas_used
        phases = dict(tracker.peaks)
    fixed = CUDA_CONTEXT + (CUBLAS_WORKSPACES if used_cublas else 0)
    phases = {k: v + fixed for k, v in phases.items()}
    plan_phases = {k: v for k, v in plan.device_parts.items() if k.startswith("peak ")}
    return {"config": where, "blocks": blocks, "nsamples": options.nsamples, "seqlen": options.seqlen,
            "method": options.method, "fit": options.fit, "allocation": options.allocation,
            "gpu_cap_gib": gpu_cap_gib, "batch_tokens": plan.batch_tokens,
            "decompose_on_host": plan.decompose_on_host,
            "peak_gib": max(phases.values()) / GIB, "plan_gib": plan.peak_device / GIB,
            "plan_problems": plan.problems,
            "phases": {k: v / GIB for k, v in phases.items()},
            "plan_phases": {k: v / GIB for k, v in plan_phases.items()},
            "workspaces": {k: {"bytes": b, "source": s} for k, (b, s) in WORKSPACES.items()}}


def smallest_cap(cfg: dict, options: CompressOptions) -> int:
    """The smallest whole GiB device budget the plan accepts for this run."""
    def accepted(gib: int) -> bool:
        return not make_plan(cfg, options, torch.device("cuda"), budget_device=gib * GIB, budget_host=2**62).problems
    lo, hi = 1, 4096
    if not accepted(hi):
        raise InputError(f"the plan accepts no device budget up to {hi} GiB")
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if accepted(mid) else (mid + 1, hi)
    return lo


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a config.json (file or directory), e.g. tools/configs/*.json")
    p.add_argument("--gpu-cap", required=True,
                   help="device budget in GiB (what --max-gpu-memory says), or 'min': the smallest whole GiB "
                        "budget the plan accepts")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--blocks", type=int, default=1, help="blocks to run (default 1; all blocks are alike)")
    p.add_argument("--method", default="sola", help="sola, svd-llm or svd (default sola)")
    p.add_argument("--ratio", type=float, default=0.2, help="target ratio (default 0.2)")
    p.add_argument("--prime-ratio", type=prime_ratio_arg, default=CompressOptions.prime_ratio,
                   help=f"a number, or auto (each block tries {', '.join(map(str, AUTO_CHOICES))})")
    p.add_argument("--fit", default="plain", help="plain or compensate (default plain)")
    p.add_argument("--allocation", default="block", help="block or global (default block)")
    p.add_argument("--propagate", default="compressed", help="compressed or original (default compressed)")
    p.add_argument("--ratios", type=lambda v: tuple(float(r) for r in v.split(",")), default=(),
                   help="R1,R2,...: several ratios in lockstep (with --propagate original), instead of --ratio")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args()
    path = Path(args.config)
    path = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(path.read_text())
        options = CompressOptions(method=args.method, ratio=args.ratio, **prime_options(args.prime_ratio, args.fit),
                                  nsamples=args.nsamples, seqlen=args.seqlen, fit=args.fit,
                                  allocation=args.allocation, propagate=args.propagate, device="cpu")
        options.validate()
        if args.blocks < 1:
            raise InputError(f"--blocks: {args.blocks} must be at least 1")
        try:
            cap = smallest_cap(cfg, options) if args.gpu_cap == "min" else float(args.gpu_cap)
        except ValueError:
            raise InputError(f"--gpu-cap: {args.gpu_cap!r} is not a number of GiB or 'min'") from None
        if not cap > 0:
            raise InputError(f"--gpu-cap: {args.gpu_cap} is not a positive number of GiB")
        out = simulate(cfg, options, cap, args.blocks, str(path), args.ratios)
    except (OSError, ValueError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    width = max(map(len, out["phases"]))
    print(f"{path}: {args.blocks} block(s), {args.nsamples} x {args.seqlen} calibration, chunk "
          f"{out['batch_tokens']} tokens, cap {cap:g} GiB"
          + (", decompositions on the host (the plan's decision)" if out["decompose_on_host"] else ""))
    for k, v in out["phases"].items():
        print(f"  {k:<{width}} {v:8.2f} GiB")
    print(f"simulated peak {out['peak_gib']:.2f} GiB, planned {out['plan_gib']:.2f} GiB"
          + "".join(f"\nthe plan refuses this budget: {p}" for p in out["plan_problems"]))
    for k, v in out["plan_phases"].items():
        print(f"  plan {k:<{width - 5}} {v:8.2f} GiB")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
