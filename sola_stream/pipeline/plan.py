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

import psutil
import torch

from sola_stream.errors import InputError
from sola_stream.families import family_for_dict, meta_model, transformers_config

GIB = 2**30
RUNTIME_HOST = int(0.5 * GIB)  # torch, transformers, tokenizer, skeleton: measured 0.42 GiB peak on a tiny model
CUDA_CONTEXT = int(0.5 * GIB)  # CUDA context and kernels, outside torch's allocator
DEFAULT_BATCH_TOKENS = {"cpu": 1024, "cuda": 16384}  # CPU: small chunks stay in cache (measured)


def _itemsize(name) -> int:
    """Bytes per element of a config's dtype name ("bfloat16"); 2 when absent or not a dtype."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 2


@dataclass
class Shapes:
    """What the plan needs of a model, read off the family's block built on the meta device."""

    hidden: int
    neurons: int  # FFN neurons per block
    attn: int  # attention width (heads x head_dim)
    qkv_out: int  # output rows of the attention's input group (q, k and v together)
    heads: int
    blocks: int
    outer_params: int  # embeddings, final norm, head (once when tied), any vision tower
    storage_bytes: int
    block_params: int  # linear weights of one block
    group_widths: tuple[int, ...]  # input width of each input group: one covariance each
    layers: tuple[tuple[int, int, str, int], ...]  # (out, in, "rows" | "cols" | "", FFN index) per linear layer
    ffns: tuple[tuple[int, int], ...] = ()  # (neurons, chunks) of each FFN (each expert is one)

    @classmethod
    def from_config(cls, cfg: dict, where: str = "config.json") -> "Shapes":
        family = family_for_dict(cfg, where)
        one = transformers_config(family.with_blocks(cfg, 1, where), where)  # one block is enough
        model = meta_model(one, where)
        family = family.bind(one)  # experts counted
        layers = model.get_submodule(family.layers_path)
        block = family.prepare(layers[0])
        family.check(block, where)
        linears = {n: block.get_submodule(n) for n in family.linears}
        first = family.groups[0].linears
        text = one.get_text_config()  # the language model's fields (a multimodal config holds them)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        ffn_of = {n: (k, "rows") for k, g in enumerate(family.neuron_groups) for n in g.rows}
        ffn_of.update({g.cols: (k, "cols") for k, g in enumerate(family.neuron_groups)})
        in_blocks = {id(p) for p in layers.parameters()}
        head = model.get_submodule(family.head_path).weight
        if getattr(text, "tie_word_embeddings", False) and head is not model.get_input_embeddings().weight:
            in_blocks.add(id(head))  # tied at load, not on the meta device: the head is the embedding
        return cls(hidden=text.hidden_size, neurons=family.neuron_count(block),
                   attn=text.num_attention_heads * head_dim, qkv_out=sum(linears[n].out_features for n in first),
                   heads=text.num_attention_heads, blocks=family.text(cfg, where)["num_hidden_layers"],
                   outer_params=sum(p.numel() for p in model.parameters() if id(p) not in in_blocks),
                   storage_bytes=_itemsize(cfg.get("torch_dtype") or cfg.get("dtype")),
                   block_params=sum(m.weight.numel() for m in linears.values()),
                   group_widths=tuple(linears[g.linears[0]].in_features for g in family.groups),
                   layers=tuple((m.out_features, m.in_features, *reversed(ffn_of.get(n, (-1, ""))))
                                for n, m in linears.items()),
                   ffns=tuple((block.get_submodule(g.cols).in_features, g.chunks) for g in family.neuron_groups))

    def factored_dims(self, marginal: list[int]) -> list[tuple[int, int]]:
        """Shapes of the matrices decomposed when marginal[k] neurons of FFN k are factored (the
        rest prime)."""
        dims = []
        for out, inp, role, k in self.layers:
            if role == "rows":
                out = self.ffns[k][1] * marginal[k]
            elif role == "cols":
                inp = marginal[k]
            dims.append((out, inp))
        return dims


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


def _g(n: int | None) -> str:
    return "none" if n is None else f"{n / GIB:.2f} GiB"


def _fit(options) -> str:
    return getattr(options, "fit", "plain")


