"""The run directory: who owns it, one run at a time in it, and artifacts that appear complete or not at all.

Every artifact appears complete or not at all: it is written to a temporary beside its final path (named with
:data:`TEMP_PREFIX`) and renamed into place. A process killed mid-write leaves only such a temporary, which the
next run in that directory removes (:func:`remove_stale_temporaries`).

dlp never deletes what it did not create. Every directory it creates holds a marker file (:data:`MARKER`);
a directory without it is the user's: dlp writes into it only if it is empty, replaces it never, and
``--overwrite`` removes only dlp's own artifacts (:data:`RUN_FILES` and marked subdirectories), nothing else.

One run at a time per directory: a run holds an exclusive OS advisory lock (:class:`RunLock`, ``flock`` on
:data:`LOCK_FILE` inside the directory) from the moment it writes until it returns; the OS drops it when the process
dies, so a killed run never leaves a stale lock. A finished run answers a rerun only if the rerun asks for the same
recipe (:func:`recipe_changes`); otherwise it is refused with the fields that differ.

A write that runs out of disk space becomes one line naming the directory and the bytes it needed
(:func:`no_space_error`), and leaves nothing half-written behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import DlpError

MARKER = ".dlp"  # in every directory dlp creates; its presence is what makes a directory dlp's to replace
_MARKER_TEXT = "This directory was written by dlp; dlp may replace what it wrote here (and nothing else).\n"
TEMP_PREFIX = ".dlp-tmp."  # every temporary file or directory dlp writes before renaming it into place
LOCK_FILE = ".dlp.lock"  # flock'ed by the run writing into the directory; holds that run's pid, for messages
# Settings that say where a run writes and how it starts, not what it computes: a rerun may change them freely.
NOT_RECIPE = ("output_dir", "overwrite", "wait_for_lock")
# The files a dlp run writes into its output directory (prune, slice and prune-then-finetune runs); --overwrite
# removes these and the marked subdirectories (model/, prune/, adapter/, ...), and keeps everything else.
RUN_FILES = (
    "masks.safetensors",
    "report.json",
    "summary.md",
    "sparsity.png",
    "widths.png",
    "loss.png",
    "layer_scores.json",
    "slicing.json",
    "recipe.json",
    "merge.json",
    "eval.json",
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _oserror(path: Path, exc: OSError, what: str) -> DlpError:
    return DlpError(f"{what}: cannot write to {path} ({exc.strerror or type(exc).__name__})")


def is_dlp_dir(path: str | Path) -> bool:
    """A directory dlp created (it holds the marker)."""
    return (Path(path) / MARKER).is_file()


def mark_dir(path: Path) -> None:
    """Put the marker in a directory dlp has just built (it becomes dlp's to replace)."""
    (path / MARKER).write_text(_MARKER_TEXT)


def claim_dir(path: str | Path, what: str = "output_dir") -> Path:
    """Make ``path`` a dlp directory: create it, or adopt it if it is empty; one of dlp's is taken as it is.

    A regular file, a non-empty directory dlp did not make, or a place dlp cannot write: a one-line DlpError
    naming ``what`` (the field), raised before any heavy work."""
    path = Path(path)
    check_writable_dir(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not is_dlp_dir(path):
            mark_dir(path)
    except OSError as exc:
        raise _oserror(path, exc, what)
    return path


def check_writable_dir(path: str | Path, what: str = "output_dir") -> None:
    """The checks of :func:`claim_dir` without creating anything (for processes that must not write)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DlpError(f"{what}: {path} is a file, not a directory")
    if path.is_dir() and not is_dlp_dir(path) and any(path.iterdir()):
        raise DlpError(
            f"{what}: {path} is not empty and was not written by dlp (no {MARKER} marker); "
            "dlp never writes into or deletes a directory it did not create: choose a new or empty one"
        )
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise DlpError(f"{what}: {existing} is a file, so {path} cannot be created")


def clear_dlp_artifacts(path: str | Path, what: str = "output_dir") -> list[str]:
    """``--overwrite``: remove dlp's own artifacts from ``path`` (a dlp directory) and return the names of the
    entries it kept because dlp did not write them."""
    path = Path(path)
    if not path.exists():
        return []
    check_writable_dir(path, what)  # refuses a foreign directory
    kept = []
    for entry in sorted(path.iterdir()):
        if entry.name in (MARKER, LOCK_FILE):
            continue
        if entry.is_dir() and not entry.is_symlink() and (is_dlp_dir(entry) or entry.name.startswith(TEMP_PREFIX)):
            shutil.rmtree(entry)
        elif entry.is_file() and (entry.name in RUN_FILES or entry.name.startswith(TEMP_PREFIX)):
            entry.unlink()
        else:
            kept.append(entry.name)
    return kept


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries that killed dlp processes left in the dlp directory ``path`` and in its dlp
    subdirectories; returns what was removed. Only the run owning ``path`` may call this (nothing is in flight)."""
    path = Path(path)
    removed: list[Path] = []
    if not is_dlp_dir(path):
        return removed
    for entry in sorted(path.iterdir()):
        if entry.name.startswith(TEMP_PREFIX):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
        elif entry.is_dir() and not entry.is_symlink() and is_dlp_dir(entry):
            removed += remove_stale_temporaries(entry)
    return removed


def publish_file(tmp: str | Path, path: str | Path) -> None:
    """Give a temp file ordinary permissions (mkstemp makes it 0600) and rename it into place."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


@contextmanager
def atomic_file(path: str | Path, size: int | None = None, what: str = "output") -> Iterator[str]:
    """Yield a temporary path beside ``path``; whatever was written there replaces ``path`` only if the block
    finishes without an error (a crash leaves no half-written artifact). ``size``: the bytes about to be written,
    so a disk too small is refused before writing (see :func:`check_space`)."""
    path = Path(path)
    if path.is_dir():
        raise DlpError(f"{path} is a directory; dlp writes a file there")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        check_space(path.parent, size, path.name, what)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.")
    except OSError as exc:
        raise no_space_error(path.parent, path.name, size, what, exc) or _oserror(path.parent, exc, what)
    os.close(fd)
    try:
        yield tmp
        publish_file(tmp, path)
    except Exception as exc:
        raise no_space_error(path.parent, path.name, size, what, exc) or exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_file(path, size=len(data)) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def is_out_of_space(exc: BaseException) -> bool:
    """ENOSPC from Python's own writes, or from a library that reports it in its message (safetensors' Rust
    writer raises ``SafetensorError: ... No space left on device``; torch.save a RuntimeError)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(exc) for text in ("No space left on device", "StorageFull", "Disk quota exceeded"))


