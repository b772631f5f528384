"""Resource plan of a compression run, from config.json and the options alone (no weights read).

The model below mirrors what the engine allocates (docs/MEMORY.md explains each term):
- device memory: the block in float32, one chunk of activations, the four covariances, and the
  float64 decomposition workspace (Cholesky of the largest covariance, the kept whitening
  factors and spectra bases);
- host memory: the runtime, the embeddings/head in float32, two blocks of weights in their storage
  dtype (current + prefetched), the compressed block being written, and the calibration cache
  (in RAM, or about two chunks when spilled to disk); on a CPU run the device terms are host too;
- disk: the output (block shards + outer weights) and two states checkpoints while running.
The chunk size (batch tokens) is the largest power of two that fits the device budget.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from pathlib import Path

import psutil
import torch

from sola_stream.storage.checkpoint import read_json_object
from sola_stream.errors import InputError
from sola_stream.storage.input_checks import check_config

GIB = 2**30
RUNTIME_HOST = int(0.5 * GIB)  # torch, transformers, tokenizer, skeleton: measured 0.42 GiB peak on a tiny model
CUDA_CONTEXT = int(0.5 * GIB)  # CUDA context and kernels, outside torch's allocator
DEFAULT_BATCH_TOKENS = {"cpu": 1024, "cuda": 16384}  # CPU: small chunks stay in cache (measured)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class Shapes:
    hidden: int
    inter: int
    attn: int  # q and o width (heads x head_dim)
    kv: int  # k and v width
    heads: int
    vocab: int
    blocks: int
    tied: bool
    storage_bytes: int

    @classmethod
    def from_config(cls, cfg: dict) -> "Shapes":
        try:
            h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
            hd = cfg.get("head_dim") or h // heads
            return cls(hidden=h, inter=cfg["intermediate_size"], attn=heads * hd,
                       kv=cfg.get("num_key_value_heads", heads) * hd, heads=heads, vocab=cfg["vocab_size"],
                       blocks=cfg["num_hidden_layers"], tied=bool(cfg.get("tie_word_embeddings", False)),
                       storage_bytes=_DTYPE_BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype")), 2))
        except KeyError as exc:
            raise InputError(f"config.json: missing {exc.args[0]!r}, needed to plan the run") from None

    @property
    def block_params(self) -> int:
        h = self.hidden
        return 2 * h * self.attn + 2 * h * self.kv + 3 * h * self.inter


@dataclass
class Plan:
    device: str
    batch_tokens: int
    spill: bool
    states_bytes: int
    device_parts: dict[str, int]
    host_parts: dict[str, int]
    disk_parts: dict[str, int]
    budget_device: int | None
    budget_host: int | None
    flops_per_block: float
    seconds_per_block: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def peak_device(self) -> int:
        return max(v for k, v in self.device_parts.items() if k.startswith("peak "))

    @property
    def peak_host(self) -> int:
        return sum(self.host_parts.values())

    def check(self) -> None:
        if self.problems:
            raise InputError(f"plan: {self.problems[0]} (see `sola-stream plan` for the breakdown)")

    def describe(self) -> str:
        lines = [f"device {self.device}, chunk {self.batch_tokens} tokens, calibration cache "
                 f"{_g(self.states_bytes)} {'spilled to disk (memory-mapped)' if self.spill else 'in host RAM'}"]
        if self.device == "cuda":
            lines.append(f"GPU memory (peak {_g(self.peak_device)}, budget {_g(self.budget_device)}):")
            lines += [f"  {k:<40} {_g(v)}" for k, v in self.device_parts.items()]
        lines.append(f"host memory (peak {_g(self.peak_host)}, budget {_g(self.budget_host)}):")
        lines += [f"  {k:<40} {_g(v)}" for k, v in self.host_parts.items()]
        lines.append(f"disk (peak {_g(sum(self.disk_parts.values()))}):")
        lines += [f"  {k:<40} {_g(v)}" for k, v in self.disk_parts.items()]
        t = f"{self.seconds_per_block:.1f} s" if self.seconds_per_block else "n/a"
        lines.append(f"compute {self.flops_per_block / 1e12:.2f} TFLOP per block, estimated {t} per block")
        lines += [f"REFUSED: {p}" for p in self.problems]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"device": self.device, "batch_tokens": self.batch_tokens, "spill": self.spill,
                "states_bytes": self.states_bytes, "peak_device_bytes": self.peak_device if self.device == "cuda" else 0,
                "peak_host_bytes": self.peak_host, "disk_bytes": sum(self.disk_parts.values()),
                "device_parts": self.device_parts, "host_parts": self.host_parts, "disk_parts": self.disk_parts,
                "flops_per_block": self.flops_per_block, "seconds_per_block": self.seconds_per_block,
                "problems": self.problems}


def read_config(model: str) -> dict:
    """config.json of a checkpoint directory, a config file, or a hub id (online)."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        if path.exists() or "/" not in model or model.startswith((".", "/")):
            raise InputError(f"{path}: no config.json")
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, "config.json"))
        except Exception as exc:
            raise InputError(f"{model}: cannot fetch config.json from the hub ({type(exc).__name__})") from None
    cfg = read_json_object(path, "config.json")
    check_config(cfg, str(path))
    return cfg


