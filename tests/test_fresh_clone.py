"""The README's main command works from a copy of the repository anywhere on a machine, with no
../shared beside it (the package ships its default calibration and evaluation texts); and the
CPU thread count follows what the process was given."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, make_tiny


def tracked_copy(dest: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked and not-ignored new files)."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for name in filter(None, names):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory, tiny_tokenizer):
    """A copy of the repository in a folder with no `shared/` in any parent, and a tiny model."""
    base = tmp_path_factory.mktemp("elsewhere")
    assert not any((p / "shared").exists() for p in (base, *base.parents))
    repo = tracked_copy(base / "sola_stream_clone")
    model = make_tiny("llama", base / "models" / "tiny", tiny_tokenizer)
    return repo, model


def run_copy(repo: Path, *args: str, env: dict | None = None, prefix: tuple[str, ...] = ()):
    """`python -m sola_stream ARGS` importing the copy's package, from the copy's parent folder."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(repo)}
    env.pop("SOLA_STREAM_CRASH_AT", None)
    return subprocess.run([*prefix, sys.executable, "-m", "sola_stream", *args], cwd=repo.parent, env=env,
                          capture_output=True, text=True, timeout=600)


def test_main_command_steps_work_outside_the_repository_layout(elsewhere):
    repo, model = elsewhere
    where = subprocess.run([sys.executable, "-c", "import sola_stream; print(sola_stream.__file__)"],
                           cwd=repo.parent, env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True,
                           text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(repo), where  # the copy's package, with its own data files
    # the README's main command, on a tiny model: compress with defaults, then eval without --text
    r = run_copy(repo, "compress", str(model), "runs/tiny-sola-20", "--ratio", "0.2", "--nsamples", "8",
                 "--seqlen", "64", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "default (wiki.valid.tokens" in (repo.parent / "runs/tiny-sola-20/config.json").read_text()
    r = run_copy(repo, "eval", "runs/tiny-sola-20", "--max-windows", "2", "--seqlen", "64", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert re.search(r"perplexity [0-9.]+ over 2 windows x 64 tokens", r.stdout)
    assert "wiki.test.raw" in r.stdout


@pytest.mark.parametrize("how,expect", [
    ({"env": {"SLURM_CPUS_PER_TASK": "1"}}, "threads         1 (SLURM_CPUS_PER_TASK)"),
    ({"prefix": ("taskset", "-c", "0")}, "threads         1 (CPU affinity)"),
    ({"args": ("--threads", "2")}, "threads         2 (--threads)"),
])
def test_threads_follow_the_cpus_this_process_was_given(elsewhere, tmp_path, how, expect):
    if "prefix" in how and not shutil.which("taskset"):
        pytest.skip("taskset not installed")
    if "prefix" in how and (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: affinity cannot lower the count")
    repo, model = elsewhere
    r = run_copy(repo, "compress", str(model), str(tmp_path / "out"), "--nsamples", "4", "--seqlen", "32",
                 "--no-progress", *how.get("args", ()), env=how.get("env"), prefix=how.get("prefix", ()))
    assert r.returncode == 0, r.stderr
    assert expect in r.stdout, r.stdout
