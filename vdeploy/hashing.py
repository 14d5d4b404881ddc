"""Content hashes: sha256 of files, read in large blocks, in parallel across files."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Large reads keep the syscall count low; hashlib releases the GIL on blocks this size,
# so threads hash different files on different cores.
BLOCK_SIZE = 8 * 1024 * 1024


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(BLOCK_SIZE)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as stream:
        if hasattr(os, "posix_fadvise"):
            # Doubles the kernel's read-ahead for files not in the page cache.
            os.posix_fadvise(stream.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while count := stream.readinto(buffer):
            digest.update(view[:count])
            if on_bytes is not None:
                on_bytes(count)
    return digest.hexdigest()


def sha256_files(paths: Iterable[Path], workers: int | None = None) -> list[str]:
    """sha256 of each path, in order, hashed by one thread per core."""
    paths = list(paths)
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(sha256_file, paths))


def git_blob_id(data: bytes) -> str:
    """The id git (and the Hub's tree listing) gives a file's bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
