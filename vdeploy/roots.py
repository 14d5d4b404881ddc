"""Step 4's bookkeeping, for `vdeploy gc`: which locks use a store (its roots) and which of its
files vdeploy itself placed there.

    <root>/.locks/vdeploy/roots/<sha256 of host and lock path>.json   one per lock used with the store
    <root>/.locks/vdeploy/placed.log                                  store paths vdeploy created, one a line
    <root>/.locks/vdeploy/store-use.lock                              shared by lock/fetch/up/unbundle, exclusive for gc

`lock`, `fetch`, `up` (and so `run`) and `unbundle` record their lock as a root before they place
anything, and append what they created (a blob, a snapshot entry, a ref that was not there
before) to placed.log after. Both happen under a shared lock that gc takes exclusively, so gc
never sees half of a fetch, and a fetch that starts while gc runs waits, then finds what gc
removed missing and places it again. A file that was already there when vdeploy came (put by
`hf download`, vLLM or transformers into a shared Hugging Face cache) is never recorded as placed,
so gc never removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vdeploy.atomic import write_atomically
from vdeploy.lockfile import Lock
from vdeploy.store import Store

ROOT_FORMAT = 1
_RELATIVE = Store(Path("."))  # the store layout's own path functions, giving store-relative paths


@dataclass(frozen=True)
class RootRecord:
    """A lock that used this store, and what it pinned there when it did."""

    lock_path: str  # absolute, on `host`
    lock_sha256: str
    deployment: str
    host: str
    pins: tuple[str, ...]  # store-relative paths, sorted

    def to_json(self) -> dict[str, object]:
        return {
            "format": ROOT_FORMAT, "lock": self.lock_path, "lock_sha256": self.lock_sha256,
            "deployment": self.deployment, "host": self.host, "pins": list(self.pins),
        }


def pins_of(lock: Lock) -> list[str]:
    """Every store path a lock needs: its blobs, snapshot entries, refs and chat template. Pure."""
    pins = set()
    for source in lock.sources:
        for file in source.files:
            pins.add(_RELATIVE.blob_path(source, file).as_posix())
            pins.add(_RELATIVE.snapshot_path(source, file).as_posix())
        if not source.is_local and source.revision and source.revision != source.commit:
            pins.add((_RELATIVE.repo_dir(source) / "refs" / source.revision).as_posix())
    if lock.chat_template is not None:
        pins.add(_RELATIVE.chat_template_path(lock.chat_template.sha256).as_posix())
    return sorted(pins)


def roots_dir(store: Store) -> Path:
    return store.meta_dir / "roots"


def placed_log(store: Store) -> Path:
    return store.meta_dir / "placed.log"


def this_host() -> str:
    return socket.gethostname()


def root_file(store: Store, lock_path: Path, host: str | None = None) -> Path:
    key = f"{host or this_host()}\0{os.path.abspath(lock_path)}"
    return roots_dir(store) / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def record_root(store: Store, lock_path: Path, lock_bytes: bytes, lock: Lock) -> None:
    """Record (or refresh) lock_path as a root of the store; writes nothing when it is current."""
    record = RootRecord(
        lock_path=os.path.abspath(lock_path), lock_sha256=hashlib.sha256(lock_bytes).hexdigest(),
        deployment=lock.deployment, host=this_host(), pins=tuple(pins_of(lock)),
    )
    data = json.dumps(record.to_json(), indent=1).encode()
    path = root_file(store, lock_path)
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    write_atomically(path, data)


def read_root(path: Path) -> RootRecord:
    """A root record; ValueError when it is not one."""
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict) or data.get("format") != ROOT_FORMAT:
        raise ValueError("not a root record of this vdeploy")
    pins = data["pins"]
    if not isinstance(pins, list) or not all(isinstance(p, str) for p in pins):
        raise ValueError("pins is not a list of paths")
    return RootRecord(
        lock_path=str(data["lock"]), lock_sha256=str(data["lock_sha256"]), deployment=str(data["deployment"]),
        host=str(data["host"]), pins=tuple(pins),
    )


def read_placed(store: Store) -> set[str]:
    try:
        text = placed_log(store).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return set()
    return {line for line in text.splitlines() if line}


def append_placed(store: Store, paths: list[str]) -> None:
    if not paths:
        return
    log = placed_log(store)
    log.parent.mkdir(parents=True, exist_ok=True)
    # One write with O_APPEND: lines from processes placing at the same time never interleave.
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, "".join(f"{p}\n" for p in paths).encode())
    finally:
        os.close(fd)


def rewrite_placed(store: Store, paths: set[str]) -> None:
    """Replace the log (gc, holding the store exclusively)."""
    write_atomically(placed_log(store), "".join(f"{p}\n" for p in sorted(paths)).encode())


# ---- the store-use lock -------------------------------------------------------------------------


@contextmanager
def _store_lock(store: Store, exclusive: bool, say: Callable[[str], None] | None = None) -> Iterator[bool]:
    """flock on the store's use lock; yields False (and locks nothing) where the store cannot be
    written, as a read-only model volume: nothing is placed there and gc cannot run there."""
    path = store.meta_dir / "store-use.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if exclusive:
            raise
        yield False
        return
    try:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): one vdeploy at a time instead
            from filelock import FileLock

            with FileLock(str(path) + ".excl"):
                yield True
            return
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if say is not None:
                say("waiting for the other vdeploy commands using this store (fetch, lock, unbundle, gc) to finish")
            fcntl.flock(fd, mode)
        yield True
    finally:
        os.close(fd)  # releases the flock


def store_exclusive(store: Store, say: Callable[[str], None] | None = None):
    return _store_lock(store, True, say)


@contextmanager
def using_store(store: Store, lock_path: Path, lock: Lock, lock_bytes: bytes | None = None) -> Iterator[None]:
    """Around anything that places files for a lock: record the lock as a root first, then what
    was placed (paths the lock pins that did not exist before), even when it stops half-way."""
    with _store_lock(store, exclusive=False) as writable:
        if not writable:
            yield
            return
        record_root(store, lock_path, lock_path.read_bytes() if lock_bytes is None else lock_bytes, lock)
        candidates = pins_of(lock)
        before = {p for p in candidates if os.path.lexists(store.root / p)}
        try:
            yield
        finally:
            append_placed(store, [p for p in candidates if p not in before and os.path.lexists(store.root / p)])


def record_use(store: Store, lock_path: Path, lock: Lock) -> None:
    """Record a lock that uses the store without placing anything (`up` on a complete store)."""
    with _store_lock(store, exclusive=False) as writable:
        if writable:
            try:
                record_root(store, lock_path, lock_path.read_bytes(), lock)
            except OSError:
                pass  # a store this user may read but not write: nothing to collect there
