"""Per-block commit, resume and its integrity checks for one output directory.

An output directory is ours only when it holds the `.sola-stream.json` marker (storage/ownership.py).
While a run is unfinished it also holds `.sola-run/`:
- `manifest.json`: the run's fingerprint, the SHA-256 of the outer input tensors, the current
  states file's SHA-256 and one entry per finished block (shard SHA-256, input-tensor digest):
  the commit record.
- `states-NNNNN.safetensors`: the calibration states entering block NNNNN (float32), so that a
  resumed run starts there without replaying finished blocks. A run of several processes
  (torchrun) keeps one per rank, `states-NNNNN-rankRofW.safetensors`, each with its SHA-256 in
  the manifest; only rank 0 writes the manifest and the shards, and a resume needs as many ranks.
`.sola-stream.lock` (storage/lock.py) is held by the writing process. Commit order per block: shard
(temp name, fsync, rename) -> next states (same) -> manifest (same; the commit point) -> the
previous states file is deleted. Before a resume, everything the manifest records is verified.
See docs/RESUME.md.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sola_stream import __version__, faults
from sola_stream.storage.checkpoint import CheckpointReader
from sola_stream.storage.atomic import atomic_write_json, file_sha256, fsync_dir
from sola_stream.errors import OutputError
from sola_stream.storage.lock import DirLock
from sola_stream.storage.ownership import MARKER, finish_output, foreign_planned, read_marker, remove_ours, verify_files, write_marker
from sola_stream.storage.output import block_shard_name
from sola_stream.pipeline.state_cache import STREAMS, states_file

RUN_DIR = ".sola-run"
MANIFEST = "manifest.json"
LOCK = ".sola-stream.lock"
MANIFEST_VERSION = 2
_HASH_EDGE = 1 << 20  # bytes hashed at each end of an input file (with its header and size)
_REDO = "run with --overwrite to start over"


def file_fingerprint(path: Path) -> dict:
    """Name, size and a SHA-256 over the safetensors header and the first and last MiB: a cheap
    first check on every start. Content changes inside finished blocks are caught by their
    input digests (RunDir.verify)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        h.update(head)
        if len(head) == 8:
            h.update(fh.read(min(int.from_bytes(head, "little"), 100 << 20)))
        fh.seek(0)
        h.update(fh.read(_HASH_EDGE))
        fh.seek(max(0, size - _HASH_EDGE))
        h.update(fh.read(_HASH_EDGE))
    return {"name": path.name, "size": size, "sha256_header_edges": h.hexdigest()}


def fingerprint(reader: CheckpointReader, options: dict, calib_sha256: str) -> dict:
    return {
        "package_version": __version__,
        "input_files": [file_fingerprint(p) for p in reader.files],
        "config_sha256": hashlib.sha256(json.dumps(reader.config_dict, sort_keys=True).encode()).hexdigest(),
        "calibration_sha256": calib_sha256,
        "options": options,
    }