def _g(n: int | None) -> str:
    return "none" if n is None else f"{n / GIB:.2f} GiB"


def device_terms(s: Shapes, method: str, prime_ratio: float, seqlen: int, tokens: int, cpu: bool) -> dict[str, int]:
    """Bytes on the compute device for each step of one block (float32 compute, float64 math)."""
    h, a, kv, i = s.hidden, s.attn, s.kv, s.inter
    block = 4 * s.block_params
    # live floats per token in a block forward: chunk in/out and residual, the FFN's gate, up,
    # act, product and the score hook's |a|; attention q/k/v with rotary copies; CPU sdpa also
    # materializes the heads x seqlen scores of each window
    ffn = 3 * h + 5 * i
    att = 3 * h + 3 * a + 4 * kv + (s.heads * seqlen if cpu else 0)
    acts = 4 * tokens * max(ffn, att)
    covs = 4 * (2 * h * h + a * a + i * i)
    m = i - int(round(prime_ratio * i)) if method == "sola" else i
    whiten = 0 if method == "svd" else 8 * (2 * m * m + 2 * h * h + a * a)  # float64 C and L, kept L's
    bases = 8 * (min(a, h) ** 2 * 2 + min(kv, h) ** 2 * 2 + min(m, h) ** 2 * 3)
    transient = 8 * (2 * h * m + 2 * min(h, m) ** 2)  # W L, its Gram and eigh's workspace
    return {"block (float32)": block, "activations (one chunk)": acts, "covariances (float32)": covs,
            "decomposition (float64)": whiten + bases + transient,
            "peak statistics pass": block + acts + covs,
            "peak decomposition": covs + whiten + bases + transient,
            "peak propagation": block + acts}


