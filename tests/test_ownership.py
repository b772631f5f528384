"""--overwrite and ownership: only what sola-stream wrote (listed in OUTPUT/.sola-stream.json, with
unchanged checksums) is ever deleted; directories without the marker are never written to."""
from __future__ import annotations

import json
import shutil

import pytest

from sola_stream.storage.ownership import MARKER
from sola_stream.pipeline.resume import RUN_DIR

from test_bad_input import compress, error_line, model, small_calib, snapshot  # noqa: F401  (fixtures)


def ok(result):
    code, out, err = result
    assert code == 0, err
    return out


def refused(result, *names) -> str:
    code, _, err = result
    line = error_line(err)
    assert code == 2, line
    for name in names:
        assert name in line, (name, line)
    return line


@pytest.fixture
def finished(model, tmp_path, compress):
    out = tmp_path / "out"
    ok(compress(model, out))
    marker = json.loads((out / MARKER).read_text())
    assert marker["complete"] and "config.json" in marker["files"]
    return out


def test_overwrite_keeps_user_files_beside_a_finished_output(model, finished, compress):
    (finished / "notes.txt").write_text("my notes\n")
    (finished / "results").mkdir()
    (finished / "results" / "eval.json").write_text('{"ppl": 12.3}\n')
    (finished / "MY_CARD.md").write_text("my model card\n")
    user = snapshot(finished / "notes.txt", finished / "results", finished / "MY_CARD.md")
    ok(compress(model, finished, "--ratio", "0.3", "--overwrite"))
    assert snapshot(finished / "notes.txt", finished / "results", finished / "MY_CARD.md") == user
    assert json.loads((finished / "config.json").read_text())["sola"]["ratio"] == 0.3
    assert set(json.loads((finished / MARKER).read_text())["files"]) >= {"config.json", "model-outer.safetensors"}


def test_overwrite_refuses_when_a_file_it_wrote_was_changed(model, finished, compress):
    config = json.loads((finished / "config.json").read_text())
    config["note"] = "edited by hand"
    (finished / "config.json").write_text(json.dumps(config))
    before = snapshot(finished)
    refused(compress(model, finished, "--ratio", "0.3", "--overwrite"), "config.json", "changed")
    assert snapshot(finished) == before


def test_overwrite_refuses_a_symlink_at_one_of_its_names(model, finished, compress, tmp_path):
    keep = tmp_path / "keep.json"
    keep.write_text("{}")
    (finished / "config.json").unlink()
    (finished / "config.json").symlink_to(keep)
    before = snapshot(finished, keep)
    refused(compress(model, finished, "--overwrite"), "config.json")
    assert snapshot(finished, keep) == before


def test_input_model_inside_the_output_is_refused_before_anything_is_deleted(model, finished, compress):
    inner = finished / "base-model"
    shutil.copytree(model, inner)
    before = snapshot(finished)
    refused(compress(inner, finished, "--overwrite"), str(finished), "contains the input model")
    assert snapshot(finished) == before


def test_output_inside_the_input_model_is_refused(model, compress):
    before = snapshot(model)
    refused(compress(model, model / "compressed"), "inside the input model")
    assert snapshot(model) == before and not (model / "compressed").exists()


@pytest.mark.parametrize("config", [["sola"], "sola", {"sola": {"format_version": 1}, "model_type": "llama"}])
def test_directory_without_marker_is_never_deleted(model, tmp_path, compress, config):
    """A config.json mentioning "sola" (in a list, a string, or a section of an older version)
    does not make a directory ours: even --overwrite refuses and deletes nothing."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    (out / "model-block-00000.safetensors").write_bytes(b"user data")
    before = snapshot(out)
    refused(compress(model, out, "--overwrite"), str(out), MARKER)
    assert snapshot(out) == before


def test_overwrite_of_an_unfinished_run_keeps_user_files(model, tmp_path, compress):
    out = tmp_path / "out"
    ok(compress(model, out))
    marker = json.loads((out / MARKER).read_text())  # turn it back into an unfinished run
    marker["complete"] = False
    marker.pop("files")
    (out / MARKER).write_text(json.dumps(marker))
    (out / RUN_DIR).mkdir()
    (out / RUN_DIR / "manifest.json").write_text("{damaged")
    (out / "notes.txt").write_text("keep me\n")
    refused(compress(model, out), "manifest.json", "damaged")
    ok(compress(model, out, "--overwrite"))
    assert (out / "notes.txt").read_text() == "keep me\n"
    assert not (out / RUN_DIR).exists() and (out / "config.json").is_file()


@pytest.mark.parametrize("content", ["{oops", "[]", '{"format": "other"}',
                                     '{"format": "sola-stream-output", "format_version": 99}',
                                     '{"format": "sola-stream-output", "format_version": 1, "planned": ["../x"]}'])
def test_damaged_or_foreign_marker_is_refused(model, finished, compress, content):
    (finished / MARKER).write_text(content)
    before = snapshot(finished)
    refused(compress(model, finished, "--overwrite"), MARKER)
    assert snapshot(finished) == before


def test_a_new_run_never_replaces_a_user_file_named_like_an_output_file(model, finished, compress):
    """The user's LICENSE beside a finished output; the next run's input has a LICENSE too."""
    (finished / "LICENSE").write_text("my own terms for this model\n")
    (model / "LICENSE").write_text("the base model's license\n")
    before = snapshot(finished)
    refused(compress(model, finished, "--overwrite"), "LICENSE", "move it away")
    assert snapshot(finished) == before
    assert (finished / "config.json").is_file()  # nothing of the old output was deleted either
