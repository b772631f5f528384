"""Resource plan of a compression run, from config.json and the options alone (no weights read).

The model below mirrors what the engine allocates (docs/MEMORY.md explains each term):
- device memory, per step of a block: the statistics pass (the block in float32, one chunk of
  activations, the covariances), the decompositions (replayed allocation by allocation:
  `decomposition_peak`; on the host instead when the device cannot hold them) and the
  propagation; checked against tools/simulate_device_memory.py;
- host memory: the runtime, the embeddings/head in float32, two blocks of weights in their storage
  dtype (current + prefetched), the compressed block being written, and the calibration cache
  (in RAM, or about two chunks when spilled to disk); on a CPU run the device terms are host too;
- disk: the output (block shards + outer weights) and two states checkpoints while running.
The chunk size (batch tokens) is the largest power of two that fits the device budget.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import psutil
import torch

from sola_stream.errors import InputError
from sola_stream.families import family_for_dict, meta_model, transformers_config
from sola_stream.method.decompose import SUBMATRIX_SLAB
from sola_stream.pipeline.prime_split import WINDOWS as SPLIT_WINDOWS

GIB = 2**30
RUNTIME_HOST = int(0.5 * GIB)  # torch, transformers, tokenizer, skeleton: measured 0.42 GiB peak on a tiny model
CUDA_CONTEXT = int(0.5 * GIB)  # CUDA context and kernels, outside torch's allocator
# host memory CUDA's libraries add once used (context, cuBLAS, cuSOLVER): 0.36 GiB of resident
# memory over `import torch`, measured on an H200 with torch 2.11+cu130 (tools/bench_solver_memory.py)
CUDA_RUNTIME_HOST = int(0.36 * GIB)
# PyTorch's defaults: CUBLAS_WORKSPACE_CONFIG :4096:2:16:8 for cuBLAS, plus 32 MiB for cuBLASLt on
# sm90 (aten/src/ATen/cuda/CUDABlas.cpp); allocated once, kept
CUBLAS_WORKSPACES = 4096 * 1024 * 2 + 16 * 1024 * 8 + 32 * 2**20
GPU_FIXED = CUDA_CONTEXT + CUBLAS_WORKSPACES
# of one split's decomposition time (whitening, spectra, factors), the factors' part: what each more
# output of a lockstep run adds (SmolLM2 on the CPU: 6.8 s of 41 s per run, docs/BENCHMARKS.md)
FACTORS_SHARE = 0.2
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
    layer_groups: tuple[int, ...] = ()  # input group (index into group_widths) of each linear layer
    neuron_inputs: tuple[int, ...] = ()  # input group of each FFN's neuron activations

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
                   ffns=tuple((block.get_submodule(g.cols).in_features, g.chunks) for g in family.neuron_groups),
                   layer_groups=tuple(next(k for k, g in enumerate(family.groups) if n in g.linears) for n in linears),
                   neuron_inputs=tuple(next(k for k, g in enumerate(family.groups) if n.cols in g.linears)
                                       for n in family.neuron_groups))

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
    decompose_on_host: bool = False  # the device cannot hold a block's decompositions: they run on the host
    ranks: int = 1  # processes of the run (torchrun): the figures are one rank's, disk the run's

    @property
    def peak_device(self) -> int:
        return _peak(self.device_parts, self.decompose_on_host)

    @property
    def peak_host(self) -> int:
        return sum(self.host_parts.values())

    def check(self) -> None:
        if self.problems:
            raise InputError(f"plan: {self.problems[0]} (see `sola-stream plan` for the breakdown)")

    def describe(self) -> str:
        lines = [f"device {self.device}, chunk {self.batch_tokens} tokens, calibration cache "
                 f"{_g(self.states_bytes)} {'spilled to disk (memory-mapped)' if self.spill else 'in host RAM'}"]
        if self.ranks > 1:
            lines.append(f"{self.ranks} ranks: memory and time are one rank's (its share of the windows, its "
                         "share of the decompositions); the host budget is the node's divided among its ranks")
        if self.decompose_on_host:
            lines.append("decompositions on the host: the GPU budget cannot hold them "
                         f"({_g(self.device_parts['peak decomposition'])} needed)")
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
                "decompose_on_host": self.decompose_on_host, "ranks": self.ranks, "problems": self.problems}


def _g(n: int | None) -> str:
    return "none" if n is None else f"{n / GIB:.2f} GiB"


def _fit(options) -> str:
    return getattr(options, "fit", "plain")


def device_terms(s: Shapes, method: str, prime_ratio: float, seqlen: int, tokens: int, cpu: bool,
                 fit: str = "plain", survey: bool = False, probe: bool = False,
                 choices: bool = False) -> dict[str, int]:
    """Bytes on the compute device for each step of one block (float32 compute, float64 math).
    The compensating fit holds two blocks (the original and the one being compressed), the input
    of one layer per stream and a cross-covariance beside each covariance. GPU terms are checked
    against tools/simulate_device_memory.py (the engine's code on a fake device)."""
    h, i = s.hidden, s.neurons
    block = 4 * s.block_params * (2 if fit == "compensate" else 1)
    # live floats per token in a block forward, at its widest point (the FFN's output projection):
    # the chunk in, the residual and the normed input (3h), the up projection, the activated gate
    # and their product (3i; the GPU's caching allocator reuses the gate's block at once, as the
    # simulation shows; the host heap keeps more: gate and the score hook's |a| counted, 5i);
    # attention: q/k/v with rotary copies and the heads' output (CPU sdpa also materializes the
    # heads x seqlen scores of each window; CUDA's memory-efficient kernel does not, but needs
    # grouped key/value heads repeated to every head: nn/attention.py)
    ffn = 3 * h + (5 if cpu else 3) * i
    grouped = s.qkv_out < 3 * s.attn
    att = 3 * h + 2 * s.qkv_out + s.attn + (s.heads * seqlen if cpu else 2 * s.attn * grouped)
    acts = 4 * tokens * max(ffn, att)
    squares = sum(w * w for w in s.group_widths)
    covs = 4 * squares
    if fit == "compensate":
        widest = max(s.group_widths)
        acts += 2 * 4 * tokens * widest
        covs += 2 * 4 * widest * widest
    # with --prime-ratio auto the smallest split is fitted first (the widest marginal block), with no
    # earlier candidate held; a later one holds the best so far, but a narrower marginal block
    # (several ratios fitted from one statistics pass share each split's layout: pipeline/lockstep.py)
    decomposition = decomposition_peak(s, method, prime_ratio, shared_covs=choices) + (covs - 4 * squares)
    if fit == "compensate":  # pipeline/paired.py: the layout's factors and bases stay while each input
        # group is refitted next to the original block (and, in its paired pass, a working block):
        # the widest group's C and (C + M)/2 in float32, C's float64 copy and factor, and W M
        # (method/compensate.py). A bound, not a replay (docs/MEMORY.md gives the simulated figures)
        w = max(s.group_widths)
        kept = decomposition_peak(s, method, prime_ratio, kept=True)
        decomposition = max(decomposition, block // 2 + kept + 24 * w * w + 8 * h * w,
                            block + kept + 8 * w * w + acts + 2 * 4 * tokens * h)  # both streams' chunks
    # small tensors: the blocks' keyword arguments (rotary tables, a causal mask where one is built:
    # bools, and CUDA's float copy of it inside attention); neuron scores and index vectors
    small = 8 * seqlen * (s.attn // s.heads) + 5 * seqlen * seqlen + 32 * s.neurons
    rank = 4 * tokens * h  # propagation: a factored layer's rank-k intermediate (k < hidden)
    terms = {"block (float32)": block, "activations (one chunk)": acts, "covariances (float32)": covs,
             "decomposition (float64, covariances included)": decomposition,
             "small tensors (rotary tables, masks, indices)": small,
             "peak statistics pass": block + acts + covs + small,
             "peak decomposition": decomposition + small,
             "peak propagation": block + acts + rank + small}
    if choices:  # pipeline/prime_split.py: a block (the original, then each candidate's) run on the
        # compared windows, one chunk of at most those windows, beside the covariances kept for the
        # next candidate's fit (the candidates' factors are on the host)
        compared = min(tokens, SPLIT_WINDOWS * seqlen)
        terms["peak prime split choice"] = block + covs + acts * compared // tokens + 4 * compared * h + small
    if survey:  # pipeline/survey.py: a whole forward, which the statistics pass stops short of: the
        # FFN output projection's output beside its input, then the residual sum, then the update's
        # difference for its norm (three chunks more); its spectra (values only) need less than the
        # decomposition
        terms["peak survey"] = block + acts + covs + small + 3 * 4 * tokens * h
    if probe:  # pipeline/probe.py: the original block beside the spectra and their bases, while one
        # layer's factors are made (the decomposition's peak), then one window through the block with
        # that layer cut (its float32 copy and the factors' product)
        largest = max(out * inp for out, inp, _, _ in s.layers)
        kept = decomposition_peak(s, method, prime_ratio, kept=True)
        # a window's states in, out and the last layer's perturbed output
        one = block + small + 3 * 4 * seqlen * h + acts * seqlen // tokens + 2 * 4 * largest
        terms["peak survey probe"] = one  # the spectra on the host (the cut layer copied in)
        terms["peak decomposition (survey probe)"] = max(one + kept, block + small + 3 * 4 * seqlen * h
                                                         + decomposition_peak(s, method, prime_ratio))
    return terms


def eigh_workspace(n: int, vectors: bool = True, itemsize: int = 8) -> int:
    """eigh's workspace beside its input and outputs. With vectors: 4 n^2 elements, measured through
    torch 2.11 on an H200 (cuSOLVER, n = 4096, 8192, 24576: tools/bench_solver_memory.py; cuSOLVER
    documents no formula), twice LAPACK dsyevd's minimum LWORK of 1 + 6n + 2n^2, which is kept
    for its linear terms, plus LIWORK = 3 + 5n ints. Values only: LAPACK's 2n + 1 (not measured)."""
    return itemsize * (1 + 6 * n + 4 * n * n) + 4 * (3 + 5 * n) if vectors else itemsize * (2 * n + 1)


def potrf_workspace(n: int, itemsize: int = 8) -> int:
    """A 256-column panel: an assumption (LAPACK dpotrf needs none; cuSOLVER documents no size)."""
    return itemsize * 256 * n


def decomposition_peak(s: Shapes, method: str, prime_ratio: float, values_only: bool = False,
                       kept: bool = False, shared_covs: bool = False) -> int:
    """Peak bytes of one block's decomposition (method/block_compress.py), its allocations replayed
    in order: the float32 covariances; each input group's float64 Cholesky factor (a neuron
    group's covariance is freed as its marginal block is gathered and converted in place); each
    layer's spectrum (its whitened weight, Gram, eigh workspace and flipped basis; the basis is
    kept); then the factors of one layer at the largest useful rank on top of everything kept.
    `kept`: instead, the bytes still held once every spectrum is made (the covariances not yet
    freed, the whitening factors and the bases). `shared_covs`: the neuron covariances are not
    freed (--prime-ratio auto fits the block again from the same statistics)."""
    ms = marginal_neurons(s, method, prime_ratio)
    neuron_of = {g: k for k, g in enumerate(s.neuron_inputs)}
    alive = peak = 4 * sum(w * w for w in s.group_widths)
    whitened: set[int] = set()
    dims = s.factored_dims(ms)
    for (out, inp, role, k), g, (m, n) in zip(s.layers, s.layer_groups, dims):
        if method != "svd" and g not in whitened:
            whitened.add(g)
            w = s.group_widths[g]
            if g in neuron_of and shared_covs:  # gathered, converted and factored beside the covariance
                c = n if role == "cols" else w
                peak = max(peak, alive + 4 * c * c + SUBMATRIX_SLAB, alive + 12 * c * c,
                           alive + 16 * c * c + potrf_workspace(c))
                alive += 8 * c * c
            elif g in neuron_of:  # popped, the marginal block gathered (float32, a slab at a time), converted, factored
                c = n if role == "cols" else w
                peak = max(peak, alive + (4 * c * c + SUBMATRIX_SLAB if c < w else 0))
                alive -= 4 * w * w
                peak = max(peak, alive + 12 * c * c, alive + 16 * c * c + potrf_workspace(c))
                alive += 8 * c * c
            else:  # copied to float64, factored; the copy is freed
                peak = max(peak, alive + 16 * w * w + potrf_workspace(w))
                alive += 8 * w * w
        lo, mn = min(m, n), m * n
        weight = (2 if method != "svd" else 1) * 8 * mn  # W in float64, then W L
        eigh = 8 * lo * lo + (eigh_workspace(lo, False) if values_only else 8 * lo * lo + eigh_workspace(lo))
        flip = 0 if values_only else 3 * 8 * lo * lo
        peak = max(peak, alive + weight, alive + 8 * (mn + lo * lo), alive + eigh, alive + flip)
        alive += 0 if values_only else 8 * lo * lo
    if kept:
        return alive
    if values_only:
        return peak
    for m, n in dims:  # the factors, layer by layer, at the largest useful rank; each basis then freed
        k = max(1, (m * n - 1) // (m + n))
        # W in float64 and W L (or U^T W), then A (m x k) and B (k x n) with B's transposed copy
        peak = max(peak, alive + 8 * max(2 * m * n + m * k, m * n + m * k + 2 * n * k))
        alive -= 8 * min(m, n) ** 2
    return peak


def marginal_neurons(s: Shapes, method: str, prime_ratio: float) -> list[int]:
    """Neurons left to factor in each FFN."""
    return [n - int(round(prime_ratio * n)) if method == "sola" else n for n, _ in s.ffns]


def make_plan(cfg: dict, options, device: torch.device, budget_device: int | None = None,
              budget_host: int | None = None, measure: bool = False, ranks: int = 1, ranks_per_node: int = 1,
              outputs: int = 1) -> Plan:
    """Plan for `options` (CompressOptions) on `device`; budgets in bytes (None: what there is).
    With `ranks` processes (torchrun), the plan is one rank's: its share of the windows, its part
    of the work, and the node's host budget divided among the `ranks_per_node` on it. With
    `outputs` > 1, the ratios of one statistics pass per block (pipeline/lockstep.py): each split's
    whitening and spectra made once for all of them (the device's peak is one output's), a
    compressed block, factors and comparisons per output."""
    s = Shapes.from_config(cfg)
    if ranks > 1:
        options = replace(options, nsamples=-(-options.nsamples // ranks))  # the largest share
    cpu = device.type != "cuda"
    if budget_device is None and getattr(options, "max_gpu_memory", None):
        budget_device = int(options.max_gpu_memory * GIB)
    if budget_host is None and getattr(options, "max_host_memory", None):
        budget_host = int(options.max_host_memory * GIB)
    if ranks > 1 and budget_host is not None:
        budget_host //= ranks_per_node  # a budget is the node's
    if not cpu and budget_device is None and torch.cuda.is_available():
        budget_device = torch.cuda.get_device_properties(device).total_memory
    streams = 2 if getattr(options, "two_streams", False) else 1  # --fit compensate: the original model's too
    states = streams * 4 * options.nsamples * options.seqlen * s.hidden
    problems: list[str] = []

    survey = getattr(options, "allocation", "block") == "global" and options.method == "sola"
    choosing = bool(options.prime_choices) and options.method == "sola"  # --prime-ratio auto
    compared = min(SPLIT_WINDOWS, options.nsamples) * options.seqlen  # tokens its candidates are compared on

    def terms(tokens: int) -> dict[str, int]:
        windows = min(max(1, tokens // options.seqlen), options.nsamples)  # a chunk holds whole windows
        return device_terms(s, options.method, options.smallest_prime_ratio, options.seqlen, windows * options.seqlen, cpu,
                            _fit(options), survey, survey and bool(getattr(options, "probe_windows", 0)), choosing)

    fixed = 0 if cpu else GPU_FIXED
    tokens = options.batch_tokens or DEFAULT_BATCH_TOKENS["cpu" if cpu else "cuda"]
    dev = terms(tokens)
    # a block's decompositions need the same memory whatever the chunk: when the device cannot hold
    # them they run on the host (the plain fit; the compensating fit keeps them on the device)
    host_decomp = (not cpu and budget_device is not None and _fit(options) == "plain"
                   and _decomposition(dev) + fixed > budget_device)
    if not cpu and budget_device is not None and options.batch_tokens is None:
        # largest power-of-two chunk (at least one window) that fits the device budget
        while tokens > options.seqlen and _peak(dev, host_decomp) + fixed > budget_device:
            tokens //= 2
            dev = terms(tokens)
    tokens = max(tokens, options.seqlen)
    dev = terms(tokens)
    if not cpu and budget_device is not None and _peak(dev, host_decomp) + fixed > budget_device:
        problems.append(f"peak GPU memory {_g(_peak(dev, host_decomp) + fixed)} exceeds the budget "
                        f"{_g(budget_device)} even with one window per chunk"
                        + (" and the decompositions on the host" if host_decomp else ""))

    weights = s.storage_bytes * s.block_params
    runtime = ("runtime (torch, transformers)", RUNTIME_HOST) if cpu else \
        ("runtime (torch, transformers, CUDA)", RUNTIME_HOST + CUDA_RUNTIME_HOST)
    host = {runtime[0]: runtime[1],
            "embeddings and head (float32)": 4 * s.outer_params,
            "block weights (current + next)": min(2, s.blocks) * weights,  # the next is read ahead
            "compressed block being written": weights * outputs}  # one per output of a lockstep run
    if cpu:
        host["compute (block, chunk, statistics)"] = _peak(dev)
    elif host_decomp:
        host["decompositions (float64, on the host)"] = _decomposition(dev)
    chunk = 4 * tokens * s.hidden
    if choosing:  # pipeline/prime_split.py: per output, the best candidate so far and the one fitted at
        # the current split (the previous block's commit may still hold another, counted above), and
        # the original block's and a candidate's outputs on the windows they are compared on
        host["prime split choice (two compressed blocks per output, outputs)"] = (
            2 * weights * outputs + 2 * 4 * compared * s.hidden)
    elif outputs > 1:  # every output's block is fitted layer by layer at once (one counted as for one output)
        host["compressed blocks of the other outputs"] = weights * (outputs - 1)
    probe = getattr(options, "probe_windows", 0) if survey else 0
    probe_tokens = probe * options.seqlen  # drawn beside the calibration windows; the first rank runs them all
    if survey:
        host["survey (a block's update, one chunk)"] = chunk  # pipeline/survey.py
    probe_host = 0
    if probe_tokens:  # pipeline/probe.py: one bfloat16 perturbation per layer of the model, clean states
        probe_host = (2 * len(s.layers) * s.blocks + 3 * 4) * probe_tokens * s.hidden
        host["survey probe (a perturbation per layer)"] = probe_host
    spill = False
    in_ram = sum(host.values()) + states
    if budget_host is not None and in_ram > budget_host:
        spill = True
    host["calibration cache" + (" (two chunks, rest on disk)" if spill else "")] = 2 * streams * chunk if spill else states
    if budget_host is not None and sum(host.values()) > budget_host:
        problems.append(f"peak host memory {_g(sum(host.values()))} exceeds the budget {_g(budget_host)} "
                        "even with the calibration cache on disk" + (
                            f"; the survey's probe holds {_g(probe_host)} of it (--probe-windows 0 or "
                            "--allocation block run without it)" if sum(host.values()) - probe_host <= budget_host else ""))
    if not cpu:
        dev = {k: (v + fixed if k.startswith("peak ") else v) for k, v in dev.items()}
        dev["CUDA context"] = CUDA_CONTEXT
        dev["cuBLAS workspaces"] = CUBLAS_WORKSPACES

    out_block = int(weights * (1 - options.ratio)) + s.storage_bytes * 4 * s.hidden
    disk = {"output shards": s.blocks * out_block + s.storage_bytes * s.outer_params,
            "states checkpoints (two per stream while running)": 2 * states * ranks}

    # forward (2 FLOP per weight per token, and the attention scores), covariances, and the
    # decompositions (Cholesky + Gram + eigh, ~ n^3 terms)
    n_tok = options.nsamples * options.seqlen
    h = s.hidden
    ms = marginal_neurons(s, options.method, options.smallest_prime_ratio)
    forward = 2 * s.block_params * n_tok + 2 * 2 * n_tok * options.seqlen * s.attn  # one pass over the windows
    covariances = 2 * n_tok * sum(w * w for w in s.group_widths)
    decompositions = sum(m ** 3 / 3 + 2 * h * m * m + 2 * h * m * h * 3 for m in ms) + 2 * h ** 3 + 10 * 4 * h ** 3
    # plain fit: statistics and propagation passes (with --propagate original the statistics pass
    # carries the states: one); compensating fit: about five (pipeline/paired.py)
    passes = 5 if _fit(options) == "compensate" else 1 if getattr(options, "propagate", "") == "original" else 2
    # several ranks: each runs its share of the windows, and the most loaded one its share of the
    # decompositions (layers are not split: pipeline/distributed.py Spread)
    decompositions *= largest_decomposition_share(s, ms, ranks)
    surveyed = decompositions  # the survey fits one split
    splits = len(options.prime_choices) if choosing else 1
    # every candidate split is fitted; several outputs (lockstep) share its whitening and spectra, each
    # making its own factors (FACTORS_SHARE of a split's time)
    decompositions *= splits * (1 + (outputs - 1) * FACTORS_SHARE)
    if choosing:  # each output's candidates, and the original block once, run on the compared windows
        decompositions += (splits * outputs + 1) * 2 * s.block_params * compared
    flops = passes * forward + covariances * (2 if _fit(options) == "compensate" else 1) + decompositions
    if survey:
        flops += forward + covariances + surveyed  # the survey pass (pipeline/survey.py)
    if probe_tokens:  # per block on average: half the model's layers' perturbations, its own, the clean run
        streams = len(s.layers) * (s.blocks + 1) / 2 + 1
        flops += streams * (2 * s.block_params * probe_tokens + 4 * probe_tokens * options.seqlen * s.attn)
    plan = Plan(device=device.type, batch_tokens=tokens, spill=spill, states_bytes=states, device_parts=dev,
                host_parts=host, disk_parts=disk, budget_device=budget_device, budget_host=budget_host,
                flops_per_block=float(flops), problems=problems, decompose_on_host=host_decomp, ranks=ranks)
    if measure:
        plan.seconds_per_block = flops / matmul_throughput(device)
    return plan


def largest_decomposition_share(s: Shapes, marginal: list[int], ranks: int) -> float:
    """The most loaded rank's fraction of a block's decomposition cost, under the engine's
    assignment of layers to ranks (by decomposition_cost, from the shapes alone)."""
    if ranks <= 1:
        return 1.0
    from sola_stream.method.block_compress import decomposition_cost
    from sola_stream.pipeline.distributed import Ranks, Spread

    costs = {str(k): decomposition_cost(m, n, n) for k, (m, n) in enumerate(s.factored_dims(marginal))}
    load = Spread(Ranks(0, ranks)).assign(costs)
    return max(load) / sum(load)


def _decomposition(dev: dict[str, int]) -> int:
    """The device peak of the steps that move to the host with the decompositions."""
    return max(v for k, v in dev.items() if k.startswith("peak decomposition"))


def _peak(dev: dict[str, int], without_decomposition: bool = False) -> int:
    return max(v for k, v in dev.items()
               if k.startswith("peak ") and not (without_decomposition and k.startswith("peak decomposition")))


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
