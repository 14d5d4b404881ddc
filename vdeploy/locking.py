"""`vdeploy lock`: resolve the manifest's sources into pinned files and write vdeploy.lock.

Commits already pinned are kept unless the manifest changed that source or --update is given
(as `uv lock` and `nix flake update` do), so an upstream push never changes an existing lock.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vdeploy import hub
from vdeploy.engine import engine_for_lock, installed_engine
from vdeploy.errors import HubError, LockError
from vdeploy.trust import CODE_CONFIGS, drop_pickles_beside_safetensors, find_code, is_pickle
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
from vdeploy.manifest import Manifest, SourceSpec, manifest_problem, sha256_hex
from vdeploy.safety import case_collisions, path_problem
from vdeploy.store import Store, fetch

SMALL_FILE_WORKERS = 8


@dataclass
class LockOutcome:
    lock: Lock
    written: bool
    moved: list[str] = field(default_factory=list)  # "model: org/name main abc → def"
    skipped: list[str] = field(default_factory=list)  # checks not made (no engine installed here)
    code_changes: list[str] = field(default_factory=list)  # "model: changed modeling_x.py" on --update


def lock_manifest(manifest: Manifest, update: bool = False, say: Callable[[str], None] = print) -> LockOutcome:
    previous = _previous_lock(manifest)
    store = Store(manifest.store_path())
    sources: list[LockedSource] = []
    moved: list[str] = []
    code_changes: list[str] = []
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
        if earlier is not None:
            code_changes.extend(describe_code_changes(earlier, source))
        check_code_policy(manifest, source)
        sources.append(source)
    for source in _code_sources(manifest, sources, previous, update):
        earlier = next((s for s in previous.code if s.repo == source.repo), None) if previous else None
        if earlier is not None:
            code_changes.extend(describe_code_changes(earlier, source))
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

    engine = engine_for_lock(manifest, installed_engine())
    catalogue = load_catalogue(engine.spec) if engine.source == "installed" else None
    serve, skipped = check_serve(manifest.serve, catalogue, manifest)
    if str(serve.get("load-format", "")).lower() == "pt" and not manifest.policy.allow_pickle:
        raise manifest_problem(
            manifest, "serve", "load-format", "\"pt\" loads pickle weights, which run code when loaded",
            "set [policy] allow-pickle = true if you trust them",
        )
    lock = build_lock(
        manifest, sources, template, engine, serve, catalogue.digest if catalogue is not None else None
    )
    # Local folders are copied into the store now, so later edits to them cannot change this lock.
    if local_folders or template is not None:
        local_sources = [s for s in lock.sources if s.is_local]
        fetch(local_sources, store, template, template_bytes, local_folders)
    if code_changes:
        # Code that will run is shown on its own, before the lock that pins it is written.
        say("code changes (these files run with trust-remote-code):")
        for line in code_changes:
            say(f"  {line}")
    written = write_lock(manifest.lock_path, lock)
    return LockOutcome(lock=lock, written=written, moved=moved, skipped=skipped, code_changes=code_changes)


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
    kept, _ = drop_pickles_beside_safetensors([f.path for f in chosen])
    chosen = [f for f in chosen if f.path in set(kept)]
    configs = {f.path: f.source.read_bytes() for f in chosen if f.path in CODE_CONFIGS}
    return LockedSource(
        auto_map=find_code(kept, configs).auto_map,
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
    kept, _ = drop_pickles_beside_safetensors([f.path for f in remote])
    remote = [f for f in remote if f.path in set(kept)]
    configs: dict[str, bytes] = {}

    def pin(file: hub.RemoteFile) -> LockedFile:
        if file.lfs_sha256 is not None:
            return LockedFile(path=file.path, size=file.size, sha256=file.lfs_sha256, blob=file.lfs_sha256)
        # Small git files carry no sha256 in the tree: fetch and hash them, and check their git id.
        data = hub.read_small_file(spec.repo, commit, file.path, file.size)
        if git_blob_id(data) != file.git_oid:
            raise HubError(f"{spec.repo}@{commit[:12]}: {file.path}: the bytes served do not match the tree's git id")
        if file.path in CODE_CONFIGS:
            configs[file.path] = data
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
        auto_map=find_code(kept, configs).auto_map,
    )


def _label(source: LockedSource) -> str:
    return f"[{source.role}] {source.repo or source.path}" + (f"@{source.commit[:12]}" if source.repo else "")


def check_code_policy(manifest: Manifest, source: LockedSource) -> None:
    """Nothing runs that the lock does not pin and the policy does not allow."""
    pickles = [f.path for f in source.files if is_pickle(f.path)]
    if pickles and not manifest.policy.allow_pickle:
        raise HubError(
            f"{_label(source)}: pickle weights run code when loaded ({', '.join(pickles[:3])}); "
            "use a revision with safetensors, or set [policy] allow-pickle = true if you trust them"
        )
    if not source.auto_map:
        return
    entries = "; ".join(e.describe() for e in source.auto_map[:3])
    if not manifest.policy.trust_remote_code:
        files = ", ".join(f.path for f in source.code_files[:3]) or "no .py files here"
        raise HubError(
            f"{_label(source)}: needs remote code ({entries}; code: {files}); "
            'to pin it and allow it to run, set [policy] trust-remote-code = "pinned"'
        )
    paths = {f.path for f in source.files}
    for entry in source.auto_map:
        if entry.repo is None and entry.module_file not in paths:
            raise HubError(
                f"{_label(source)}: {entry.describe()} needs {entry.module_file}, which is not in the source; "
                f"the repo lacks it, or [{source.role}] include leaves it out"
            )


def _code_sources(
    manifest: Manifest, sources: list[LockedSource], previous: Lock | None, update: bool
) -> list[LockedSource]:
    """Other repos that auto_map entries load code from, each resolved and pinned as a source."""
    wanted = sorted({e.repo for s in sources for e in s.auto_map if e.repo is not None})
    if len(wanted) > 1:
        raise HubError(
            f"{manifest.path}: auto_map loads code from several other repos ({', '.join(wanted)}); "
            "vLLM pins remote code with one --code-revision, so vdeploy cannot pin them all"
        )
    pinned = []
    for repo in wanted:
        earlier = next((s for s in previous.code if s.repo == repo), None) if previous else None
        if earlier is not None and not update:
            source = earlier
        else:
            spec = SourceSpec(role="code", repo=repo, revision="main", include=("*.py", "*.json"))
            source = _hub_source(spec)
        needed = {e.module_file for s in sources for e in s.auto_map if e.repo == repo}
        missing = needed - {f.path for f in source.files}
        if missing:
            raise HubError(f"[code] {repo}@{source.commit[:12]}: has no {', '.join(sorted(missing))}, which auto_map names")
        pinned.append(source)
    return pinned


def describe_code_changes(before: LockedSource, after: LockedSource) -> list[str]:
    """Code files added, removed or changed between two pins of one source."""
    old = {f.path: f.sha256 for f in before.code_files}
    new = {f.path: f.sha256 for f in after.code_files}
    label = f"{after.role} {after.repo or after.path}"
    return (
        [f"{label}: added {p}" for p in sorted(new.keys() - old.keys())]
        + [f"{label}: removed {p}" for p in sorted(old.keys() - new.keys())]
        + [f"{label}: changed {p}" for p in sorted(old.keys() & new.keys()) if old[p] != new[p]]
    )


def fetch_locked(manifest: Manifest, lock: Lock, store: Store, say: Callable[[str], None]):
    """Fetch everything the lock pins; local folders and the chat template come from the manifest."""
    return fetch(
        lock.sources,
        store,
        lock.chat_template,
        manifest.chat_template.read() if manifest.chat_template else None,
        {s.role: s.path for s in manifest.sources if s.is_local},
        say=say,
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