def _classify(out: Path) -> dict | None:
    """None for a new or empty directory, the marker for one of ours; anything else is refused."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    if not out.is_dir():
        return None
    try:
        names = {p.name for p in out.iterdir()} - {LOCK}
    except OSError as exc:
        raise OutputError(f"{out}: cannot list the output directory ({exc.strerror})") from None
    if not names:
        return None
    if MARKER not in names:
        raise OutputError(f"{out}: directory holds files that sola-stream did not write (no {MARKER}); "
                          "choose a new or empty output directory")
    return read_marker(out)


class RunDir:
    """The run state of one output directory; a context manager that holds the lock while writing.

    `planned`: every file name the run will write at the top of the directory. `world`: the
    number of processes of the run (rank 0 opens it; the others `follow`)."""

    def __init__(self, out_dir: Path, fp: dict, planned: list[str], overwrite: bool = False, world: int = 1):
        self.out_dir, self.fp, self.planned, self.world = out_dir, fp, planned, world
        self.dir = out_dir / RUN_DIR
        self.finished = False
        self._lock: DirLock | None = None
        marker = _classify(out_dir)
        if marker and self._finished(marker) and not overwrite:
            self._check_finished(marker)
            return
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{out_dir}: cannot create the output directory ({exc.strerror})") from None
        self._lock = DirLock(out_dir / LOCK, str(out_dir)).acquire()
        try:
            marker = _classify(out_dir)  # again, now that no other process can change it
            if marker is None or overwrite:  # a new run: no file of the user's may stand in its way
                ours = set(marker["planned"]) | set(marker.get("files", {})) if marker else set()
                if clash := foreign_planned(out_dir, [p for p in planned if p not in ours]):
                    raise OutputError(f"{out_dir / clash}: exists and would be replaced by the output; move it away")
            if marker and overwrite:
                remove_ours(out_dir, marker)
                shutil.rmtree(self.dir, ignore_errors=True)
                marker = None
            if marker is None:
                write_marker(out_dir, planned)
                self.dir.mkdir(exist_ok=True)
                self.manifest = {"format_version": MANIFEST_VERSION, "fingerprint": fp, "outer_sha256": None,
                                 "states": None, "blocks": [], **({"ranks": world} if world > 1 else {})}
                atomic_write_json(self.dir / MANIFEST, self.manifest)
            elif self._finished(marker):  # finished by another process meanwhile
                self._check_finished(marker)
                self.release()
            else:
                self.manifest = self._load_manifest()
        except BaseException:
            self.release()
            raise

    @classmethod
    def follow(cls, out_dir: Path, fp: dict, planned: list[str], opened: dict, world: int) -> "RunDir":
        """Another rank's view of the run rank 0 opened (`opened`: its `shared()`): no lock, and
        only its own states files are written or verified by it."""
        self = cls.__new__(cls)
        self.out_dir, self.fp, self.planned, self.world = out_dir, fp, planned, world
        self.dir, self._lock = out_dir / RUN_DIR, None
        self.finished, self.manifest = opened["finished"], opened["manifest"]
        return self

    def shared(self) -> dict:
        return {"finished": self.finished, "manifest": None if self.finished else self.manifest}

    # -- opening -------------------------------------------------------------------------------
    def _finished(self, marker: dict) -> bool:
        return bool(marker.get("complete")) and not (self.dir / MANIFEST).exists()

    def _check_finished(self, marker: dict) -> None:
        """The same run finished earlier: its fingerprint matches and every file is intact."""
        config = self.out_dir / "config.json"
        try:
            old = json.loads(config.read_text())["sola"]["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            raise OutputError(f"{config}: missing or damaged in a finished output; {_REDO}") from None
        if old != self.fp:
            raise OutputError(f"{self.out_dir}: holds a finished run with a different model or options "
                              f"({_first_difference(old if isinstance(old, dict) else {}, self.fp)}); "
                              "use --overwrite to start over")
        verify_files(self.out_dir, marker.get("files", {}), _REDO)
        self.finished = True

    def _load_manifest(self) -> dict:
        path = self.dir / MANIFEST
        try:
            m = json.loads(path.read_text())
        except FileNotFoundError:
            raise OutputError(f"{path}: missing from an unfinished run; {_REDO}") from None
        except (OSError, ValueError) as exc:
            raise OutputError(f"{path}: damaged run manifest ({exc}); {_REDO}") from None
        if not _valid_manifest(m):
            raise OutputError(f"{path}: damaged run manifest or one of another sola-stream version; {_REDO}")
        if m.get("ranks", 1) != self.world:
            raise OutputError(f"{self.out_dir}: this unfinished run was started with {m.get('ranks', 1)} process(es), "
                              f"not {self.world}; resume it with as many (torchrun --nproc-per-node), "
                              "or --overwrite to start over")
        if m["fingerprint"] != self.fp:
            diff = _first_difference(m["fingerprint"], self.fp)
            raise OutputError(f"{self.out_dir}: holds an unfinished run of a different model or options "
                              f"({diff}); run the same command to resume, or --overwrite to start over")
        return m

    def verify(self, outer_digest: str, block_digest, workers: int = 1, progress=None) -> None:
        """Before resuming: the outer input tensors, the states file, and each committed block's
        shard and input tensors (`block_digest(i)`) are exactly what the manifest recorded.
        Blocks are hashed on `workers` threads (hashlib releases the GIL); errors are reported in
        block order."""
        m = self.manifest
        if m["outer_sha256"] is not None and m["outer_sha256"] != outer_digest:
            raise OutputError(f"{self.out_dir}: the input model's embeddings/head changed since this run started; "
                              f"{_REDO}")
        self.verify_states(0)

        def check(entry: dict) -> str | None:
            shard = self.out_dir / entry["shard"]
            if not shard.is_file():
                return f"{shard}: committed block shard is missing; {_REDO}"
            if file_sha256(shard) != entry["shard_sha256"]:
                return f"{shard}: damaged (checksum differs from the manifest); {_REDO}"
            if block_digest(entry["block"]) != entry["input_sha256"]:
                return f"{self.out_dir}: the input model's block {entry['block']} changed since it was compressed; {_REDO}"
            return None

        with ThreadPoolExecutor(max(1, workers)) as pool:
            for problem in pool.map(check, m["blocks"]):
                if problem:
                    raise OutputError(problem)
                if progress is not None:
                    progress()

    def verify_states(self, rank: int) -> None:
        """Rank `rank`'s states files are what the manifest recorded."""
        for stream, sha in _stream_hashes(self.manifest["states"], rank):
            path = self.states_path(self.next_block, stream, rank)
            if not path.is_file():
                raise OutputError(f"{path}: calibration states of the unfinished run are missing; {_REDO}")
            if file_sha256(path) != sha:
                raise OutputError(f"{path}: calibration states damaged (checksum differs from the manifest); {_REDO}")

    # -- progress ------------------------------------------------------------------------------
    @property
    def next_block(self) -> int:
        return len(self.manifest["blocks"])

    def states_path(self, block: int, stream: str = "states", rank: int = 0) -> Path:
        return states_file(self.dir, block, stream, rank, self.world)

    def all_states(self, block: int) -> list[Path]:
        return [self.states_path(block, stream, r) for stream in STREAMS for r in range(self.world)]

    def commit_start(self, outer_digest: str, states_sha256: dict, budgets: list[int] | None = None,
                     importance: list[dict[str, float]] | None = None) -> None:
        """The first block's states are durable (`states_sha256`: SHA-256 by stream, a list by
        rank in a run of several processes): recorded with the outer tensors' digest and, for a
        model-wide allocation, every block's budget and its layers' measured importance."""
        self.manifest["outer_sha256"] = outer_digest
        if budgets is not None:
            self.manifest["budgets"] = budgets
        if importance is not None:
            self.manifest["importance"] = importance
        self.manifest["states"] = _states_entry(0, states_sha256)
        atomic_write_json(self.dir / MANIFEST, self.manifest)

    def commit_block(self, index: int, entry: dict, persist_states) -> None:
        """Called after block `index`'s shard is durable (its SHA-256 in `entry`):
        `persist_states()` makes the next block's states durable and returns their SHA-256 by
        stream (as in commit_start; None after the last block), then the manifest commits."""
        if persist_states is not None:
            self.manifest["states"] = _states_entry(index + 1, persist_states())
        else:
            self.manifest["states"] = None
        self.manifest["blocks"].append(entry)
        atomic_write_json(self.dir / MANIFEST, self.manifest)
        for path in self.all_states(index):
            path.unlink(missing_ok=True)

    def cleanup_orphans(self) -> None:
        """Temp files and uncommitted states left by a crash (they are rewritten anyway)."""
        keep = set(self.all_states(self.next_block))
        for p in [p for stream in STREAMS for p in self.dir.glob(f"{stream}-*.safetensors")]:
            if p not in keep:
                p.unlink()
        for p in [*self.dir.glob(".*.tmp"), *self.out_dir.glob(".*.tmp")]:
            p.unlink()

    def complete(self, last_name: str, last_data: bytes) -> None:
        """Finish the output: record every file's checksum in the marker, write the last file
        (config.json, the one that makes the directory a model), then drop the run state. A
        failure before the last rename leaves an unfinished run that the same command completes."""
        finish_output(self.out_dir, self.planned, {e["shard"]: e["shard_sha256"] for e in self.manifest["blocks"]},
                      last_name, last_data)
        faults.hit("config_written")
        shutil.rmtree(self.dir)
        self.release()
        fsync_dir(self.out_dir)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _valid_manifest(m) -> bool:
    """Types of everything the resume reads (a manifest is data a user or a crash could damage)."""
    if not isinstance(m, dict) or m.get("format_version") != MANIFEST_VERSION:
        return False
    if not isinstance(m.get("fingerprint"), dict) or not isinstance(m.get("blocks"), list):
        return False
    if not (m.get("outer_sha256") is None or isinstance(m["outer_sha256"], str)):
        return False
    world = m.get("ranks", 1)
    if type(world) is not int or world < 1:
        return False

    def hashes(v) -> bool:  # one per rank in a run of several processes
        return isinstance(v, str) if world == 1 else (isinstance(v, list) and len(v) == world
                                                      and all(isinstance(x, str) for x in v))

    states = m.get("states")
    if not (states is None or (isinstance(states, dict) and "sha256" in states
                               and states.get("block") == len(m["blocks"])
                               and all(hashes(v) for k, v in states.items() if k.endswith("sha256")))):
        return False
    budgets = m.get("budgets")
    if budgets is not None and not (isinstance(budgets, list) and all(type(x) is int and x > 0 for x in budgets)):
        return False
    weights = m.get("importance")
    if weights is not None and not (isinstance(weights, list) and all(
            isinstance(d, dict) and all(isinstance(k, str) and type(v) in (int, float) and math.isfinite(v) and v >= 0
                                        for k, v in d.items()) for d in weights)):
        return False
    for i, b in enumerate(m["blocks"]):
        if not isinstance(b, dict) or b.get("block") != i or b.get("shard") != block_shard_name(i):
            return False
        if not all(isinstance(b.get(k), str) for k in ("shard_sha256", "input_sha256")):
            return False
        if not isinstance(b.get("layers"), dict) or not all(isinstance(b.get(k), int) for k in ("dense_params", "kept_params")):
            return False
        split = b.get("prime_split", 0.0)  # --prime-ratio auto's choice, copied into config.json
        if type(split) not in (int, float) or not 0.0 <= split < 1.0:
            return False
    return True


