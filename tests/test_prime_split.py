"""--prime-ratio auto (pipeline/prime_split.py): each block keeps the candidate split whose output
is closest to the original block's, within the same budget."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import sola_stream
from sola_stream.cli import main
from sola_stream.method.block_compress import BudgetError
from sola_stream.pipeline.engine import _first_windows
from sola_stream.pipeline.options import AUTO_CHOICES
from sola_stream.pipeline.prime_split import WINDOWS, choose_split
from sola_stream.pipeline.distributed import Ranks
from sola_stream.storage.output import block_shard_name

from conftest import CALIB_TEXT, make_tiny


class Scale(torch.nn.Module):
    """A stand-in block: multiplies its input."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_each_output_keeps_the_split_with_the_closest_output_and_skips_unaffordable_ones():
    """Two outputs (two ratios of one block): each keeps its own best split among those its
    budget pays for; the original block runs once for both."""
    states = torch.randn(WINDOWS, 5, 8)
    # by split, each output's stand-in block factor (None: more prime neurons than its budget pays for)
    factors = {0.1: (1.3, 1.01), 0.3: (0.95, 1.2), 0.5: (1.02, None), 0.7: (None, None)}
    seen, originals = [], []

    def fit(split):
        seen.append(split)
        return [BudgetError("budget") if f is None else SimpleNamespace(tensors={"f": f}, specs={"s": split})
                for f in factors[split]]

    def build(tensors, specs):
        if specs is None:
            originals.append(1)
        return Scale(1.0 if specs is None else tensors["f"])

    chosen = choose_split((0.1, 0.3, 0.5, 0.7), fit, build, states, {}, "cpu", 2)
    assert [(split, result.specs) for result, split, _ in chosen] == [(0.5, {"s": 0.5}), (0.1, {"s": 0.1})]
    assert seen == [0.1, 0.3, 0.5, 0.7] and originals == [1]
    x = states.double()
    for j, expected in enumerate(({0.1: 1.3, 0.3: 0.95, 0.5: 1.02}, {0.1: 1.01, 0.3: 1.2})):
        errors = chosen[j][2]
        assert set(errors) == set(expected)
        for s, f in expected.items():
            assert errors[s] == pytest.approx(float(((f - 1) * x).square().sum()), rel=1e-5)
    with pytest.raises(ValueError, match=r"no prime split .* \(ratio 0.4\)$"):  # the second output fits none of these
        choose_split((0.5, 0.7), fit, build, states, {}, "cpu", 2, labels=["ratio 0.2", "ratio 0.4"])

    def broken(split):  # any other failure of a fit (a Cholesky that fails) is not "does not fit"
        raise ValueError("Cholesky failed")

    with pytest.raises(ValueError, match="Cholesky failed"):
        choose_split((0.1, 0.3), broken, build, states, {}, "cpu", 2)


def test_the_windows_compared_are_the_runs_first_whatever_the_ranks():
    """Each process measures its own share of the run's first WINDOWS windows (summed: the choice
    of one process)."""
    assert _first_windows(Ranks(), 10, WINDOWS) == WINDOWS
    shares = [_first_windows(Ranks(rank=r, world=3), 7, WINDOWS) for r in range(3)]  # windows 0-1, 2-3, 4-6
    assert shares == [2, 2, 0] and sum(shares) == WINDOWS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer):
    return make_tiny("llama", tmp_path_factory.mktemp("split") / "tiny", tiny_tokenizer, num_hidden_layers=3)


