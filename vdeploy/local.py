"""Step 2, for a local folder source: list its files and hash the chosen ones (no network)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from vdeploy.errors import SourceError
from vdeploy.hashing import sha256_files
from vdeploy.manifest import canonical_json, sha256_hex


@dataclass(frozen=True)
class LocalFile:
    path: str  # relative, "/"-separated
    source: Path  # the file on disk
    size: int
    sha256: str


def list_folder(folder: Path, where: str) -> dict[str, tuple[Path, int]]:
    """Every regular file under folder (relative path → file, size); symlinks must stay inside."""
    if not folder.is_dir():
        raise SourceError(f"{where}: {folder} is not a folder")
    root = folder.resolve()
    found: dict[str, tuple[Path, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        # .git and the .cache/huggingface of an `hf download --local-dir` folder are not model files.
        dirnames[:] = sorted(d for d in dirnames if d not in {".git", ".cache"})
        for name in sorted(filenames):
            full = Path(dirpath) / name
            relative = full.relative_to(root).as_posix()
            if full.is_symlink():
                target = full.resolve()
                if not target.is_relative_to(root):
                    raise SourceError(f"{where}: {relative} is a symlink to {target}, outside {root}; copy the file in instead")
            info = full.stat()
            if stat.S_ISREG(info.st_mode):
                found[relative] = (full, info.st_size)
    if not found:
        raise SourceError(f"{where}: {folder} holds no files")
    return found


def hash_files(listing: dict[str, tuple[Path, int]], chosen: list[str]) -> list[LocalFile]:
    """The chosen files of a listing, hashed (one thread per core)."""
    hashes = sha256_files(listing[p][0] for p in chosen)
    return [LocalFile(p, listing[p][0], listing[p][1], h) for p, h in zip(chosen, hashes)]


def folder_commit(files: list[LocalFile]) -> str:
    """A 40-hex stand-in for a commit: the hash of the file list, so equal contents give equal ids."""
    listing = [[f.path, f.size, f.sha256] for f in sorted(files, key=lambda f: f.path)]
    return sha256_hex(canonical_json(listing))[:40]
