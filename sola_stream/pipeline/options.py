"""Options of a compression run: what the user asked for, checked, and which of them change the
output bytes (the run fingerprint)."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch

from sola_stream.method.block_compress import METHODS
from sola_stream.storage.calibration import DEFAULT_NSAMPLES, DEFAULT_SEED, DEFAULT_SEQLEN
from sola_stream.errors import InputError

PROPAGATE = ("compressed", "original")
FITS = ("plain", "compensate")
ALLOCATIONS = ("block", "global")


def check_device(device: str, need_device: bool = True) -> torch.device:
    """The torch device that --device names (auto: CUDA when available, else the CPU); with
    `need_device`, a CUDA device must exist on this machine. InputError otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not re.fullmatch(r"cuda(:\d{1,4})?", device):
        raise InputError(f"--device: {device!r} is not cpu, cuda or cuda:N")
    if need_device and device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available on this machine")
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(device)


def check_threads(threads: int | None) -> None:
    if threads is not None and not 1 <= threads <= 4096:
        raise InputError(f"--threads: {threads} is out of range [1, 4096]")


# the splits each block tries under --prime-ratio auto: with the held-out probe, 0.15 lost where
# it was chosen (SmolLM2 at 40%: 64.1 against 62.9 without it; docs/BENCHMARKS.md)
AUTO_CHOICES = (0.25, 0.45, 0.65)


def prime_options(prime_ratio: float | str | None, fit: str = "plain") -> dict:
    """CompressOptions' prime fields for the CLI's and the API's `prime_ratio`: a number (every
    block at that split), "auto" (each block chooses among AUTO_CHOICES), or None, the default:
    auto, except with --fit compensate, which fits one split (the dataclass default)."""
    if prime_ratio == "auto" or (prime_ratio is None and fit != "compensate"):
        return {"prime_ratio": CompressOptions.prime_ratio, "prime_choices": AUTO_CHOICES}
    return {"prime_ratio": CompressOptions.prime_ratio if prime_ratio is None else prime_ratio, "prime_choices": ()}