def make_plan(cfg: dict, options, device: torch.device, budget_device: int | None = None,
              budget_host: int | None = None, measure: bool = False) -> Plan:
    """Plan for `options` (CompressOptions) on `device`; budgets in bytes (None: what there is)."""
    s = Shapes.from_config(cfg)
    cpu = device.type != "cuda"
    if budget_device is None and getattr(options, "max_gpu_memory", None):
        budget_device = int(options.max_gpu_memory * GIB)
    if budget_host is None and getattr(options, "max_host_memory", None):
        budget_host = int(options.max_host_memory * GIB)
    if not cpu and budget_device is None and torch.cuda.is_available():
        budget_device = torch.cuda.get_device_properties(device).total_memory
    states = 4 * options.nsamples * options.seqlen * s.hidden
    problems: list[str] = []

    tokens = options.batch_tokens or DEFAULT_BATCH_TOKENS["cpu" if cpu else "cuda"]
    dev = device_terms(s, options.method, options.prime_ratio, options.seqlen, tokens, cpu)
    if not cpu and budget_device is not None and options.batch_tokens is None:
        # largest power-of-two chunk (at least one window) that fits the device budget
        while tokens > options.seqlen and _peak(dev) + CUDA_CONTEXT > budget_device:
            tokens //= 2
            dev = device_terms(s, options.method, options.prime_ratio, options.seqlen, tokens, cpu)
    tokens = max(tokens, options.seqlen)
    dev = device_terms(s, options.method, options.prime_ratio, options.seqlen, tokens, cpu)
    if not cpu and budget_device is not None and _peak(dev) + CUDA_CONTEXT > budget_device:
        problems.append(f"peak GPU memory {_g(_peak(dev) + CUDA_CONTEXT)} exceeds the budget {_g(budget_device)} "
                        "even with one window per chunk")

    weights = s.storage_bytes * s.block_params
    host = {"runtime (torch, transformers)": RUNTIME_HOST,
            "embeddings and head (float32)": 4 * s.vocab * s.hidden * (1 if s.tied else 2),
            "block weights (current + next)": 2 * weights,
            "compressed block being written": weights}
    if cpu:
        host["compute (block, chunk, statistics)"] = _peak(dev)
    chunk = 4 * tokens * s.hidden
    spill = False
    in_ram = sum(host.values()) + states
    if budget_host is not None and in_ram > budget_host:
        spill = True
    host["calibration cache" + (" (two chunks, rest on disk)" if spill else "")] = 2 * chunk if spill else states
    if budget_host is not None and sum(host.values()) > budget_host:
        problems.append(f"peak host memory {_g(sum(host.values()))} exceeds the budget {_g(budget_host)} "
                        "even with the calibration cache on disk")
    if not cpu:
        dev = {k: (v + CUDA_CONTEXT if k.startswith("peak ") else v) for k, v in dev.items()}
        dev["CUDA context"] = CUDA_CONTEXT

    out_block = int(weights * (1 - options.ratio)) + s.storage_bytes * 4 * s.hidden
    disk = {"output shards": s.blocks * out_block + s.storage_bytes * s.vocab * s.hidden * (1 if s.tied else 2),
            "states checkpoints (two while running)": 2 * states}

    # forward (2 FLOP per weight per token, twice: statistics and propagation), covariances,
    # attention scores, and the decompositions (Cholesky + Gram + eigh, ~ n^3 terms)
    n_tok = options.nsamples * options.seqlen
    h, i = s.hidden, s.inter
    m = i - int(round(options.prime_ratio * i)) if options.method == "sola" else i
    flops = (2 * 2 * s.block_params * n_tok + 2 * n_tok * (2 * h * h + s.attn ** 2 + i * i)
             + 2 * 2 * 2 * n_tok * options.seqlen * s.attn
             + (m ** 3 / 3 + 2 * h ** 3 + 2 * h * m * m + 10 * 4 * h ** 3 + 2 * h * m * h * 3))
    plan = Plan(device=device.type, batch_tokens=tokens, spill=spill, states_bytes=states, device_parts=dev,
                host_parts=host, disk_parts=disk, budget_device=budget_device, budget_host=budget_host,
                flops_per_block=float(flops), problems=problems)
    if measure:
        plan.seconds_per_block = flops / matmul_throughput(device)
    return plan


def _peak(dev: dict[str, int]) -> int:
    return max(v for k, v in dev.items() if k.startswith("peak "))


def matmul_throughput(device: torch.device, n: int = 2048, seconds: float = 0.5) -> float:
    """Measured float32 matmul FLOP/s on `device` (for the time estimate)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


def available_host_memory() -> int:
    return psutil.virtual_memory().available
