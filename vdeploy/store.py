"""Step 4 of the flow: the store, a download-dir in the Hugging Face cache layout.

    <root>/models--org--name/blobs/<blob>                 the bytes, named by content
    <root>/models--org--name/snapshots/<commit>/<path>    relative symlinks into blobs/
    <root>/models--org--name/refs/<branch or tag>         the locked commit (as `hf download` writes)
    <root>/.locks/models--org--name/<blob>.lock           per-blob file locks (as huggingface_hub)
    <root>/.locks/vdeploy/fingerprints.json               files already hashed: size, mtime, ctime, inode
    <root>/.locks/vdeploy/chat-templates/<sha256>.jinja   locked chat templates

vdeploy's own files live under .locks/ because that is the one folder of the cache root that
huggingface_hub's cache tools (`hf cache scan`) skip instead of reporting as a corrupted repo.

A file appears in a snapshot only after its sha256 matched the lock: every blob, downloaded,
imported from a folder, linked from another repo or kept from `lock`, is published by one
function (`_publish`) that checks it first. Downloads go to blobs/<blob>.incomplete, so a killed
fetch resumes and never leaves a bad file in view.

The snapshot folders of the commits a lock pins are vLLM's model folders, and vLLM loads what
is in them, so fetch keeps them to exactly the locked files: it removes any other link in them
(the blob stays, so huggingface_hub re-links it without a download if another tool asks for the
file), and refuses, naming it, anything else there that it did not put there.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vdeploy.atomic import write_atomically
from vdeploy.constants import to_stderr
from vdeploy.errors import StoreError
from vdeploy.hashing import sha256_file, sha256_stored_file
from vdeploy.lockfile import Lock, LockedChatTemplate, LockedFile, LockedSource

FETCH_WORKERS = 4


@dataclass(frozen=True)
class Store:
    root: Path

    def repo_dir(self, source: LockedSource) -> Path:
        return self.root / source.name

    def blob_path(self, source: LockedSource, file: LockedFile) -> Path:
        return self.root / source.name / "blobs" / file.blob

    def snapshot_dir(self, source: LockedSource) -> Path:
        return self.root / source.name / "snapshots" / source.commit

    def snapshot_path(self, source: LockedSource, file: LockedFile) -> Path:
        return self.snapshot_dir(source) / file.path

    def chat_template_path(self, sha256: str) -> Path:
        return self.meta_dir / "chat-templates" / f"{sha256}.jinja"

    @property
    def meta_dir(self) -> Path:
        return self.root / ".locks" / "vdeploy"

    def blob_lock(self, source: LockedSource, file: LockedFile):
        return self.named_blob_lock(source.name, file.blob)

    def named_blob_lock(self, repo_name: str, blob: str):
        """The lock huggingface_hub and vdeploy take while they write blobs/<blob> of a repo."""
        from filelock import FileLock

        lock_path = self.root / ".locks" / repo_name / f"{blob}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(lock_path))


# ---- fingerprints: "this inode, this size, this mtime and ctime was hashed and gave this sha256" ------


class Fingerprints:
    """The record of files already hashed, so a fast verify need not read them again."""

    def __init__(self, store: Store) -> None:
        self.path = store.meta_dir / "fingerprints.json"
        self.records: dict[str, list] = {}
        self.changed: dict[str, list] = {}
        self._mutex = threading.Lock()
        try:
            self.records = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.records = {}

    @staticmethod
    def _key(blob: str | os.PathLike[str]) -> str:
        # os.path, not pathlib: fast verify calls this once per file.
        blob = os.fspath(blob)
        return f"{os.path.basename(os.path.dirname(os.path.dirname(blob)))}/{os.path.basename(blob)}"

    @staticmethod
    def _stamp(info: os.stat_result, sha256: str) -> list:
        # ctime too: writing a file in place and restoring its mtime (touch -d) cannot restore it.
        return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, sha256]

    def matches(self, blob: str | os.PathLike[str], info: os.stat_result, sha256: str) -> bool:
        return self.records.get(self._key(blob)) == self._stamp(info, sha256)

    def record(self, blob: str | os.PathLike[str], sha256: str) -> None:
        info = os.stat(blob)
        with self._mutex:
            self.changed[self._key(blob)] = self._stamp(info, sha256)

    def forget(self, blob: str | os.PathLike[str]) -> None:
        with self._mutex:
            self.changed[self._key(blob)] = None  # type: ignore[assignment]

    def save(self) -> None:
        """Merge this run's records into the file, under a lock, atomically."""
        if not self.changed:
            return
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            try:
                current = json.loads(self.path.read_text())
            except (OSError, ValueError):
                current = {}
            for key, value in self.changed.items():
                if value is None:
                    current.pop(key, None)
                else:
                    current[key] = value
            write_atomically(self.path, json.dumps(current, sort_keys=True).encode())
        self.records = current
        self.changed = {}