@dataclass
class CompressOptions:
    method: str = "sola"
    ratio: float = 0.2
    ratio_of: str = "blocks"  # "blocks": of the block linear weights; "model": of all parameters
    # the prime split of every block, or with prime_choices, of the survey of --allocation global
    prime_ratio: float = 0.25
    # splits each block chooses among by measuring its output (--prime-ratio auto, the CLI's and the
    # API's default: prime_options; pipeline/prime_split.py); empty: every block at prime_ratio
    prime_choices: tuple[float, ...] = ()
    calib: str | None = None
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_SEQLEN
    seed: int = DEFAULT_SEED
    device: str = "auto"
    propagate: str = "compressed"
    fit: str = "plain"  # or "compensate" (opt-in: measured no gain on top of the other options)
    # model-wide (a survey pass first; sola only) or per block at the block's ratio: model-wide is
    # measured better at every ratio on SmolLM2, for 1.7x the time (docs/BENCHMARKS.md "Quality options")
    allocation: str = "global"
    # calibration windows the survey probes for what each layer's error costs the model (0: the
    # block-update heuristic instead; pipeline/probe.py)
    probe_windows: int = 1
    batch_tokens: int | None = None  # tokens per forward chunk (None: planned from the device budget)
    # where a block's decompositions run: "device", or "host" when the plan finds the device too
    # small for them (set by the plan; part of the fingerprint: float64 results differ in the last bits)
    decompose_on: str = "device"
    max_gpu_memory: float | None = None  # GiB; None: the device's total memory
    max_host_memory: float | None = None  # GiB; None: the host's available memory at the start
    threads: int | None = None  # CPU threads; None: what affinity, cgroup quota and SLURM allow
    model_ratio: float | None = None  # the --ratio-of model target this ratio was derived from

    def validate(self, need_device: bool = True) -> None:
        if self.method not in METHODS:
            raise InputError(f"--method: {self.method!r} is not one of {', '.join(METHODS)}")
        if not 0.0 < self.ratio < 1.0:
            raise InputError(f"--ratio: {self.ratio} is out of range (0, 1)")
        if self.ratio_of not in ("blocks", "model"):
            raise InputError(f"--ratio-of: {self.ratio_of!r} is not blocks or model")
        if not 0.0 <= self.prime_ratio < 1.0:
            raise InputError(f"--prime-ratio: {self.prime_ratio} is out of range [0, 1)")
        if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0.0 <= c < 1.0
                   for c in self.prime_choices):
            raise InputError(f"prime_choices: {self.prime_choices} are not numbers in [0, 1)")
        self.prime_choices = tuple(sorted({float(c) for c in self.prime_choices}))
        if self.prime_choices and self.fit == "compensate":
            raise InputError("--prime-ratio auto needs --fit plain (the compensating fit uses one split)")
        if self.fit not in FITS:
            raise InputError(f"--fit: {self.fit!r} is not one of {', '.join(FITS)}")
        if self.fit == "compensate" and self.method == "svd":
            raise InputError("--fit compensate needs a whitened method (sola or svd-llm), not svd")
        if self.allocation not in ALLOCATIONS:
            raise InputError(f"--allocation: {self.allocation!r} is not one of {', '.join(ALLOCATIONS)}")
        if self.method != "sola":
            self.allocation = "block"  # the baselines' uniform ranks: nothing to allocate
            self.prime_choices = ()  # and no prime neurons
        if type(self.probe_windows) is not int or self.probe_windows < 0:
            raise InputError(f"--probe-windows: {self.probe_windows!r} is not a whole number >= 0")
        if self.allocation == "block":
            self.probe_windows = 0  # only a survey probes
        if self.decompose_on not in ("device", "host"):
            raise InputError(f"decompose_on: {self.decompose_on!r} is not device or host")
        if self.propagate not in PROPAGATE:
            raise InputError(f"--propagate: {self.propagate!r} is not one of {', '.join(PROPAGATE)}")
        check_device(self.device, need_device)
        if self.nsamples < 1 or self.seqlen < 2 or (self.batch_tokens is not None and self.batch_tokens < 1):
            raise InputError("--nsamples, --seqlen and --batch-tokens must be positive (seqlen >= 2)")
        check_threads(self.threads)
        if not 0 <= self.seed < 2**64:
            raise InputError(f"--seed: {self.seed} is out of range [0, 2**64)")
        for name in ("max_gpu_memory", "max_host_memory"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InputError(f"--{name.replace('_', '-')}: {value} GiB is not a positive number")

    @property
    def two_streams(self) -> bool:
        """The run carries the original model's states beside the compressed model's."""
        return self.fit == "compensate" and self.propagate == "compressed"

    @property
    def smallest_prime_ratio(self) -> float:
        """The split with the most marginal neurons this run may factor (what the plan sizes)."""
        return min((self.prime_ratio, *self.prime_choices))

    def resolved_device(self) -> torch.device:
        return check_device(self.device)

    def plan_device(self) -> torch.device:
        """The device a plan is for: as resolved_device, but `cuda` may be planned without a GPU."""
        return check_device(self.device, need_device=False)

    def result_options(self, device: torch.device) -> dict:
        """Every option that changes the output bytes (the run fingerprint)."""
        opts = asdict(self)
        opts.pop("calib")  # its content is fingerprinted by hash instead
        for budget in ("max_gpu_memory", "max_host_memory", "threads"):  # they change where, not what
            opts.pop(budget)
        opts["device"] = device.type
        if self.decompose_on == "device":  # the usual case keeps the fingerprints of earlier versions
            opts.pop("decompose_on")
        if not self.probe_windows:  # what versions before the probe did: their runs still resume
            opts.pop("probe_windows")
        if self.method != "sola":
            opts["prime_ratio"] = 0.0
        if not self.prime_choices:  # earlier versions' fingerprints
            opts.pop("prime_choices")
        else:
            opts["prime_choices"] = list(self.prime_choices)
        return opts