def test_auto_keeps_per_block_one_of_the_fixed_splits_outputs(tiny, tmp_path):
    """Per-block allocation: block 0's inputs are the embeddings in every run, so its shard under
    auto is byte for byte the shard of the fixed split it chose; the ratio holds; the output
    records the choices and loads for evaluation."""
    common = dict(ratio=0.3, allocation="block", calib=str(CALIB_TEXT), nsamples=6, seqlen=32, progress=False)
    sola_stream.compress(tiny, tmp_path / "auto", prime_choices=(0.1, 0.5), **common)
    for split in (0.1, 0.5):
        sola_stream.compress(tiny, tmp_path / f"p{split}", prime_ratio=split, **common)
    sola = json.loads((tmp_path / "auto" / "config.json").read_text())["sola"]
    assert sola["prime_choices"] == [0.1, 0.5] and abs(sola["achieved_ratio_blocks"] - 0.3) <= 0.005
    chosen = [b["prime_split"] for b in sola["blocks"]]
    assert len(chosen) == 3 and set(chosen) <= {0.1, 0.5}
    shard = block_shard_name(0)
    auto0 = load_file(str(tmp_path / "auto" / shard))
    fixed0 = load_file(str(tmp_path / f"p{chosen[0]}" / shard))
    assert auto0.keys() == fixed0.keys() and all(torch.equal(auto0[k], fixed0[k]) for k in auto0)
    other0 = load_file(str(tmp_path / f"p{0.6 - chosen[0]:.1f}" / shard))
    assert any(k not in other0 or not torch.equal(auto0[k], other0[k]) for k in auto0)
    r = sola_stream.evaluate(tmp_path / "auto", CALIB_TEXT, seqlen=32, max_windows=2, progress=False)
    assert r.ppl > 1 and r.ppl == r.ppl


def test_candidates_are_compared_on_the_blocks_inputs_when_the_original_states_are_propagated(
        tiny, tmp_path, monkeypatch):
    """With --propagate original the statistics pass writes the original block's outputs over its
    inputs (in RAM): the windows the candidates run on are copied first, so block 0 compares them
    on the embeddings, as with --propagate compressed (a spilled cache reads them from the
    committed file, unchanged)."""
    import sola_stream.pipeline.engine as engine

    seen = {}

    def spy(choices, fit, build, states, *args, **kw):
        seen.setdefault(key, states.clone())
        return choose_split(choices, fit, build, states, *args, **kw)

    monkeypatch.setattr(engine, "choose_split", spy)
    common = dict(ratio=0.3, allocation="block", prime_choices=(0.1, 0.5), calib=str(CALIB_TEXT), nsamples=6,
                  seqlen=32, progress=False)
    for key in ("compressed", "original"):
        sola_stream.compress(tiny, tmp_path / key, propagate=key, **common)
    assert seen["original"].shape == (WINDOWS, 32, seen["compressed"].shape[-1])
    assert torch.equal(seen["original"], seen["compressed"])


def test_auto_is_the_default_on_the_command_line_and_its_refusals(tiny, tmp_path, capsys):
    """No --prime-ratio: auto among AUTO_CHOICES (with --fit compensate: 0.25, one split); a
    number: that split everywhere; auto with the compensating fit, or a word: refused."""
    out = tmp_path / "cli"
    small = ["--ratio", "0.3", "--nsamples", "4", "--seqlen", "32", "--calib", str(CALIB_TEXT), "--no-progress"]
    assert main(["compress", str(tiny), str(out), *small]) == 0
    assert f"prime ratio auto, per block among {', '.join(map(str, AUTO_CHOICES))}" in capsys.readouterr().out
    assert "whose output is closest" in (out / "README.md").read_text()
    sola = json.loads((out / "config.json").read_text())["sola"]
    assert sola["prime_choices"] == list(AUTO_CHOICES) and all(b["prime_split"] in AUTO_CHOICES for b in sola["blocks"])
    assert main(["compress", str(tiny), str(tmp_path / "fixed"), *small, "--prime-ratio", "0.3"]) == 0
    sola = json.loads((tmp_path / "fixed" / "config.json").read_text())["sola"]
    assert sola["prime_ratio"] == 0.3 and "prime_choices" not in sola and "prime_split" not in sola["blocks"][0]
    assert main(["compress", str(tiny), str(tmp_path / "comp"), *small, "--fit", "compensate"]) == 0
    sola = json.loads((tmp_path / "comp" / "config.json").read_text())["sola"]
    assert sola["prime_ratio"] == 0.25 and "prime_choices" not in sola
    with pytest.raises(SystemExit) as exc:
        main(["compress", str(tiny), str(tmp_path / "x"), "--prime-ratio", "most"])
    assert exc.value.code == 2 and "not a number or auto" in capsys.readouterr().err
    assert main(["compress", str(tiny), str(tmp_path / "y"), "--prime-ratio", "auto", "--fit", "compensate",
                 "--no-progress"]) == 2
    assert "--prime-ratio auto needs --fit plain" in capsys.readouterr().err
