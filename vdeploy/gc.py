"""Step 4's clean-up: `vdeploy gc` removes from a store what vdeploy placed there and no live
lock pins any more; `gc --roots` lists the locks that use the store.

A root (vdeploy.roots) is live while its lock file exists and pins its files; when the lock was
rewritten, what the new lock pins is live instead; when it was deleted, the root is dead. A
root recorded on another host, or whose lock cannot be read, is kept as it was recorded: gc
cannot tell, so it keeps. Only what placed.log says vdeploy created is ever removed, and then
only where no live root pins it, no snapshot entry left behind still links to it, and no
download holds its lock (huggingface_hub and vdeploy take the same per-blob lock).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vdeploy.constants import to_stderr
from vdeploy.errors import StoreError
from vdeploy.roots import RootRecord, pins_of, read_placed, read_root, rewrite_placed, roots_dir, store_exclusive, this_host
from vdeploy.safety import path_problem
from vdeploy.store import Fingerprints, Store

_REPO = r"models--[A-Za-z0-9][A-Za-z0-9._-]*(?:--[A-Za-z0-9][A-Za-z0-9._-]*)*"
_PLACED = re.compile(rf"(?P<repo>{_REPO})/(?:blobs/(?P<blob>[0-9a-f]{{40}}|[0-9a-f]{{64}})|snapshots/[0-9a-f]{{40}}/.+|refs/.+)")
_TEMPLATES = ".locks/vdeploy/chat-templates"
# Names vdeploy gives files while it places them: left only by a run that was killed.
_VDEPLOY_STAGING = re.compile(r"(?P<blob>[0-9a-f]{40}|[0-9a-f]{64})\.vdeploy-[a-z0-9-]+")
_PARTIAL = re.compile(r"(?P<blob>[0-9a-f]{40}|[0-9a-f]{64})\.incomplete")



@dataclass(frozen=True)
class RootState:
    record: RootRecord
    path: Path  # the record's file
    state: str  # live, changed (the lock was rewritten: what it pins now is live), dead, kept
    why: str
    live_pins: frozenset[str]

    def to_json(self) -> dict[str, object]:
        return {
            "lock": self.record.lock_path, "host": self.record.host, "state": self.state, "why": self.why,
            "deployment": self.record.deployment, "pins": len(self.record.pins),
        }


def root_states(store: Store) -> list[RootState]:
    states = []
    folder = roots_dir(store)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = read_root(path)
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(f"{path}: not a readable root record ({exc}); remove it, then run `vdeploy fetch` in each project using this store") from None
        states.append(_state(record, path))
    return states


def _state(record: RootRecord, path: Path) -> RootState:
    recorded = frozenset(record.pins)
    if record.host != this_host():
        return RootState(record, path, "kept", f"recorded on host {record.host}; gc there decides", recorded)
    try:
        raw = Path(record.lock_path).read_bytes()
    except FileNotFoundError:
        return RootState(record, path, "dead", "its lock was deleted", frozenset())
    except OSError as exc:
        return RootState(record, path, "kept", f"its lock cannot be read ({exc.strerror})", recorded)
    if hashlib.sha256(raw).hexdigest() == record.lock_sha256:
        return RootState(record, path, "live", "", recorded)
    from vdeploy.lockfile import LockError, loads_lock

    try:
        current = frozenset(pins_of(loads_lock(raw.decode("utf-8"), record.lock_path, older=True)))
    except (LockError, UnicodeDecodeError) as exc:
        return RootState(record, path, "kept", f"its lock changed and cannot be read ({exc})", recorded)
    return RootState(record, path, "changed", "its lock was rewritten; what it pins now is kept", current)


@dataclass
class GcReport:
    store: Path
    dry_run: bool
    roots: list[RootState] = field(default_factory=list)
    removed: list[tuple[str, int]] = field(default_factory=list)  # (store path, bytes)
    in_use: list[str] = field(default_factory=list)  # a download holds its lock: kept
    still_linked: list[str] = field(default_factory=list)  # a snapshot entry vdeploy did not place links to it
    shared_bytes: int = 0  # of the bytes removed, those other hard links (a bundle folder) keep on disk

    @property
    def removed_bytes(self) -> int:
        return sum(size for _, size in self.removed)

    def to_json(self) -> dict[str, object]:
        return {
            "store": str(self.store), "dry_run": self.dry_run, "roots": [r.to_json() for r in self.roots],
            "removed": [{"path": p, "bytes": b} for p, b in self.removed], "removed_bytes": self.removed_bytes,
            "in_use": self.in_use, "still_linked": self.still_linked, "shared_bytes": self.shared_bytes,
        }


def store_for(manifest_arg: str | os.PathLike[str] | None, store_arg: Path | None) -> Store:
    """--store, else the manifest's store (the argument, or ./vdeploy.toml), else the HF cache."""
    from vdeploy.constants import MANIFEST_NAME, default_hf_cache
    from vdeploy.manifest import load_manifest

    if store_arg is not None:
        return Store(Path(store_arg).resolve())
    if manifest_arg is not None or Path(MANIFEST_NAME).is_file():
        return Store(load_manifest(manifest_arg).store_path())
    return Store(default_hf_cache())


