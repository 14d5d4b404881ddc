"""Step 2 and 3 of the flow, `vdeploy lock`: resolve the manifest's sources into pinned files and
build the Lock; `lock_manifest` writes it as vdeploy.lock.

Commits already pinned are kept unless the manifest changed that source or --update is given
(as `uv lock` and `nix flake update` do), so an upstream push never changes an existing lock.
The engine is what the manifest names (engine.py), never what is installed here, so the same
manifest gives the same lock on every machine.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vdeploy import hub
from vdeploy.changes import Change, Effect
from vdeploy.engine import installed_engine, locked_engine
from vdeploy.errors import LockError, SourceError
from vdeploy.flags import check_serve
from vdeploy.hashing import git_blob_id
from vdeploy.local import LocalFile, folder_commit, hash_files, list_folder
from vdeploy.lockfile import (
    Lock,
    LockedChatTemplate,
    LockedFile,
    LockedSource,
    NewerLockError,
    build_lock,
    dumps_lock,
    read_lock,
    store_name,
    write_lock,
)
from vdeploy.manifest import Manifest, SourceSpec, manifest_problem, sha256_hex
from vdeploy.roots import using_store
from vdeploy.selection import check_code_policy, loads_pickles, select_files
from vdeploy.store import Store, fetch, keep_blobs
from vdeploy.trust import CODE_CONFIGS, find_code

SMALL_FILE_WORKERS = 8


@dataclass
class Resolved:
    """What resolving found besides the Lock: bytes already read, and what moved."""

    lock: Lock
    previous: Lock | None
    moved: list[Change] = field(default_factory=list)  # sources whose commit moved (--update)
    code_changes: list[Change] = field(default_factory=list)  # code files added, removed, changed
    skipped: list[str] = field(default_factory=list)  # checks not made (no engine catalogue here)
    small_files: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (store-name, blob) → bytes
    local_files: dict[str, list[LocalFile]] = field(default_factory=dict)  # role → files on disk


@dataclass
class LockOutcome:
    lock: Lock
    written: bool
    moved: list[Change] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    code_changes: list[Change] = field(default_factory=list)
    previous: Lock | None = None


def lock_manifest(
    manifest: Manifest, update: bool = False, say: Callable[[str], None] = print, locked: bool = False,
) -> LockOutcome:
    """Resolve and write the lock. With locked=True nothing is written: a LockError says what
    locking would change (as `uv lock --locked`), for CI."""
    resolved = resolve(manifest, update)
    lock = resolved.lock
    if locked:
        current = manifest.lock_path.read_bytes() if manifest.lock_path.is_file() else None
        if current != dumps_lock(lock).encode():
            from vdeploy.lockfile import stale_changes
            from vdeploy.changes import summarise

            why = "there is none" if current is None else (
                summarise(stale_changes(resolved.previous, manifest)) if resolved.previous else "it is unreadable or older"
            )
            raise LockError(f"{manifest.lock_path}: locking would change the lock ({why or 'its contents differ'}); run `vdeploy lock`")
        return LockOutcome(lock=lock, written=False, skipped=resolved.skipped, previous=resolved.previous)
    store = Store(manifest.store_path())
    # What lock places in the store is recorded, with the lock as its root, for `vdeploy gc`.
    with using_store(store, manifest.lock_path, lock, dumps_lock(lock).encode()):
        # Local folders are copied into the store now, so later edits to them cannot change this lock;
        # small Hub files were read to hash them, so fetch need not download them again.
        local_sources = [s for s in lock.sources if s.is_local]
        if local_sources or lock.chat_template is not None:
            fetch(
                local_sources, store, lock.chat_template,
                manifest.chat_template.data if manifest.chat_template else None,
                {s.role: s.path for s in manifest.sources if s.is_local}, say=lambda line: None,
            )
        keep_blobs(store, [s for s in lock.sources if not s.is_local], resolved.small_files)
        # What moved, and code that will run, is shown before the lock that pins it is written:
        # on --update as `vdeploy diff` reports it (code diffs included), else the code on its own.
        if update and resolved.previous is not None:
            for line in update_report(resolved.previous, lock, store):
                say(line)
        elif resolved.code_changes:
            say("code changes (these files run with trust-remote-code):")
            for change in resolved.code_changes:
                say(f"  {change.describe()}")
        written = write_lock(manifest.lock_path, lock)
    return LockOutcome(
        lock=lock, written=written, moved=resolved.moved, skipped=resolved.skipped,
        code_changes=resolved.code_changes, previous=resolved.previous,
    )


def dtype_warning(manifest: Manifest) -> str | None:
    """One line when [serve] leaves dtype to vLLM, which picks it per machine (determinism.md)."""
    if str(manifest.serve.get("dtype", "auto")) != "auto":
        return None
    return (
        f"warning: {manifest.path}: [serve] dtype is not pinned, so vLLM picks it per machine "
        "(a float32 checkpoint runs as bfloat16 on x86 CPUs); pin it, e.g. dtype = \"bfloat16\""
    )


def resolve(manifest: Manifest, update: bool = False) -> Resolved:
    """The Lock the manifest resolves to now (asking the Hub only for sources not pinned yet)."""
    previous = _previous_lock(manifest)
    sources: list[LockedSource] = []
    resolved = Resolved(lock=None, previous=previous)  # type: ignore[arg-type]
    for spec in manifest.sources:
        earlier = _earlier_pin(previous, spec)
        if spec.is_local:
            source = _local_source(spec, resolved)
        elif earlier is not None and not update:
            source = earlier
        else:
            source = _hub_source(spec, resolved)
            if earlier is not None and earlier.commit != source.commit:
                resolved.moved.append(
                    Change("source", f"{spec.role}: {spec.repo} {spec.revision}", earlier.commit, source.commit, Effect.OUTPUTS)
                )
        if earlier is not None:
            resolved.code_changes.extend(code_changes(earlier, source))
        check_code_policy(manifest.policy, source)
        sources.append(source)
    for source in _code_sources(manifest, sources, previous, update, resolved):
        earlier = next((s for s in previous.code if s.repo == source.repo), None) if previous else None
        if earlier is not None:
            resolved.code_changes.extend(code_changes(earlier, source))
        sources.append(source)

    template = None
    if manifest.chat_template is not None:
        template = LockedChatTemplate(
            sha256=manifest.chat_template.sha256,
            origin=manifest.chat_template.origin,
            file=manifest.chat_template.file_as_written,
        )

    installed = installed_engine()
    engine = locked_engine(manifest, installed)
    catalogue = _catalogue_for_checks(engine.spec, installed)
    serve, resolved.skipped = check_serve(manifest.serve, catalogue, manifest)
    if loads_pickles(serve) and not manifest.policy.allow_pickle:
        raise manifest_problem(
            manifest, "serve", "load-format", "\"pt\" loads pickle weights, which run code when loaded",
            "set [policy] allow-pickle = true if you trust them",
        )
    resolved.lock = build_lock(manifest, sources, template, engine, serve)
    return resolved


def _catalogue_for_checks(engine_spec: str, installed):
    """The flag catalogue [serve] is checked against at lock: the named engine's, when it is
    installed here or its catalogue is cached; else None (static checks only, reported as skipped).
    Either way the lock's bytes are the same: the checks only refuse, they never change values."""
    from vdeploy.probe import load_catalogue

    build = installed is not None and installed.spec == engine_spec
    return load_catalogue(engine_spec, build=build)