def _mb(size: float) -> str:
    """A byte count in the unit that shows it best (a tiny model's export is a few hundred KB)."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 2**10:.0f} KB"


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def check_space(directory: str | Path, size: int | None, name: str, what: str = "output_dir") -> None:
    """Refuse, before writing, an artifact of ``size`` bytes that the file system under ``directory`` cannot hold."""
    free = _free_bytes(Path(directory)) if size else None
    if free is not None and size > free:
        raise DlpError(f"{what}: not enough space in {directory} to write {name}: needs {_mb(size)}, {_mb(free)} free")


def no_space_error(
    directory: str | Path, name: str, size: int | None, what: str, exc: BaseException
) -> DlpError | None:
    """The one-line error for a write that ran out of disk space (None for any other failure): the directory, the
    artifact, the bytes it needed (when known) and what is free (the temporary is removed by then)."""
    if isinstance(exc, DlpError) or not is_out_of_space(exc):
        return None
    free = _free_bytes(Path(directory))
    needed = f"needs {_mb(size)}" if size else "needs more"
    available = f", {_mb(free)} free" if free is not None else ""
    return DlpError(
        f"{what}: no space left on the device of {directory} while writing {name} ({needed}{available}); "
        "nothing was left half-written: free some space and rerun to resume"
    )


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """JSON in the dicts' own (deterministic) key order, so the same inputs give the same bytes."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(path: str | Path, what: str = "output_dir", size: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block finishes without an error.

    ``path`` must be absent, empty, or a directory dlp made (:func:`claim_dir`'s rule): an existing directory of
    the user's is refused before anything is written, never deleted. The result carries dlp's marker. ``size``:
    about how many bytes the block writes (refused before writing if the disk cannot hold them)."""
    path = Path(path)
    check_writable_dir(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        check_space(path.parent, size, f"{path.name}/", what)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}."))
    except OSError as exc:
        raise no_space_error(path.parent, f"{path.name}/", size, what, exc) or _oserror(path.parent, exc, what)
    try:
        yield tmp
        mark_dir(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            check_writable_dir(path, what)  # still ours (or empty) at the moment it is replaced
            shutil.rmtree(path)
        os.replace(tmp, path)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # first, so the error can say what is free without it
        raise no_space_error(path.parent, f"{path.name}/", size, what, exc) or exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_json(path: str | Path) -> Any | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def start_output_dir(
    path: str | Path, overwrite: bool, what: str = "output_dir", lock: "RunLock | None" = None
) -> Path:
    """Take ``path`` for a run that is about to write (after its checks passed): claim it, take its ``lock`` (so
    nothing below touches another run's files), with ``overwrite`` remove dlp's own artifacts (and say what was
    kept), and remove what interrupted runs left half-written."""
    path = Path(path)
    claim_dir(path, what)
    if lock is not None:
        lock.acquire()
    if overwrite:
        kept = clear_dlp_artifacts(path, what)
        if kept:
            print(f"[dlp] --overwrite kept what dlp did not write in {path}: {', '.join(kept)}")
    for stale in remove_stale_temporaries(path):
        print(f"[dlp] removed {stale}, left half-written by an interrupted run")
    return path


class RunLock:
    """The exclusive lock of one run on its directory: ``flock`` on :data:`LOCK_FILE` inside it.

    ``flock`` locks belong to the open file and end with the process, so a run killed by any signal frees the
    directory at once. Another process that wants it is refused in one line naming the holder's pid, or, with
    ``wait``, waits for it. Within one process the lock is re-entrant (a second flock on a new descriptor of the
    same file would conflict with the first). Used as a context manager; :meth:`acquire` needs the directory to
    exist and may be called late (after the checks that must leave the directory untouched)."""

    _held: dict[str, list] = {}  # resolved directory -> [descriptor, holders] in this process

    def __init__(self, directory: str | Path, wait: bool = False, what: str = "output_dir"):
        self.directory, self.wait, self.what = Path(directory), wait, what
        self._key: str | None = None

    def acquire(self) -> None:
        if self._key is not None:
            return
        key = str(self.directory.resolve())
        if key in RunLock._held:
            RunLock._held[key][1] += 1
            self._key = key
            return
        try:
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as exc:
            raise _oserror(self.directory, exc, self.what)
        self._lock(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        RunLock._held[key], self._key = [fd, 1], key

    def _lock(self, fd: int) -> None:
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                holder = _lock_holder(fd)
            if not self.wait:
                os.close(fd)
                raise DlpError(
                    f"{self.what}: {self.directory} is in use by another dlp run ({holder}); wait for it to end, "
                    "choose another output_dir, or rerun with --wait_for_lock true to queue behind it"
                )
            if not announced:
                print(f"[dlp] {self.directory} is in use by another dlp run ({holder}); waiting for it to end")
                announced = True
            time.sleep(0.5)

    def release(self) -> None:
        if self._key is None:
            return
        entry = RunLock._held[self._key]
        entry[1] -= 1
        if entry[1] == 0:
            del RunLock._held[self._key]
            os.close(entry[0])  # closing the descriptor drops the flock
        self._key = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _lock_holder(fd: int) -> str:
    """``pid N`` as the holder wrote it into the lock file (it may be mid-write: then just 'another process')."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f"pid {text}" if text.isdigit() else "another process"


def _flat(recipe: dict[str, Any]) -> dict[str, Any]:
    """Recipe keys are flat whatever group records them (``{"training": {"seed": 0}}`` → ``{"seed": 0}``)."""
    flat: dict[str, Any] = {}
    for key, value in recipe.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def recipe_changes(saved: dict[str, Any], recipe: dict[str, Any]) -> list[str]:
    """``key: old → new`` for every key ``recipe`` records whose value differs from the saved recipe's. Keys are
    compared flat (recipe keys are flat, whatever group records them), and only the keys this recipe records: a
    recipe.json of an older layout still matches, and a slicing run never depends on a pruning field it does not
    read. :data:`NOT_RECIPE` keys (where a run writes, how it starts) never count."""
    old = _flat(saved)
    return [
        f"{key}: {old.get(key)!r} → {value!r}"
        for key, value in _flat(recipe).items()
        if key not in NOT_RECIPE and old.get(key) != value
    ]


def cache_complete(cache_dir: str | Path, key: str, shard_name: Callable[[int], str]) -> bool:
    """Whether a sharded cache (a ``manifest.json`` with its ``key`` and ``shards`` count, then one file per shard,
    each written atomically) holds every shard of ``key``: the teacher's logits, the dense model's answers."""
    manifest = read_json(Path(cache_dir) / "manifest.json")
    return (
        manifest is not None
        and manifest.get("key") == key
        and all((Path(cache_dir) / shard_name(s)).is_file() for s in range(manifest["shards"]))
    )
