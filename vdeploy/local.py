"""Step 2, for a local folder source: list and hash its files (no network)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from vdeploy.errors import HubError
from vdeploy.hashing import sha256_files
from vdeploy.manifest import canonical_json, sha256_hex
from vdeploy.safety import case_collisions, path_problem


@dataclass(frozen=True)
class LocalFile:
    path: str  # relative, "/"-separated
    source: Path  # the file on disk
    size: int
    sha256: str


def scan_folder(folder: Path, where: str) -> list[LocalFile]:
    """Every regular file under folder, hashed; symlinks must stay inside the folder."""
    if not folder.is_dir():
        raise HubError(f"{where}: {folder} is not a folder")
    root = folder.resolve()
    found: list[tuple[str, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # .git and the .cache/huggingface of an `hf download --local-dir` folder are not model files.
        dirnames[:] = sorted(d for d in dirnames if d not in {".git", ".cache"})
        for name in sorted(filenames):
            full = Path(dirpath) / name
            relative = full.relative_to(root).as_posix()
            problem = path_problem(relative)
            if problem:
                raise HubError(f"{where}: file name {relative!r} {problem}; rename it")
            if full.is_symlink():
                target = full.resolve()
                if not target.is_relative_to(root):
                    raise HubError(f"{where}: {relative} is a symlink to {target}, outside {root}; copy the file in instead")
            info = full.stat()
            if not stat.S_ISREG(info.st_mode):
                continue
            found.append((relative, full, info.st_size))
    clashes = case_collisions([r for r, _, _ in found])
    if clashes:
        a, b = clashes[0]
        raise HubError(f"{where}: {a!r} and {b!r} differ only in case; rename one")
    if not found:
        raise HubError(f"{where}: {folder} holds no files")
    hashes = sha256_files(p for _, p, _ in found)
    return [LocalFile(r, p, s, h) for (r, p, s), h in zip(found, hashes)]


def folder_commit(files: list[LocalFile]) -> str:
    """A 40-hex stand-in for a commit: the hash of the file list, so equal contents give equal ids."""
    listing = [[f.path, f.size, f.sha256] for f in sorted(files, key=lambda f: f.path)]
    return sha256_hex(canonical_json(listing))[:40]