def _previous_lock(manifest: Manifest) -> Lock | None:
    if not manifest.lock_path.is_file():
        return None
    try:
        return read_lock(manifest.lock_path, older=True)
    except NewerLockError:
        raise
    except LockError:
        # Unreadable: `vdeploy lock` is how it gets rewritten, so lock afresh.
        return None


def _earlier_pin(previous: Lock | None, spec: SourceSpec) -> LockedSource | None:
    """The source as the previous lock pinned it, if the manifest still asks for the same thing."""
    if previous is None or previous.inputs.get(spec.role) != spec.requested():
        return None
    return next((s for s in previous.sources if s.role == spec.role), None)


def _local_source(spec: SourceSpec, resolved: Resolved) -> LockedSource:
    where = f"[{spec.role}] path {spec.path_as_written}"
    listing = list_folder(spec.path, where)
    chosen = select_files(where, listing, spec.include)
    files = hash_files(listing, chosen)
    resolved.local_files[spec.role] = files
    configs = {f.path: f.source.read_bytes() for f in files if f.path in CODE_CONFIGS}
    return LockedSource(
        auto_map=find_code(chosen, configs).auto_map,
        role=spec.role,
        commit=folder_commit(files),
        files=tuple(LockedFile(path=f.path, size=f.size, sha256=f.sha256, blob=f.sha256) for f in files),
        path=spec.path_as_written,
        name=store_name(None, spec.path_as_written),
    )