def _states_entry(block: int, hashes: dict[str, str]) -> dict:
    """The manifest's record of the states entering `block`: `sha256` for the compressed model's
    stream, `<stream>_sha256` for any other."""
    return {"block": block, **{("sha256" if s == "states" else f"{s}_sha256"): h for s, h in hashes.items()}}


def _stream_hashes(entry: dict | None, rank: int = 0) -> list[tuple[str, str]]:
    """(stream, SHA-256) of each of rank `rank`'s states files that a manifest entry records."""
    if entry is None:
        return []
    found = [(s, entry[k]) for s in STREAMS if (k := "sha256" if s == "states" else f"{s}_sha256") in entry]
    return [(s, h if isinstance(h, str) else h[rank]) for s, h in found]


def _first_difference(old: dict, new: dict, most: int = 3) -> str:
    """The first `most` differing fields (one option can change two: --prime-ratio sets
    prime_ratio and prime_choices), in key order."""
    found = _differences(old, new)
    return "; ".join(found[:most]) + ("; ..." if len(found) > most else "") if found else "fingerprint differs"


def _differences(old: dict, new: dict, path: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                out += _differences(a, b, f"{path}{key}.")
            else:
                out.append(f"{path}{key} was {_short(a)}, now {_short(b)}")
    return out


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) < 80 else s[:77] + "..."
