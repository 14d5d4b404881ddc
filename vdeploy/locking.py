"""`vdeploy lock`: resolve the manifest's sources into pinned files and write vdeploy.lock.

Commits already pinned are kept unless the manifest changed that source or --update is given
(as `uv lock` and `nix flake update` do), so an upstream push never changes an existing lock.
"""

from __future__ import annotations

import fnmatch
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vdeploy import hub
from vdeploy.engine import engine_for_lock
from vdeploy.errors import HubError, LockError
from vdeploy.flags import check_serve, load_catalogue
from vdeploy.hashing import git_blob_id
from vdeploy.local import LocalFile, folder_commit, scan_folder
from vdeploy.lockfile import (
    Lock,
    LockedChatTemplate,
    LockedFile,
    LockedSource,
    NewerLockError,
    build_lock,
    read_lock,
    store_name,
    write_lock,
)
from vdeploy.manifest import Manifest, SourceSpec, sha256_hex
from vdeploy.safety import case_collisions, path_problem
from vdeploy.store import Store, fetch

SMALL_FILE_WORKERS = 8


@dataclass
class LockOutcome:
    lock: Lock
    written: bool
    moved: list[str] = field(default_factory=list)  # "model: org/name main abc → def"
    skipped: list[str] = field(default_factory=list)  # checks not made (no engine installed here)


def lock_manifest(manifest: Manifest, update: bool = False) -> LockOutcome:
    previous = _previous_lock(manifest)
    store = Store(manifest.store_path())
    sources: list[LockedSource] = []
    moved: list[str] = []
    local_folders = {}
    for spec in manifest.sources:
        earlier = _earlier_pin(previous, spec)
        if spec.is_local:
            files = scan_folder(spec.path, f"{manifest.path}: [{spec.role}] path")
            source = _local_source(spec, files)
            local_folders[spec.role] = spec.path
        elif earlier is not None and not update:
            source = earlier
        else:
            source = _hub_source(spec)
            if earlier is not None and earlier.commit != source.commit:
                moved.append(f"{spec.role}: {spec.repo} {spec.revision} {earlier.commit[:12]} → {source.commit[:12]}")
        sources.append(source)

    template = None
    template_bytes = None
    if manifest.chat_template is not None:
        template_bytes = manifest.chat_template.read()
        template = LockedChatTemplate(
            sha256=sha256_hex(template_bytes),
            origin="inline" if manifest.chat_template.text is not None else "file",
            file=manifest.chat_template.file_as_written,
        )

    engine = engine_for_lock(manifest)
    catalogue = load_catalogue(engine.spec) if engine.source == "installed" else None
    serve, skipped = check_serve(manifest.serve, catalogue, manifest)
    lock = build_lock(
        manifest, sources, template, engine, serve, catalogue.digest if catalogue is not None else None
    )
    # Local folders are copied into the store now, so later edits to them cannot change this lock.
    if local_folders or template is not None:
        local_sources = [s for s in lock.sources if s.is_local]
        fetch(local_sources, store, template, template_bytes, local_folders)
    written = write_lock(manifest.lock_path, lock)
    return LockOutcome(lock=lock, written=written, moved=moved, skipped=skipped)


def _previous_lock(manifest: Manifest) -> Lock | None:
    if not manifest.lock_path.is_file():
        return None
    try:
        return read_lock(manifest.lock_path)
    except NewerLockError:
        raise
    except LockError:
        # Unreadable, or an older format: `vdeploy lock` is how it gets rewritten, so lock afresh.
        return None


def _earlier_pin(previous: Lock | None, spec: SourceSpec) -> LockedSource | None:
    """The source as the previous lock pinned it, if the manifest still asks for the same thing."""
    if previous is None or previous.inputs.get(spec.role) != spec.requested():
        return None
    return next((s for s in previous.sources if s.role == spec.role), None)


def _selected(path: str, include: tuple[str, ...]) -> bool:
    return not include or any(fnmatch.fnmatchcase(path, pattern) for pattern in include)


def _local_source(spec: SourceSpec, files: list[LocalFile]) -> LockedSource:
    chosen = [f for f in files if _selected(f.path, spec.include)]
    if not chosen:
        raise HubError(f"[{spec.role}] path {spec.path_as_written}: include matches no file")
    return LockedSource(
        role=spec.role,
        commit=folder_commit(chosen),
        files=tuple(LockedFile(path=f.path, size=f.size, sha256=f.sha256, blob=f.sha256) for f in chosen),
        path=spec.path_as_written,
        name=store_name(None, spec.path_as_written),
    )


def _hub_source(spec: SourceSpec) -> LockedSource:
    assert spec.repo is not None
    commit = hub.resolve_commit(spec.repo, spec.revision)
    remote = [f for f in hub.list_files(spec.repo, commit) if _selected(f.path, spec.include)]
    for file in remote:
        problem = path_problem(file.path)
        if problem:
            raise HubError(f"{spec.repo}@{commit[:12]}: file name {file.path!r} {problem}; refusing this repo")
    clashes = case_collisions([f.path for f in remote])
    if clashes:
        a, b = clashes[0]
        raise HubError(
            f"{spec.repo}@{commit[:12]}: {a!r} and {b!r} differ only in case and would collide; "
            "exclude one with [model] include"
        )
    if not remote:
        raise HubError(f"{spec.repo}@{commit[:12]}: no files{' match include' if spec.include else ''}")

    def pin(file: hub.RemoteFile) -> LockedFile:
        if file.lfs_sha256 is not None:
            return LockedFile(path=file.path, size=file.size, sha256=file.lfs_sha256, blob=file.lfs_sha256)
        # Small git files carry no sha256 in the tree: fetch and hash them, and check their git id.
        data = hub.read_small_file(spec.repo, commit, file.path, file.size)
        if git_blob_id(data) != file.git_oid:
            raise HubError(f"{spec.repo}@{commit[:12]}: {file.path}: the bytes served do not match the tree's git id")
        return LockedFile(path=file.path, size=file.size, sha256=sha256_hex(data), blob=file.git_oid)

    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    with ThreadPoolExecutor(max_workers=SMALL_FILE_WORKERS) as pool:
        files = list(pool.map(pin, remote))
    return LockedSource(
        role=spec.role,
        commit=commit,
        files=tuple(sorted(files, key=lambda f: f.path)),
        repo=spec.repo,
        revision=spec.revision,
        name=store_name(spec.repo),
    )


def check_lock_is_current(manifest: Manifest) -> Lock:
    """The lock, if it matches the manifest; else a LockError naming what changed."""
    from vdeploy.lockfile import stale_reasons

    lock = read_lock(manifest.lock_path)
    reasons = stale_reasons(lock, manifest)
    if reasons:
        shown = "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")
        raise LockError(f"{manifest.lock_path}: stale, the manifest changed ({shown}); run `vdeploy lock`")
    return lock