# ---- verify ------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    checked: int = 0
    hashed_bytes: int = 0
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatched or self.extra)

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok, "checked": self.checked, "missing": self.missing,
            "mismatched": self.mismatched, "extra": self.extra,
        }

    def problems(self) -> list[str]:
        return (
            [f"missing: {p}" for p in self.missing]
            + [f"mismatch: {p}" for p in self.mismatched]
            + [f"extra: {p}" for p in self.extra]
        )


def _linked_blob(store: Store, source: LockedSource, file: LockedFile) -> Path | None:
    """The blob a snapshot entry stands for, if it is a link into this repo's blobs/ (or None)."""
    blob = _entry_blob(str(store.snapshot_path(source, file)), str(store.repo_dir(source) / "blobs"))
    return None if blob is None else Path(blob)


def _entry_blob(entry: str, blobs: str) -> str | None:
    """_linked_blob on plain strings (fast verify calls it once per file; pathlib is slow)."""
    try:
        target = os.readlink(entry)
    except FileNotFoundError:
        return None
    except OSError:
        # A plain file (no symlink support): it is its own blob.
        return entry if os.path.isfile(entry) else None
    resolved = os.path.normpath(os.path.join(os.path.dirname(entry), target))
    if os.path.dirname(resolved) != blobs:
        raise StoreError(f"{entry}: links to {target}, outside {blobs}; remove it and run `vdeploy fetch`")
    return resolved


def verify(lock: Lock, store: Store, full: bool = False) -> VerifyReport:
    """Check every locked file in the store: fast (fingerprints, else hash) or full (hash all)."""
    report = VerifyReport()
    fingerprints = Fingerprints(store)
    to_hash: list[tuple[str, str, LockedFile | None]] = []
    locked = locked_by_snapshot(store, lock.sources)
    for source in lock.sources:
        snapshot = str(store.snapshot_dir(source))
        blobs = str(store.repo_dir(source) / "blobs")
        link = snapshot_link(store, source)
        if link is not None:
            # vLLM would read the files wherever the link points; none of them is checked here.
            report.checked += len(source.files)
            report.mismatched.append(f"{source.role}: snapshots/{source.commit} (reached through the link {link})")
            continue
        for file in source.files:
            report.checked += 1
            try:
                blob = _entry_blob(os.path.join(snapshot, file.path), blobs)
            except StoreError:
                report.mismatched.append(f"{_label(source, file)} (links outside the store's blobs/)")
                continue
            try:
                info = os.stat(blob) if blob is not None else None
            except FileNotFoundError:
                info = None
            if info is None:
                report.missing.append(_label(source, file))
            elif info.st_size != file.size:
                report.mismatched.append(_label(source, file))
            elif full or not fingerprints.matches(blob, info, file.sha256):
                to_hash.append((_label(source, file), blob, file))
        snapshot = str(store.snapshot_dir(source))
        if snapshot in locked:  # once per folder: sources pinning one commit share it
            report.extra.extend(f"{source.role}: {path}" for path in _extra_in_snapshot(snapshot, locked.pop(snapshot)))
    if lock.chat_template is not None:
        report.checked += 1
        template = store.chat_template_path(lock.chat_template.sha256)
        if not template.is_file():
            report.missing.append(f"chat-template {lock.chat_template.sha256[:12]}")
        else:
            to_hash.append((f"chat-template {template.name}", str(template), None))

    def check(item: tuple[str, str, LockedFile | None]) -> tuple[str, bool]:
        label, path, file = item
        digest = sha256_stored_file(Path(path))
        expected = file.sha256 if file is not None else lock.chat_template.sha256  # type: ignore[union-attr]
        if file is not None:
            if digest == expected:
                fingerprints.record(path, digest)
            else:
                # No longer trusted, so that `vdeploy fetch` re-checks and replaces it.
                fingerprints.forget(path)
        return label, digest == expected

    if to_hash:
        with ThreadPoolExecutor(max_workers=min(len(to_hash), os.cpu_count() or 1)) as pool:
            for label, good in pool.map(check, _largest_first(to_hash)):
                if not good:
                    report.mismatched.append(label)
    report.hashed_bytes = sum(os.stat(p).st_size for _, p, _ in to_hash)
    fingerprints.save()
    report.mismatched.sort()
    return report


