"""Atomic writes and the ownership of output directories.

Every artifact appears complete or not at all: it is written to a temporary beside its final path (named with
:data:`TEMP_PREFIX`) and renamed into place. A process killed mid-write leaves only such a temporary, which the
next run in that directory removes (:func:`remove_stale_temporaries`).

dlp never deletes what it did not create. Every directory it creates holds a marker file (:data:`MARKER`);
a directory without it is the user's: dlp writes into it only if it is empty, replaces it never, and
``--overwrite`` removes only dlp's own artifacts (:data:`RUN_FILES` and marked subdirectories), nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import DlpError

MARKER = ".dlp"  # in every directory dlp creates; its presence is what makes a directory dlp's to replace
_MARKER_TEXT = "This directory was written by dlp; dlp may replace what it wrote here (and nothing else).\n"
TEMP_PREFIX = ".dlp-tmp."  # every temporary file or directory dlp writes before renaming it into place
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
        if entry.name == MARKER:
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
def atomic_file(path: str | Path) -> Iterator[str]:
    """Yield a temporary path beside ``path``; whatever was written there replaces ``path`` only if the block
    finishes without an error (a crash leaves no half-written artifact)."""
    path = Path(path)
    if path.is_dir():
        raise DlpError(f"{path} is a directory; dlp writes a file there")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.")
    except OSError as exc:
        raise _oserror(path.parent, exc, "output")
    os.close(fd)
    try:
        yield tmp
        publish_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """JSON in the dicts' own (deterministic) key order, so the same inputs give the same bytes."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(path: str | Path, what: str = "output_dir") -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block finishes without an error.

    ``path`` must be absent, empty, or a directory dlp made (:func:`claim_dir`'s rule): an existing directory of
    the user's is refused before anything is written, never deleted. The result carries dlp's marker."""
    path = Path(path)
    check_writable_dir(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}."))
    except OSError as exc:
        raise _oserror(path.parent, exc, what)
    try:
        yield tmp
        mark_dir(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            check_writable_dir(path, what)  # still ours (or empty) at the moment it is replaced
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_json(path: str | Path) -> Any | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def start_output_dir(path: str | Path, overwrite: bool, what: str = "output_dir") -> Path:
    """Take ``path`` for a run that is about to write (after its checks passed): with ``overwrite``, remove dlp's
    own artifacts (and say what was kept); claim it; remove what interrupted runs left half-written."""
    path = Path(path)
    if overwrite:
        kept = clear_dlp_artifacts(path, what)
        if kept:
            print(f"[dlp] --overwrite kept what dlp did not write in {path}: {', '.join(kept)}")
    claim_dir(path, what)
    for stale in remove_stale_temporaries(path):
        print(f"[dlp] removed {stale}, left half-written by an interrupted run")
    return path
