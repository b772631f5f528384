"""Which files of an output directory this tool wrote: the `.sola-stream.json` marker.

The marker is the first file a run writes into a new or empty directory and the only proof of
ownership: a directory without it is never written to, resumed or deleted from, whatever its
config.json says. It lists the names the run will write (`planned`) and, once the run is
complete, each file's SHA-256 (`files`). `--overwrite` deletes only those files, and only while
their content is what this tool wrote; anything else in the directory (notes, evaluation
results) is left alone, and a file the user changed makes the run refuse instead.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sola_stream.storage.atomic import atomic_write_bytes, atomic_write_json, file_sha256, temp_name
from sola_stream.errors import OutputError
from sola_stream.storage.runlog import LOG_NAME

MARKER = ".sola-stream.json"
# ours, but changed after the run by later commands (the run log, the model card and the
# evaluation records of `eval --record`): no checksum
UNCHECKED = {LOG_NAME, "README.md", "sola-stream-evals.jsonl"}
FORMAT = "sola-stream-output"
FORMAT_VERSION = 1


def read_marker(out: Path) -> dict | None:
    """The marker of `out`, None when there is none; a damaged or foreign one is refused."""
    path = out / MARKER
    if not path.exists():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path}: damaged ownership marker ({exc}); delete the directory yourself if it "
                          "is a sola-stream output you no longer need") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise OutputError(f"{path}: not a sola-stream ownership marker")
    if marker.get("format_version") != FORMAT_VERSION:
        raise OutputError(f"{path}: format version {marker.get('format_version')!r} is not {FORMAT_VERSION} "
                          "(written by another version of sola-stream)")
    planned, files = marker.get("planned"), marker.get("files", {})
    if (not isinstance(planned, list) or not all(_plain(n) for n in planned) or not isinstance(files, dict)
            or not all(_plain(n) and isinstance(h, str) for n, h in files.items())):
        raise OutputError(f"{path}: damaged ownership marker (planned/files are not lists of plain file names)")
    return marker


def _plain(name) -> bool:
    """A file name directly inside the directory (a marker is data a user could edit)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def write_marker(out: Path, planned: list[str], files: dict[str, str] | None = None) -> None:
    marker = {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": files is not None,
              "planned": sorted(planned)}
    if files is not None:
        marker["files"] = dict(sorted(files.items()))
    atomic_write_json(out / MARKER, marker)


def finish_output(out: Path, planned: list[str], known: dict[str, str], last_name: str, last_data: bytes) -> None:
    """Make `out` a complete output: the marker with every planned file's SHA-256 (`known` ones as
    given, the others hashed, UNCHECKED ones left out, `last_name` from `last_data`), then the
    last file itself (config.json: what makes the directory a model) written after it."""
    files = dict(known)
    for name in planned:
        if name not in files and name != last_name and name not in UNCHECKED and (out / name).is_file():
            files[name] = file_sha256(out / name)
    files[last_name] = hashlib.sha256(last_data).hexdigest()
    write_marker(out, planned, files)
    atomic_write_bytes(out / last_name, last_data)


def verify_files(out: Path, files: dict[str, str], hint: str) -> None:
    """Every file the marker lists exists with its recorded SHA-256."""
    for name, digest in sorted(files.items()):
        path = out / name
        if not path.is_file():
            raise OutputError(f"{path}: missing from a finished output; {hint}")
        if file_sha256(path) != digest:
            raise OutputError(f"{path}: content changed since sola-stream wrote it; {hint}")


def remove_ours(out: Path, marker: dict) -> None:
    """Delete what this tool wrote into `out` (see the module docstring), never anything else.
    A complete run's files are checked against their checksums before anything is deleted."""
    files = marker.get("files", {}) if marker.get("complete") else {}
    names = sorted(set(marker["planned"]) | set(files))
    hint = "move it away or delete it yourself before --overwrite"
    for name in names:
        path = out / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise OutputError(f"{path}: not a file sola-stream wrote (a link or a folder); {hint}")
        if name in files and path.is_file() and file_sha256(path) != files[name]:
            raise OutputError(f"{path}: changed since sola-stream wrote it; {hint}")
    for name in names:
        for path in (out / name, temp_name(out / name)):
            if path.is_file() and not path.is_symlink():
                path.unlink()


def foreign_planned(out: Path, planned: list[str]) -> str | None:
    """The first planned name already present in `out` (a file this run would replace)."""
    for name in sorted(planned):
        if (out / name).exists() or (out / name).is_symlink():
            return name
    return None