def collect(store: Store, dry_run: bool = False, say: Callable[[str], None] = to_stderr) -> GcReport:
    """Remove (or, dry, list) what vdeploy placed in the store and no live root pins."""
    report = GcReport(store.root, dry_run)
    if not store.meta_dir.is_dir():
        return report  # vdeploy never placed anything here
    with store_exclusive(store, say):
        report.roots = root_states(store)
        live: set[str] = set()
        for root in report.roots:
            live |= root.live_pins
        inside = _inside(store)
        placed = read_placed(store)
        garbage = {p for p in placed if p not in live and inside(p)}  # those gone already are skipped
        garbage |= _unpinned_templates(store, live)
        pinned_by_dead = {p for r in report.roots if r.state == "dead" for p in r.record.pins}
        leftovers = _leftovers(store, live, pinned_by_dead | placed)
        _remove(store, garbage, leftovers, report)
        if not dry_run:
            for root in report.roots:
                if root.state == "dead":
                    root.path.unlink(missing_ok=True)
            removed = {p for p, _ in report.removed}
            rewrite_placed(store, {p for p in placed - removed if inside(p) and os.path.lexists(os.path.join(store.root, p))})
    return report


def _inside(store: Store) -> Callable[[str], bool]:
    """Whether a placed.log line names a file vdeploy places in this store (the log is only a
    file: it might have been edited) in a folder that does not lead out of it through a link."""
    root = os.path.realpath(store.root)
    folders: dict[str, bool] = {}

    def inside(relative: str) -> bool:
        match = _PLACED.fullmatch(relative)
        # A blob's name is all hex (the pattern says so); other names are checked like a repo's.
        if match is None or (match["blob"] is None and path_problem(relative)):
            return False
        folder = os.path.dirname(relative)
        if folder not in folders:
            real = os.path.realpath(os.path.join(store.root, folder))
            folders[folder] = real == root or real.startswith(root + os.sep)
        return folders[folder]

    return inside


def _unpinned_templates(store: Store, live: set[str]) -> set[str]:
    folder = store.root / _TEMPLATES
    if not folder.is_dir():
        return set()
    return {f"{_TEMPLATES}/{e.name}" for e in os.scandir(folder)
            if e.is_file(follow_symlinks=False) and f"{_TEMPLATES}/{e.name}" not in live}


def _leftovers(store: Store, live: set[str], vdeploy_blobs: set[str]) -> set[str]:
    """Staging files a killed vdeploy left, and partial downloads of blobs only dead or removed
    vdeploy locks wanted (another tool's partial download of a blob no lock of ours names stays)."""
    found = set()
    repos = {p.split("/", 1)[0] for p in vdeploy_blobs if p.startswith("models--")}
    for repo in sorted(repos):
        blobs = store.root / repo / "blobs"
        if not blobs.is_dir() or blobs.is_symlink():
            continue
        for entry in os.scandir(blobs):
            if "." not in entry.name:
                continue  # a blob: hex only
            staging = _VDEPLOY_STAGING.fullmatch(entry.name)
            partial = _PARTIAL.fullmatch(entry.name)
            if staging or (partial and f"{repo}/blobs/{partial['blob']}" in vdeploy_blobs):
                blob = f"{repo}/blobs/{(staging or partial)['blob']}"  # type: ignore[index]
                if blob not in live or staging:
                    found.add(f"{repo}/blobs/{entry.name}")
    return found


