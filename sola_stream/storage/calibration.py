"""Calibration text sources and token windows.

Sources: a text file, a folder of text files (sorted, concatenated), a dataset saved with
`datasets` (`save_to_disk` folder), or `hf:NAME[:CONFIG[:SPLIT]]` for a `datasets` hub dataset
(online only). Default: WikiText-2 valid (shipped in the package; never the test split).
Windows are `nsamples` random slices of `seqlen` tokens from the tokenized text, drawn with a
seeded generator: the same text, tokenizer and seed give the same windows.
"""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import torch

from sola_stream.errors import InputError

DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 1024
DEFAULT_SEED = 0
# Windows may overlap, but their tokens may cover the text at most this many times over.
MAX_OVERSAMPLING = 8
TOKENIZE_PIECE_CHARS = 1 << 16  # calibration text is tokenized in pieces of ~64k characters
TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".md", ".text")


def default_calibration_path() -> Path:
    return Path(str(resources.files("sola_stream") / "data" / "wiki.valid.tokens"))


def default_eval_path() -> Path:
    """WikiText-2 test (raw), shipped for `sola-stream eval`: evaluation only, never calibration."""
    return Path(str(resources.files("sola_stream") / "data" / "wiki.test.raw"))


def read_calibration_text(source: str | None) -> tuple[str, str]:
    """(text, description) for a calibration source; see the module docstring."""
    if source is None:
        path = default_calibration_path()
        return path.read_text(encoding="utf-8"), f"default ({path.name}, WikiText-2 valid)"
    if source.startswith("hf:"):
        return _hub_dataset_text(source[3:]), source
    path = Path(source)
    if path.is_file():
        return read_text(path), str(path)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            from datasets import load_from_disk

            return _dataset_text(load_from_disk(str(path)), str(path)), str(path)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise InputError(f"{path}: no text files ({', '.join(TEXT_SUFFIXES)}) in calibration folder")
        return "\n\n".join(read_text(p) for p in files), f"{path} ({len(files)} files)"
    raise InputError(f"{source}: calibration source not found (file, folder, saved dataset or hf:NAME)")


def read_text(path: Path, what: str = "calibration text") -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: {what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None



def _hub_dataset_text(spec: str) -> str:
    from datasets import load_dataset

    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        ds = load_dataset(name, config, split=split or "train")
    except Exception as exc:
        raise InputError(f"hf:{spec}: cannot load dataset ({type(exc).__name__}: {exc})") from None
    return _dataset_text(ds, f"hf:{spec}")


def _dataset_text(ds, where: str) -> str:
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # DatasetDict: take its first split
        ds = ds[sorted(ds.keys())[0]]
    if "text" not in ds.column_names:
        raise InputError(f"{where}: dataset has no 'text' column (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds["text"] if t)


def tokenize(tokenizer, text: str, add_special_tokens: bool, piece_chars: int | None = None) -> torch.Tensor:
    """The text as one 1-D tensor of token ids (no length warnings, no truncation).

    With `piece_chars`, the text is tokenized in pieces of about that many characters, cut where
    a line starts with a word, optionally after one space (where byte-level BPE pre-tokenizers
    split anyway, so the ids equal a whole-text tokenization for them):
    a large calibration corpus then never holds a whole-text encoding (~200 bytes per token) in
    memory. Evaluation tokenizes the whole text at once, as the perplexity protocol does."""
    parts = []
    for piece in _pieces(text, piece_chars):
        ids = tokenizer(piece, add_special_tokens=add_special_tokens and not parts, verbose=False,
                        return_attention_mask=False)["input_ids"]
        parts.append(torch.tensor(ids, dtype=torch.long))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def _pieces(text: str, size: int | None):
    start = 0
    while size and len(text) - start > size:
        cut = start + size
        while cut < len(text) and not _line_start(text, cut):
            cut += 1
        yield text[start:cut]
        start = cut
    yield text[start:]


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, where: str,
                        extra: int = 0) -> torch.Tensor:
    """`nsamples` x `seqlen` token windows at seeded random offsets into `ids`, then `extra` more
    from the same draw (the survey's probe windows: the first `nsamples` do not depend on it)."""
    if nsamples < 1 or seqlen < 2:
        raise InputError(f"calibration: need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    if ids.numel() < seqlen + 1:
        raise InputError(f"{where}: calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if (nsamples + extra) * seqlen > MAX_OVERSAMPLING * ids.numel():
        probe = f" and {extra} probe window(s)" if extra else ""
        raise InputError(f"{where}: calibration text has {ids.numel()} tokens, too short for {nsamples} windows "
                         f"of {seqlen}{probe} (needs at least {(nsamples + extra) * seqlen // MAX_OVERSAMPLING})")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples + extra,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def _line_start(text: str, i: int) -> bool:
    if text[i - 1] != "\n":
        return False
    if text[i] == " ":
        i += 1
    return i < len(text) and not text[i].isspace()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