def _largest_first(items: list[tuple[str, str, LockedFile | None]]) -> list:
    # Big shards first, so no core idles at the end waiting on one late large file.
    return sorted(items, key=lambda item: -(item[2].size if item[2] is not None else 0))


def _label(source: LockedSource, file: LockedFile) -> str:
    return f"{source.role}: {file.path}"


def snapshot_link(store: Store, source: LockedSource) -> str | None:
    """A link at snapshots/ or snapshots/<commit> of a source's folder (its path), or None. Through
    one, vLLM would read files elsewhere than where their links are checked."""
    repo = str(store.repo_dir(source))
    for path in (os.path.join(repo, "snapshots"), os.path.join(repo, "snapshots", source.commit)):
        if os.path.islink(path):
            return path
    return None


def locked_by_snapshot(store: Store, sources: list[LockedSource]) -> dict[str, set[str]]:
    """Each snapshot folder the sources pin → the paths locked in it (a model and a tokenizer
    from one commit share one folder)."""
    locked: dict[str, set[str]] = {}
    for source in sources:
        locked.setdefault(str(store.snapshot_dir(source)), set()).update(f.path for f in source.files)
    return locked


def _extra_in_snapshot(snapshot: str, locked: set[str]) -> list[str]:
    """Paths in a snapshot folder that are not locked files: files, and links to folders (which
    os.walk does not enter, and through which vLLM would read whatever they point at)."""
    if not os.path.isdir(snapshot):
        return []
    extra = []
    prefix = len(snapshot) + 1
    for dirpath, dirnames, filenames in os.walk(snapshot):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            relative = os.path.join(dirpath, name)[prefix:].replace(os.sep, "/")
            if relative not in locked:
                extra.append(relative)
    return sorted(extra)


# ---- fetch -------------------------------------------------------------------------------


@dataclass
class FetchReport:
    present: int = 0  # already in the snapshot and verified
    reused: int = 0  # blob found elsewhere in the store
    downloaded: int = 0
    downloaded_bytes: int = 0
    imported: int = 0  # copied from a local folder
    removed: int = 0  # links in a locked snapshot that the lock does not list


Downloader = Callable[[LockedSource, LockedFile, Path], None]


def fetch(
    sources: list[LockedSource],
    store: Store,
    chat_template: LockedChatTemplate | None = None,
    template_bytes: bytes | None = None,
    local_folders: dict[str, Path] | None = None,
    say: Callable[[str], None] = to_stderr,
) -> FetchReport:
    """Put every locked file into the store, verified, and link it into its snapshot."""
    report = FetchReport()
    fingerprints = Fingerprints(store)
    mutex = threading.Lock()
    stop = threading.Event()
    jobs = [(source, file) for source in sources for file in source.files]
    locked = locked_by_snapshot(store, sources)
    # First, so that no link to a folder elsewhere is followed when the locked files are linked.
    for source in sources:
        link = snapshot_link(store, source)
        if link is not None and link.endswith(source.commit):
            os.unlink(link)
            say(f"  removed {link}, a link where the snapshot folder belongs")
        elif link is not None:
            raise StoreError(f"{link}: a link where the snapshots folder belongs; move it aside and run `vdeploy fetch`")
    for snapshot, paths in locked.items():
        report.removed += _remove_extra_links(snapshot, paths, say)

    def place(job: tuple[LockedSource, LockedFile]) -> None:
        source, file = job
        how = _place_file(store, source, file, fingerprints, (local_folders or {}).get(source.role), stop)
        with mutex:
            setattr(report, how, getattr(report, how) + 1)
            if how == "downloaded":
                report.downloaded_bytes += file.size
        if how != "present":
            say(f"  {how} {_label(source, file)} ({_human(file.size)})")

    pool = ThreadPoolExecutor(max_workers=FETCH_WORKERS)
    try:
        for _ in pool.map(place, sorted(jobs, key=lambda j: -j[1].size)):
            pass
    except BaseException:
        # Ctrl-C (or a failed file): downloads under way stop at their next chunk, keeping their
        # .incomplete files to resume from, and no new one starts.
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        fingerprints.save()
    if chat_template is not None:
        _place_chat_template(store, chat_template.sha256, template_bytes)
    for source in sources:
        write_ref(store, source)
    for snapshot, paths in locked.items():
        foreign = _extra_in_snapshot(snapshot, paths)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise StoreError(
                f"{os.path.join(snapshot, foreign[0])}{more}: not in the lock, and not a link vdeploy can drop; "
                "vLLM loads this whole folder, so move it out and run `vdeploy fetch` again"
            )
    return report


