"""The model outside its decoder blocks, plus empty (meta) blocks to fill one at a time.

A skeleton is the family's own transformers CausalLM built on the meta device. Only the parts
outside the blocks (embeddings, final norm, head, rotary tables) get real weights. Its blocks are
swapped for recorders, so one forward over token ids yields the first block's input and the exact
keyword arguments (masks, position embeddings) that the family passes to every block.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from sola_stream.families import Family, family_for, family_for_dict, meta_model, runtime_names, transformers_config
from sola_stream.pipeline.block_forward import StopForward
from sola_stream.storage.checkpoint import CheckpointReader
from sola_stream.storage.input_checks import check_config, check_finite_tensors, check_layer_count, check_tensors

# tensors some older checkpoints carry that the model recomputes (ignored when read)
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class _Recorder(nn.Module):
    """Stands in for block `index`: records what the model passes it, returns its input."""

    def __init__(self, index: int, last: bool, sink: dict):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder blocks are expected to take keyword arguments after hidden_states")
        self.sink.setdefault("hidden", hidden_states)
        self.sink.setdefault("kwargs", {})[self.index] = kwargs
        if self.last:
            raise StopForward
        return hidden_states


def load_config(reader: CheckpointReader):
    """The transformers config, after the checks that need no model: family, field types and
    bounds, and the layer count against the checkpoint's tensor names. An output's config
    (model_type "sola_<family>") is read as its family's config."""
    where = str(reader.path / "config.json")
    # refuse unknown families before transformers does (its message is long and suggests upgrading)
    family = family_for_dict(reader.config_dict, where)
    text = family.text(reader.config_dict, where)
    check_config(text, where)
    reader.rename(runtime_names(reader.config_dict, reader.names(), where))
    check_layer_count(reader.weight_map, family.layers_path, text["num_hidden_layers"], where)
    return transformers_config(reader.config_dict, where)


def load_outer(model: nn.Module, reader: CheckpointReader, family: Family, config, dtype: torch.dtype) -> None:
    """Embeddings, final norm and head into `model` (meta), names and shapes checked against it
    first, values checked finite; a tied head shares the embedding's weight."""
    prefix = family.layers_path + "."
    names = [n for n in reader.names() if not n.startswith(prefix) and not n.endswith(IGNORED_SUFFIXES)]
    head = family.head_path + ".weight"
    tied = getattr(config, "tie_word_embeddings", False) and head not in names
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()
                if not n.startswith(prefix) and not (tied and n == head)}
    check_tensors(expected, {n: reader.shape(n) for n in names}, "", str(reader.path))
    state = {}
    for name in names:
        t = reader.get(name)
        check_finite_tensors({name: t}, reader, "")
        state[name] = t.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.get_submodule(family.head_path).weight = model.get_input_embeddings().weight


class Skeleton:
    def __init__(self, reader: CheckpointReader, dtype: torch.dtype = torch.float32):
        self.reader = reader
        self.config = load_config(reader)
        self.family: Family = family_for(self.config, str(reader.path / "config.json"))
        self.dtype = dtype
        model = meta_model(self.config, str(reader.path / "config.json"), dtype)
        layers = model.get_submodule(self.family.layers_path)
        self.num_blocks = len(layers)
        self._meta_blocks = [self.family.prepare(b) for b in layers]
        for block in self._meta_blocks:  # the family's description fits the blocks transformers builds
            self.family.check(block, str(reader.path / "config.json"))
        if "sola" not in reader.config_dict:  # dense blocks: names and shapes known before any work
            for i in range(self.num_blocks):
                self.check_block(i)
        self._sink: dict = {}
        recorders = [_Recorder(i, i == self.num_blocks - 1, self._sink) for i in range(self.num_blocks)]
        model.set_submodule(self.family.layers_path, nn.ModuleList(recorders))
        load_outer(model, reader, self.family, self.config, dtype)
        self.model = model.eval()

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    def block_names(self, index: int) -> set[str]:
        """Parameter and persistent-buffer names of one block, relative to its prefix."""
        return set(self._meta_blocks[index].state_dict().keys())

    def check_block(self, index: int) -> None:
        """A dense block's tensor names and shapes in the checkpoint equal the model's."""
        prefix = self.family.block_prefix(index)
        expected = {n: tuple(t.shape) for n, t in self._meta_blocks[index].state_dict().items()}
        actual = {n[len(prefix):]: self.reader.shape(n) for n in self.reader.names(prefix)
                  if not n.endswith(IGNORED_SUFFIXES)}
        check_tensors(expected, actual, prefix, str(self.reader.path))

    def meta_block(self, index: int) -> nn.Module:
        """A fresh empty copy of block `index` (parameters on the meta device)."""
        return copy.deepcopy(self._meta_blocks[index])

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, dict]]:
        """First block's input for `input_ids` (batch x seq) and each block's keyword arguments."""
        self._sink.clear()
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except StopForward:
            pass
        return self._sink["hidden"], self._sink["kwargs"]

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = self.model.get_submodule(self.family.norm_path)
        head = self.model.get_submodule(self.family.head_path)
        return _capped(head(norm(hidden)), self._cap())

    def _cap(self) -> float | None:
        text = self.config.get_text_config()
        return getattr(text, self.family.logit_softcap, None) if self.family.logit_softcap else None

    def head_on(self, device) -> "Head":
        """The final norm and head (float32) on `device`."""
        norm = copy.deepcopy(self.model.get_submodule(self.family.norm_path)).to(device, torch.float32)
        head = self.model.get_submodule(self.family.head_path)
        bias = None if head.bias is None else head.bias.to(device, torch.float32)
        return Head(norm, head.weight.to(device, torch.float32), bias, self._cap())


class Head:
    """Final norm, head and the family's logit soft cap (Gemma 2/3 apply it after the head)."""

    def __init__(self, norm: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, cap: float | None):
        self.norm, self.weight, self.bias, self.cap = norm, weight, bias, cap

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return _capped(torch.nn.functional.linear(self.norm(hidden.float()), self.weight, self.bias), self.cap)

    @torch.no_grad()
    def logits_at(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits of tokens `ids` only (positions x K): K rows of the head per position."""
        u = self.norm(hidden.float())
        z = torch.einsum("...h,...kh->...k", u, self.weight[ids])
        return _capped(z if self.bias is None else z + self.bias[ids], self.cap)


def _capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The family's logit soft cap (Gemma 2/3: its CausalLM applies it after the head)."""
    return logits if not cap else torch.tanh(logits / cap) * cap
