"""The on-disk cache of pooled (and standardised) splits: one folder of ``.npy`` files per entry.

An entry's folder is named after the source file's SHA-256 and the settings that made it, and is
written whole into a temporary folder, then renamed, so a reader never sees half an entry. Arrays
are memory-mapped copy-on-write on reading: they load in no time, pages come from the system's
file cache (shared by every process that reads the same entry), and a tensor can wrap them
without a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from aemt.data.mmsa import MODALITIES, Split
from aemt.data.pooling import Stats, stats_from_arrays, stats_to_arrays
from aemt.io_utils import atomic_write_text, temp_folder

_SHA256_HEX = re.compile("[0-9a-f]{64}")
CACHE_VERSION = 4  # 2: files that version 1 read wrongly (bad masks, complex values) are refused;
# 3: a labeled file read for pre-training keeps its extra splits (every split but test), and files
# with some but not all T/A/V labels or a text_bert of the wrong shape are refused;
# 4: an entry keeps the warnings its first read gave (notes.json), and a hit gives them again


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def cached_digest(path: Path, root: Path) -> str:
    """:func:`file_digest`, remembered in ``root/digests.json``, so an unchanged multi-GB file is
    hashed once.

    The memo key is the file's path, size, inode, and modification and status-change times. The
    status-change time (``st_ctime_ns``) moves on every write and cannot be set back, so a file
    rewritten with the same size and its old modification time is hashed again, not served stale.
    A new key replaces the old keys of the same path, so the index holds one key per file.
    """
    stat, resolved = path.stat(), str(path.resolve())
    key = f"{resolved}|{stat.st_size}|{stat.st_ino}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
    index_path = root / "digests.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if not isinstance(index, dict):
        index = {}
    digest = index.get(key)
    if isinstance(digest, str) and _SHA256_HEX.fullmatch(digest):  # a damaged index never names a folder
        return digest
    digest = file_digest(path)
    index = {k: v for k, v in index.items() if k.rsplit("|", 4)[0] != resolved}
    index[key] = digest
    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(index_path, json.dumps(index))
    except OSError:
        pass
    return digest


def cache_root(cache_dir: str | Path | None) -> Path:
    """``cache_dir``, else ``$AEMT_CACHE_DIR``, else ``~/.cache/aemt``."""
    return Path(cache_dir or os.environ.get("AEMT_CACHE_DIR") or Path.home() / ".cache" / "aemt")


def entry_name(digest: str, seq_len: int, text_input: str, kind: str) -> str:
    """The folder name of the pooled splits of a file with SHA-256 ``digest`` read as ``kind``."""
    return f"{digest[:20]}-v{CACHE_VERSION}-{kind}-len{seq_len}-{text_input}"


def write_entry(folder: Path, splits: dict[str, Split], stats: Stats | None = None,
                notes: list[str] | None = None) -> None:
    """Save ``splits`` (and the ``stats`` they were standardised with, and the warnings ``notes``
    that reading the source gave) as the entry ``folder``; if another writer finished first, its
    copy is kept. Raises ``OSError`` (e.g. a read-only folder)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(folder.parent, prefix=folder.name + ".")  # one per writer; mkdir's permissions, to share
    try:
        meta = {}
        for name, s in splits.items():
            for m in MODALITIES:
                np.save(tmp / f"{name}.{m}.npy", s.features[m])
                np.save(tmp / f"{name}.{m}_lengths.npy", s.lengths[m])
            for k, v in (s.labels or {}).items():
                np.save(tmp / f"{name}.label_{k}.npy", v)
            meta[name] = {"ids": s.ids, "raw_text": s.raw_text, "labels": sorted(s.labels or {}),
                          "unimodal_from_multimodal": s.unimodal_from_multimodal, "nonfinite": s.nonfinite}
        if stats is not None:
            np.savez(tmp / "stats.npz", **stats_to_arrays(stats))
        if notes:
            atomic_write_text(tmp / "notes.json", json.dumps(notes))
        atomic_write_text(tmp / "meta.json", json.dumps(meta))  # written last: it marks a whole entry
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():
            raise


def read_entry(folder: Path, with_stats: bool = False) -> tuple[dict[str, Split], Stats | None] | None:
    """The splits (and stats) of the entry ``folder``; None when it is missing. A damaged entry
    (an interrupted writer, a full disk; ``with_stats``: one without its statistics) is removed
    and reads as missing."""
    try:
        entry = _read_files(folder)
        if with_stats and entry is not None and entry[1] is None:
            raise ValueError(f"{folder} has no stats.npz")
        return entry
    except Exception:  # noqa: BLE001 - any damage (EOFError, BadZipFile, ...): the entry is only a cache
        shutil.rmtree(folder, ignore_errors=True)
        return None


def read_notes(folder: Path) -> list[str]:
    """The warnings that reading the source of the entry ``folder`` gave (see :func:`write_entry`)."""
    try:
        notes = json.loads((folder / "notes.json").read_text())
    except (OSError, ValueError):  # none, or damaged: the notes are only a courtesy
        return []
    return [n for n in notes if isinstance(n, str)] if isinstance(notes, list) else []


def _read_files(folder: Path) -> tuple[dict[str, Split], Stats | None] | None:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        if folder.exists():
            raise ValueError(f"{folder} has no meta.json")
        return None
    meta = json.loads(meta_path.read_text())
    splits = {}
    for name, info in meta.items():
        load = lambda stem: np.load(folder / f"{name}.{stem}.npy", mmap_mode="c", allow_pickle=False)  # noqa: E731
        splits[name] = Split(
            name=name,
            features={m: load(m) for m in MODALITIES},
            lengths={m: np.asarray(load(f"{m}_lengths")) for m in MODALITIES},
            ids=info["ids"], raw_text=info["raw_text"],
            labels={k: np.asarray(load(f"label_{k}")) for k in info["labels"]} or None,
            unimodal_from_multimodal=info["unimodal_from_multimodal"], nonfinite=info["nonfinite"],
        )
    stats = None
    if (folder / "stats.npz").is_file():
        with np.load(folder / "stats.npz", allow_pickle=False) as arrays:
            stats = stats_from_arrays(arrays, MODALITIES)
    return splits, stats