def _remove_extra_links(snapshot: str, locked: set[str], say: Callable[[str], None]) -> int:
    """Remove the links in a locked snapshot folder that the lock does not list (only links: the
    blobs they point at stay), then the folders they leave empty. The number removed."""
    removed = 0
    for relative in _extra_in_snapshot(snapshot, locked):
        path = os.path.join(snapshot, relative)
        if os.path.islink(path):
            os.unlink(path)
            removed += 1
            say(f"  removed {relative} from {snapshot} (not in the lock)")
    for dirpath, _, _ in sorted(os.walk(snapshot), key=lambda entry: -len(entry[0])):
        if dirpath != snapshot and not os.listdir(dirpath):
            os.rmdir(dirpath)
    return removed


def write_ref(store: Store, source: LockedSource) -> None:
    """refs/<revision> → the locked commit, for a source locked from a branch or tag, so that
    huggingface_hub and transformers offline find the locked snapshot by the revision's name."""
    revision = source.revision
    if source.is_local or not revision or revision == source.commit:
        return
    ref = store.repo_dir(source) / "refs" / revision
    try:
        if ref.read_text() == source.commit:
            return
    except OSError:
        pass
    write_atomically(ref, source.commit.encode())


def _place_file(
    store: Store, source: LockedSource, file: LockedFile, fingerprints: Fingerprints, local_folder: Path | None,
    stop: threading.Event,
) -> str:
    blob = store.blob_path(source, file)
    entry = store.snapshot_path(source, file)
    with store.blob_lock(source, file):
        try:
            linked = _linked_blob(store, source, file)
        except StoreError:
            linked = None  # a link out of blobs/: _link below points it back into the store
        if linked == blob and _blob_is_good(blob, file, fingerprints):
            return "present"
        how = "present"
        if not _blob_is_good(blob, file, fingerprints):
            blob.parent.mkdir(parents=True, exist_ok=True)
            if _reuse_blob_from_elsewhere(store, source, file, blob, fingerprints):
                how = "reused"
            elif source.is_local:
                _import_local_file(source, file, blob, local_folder)
                how = "imported"
            else:
                if stop.is_set():
                    raise FetchStopped()
                _download_blob(source, file, blob, stop)
                how = "downloaded"
            fingerprints.record(blob, file.sha256)
        _link(entry, blob, store.meta_dir / "links")
        return how


def _blob_is_good(blob: Path, file: LockedFile, fingerprints: Fingerprints) -> bool:
    try:
        info = blob.stat()
    except FileNotFoundError:
        return False
    if info.st_size != file.size:
        return False
    if fingerprints.matches(blob, info, file.sha256):
        return True
    if sha256_file(blob) == file.sha256:
        fingerprints.record(blob, file.sha256)
        return True
    # A blob with wrong bytes (e.g. from an unverified download by another tool): drop it.
    blob.unlink()
    fingerprints.forget(blob)
    return False


def _publish(staged: Path, blob: Path, file: LockedFile, refused: Callable[[str], str], digest: str | None = None) -> None:
    """Move a staged blob into place if its sha256 is the locked one; else delete it and raise
    StoreError(refused(actual sha256)). The one way bytes enter blobs/."""
    digest = digest or sha256_file(staged)
    if digest != file.sha256:
        staged.unlink(missing_ok=True)
        raise StoreError(refused(digest))
    os.replace(staged, blob)


def keep_blobs(store: Store, sources: list[LockedSource], known: dict[tuple[str, str], bytes]) -> None:
    """Store bytes already read (small files `lock` hashed) as blobs, so fetch need not download
    them again. Their snapshot links are made by fetch, like any other file's."""
    for source in sources:
        for file in source.files:
            data = known.get((source.name, file.blob))
            if data is None:
                continue
            blob = store.blob_path(source, file)
            with store.blob_lock(source, file):
                if blob.is_file() and blob.stat().st_size == file.size:
                    continue
                blob.parent.mkdir(parents=True, exist_ok=True)
                staged = blob.with_name(blob.name + ".incomplete")
                staged.write_bytes(data)
                _publish(staged, blob, file, lambda digest: f"{source.repo}: {file.path}: bytes read at lock do not match")