def device_terms(s: Shapes, method: str, prime_ratio: float, seqlen: int, tokens: int, cpu: bool,
                 fit: str = "plain") -> dict[str, int]:
    """Bytes on the compute device for each step of one block (float32 compute, float64 math).
    The compensating fit holds two blocks (the original and the one being compressed), the input
    of one layer per stream and a cross-covariance beside each covariance."""
    h, i = s.hidden, s.neurons
    block = 4 * s.block_params * (2 if fit == "compensate" else 1)
    # live floats per token in a block forward: chunk in/out and residual, the FFN's gate, up,
    # act, product and the score hook's |a|; attention q/k/v with rotary copies; CPU sdpa also
    # materializes the heads x seqlen scores of each window
    ffn = 3 * h + 5 * i
    att = 3 * h + 2 * s.qkv_out + s.attn + (s.heads * seqlen if cpu else 0)
    acts = 4 * tokens * max(ffn, att)
    squares = sum(w * w for w in s.group_widths)
    covs = 4 * squares
    if fit == "compensate":
        widest = max(s.group_widths)
        acts += 2 * 4 * tokens * widest
        covs += 2 * 4 * widest * widest
    ms = marginal_neurons(s, method, prime_ratio)
    m = max(ms)
    # float64 C and L (the FFNs' neuron covariances restricted to marginal neurons), kept L's
    whiten = 0 if method == "svd" else 8 * (2 * sum(x * x for x in ms) + squares - sum(n * n for n, _ in s.ffns))
    bases = 8 * sum(min(out, inp) ** 2 for out, inp in s.factored_dims(ms))
    transient = 8 * (2 * h * m + 2 * min(h, m) ** 2)  # W L, its Gram and eigh's workspace (largest FFN)
    return {"block (float32)": block, "activations (one chunk)": acts, "covariances (float32)": covs,
            "decomposition (float64)": whiten + bases + transient,
            "peak statistics pass": block + acts + covs,
            "peak decomposition": covs + whiten + bases + transient,
            "peak propagation": block + acts}


def marginal_neurons(s: Shapes, method: str, prime_ratio: float) -> list[int]:
    """Neurons left to factor in each FFN."""
    return [n - int(round(prime_ratio * n)) if method == "sola" else n for n, _ in s.ffns]


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
    streams = 2 if getattr(options, "two_streams", False) else 1  # --fit compensate: the original model's too
    states = streams * 4 * options.nsamples * options.seqlen * s.hidden
    problems: list[str] = []

    tokens = options.batch_tokens or DEFAULT_BATCH_TOKENS["cpu" if cpu else "cuda"]
    dev = device_terms(s, options.method, options.prime_ratio, options.seqlen, tokens, cpu, _fit(options))
    if not cpu and budget_device is not None and options.batch_tokens is None:
        # largest power-of-two chunk (at least one window) that fits the device budget
        while tokens > options.seqlen and _peak(dev) + CUDA_CONTEXT > budget_device:
            tokens //= 2
            dev = device_terms(s, options.method, options.prime_ratio, options.seqlen, tokens, cpu, _fit(options))
    tokens = max(tokens, options.seqlen)
    dev = device_terms(s, options.method, options.prime_ratio, options.seqlen, tokens, cpu, _fit(options))
    if not cpu and budget_device is not None and _peak(dev) + CUDA_CONTEXT > budget_device:
        problems.append(f"peak GPU memory {_g(_peak(dev) + CUDA_CONTEXT)} exceeds the budget {_g(budget_device)} "
                        "even with one window per chunk")

    weights = s.storage_bytes * s.block_params
    host = {"runtime (torch, transformers)": RUNTIME_HOST,
            "embeddings and head (float32)": 4 * s.outer_params,
            "block weights (current + next)": 2 * weights,
            "compressed block being written": weights}
    if cpu:
        host["compute (block, chunk, statistics)"] = _peak(dev)
    chunk = 4 * tokens * s.hidden
    if getattr(options, "allocation", "block") == "global" and options.method == "sola":
        host["survey (a block's update, one chunk)"] = chunk  # pipeline/survey.py
    spill = False
    in_ram = sum(host.values()) + states
    if budget_host is not None and in_ram > budget_host:
        spill = True
    host["calibration cache" + (" (two chunks, rest on disk)" if spill else "")] = 2 * streams * chunk if spill else states
    if budget_host is not None and sum(host.values()) > budget_host:
        problems.append(f"peak host memory {_g(sum(host.values()))} exceeds the budget {_g(budget_host)} "
                        "even with the calibration cache on disk")
    if not cpu:
        dev = {k: (v + CUDA_CONTEXT if k.startswith("peak ") else v) for k, v in dev.items()}
        dev["CUDA context"] = CUDA_CONTEXT

    out_block = int(weights * (1 - options.ratio)) + s.storage_bytes * 4 * s.hidden
    disk = {"output shards": s.blocks * out_block + s.storage_bytes * s.outer_params,
            "states checkpoints (two per stream while running)": 2 * states}

    # forward (2 FLOP per weight per token, and the attention scores), covariances, and the
    # decompositions (Cholesky + Gram + eigh, ~ n^3 terms)
    n_tok = options.nsamples * options.seqlen
    h = s.hidden
    ms = marginal_neurons(s, options.method, options.prime_ratio)
    forward = 2 * s.block_params * n_tok + 2 * 2 * n_tok * options.seqlen * s.attn  # one pass over the windows
    covariances = 2 * n_tok * sum(w * w for w in s.group_widths)
    decompositions = sum(m ** 3 / 3 + 2 * h * m * m + 2 * h * m * h * 3 for m in ms) + 2 * h ** 3 + 10 * 4 * h ** 3
    # plain fit: statistics and propagation passes; compensating fit: about five (pipeline/paired.py)
    passes = 5 if _fit(options) == "compensate" else 2
    flops = passes * forward + covariances * (2 if _fit(options) == "compensate" else 1) + decompositions
    if getattr(options, "allocation", "block") == "global" and options.method == "sola":
        flops += forward + covariances + decompositions  # the survey pass (pipeline/survey.py)
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
