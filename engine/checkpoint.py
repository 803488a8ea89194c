"""Atomic checkpoints and exact resume.

A checkpoint is a directory `step-000123/` under the run's `checkpoints/` folder holding
`state.pt` (model, optimizer, scheduler, RNG states, data position, anything else the
loop passes). It is written so that a crash at any moment leaves either the previous
checkpoint or the new one, never a torn one:

1. everything is written into a temporary directory next to the final one, each file
   fsync'ed;
2. the temporary directory is renamed to its final name (`os.replace`, atomic on POSIX) and
   the parent directory fsync'ed;
3. the `latest` pointer file is switched to the new directory with the same temp file +
   fsync + `os.replace` dance. Resume reads `latest`, so a directory that was renamed but
   not yet pointed to is simply ignored.

Older checkpoints beyond `keep` are removed only after the pointer has moved, and so are the
temporary directories of saves that a kill interrupted.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
STATE = "state.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically: temp file in the same directory, fsync, replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout, sampling, shuffles)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | os.PathLike, step: int, state: dict[str, Any], *,
                    keep: int = 2) -> Path:
    """Write `state` (plus the RNG states) as checkpoint `step` under `root`, atomically.

    state: picklable by `torch.save` (state dicts, ints, lists). Returns the directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        with open(tmp / STATE, "wb") as f:
            torch.save({**state, "step": step, "rng": rng_state()}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a previous attempt at this step that was never pointed to
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    atomic_write_bytes(root / LATEST, final.name.encode())
    _prune(root, final, step, keep)
    return final


def export_pretrained(model, tokenizer, path: str | os.PathLike) -> Path:
    """The model as a Hugging Face folder (`save_pretrained`: config, safetensors weights,
    and the tokenizer), which `from_pretrained` and this engine's `model=` load. Written
    into a temporary folder beside `path`, each file fsync'ed, then swapped in: `path` is
    always a whole export (a crash mid-swap leaves the previous one as `.<name>.*.old`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    old = tmp.with_name(tmp.name + ".old")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _step_of(path: Path) -> int | None:
    match = re.fullmatch(r"step-(\d+)", path.name)
    return int(match.group(1)) if match else None


def _prune(root: Path, final: Path, step: int, keep: int) -> None:
    """Keep `final` (what `latest` now points to) and the `keep - 1` checkpoints just before
    it; remove the rest and the temp directories of interrupted saves.

    Ordered by the parsed step, not the name: names stop sorting by step once the number
    outgrows its 6 digits. Checkpoints numbered above `step` are left over from an older run
    into the same folder (this run's `latest` no longer points into their history), so they
    are the first to go rather than this run's own.
    """
    others = [(s, p) for p in root.glob("step-*")
              if p.is_dir() and p != final and (s := _step_of(p)) is not None]
    others.sort(key=lambda item: (item[0] < step, item[0]), reverse=True)
    for _, old in others[keep - 1:]:
        shutil.rmtree(old, ignore_errors=True)
    # This process's own temp directory and pointer file are gone (renamed, or removed on
    # error), so any left is from a save that was killed midway.
    for stale in root.glob(".step-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(f".{LATEST}.*.tmp"):
        stale.unlink(missing_ok=True)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The directory `latest` points to, or None when there is no checkpoint."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / STATE).exists():
        raise FileNotFoundError(f"{pointer} points to {path.name}, which has no {STATE}; "
                                "the checkpoint folder was modified by hand")
    return path


def load_checkpoint(root: str | os.PathLike, *, restore_rng: bool = True) -> dict[str, Any] | None:
    """The latest checkpoint's state (None if none), with the RNG states restored."""
    path = latest_checkpoint(root)
    if path is None:
        return None
    state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    if restore_rng:
        set_rng_state(state["rng"])
    return state