def _reuse_blob_from_elsewhere(
    store: Store, source: LockedSource, file: LockedFile, blob: Path, fingerprints: Fingerprints
) -> bool:
    """Blobs are named by content, so the same name in another repo of the store is the same bytes."""
    for candidate in store.root.glob(f"models--*/blobs/{file.blob}"):
        if candidate == blob or not candidate.is_file():
            continue
        info = candidate.stat()
        if info.st_size != file.size:
            continue
        if not fingerprints.matches(candidate, info, file.sha256) and sha256_file(candidate) != file.sha256:
            continue
        staged = blob.with_name(blob.name + ".vdeploy-link")
        staged.unlink(missing_ok=True)
        try:
            os.link(candidate, staged)
            digest = file.sha256  # the same inode as the blob just checked
        except OSError:
            shutil.copyfile(candidate, staged)
            digest = None
        _publish(staged, blob, file, lambda d: f"{candidate}: changed while being copied; run `vdeploy fetch` again", digest)
        if digest is not None:
            fingerprints.record(candidate, file.sha256)  # a new link changed its ctime, not its bytes
        return True
    return False


class FetchStopped(Exception):
    """A stop was asked for (Ctrl-C) while a download was under way; its partial file is kept."""


class _StoppableWriter:
    """A file wrapper that ends a download at its next chunk once a stop is asked for."""

    def __init__(self, out, stop: threading.Event) -> None:
        self._out = out
        self._stop = stop

    def write(self, data: bytes) -> int:
        if self._stop.is_set():
            raise FetchStopped()
        return self._out.write(data)

    def __getattr__(self, name: str):
        return getattr(self._out, name)


def _download_blob(source: LockedSource, file: LockedFile, blob: Path, stop: threading.Event) -> None:
    from vdeploy import hub

    partial = blob.with_name(blob.name + ".incomplete")
    done = partial.stat().st_size if partial.exists() else 0
    if done > file.size:
        partial.unlink()
        done = 0
    with open(partial, "ab") as out:
        hub.download(source.repo, source.commit, file.path, _StoppableWriter(out, stop), resume_from=done, size=file.size)
    _publish(partial, blob, file, lambda digest: (
        f"{source.repo}: {file.path}: the Hub served bytes with sha256 {digest[:12]}…, "
        f"the lock pins {file.sha256[:12]}…; nothing was stored. If upstream rewrote history, "
        "run `vdeploy lock --update`"
    ))


def _import_local_file(source: LockedSource, file: LockedFile, blob: Path, folder: Path | None) -> None:
    original = (folder / file.path) if folder is not None else None
    if original is None or not original.is_file():
        raise StoreError(
            f"{source.path}: {file.path} is not in the store and not in the local folder; "
            "restore the folder or re-run `vdeploy lock`"
        )
    staged = blob.with_name(blob.name + ".incomplete")
    shutil.copyfile(original, staged)
    _publish(staged, blob, file, lambda digest: (
        f"{source.path}: {file.path} changed while being imported or since it was locked "
        f"(sha256 {digest[:12]}…, locked {file.sha256[:12]}…); nothing was stored. "
        "Let the folder settle, then run `vdeploy lock` to pin its contents"
    ))


def _link(entry: Path, blob: Path, scratch: Path) -> None:
    """Point a snapshot entry at its blob, atomically, with a relative link as huggingface_hub does.
    Something else where the entry or its folder belongs is named in one line, and nothing is left."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next(p for p in (entry.parent, *entry.parent.parents) if p.exists() and not p.is_dir())
        raise StoreError(
            f"{blocking}: a file is where the folder of the locked {entry.name} belongs; move it out and run `vdeploy fetch`"
        ) from None
    target = os.path.relpath(blob, entry.parent)
    try:
        if os.readlink(entry) == target:
            return
    except OSError:
        pass
    if entry.is_dir() and not entry.is_symlink():
        raise StoreError(f"{entry}: a folder is where this locked file belongs; move it out and run `vdeploy fetch`")
    # Made beside vdeploy's own files, not in the snapshot, so a killed fetch leaves nothing there.
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / f"{uuid.uuid4().hex}.link"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, entry)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"{entry}: cannot link it to its blob ({exc.strerror}); move what is there out and run `vdeploy fetch`") from None


def _place_chat_template(store: Store, sha256: str, template_bytes: bytes | None) -> None:
    from vdeploy.manifest import sha256_hex

    path = store.chat_template_path(sha256)
    if path.is_file() and sha256_file(path) == sha256:
        return
    if template_bytes is None or sha256_hex(template_bytes) != sha256:
        raise StoreError("the chat template changed since it was locked; run `vdeploy lock`")
    write_atomically(path, template_bytes)


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"