def _hub_source(spec: SourceSpec, resolved: Resolved) -> LockedSource:
    assert spec.repo is not None
    commit = hub.resolve_commit(spec.repo, spec.revision)
    listing = hub.list_files(spec.repo, commit)
    where = f"{spec.repo}@{commit[:12]}"
    if len({f.path for f in listing}) != len(listing):
        raise SourceError(f"{where}: the tree lists a file twice; refusing this repo")
    chosen = set(select_files(where, (f.path for f in listing), spec.include))
    remote = [f for f in listing if f.path in chosen]
    configs: dict[str, bytes] = {}
    name = store_name(spec.repo)

    def pin(file: hub.RemoteFile) -> LockedFile:
        if file.lfs_sha256 is not None:
            return LockedFile(path=file.path, size=file.size, sha256=file.lfs_sha256, blob=file.lfs_sha256)
        # Small git files carry no sha256 in the tree: fetch and hash them, and check their git id.
        data = hub.read_small_file(spec.repo, commit, file.path, file.size)
        if git_blob_id(data) != file.git_oid:
            raise SourceError(f"{where}: {file.path}: the bytes served do not match the tree's git id")
        if file.path in CODE_CONFIGS:
            configs[file.path] = data
        resolved.small_files[(name, file.git_oid)] = data
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
        name=name,
        auto_map=find_code(sorted(chosen), configs).auto_map,
    )


def _code_sources(
    manifest: Manifest, sources: list[LockedSource], previous: Lock | None, update: bool, resolved: Resolved
) -> list[LockedSource]:
    """Other repos that auto_map entries load code from, each resolved and pinned as a source."""
    wanted = sorted({e.repo for s in sources for e in s.auto_map if e.repo is not None})
    if len(wanted) > 1:
        raise SourceError(
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
            source = _hub_source(spec, resolved)
        needed = {e.module_file for s in sources for e in s.auto_map if e.repo == repo}
        missing = needed - {f.path for f in source.files}
        if missing:
            raise SourceError(f"[code] {repo}@{source.commit[:12]}: has no {', '.join(sorted(missing))}, which auto_map names")
        pinned.append(source)
    return pinned


def code_changes(before: LockedSource, after: LockedSource) -> list[Change]:
    """Code files added, removed or changed between two pins of one source."""
    old = {f.path: f.sha256 for f in before.code_files}
    new = {f.path: f.sha256 for f in after.code_files}
    label = f"{after.role} {after.repo or after.path}"
    return [
        Change("code", f"{label}: {path}", old.get(path), new.get(path), Effect.OUTPUTS)
        for path in sorted(old.keys() | new.keys())
        if old.get(path) != new.get(path)
    ]


def update_report(previous: Lock, lock: Lock, store: Store) -> list[str]:
    """What `lock --update` changes, as `vdeploy diff` reports it, texts read from the store."""
    from vdeploy.diff import diff_locks
    from vdeploy.sides import StoreTexts

    report = diff_locks(previous, lock, StoreTexts((store.root,)))
    return ["lock --update changes:", *report.render(headers=False)]