def _remove(store: Store, garbage: set[str], leftovers: set[str], report: GcReport) -> None:
    """Snapshot entries first, then refs to snapshots left empty, then blobs nothing links to."""
    entries = sorted(p for p in garbage if "/snapshots/" in p)
    refs = sorted(p for p in garbage if "/refs/" in p)
    blobs = sorted(p for p in garbage if "/blobs/" in p)
    templates = sorted(p for p in garbage if p.startswith(_TEMPLATES))
    survivors, linked = _survivors(store, {p.split("/", 1)[0] for p in garbage if p.startswith("models--")}, set(entries))
    fingerprints = Fingerprints(store)
    for path in entries + templates:
        _unlink(store, path, report)
    for path in refs:
        repo = path.split("/", 1)[0]
        try:
            commit = (store.root / path).read_text().strip()
        except OSError:
            continue
        if survivors.get((repo, commit), 0) == 0:
            _unlink(store, path, report)
    for path in blobs + sorted(leftovers):
        repo, _, name = path.partition("/blobs/")
        blob = re.match(r"[0-9a-f]+", name)[0]  # type: ignore[index]
        if name == blob and blob in linked.get(repo, set()):
            report.still_linked.append(path)
            continue
        if report.dry_run:
            _unlink(store, path, report)
            continue
        with _unless_locked(store, repo, blob) as free:
            if not free:
                report.in_use.append(path)
            elif _unlink(store, path, report) and name == blob:
                fingerprints.forget(store.root / path)
    if not report.dry_run:
        fingerprints.save()
        for repo in sorted({p.split("/", 1)[0] for p in garbage | leftovers if p.startswith("models--")}):
            _remove_empty_folders(store.root / repo)


@contextmanager
def _unless_locked(store: Store, repo: str, blob: str) -> Iterator[bool]:
    """Hold the blob's lock (the one huggingface_hub and vdeploy take while writing it) if no one
    does; yields False when a download holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): through filelock, slower
        lock = store.named_blob_lock(repo, blob)
        try:
            lock.acquire(timeout=0)
        except Exception:  # filelock.Timeout
            yield False
            return
        try:
            yield True
        finally:
            lock.release()
        return
    path = store.root / ".locks" / repo / f"{blob}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what filelock's UnixFileLock takes
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _survivors(store: Store, repos: set[str], going: set[str]) -> tuple[dict[tuple[str, str], int], dict[str, set[str]]]:
    """Per (repo, commit) the snapshot entries that stay, and per repo the blobs they link to."""
    survivors: dict[tuple[str, str], int] = {}
    linked: dict[str, set[str]] = {}
    for repo in repos:
        snapshots = store.root / repo / "snapshots"
        if not snapshots.is_dir():
            continue
        start = len(str(store.root)) + 1
        for full, is_link in _entries(str(snapshots)):
            relative = full[start:].replace(os.sep, "/")
            if relative in going:
                continue
            commit = relative.split("/", 3)[2]
            survivors[(repo, commit)] = survivors.get((repo, commit), 0) + 1
            if is_link:
                linked.setdefault(repo, set()).add(os.path.basename(os.readlink(full)))
    return survivors, linked


def _entries(folder: str) -> Iterator[tuple[str, bool]]:
    """Every file or link under folder, and whether it is a link; links are not followed
    (os.walk would stat every link's target: a blob, once per snapshot entry)."""
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            yield from _entries(entry.path)
        else:
            yield entry.path, entry.is_symlink()


def _unlink(store: Store, relative: str, report: GcReport) -> bool:
    """Remove (or, dry, count) one file or link; False when it is gone already."""
    path = os.path.join(store.root, relative)  # os.path, not pathlib: once per file of the store
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    size = 0 if stat.S_ISLNK(info.st_mode) else info.st_size
    if info.st_nlink > 1 and size:
        report.shared_bytes += size
    report.removed.append((relative, size))
    if not report.dry_run:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return True


def _remove_empty_folders(repo: Path) -> None:
    """Folders gc emptied (snapshot subfolders, then the repo's own if nothing is left in it)."""
    if not repo.is_dir() or repo.is_symlink():
        return
    for dirpath, _, _ in sorted(os.walk(repo), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass  # not empty: someone's files are there
