"""Shared fixtures: tiny random models (no network) with a real trained-on-the-fly tokenizer,
and the real SmolLM2-135M checkpoint when available (built by tools/make_smollm2.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT_TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(ROOT_TOOLS))
from make_synthetic_checkpoint import train_tokenizer  # noqa: E402  (shared with the tools)
from tiny_models import ALL_FAMILIES, TINY, make_tiny  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SOLA_SHARED", ROOT.parent / "shared"))
WIKI_TEST = ROOT / "sola_stream" / "data" / "wiki.test.raw"  # the package's copy of WikiText-2 test
ZEROSHOT = SHARED / "data" / "zeroshot"  # not shipped (evaluation data): tests that read it skip without it
# outside CI (a fresh clone with no ../shared); in CI they run, and fail if it is missing
needs_zeroshot = pytest.mark.skipif(not ZEROSHOT.is_dir() and not os.environ.get("CI"),
                                    reason=f"zero-shot data not found at {ZEROSHOT} (set SOLA_SHARED to the "
                                           "folder holding data/zeroshot)")
CALIB_TEXT = ROOT / "sola_stream" / "data" / "wiki.valid.tokens"
SMOLLM2 = Path(os.environ.get("SOLA_SMOLLM2", ROOT / "models" / "smollm2-135m"))

def output_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file of an output directory, keyed by name, except the run log (its
    timestamps and timings differ between runs that write byte-identical models)."""
    import hashlib

    from sola_stream.storage.runlog import LOG_NAME

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.is_file() and p.name != LOG_NAME}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(TINY["vocab_size"])


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer):
    base = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny(f, base / f, tiny_tokenizer) for f in ALL_FAMILIES}


@pytest.fixture(scope="session")
def smollm2():
    if not (SMOLLM2 / "config.json").is_file():
        if os.environ.get("CI"):  # CI builds it in .ci/run: missing there is a failure, not a skip
            pytest.fail(f"SmolLM2 checkpoint not found at {SMOLLM2}")
        pytest.skip(f"SmolLM2 checkpoint not found at {SMOLLM2} (build it with tools/make_smollm2.py)")
    return SMOLLM2
