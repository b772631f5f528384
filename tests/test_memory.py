"""Bounded host memory: a small --max-host-memory spills the calibration cache to memory-mapped
files; the output is byte-identical to the in-RAM run and the peak RSS drops by most of the cache.
Also the `plan` dry run: its refusals and its agreement with the engine's choices."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import re

import pytest
import torch

from conftest import ROOT, make_tiny, output_hashes
from sola_stream.pipeline.engine import CompressOptions
from sola_stream.pipeline.options import prime_options
from sola_stream.pipeline.plan import GIB, Shapes, largest_decomposition_share, make_plan, marginal_neurons

# a wide tiny model, so the calibration cache (windows x seqlen x hidden float32) dominates memory
WIDE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4)
CALIB = ["--nsamples", "192", "--seqlen", "512", "--batch-tokens", "1024"]  # cache: 192 MiB
CACHE_BYTES = 4 * 192 * 512 * 512


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tiny_tokenizer):
    return make_tiny("llama", tmp_path_factory.mktemp("wide") / "wide", tiny_tokenizer, **WIDE)


def run(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """A CLI run in a child process: its result and, for `compress`, the peak RSS in bytes that it
    measured itself (psutil sampler; the child's rusage would include pytest's RSS at fork)."""
    r = subprocess.run([sys.executable, "-m", "sola_stream", *args], capture_output=True, text=True)
    m = re.search(r"host RSS ([0-9.]+) GiB", r.stdout)
    return r, int(float(m.group(1)) * GIB) if m else 0


hashes = output_hashes


@pytest.fixture(scope="module")
def spill_budget(wide) -> float:
    """A host budget (GiB) between the plan's in-RAM and spilled needs: forces the spill."""
    cfg = json.loads((wide / "config.json").read_text())
    opts = CompressOptions(nsamples=192, seqlen=512, batch_tokens=1024)
    in_ram = make_plan(cfg, opts, torch.device("cpu"), budget_host=64 * GIB)
    assert not in_ram.spill and in_ram.states_bytes == CACHE_BYTES
    spilled_need = in_ram.peak_host - CACHE_BYTES + 2 * 4 * 1024 * 512
    budget = (in_ram.peak_host + spilled_need) / 2 / GIB
    assert make_plan(cfg, opts, torch.device("cpu"), budget_host=int(budget * GIB)).spill
    return budget


@pytest.fixture(scope="module")
def in_ram(wide, tmp_path_factory):
    out = tmp_path_factory.mktemp("ram") / "out"
    r, rss = run("compress", str(wide), str(out), *CALIB, "--max-host-memory", "64", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "cache in RAM" in r.stdout
    return hashes(out), rss


def test_small_host_budget_spills_to_disk_with_identical_output(wide, spill_budget, in_ram, tmp_path):
    ref, rss_ram = in_ram
    r, rss_disk = run("compress", str(wide), str(tmp_path / "disk"), *CALIB, "--max-host-memory",
                      f"{spill_budget:.4f}", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "cache spilled to disk" in r.stdout
    assert hashes(tmp_path / "disk") == ref
    print(f"peak RSS in RAM {rss_ram / 2**20:.0f} MiB, spilled {rss_disk / 2**20:.0f} MiB, "
          f"cache {CACHE_BYTES / 2**20:.0f} MiB, budget {spill_budget * 1024:.0f} MiB")
    assert rss_disk <= spill_budget * GIB  # the plan's bound holds
    assert rss_disk < rss_ram - CACHE_BYTES // 2  # most of the cache left RAM


def test_run_killed_in_ram_resumes_spilled_with_identical_output(wide, spill_budget, in_ram, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "SOLA_STREAM_CRASH_AT": "block_committed:1"}
    killed = subprocess.run([sys.executable, "-m", "sola_stream", "compress", str(wide), str(out), *CALIB,
                             "--max-host-memory", "64", "--no-progress"], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    r, _ = run("compress", str(wide), str(out), *CALIB, "--max-host-memory", f"{spill_budget:.4f}", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "resumed at block 1" in r.stdout and "cache spilled to disk" in r.stdout
    assert hashes(out) == in_ram[0]


def test_plan_refuses_impossible_budgets(wide):
    r, _ = run("plan", str(wide), *CALIB, "--max-host-memory", "0.1", "--no-measure")
    assert r.returncode == 2 and "REFUSED" in r.stdout and "host memory" in r.stdout
    r, _ = run("plan", str(wide), *CALIB, "--device", "cuda", "--max-gpu-memory", "0.01", "--no-measure")
    assert r.returncode == 2 and "GPU memory" in r.stdout
    r, _ = run("compress", str(wide), "/nonexistent/never-written", *CALIB, "--max-host-memory", "0.1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "host memory" in r.stderr
    assert not os.path.exists("/nonexistent/never-written")


def test_plan_json_and_gpu_chunking(wide):
    r, _ = run("plan", str(wide), "--device", "cuda", "--max-gpu-memory", "2", "--json", "--no-measure")
    assert r.returncode == 0, r.stdout + r.stderr
    p = json.loads(r.stdout.strip().splitlines()[-1])
    assert p["peak_device_bytes"] <= 2 * GIB and p["batch_tokens"] >= 1024
    # a 70B-shaped block under 24 GiB: the chunk shrinks to fit, the plan stays under the cap
    cfg = json.loads((ROOT / "tools" / "configs" / "llama-2-70b.json").read_text())
    plan = make_plan(cfg, CompressOptions(seqlen=2048), torch.device("cuda"), budget_device=24 * GIB,
                     budget_host=32 * GIB)
    assert not plan.problems, plan.describe()
    assert plan.peak_device <= 22 * GIB and plan.batch_tokens >= 2048



def test_model_wide_allocation_keeps_the_spilled_cache_out_of_ram(wide, spill_budget, in_ram, tmp_path):
    """The survey pass of --allocation global walks the spilled cache once per block: its pages are
    dropped in every pass, so the run stays within the plan's bound (it once held the whole cache)."""
    r, rss = run("compress", str(wide), str(tmp_path / "global"), *CALIB, "--allocation", "global",
                 "--max-host-memory", f"{spill_budget:.4f}", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "cache spilled to disk" in r.stdout
    assert rss <= spill_budget * GIB
    assert rss < in_ram[1] - CACHE_BYTES // 2


def test_a_host_refusal_names_the_survey_probe_when_it_is_the_large_term():
    """LLaMA-2-70B with the CLI's defaults: the probe's perturbations (one per layer of the model)
    are most of the host peak; a budget that holds everything else is refused with the flags that
    drop them, and without the probe the same budget is accepted."""
    cfg = json.loads((ROOT / "tools" / "configs" / "llama-2-70b.json").read_text())
    kw = dict(nsamples=128, seqlen=2048, **prime_options(None))
    plan = make_plan(cfg, CompressOptions(**kw), torch.device("cuda"), budget_device=24 * GIB, budget_host=24 * GIB)
    assert plan.problems and "the survey's probe holds 17.69 GiB" in plan.problems[0], plan.describe()
    assert "--probe-windows 0" in plan.problems[0]
    plan = make_plan(cfg, CompressOptions(probe_windows=0, **kw), torch.device("cuda"), budget_device=24 * GIB,
                     budget_host=24 * GIB)
    assert not plan.problems, plan.describe()
    # a budget too small even without the probe does not point at it
    plan = make_plan(cfg, CompressOptions(**kw), torch.device("cuda"), budget_device=24 * GIB, budget_host=4 * GIB)
    assert plan.problems and "probe" not in plan.problems[0]


def test_plan_for_ranks_is_one_ranks_share():
    """`plan --ranks N`: one rank's windows (its states cache), a node's host budget shared by its
    ranks, every rank's states on disk, less compute per rank; bad rank counts are refused."""
    cfg = json.loads((ROOT / "tools" / "configs" / "llama-2-70b.json").read_text())
    opts = CompressOptions(nsamples=128, seqlen=2048)
    one = make_plan(cfg, opts, torch.device("cuda"), budget_device=80 * GIB, budget_host=512 * GIB)
    four = make_plan(cfg, opts, torch.device("cuda"), budget_device=80 * GIB, budget_host=512 * GIB, ranks=4,
                     ranks_per_node=4)
    assert four.states_bytes * 4 == one.states_bytes and four.budget_host == 128 * GIB
    assert four.disk_parts["states checkpoints (two per stream while running)"] == \
        one.disk_parts["states checkpoints (two per stream while running)"]
    # the windows' work divides by 4; the decompositions by less (the largest layer is one rank's)
    share = largest_decomposition_share(Shapes.from_config(cfg), marginal_neurons(Shapes.from_config(cfg), "sola", 0.25), 4)
    assert 0.25 < share < 0.5
    assert one.flops_per_block / 4 < four.flops_per_block < one.flops_per_block / 2
    assert four.peak_device <= one.peak_device and four.as_dict()["ranks"] == 4
    assert "4 ranks: memory and time are one rank's" in four.describe()
    config = str(ROOT / "tools" / "configs" / "llama-2-70b.json")
    r, _ = run("plan", config, "--ranks", "2", "--ranks-per-node", "3", "--no-measure")
    assert r.returncode == 2 and "--ranks 2 --ranks-per-node 3" in r.stderr
    r, _ = run("plan", config, "--ranks", "4", "--nsamples", "2", "--no-measure")
    assert r.returncode == 2 and "fewer calibration windows than the 4 ranks" in r.stderr


def test_plan_for_ratios_in_lockstep_shares_the_device_and_holds_a_block_per_output():
    """Several ratios from one statistics pass (pipeline/lockstep.py) share each split's layout:
    the device's peak is one output's; on the host each output holds its compressed blocks (its
    best candidate and the current one with --prime-ratio auto, besides the one being written);
    the time adds each output's factors and comparisons, not its whitening and spectra."""
    cfg = json.loads((ROOT / "tools" / "configs" / "llama-2-70b.json").read_text())
    kw = dict(budget_device=80 * GIB, budget_host=512 * GIB)
    for prime in ({"prime_ratio": 0.25}, prime_options("auto")):
        opts = CompressOptions(nsamples=128, seqlen=2048, propagate="original", **prime)
        one = make_plan(cfg, opts, torch.device("cuda"), **kw)
        three = make_plan(cfg, opts, torch.device("cuda"), outputs=3, **kw)
        assert three.device_parts == one.device_parts and three.batch_tokens == one.batch_tokens
        written = "compressed block being written"
        assert three.host_parts[written] == 3 * one.host_parts[written]
        held = sum(three.host_parts.values()) - sum(one.host_parts.values())
        block = one.host_parts[written]
        # two more outputs: each a block being written, and one (fixed split) or two (auto) being fitted
        assert held == 2 * block + 2 * block * (2 if prime.get("prime_choices") else 1), prime
        assert one.flops_per_block < three.flops_per_block < 3 * one.flops_per_block
        assert three.states_bytes == one.states_bytes
        # with --propagate compressed a block takes a pass more (the propagation); original: the statistics pass carries it
        compressed = make_plan(cfg, CompressOptions(nsamples=128, seqlen=2048, **prime), torch.device("cuda"), **kw)
        assert compressed.flops_per_block > one.flops_per_block
