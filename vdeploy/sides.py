"""`vdeploy diff`, the inputs: what each argument names (a lock file, a manifest or project
folder, `git:REV[:PATH]`, a run record) read into a diff Side, and the stores the texts it
diffs come from. The edge of diff.py: it reads files and runs git; it never touches the network
or vLLM.

`git:REV:PATH` reads PATH as git does in `git show REV:PATH`: from the repository's root, or
from the current folder when it starts with `./` or `../`. `git:REV` is `git:REV:./vdeploy.lock`.
A PATH naming a folder or a manifest means the lock beside it.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import subprocess
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vdeploy.constants import LOCK_NAME, MANIFEST_NAME, RUNS_DIR, default_hf_cache
from vdeploy.diff import Diff, EngineFacts, Side, compare, lock_side, planned_run, run_facts
from vdeploy.errors import DiffInputError, LockError, VdeployError
from vdeploy.lockfile import LOCK_VERSION, Lock, LockedFile, LockedSource, loads_lock, normalise_distribution, read_lock
from vdeploy.records import RECORD_NAME

GIT_PREFIX = "git:"
MAX_TEXT_BYTES = 4 * 2**20  # larger files are not diffed as text
WHAT_A_SIDE_IS = "a lock file, a manifest or project folder, git:REV[:PATH], or a run record"


@dataclass(frozen=True)
class Input:
    """A side as read, and the stores that may hold its texts."""

    side: Side
    stores: tuple[Path, ...] = ()


def diff_inputs(old_arg: str | None, new_arg: str | None, cwd: Path | None = None) -> Diff:
    """`vdeploy diff [OLD [NEW]]`: no argument, the lock at git:HEAD against the working one;
    one, it against the current folder's lock; two, the first against the second."""
    cwd = cwd or Path.cwd()
    if old_arg is None:
        old_arg = f"{GIT_PREFIX}HEAD"
    old = read_side(old_arg, cwd)
    new = read_side(new_arg, cwd) if new_arg is not None else current_lock(cwd)
    if old.side.kind == "record" or new.side.kind == "record":
        old, new = with_run(old), with_run(new)
    roots = dict.fromkeys([*old.stores, *new.stores, default_hf_cache()])
    return compare(old.side, new.side, StoreTexts(tuple(roots)))


def current_lock(cwd: Path) -> Input:
    path = cwd / LOCK_NAME
    if not path.is_file():
        raise DiffInputError(
            f"{path}: no lock here to compare with; run `vdeploy lock`, or name both sides ({WHAT_A_SIDE_IS})"
        )
    return lock_file_input(LOCK_NAME, path)


def read_side(arg: str, cwd: Path) -> Input:
    if arg.startswith(GIT_PREFIX):
        return git_input(arg, cwd)
    path = (cwd / Path(arg).expanduser())
    if path.is_dir():
        if (path / RECORD_NAME).is_file():
            return record_input(arg, path / RECORD_NAME)
        if (path / LOCK_NAME).is_file():
            return lock_file_input(arg, path / LOCK_NAME)
        if (path / MANIFEST_NAME).is_file():
            raise DiffInputError(f"{arg}: the project has no {LOCK_NAME} yet; run `vdeploy lock {arg}` first")
        raise DiffInputError(f"{arg}: holds no {LOCK_NAME}, {MANIFEST_NAME} or {RECORD_NAME}; name {WHAT_A_SIDE_IS}")
    if not path.is_file():
        raise DiffInputError(f"{arg}: no such file or folder; name {WHAT_A_SIDE_IS}")
    if path.suffix == ".json":
        return record_input(arg, path)
    if path.suffix == ".toml" and path.name != LOCK_NAME and _is_manifest(path):
        lock = path.parent / LOCK_NAME
        if not lock.is_file():
            raise DiffInputError(f"{arg}: the manifest has no {LOCK_NAME} beside it yet; run `vdeploy lock {arg}` first")
        return lock_file_input(arg, lock)
    return lock_file_input(arg, path)


def _is_manifest(path: Path) -> bool:
    """A manifest has a [model] table; a lock starts with its format version."""
    try:
        return "version" not in tomllib.loads(path.read_text(encoding="utf-8", errors="replace"))
    except tomllib.TOMLDecodeError:
        return False


# ---- locks ---------------------------------------------------------------------------------


def lock_file_input(label: str, path: Path) -> Input:
    try:
        lock = read_lock(path, older=True)
    except LockError as exc:
        raise DiffInputError(str(exc)) from None
    engine, notes = _older_engine(lock, lambda: path.read_text(encoding="utf-8", errors="replace"))
    return Input(lock_side(label, lock, notes, engine), _stores_beside(path.parent))


def _older_engine(lock: Lock, text) -> tuple[EngineFacts | None, tuple[str, ...]]:
    """A lock of an earlier format: its engine as that format wrote it (the reader drops it)."""
    if lock.version == LOCK_VERSION:
        return None, ()
    notes = (f"lock format {lock.version}: its deployment id is computed another way than format {LOCK_VERSION}'s",)
    try:
        engine = tomllib.loads(text()).get("engine")
    except tomllib.TOMLDecodeError:
        engine = None
    if not isinstance(engine, dict) or not isinstance(engine.get("distribution"), str):
        return None, notes
    distribution, version = engine["distribution"], str(engine.get("version"))
    packages = {normalise_distribution(distribution): version}
    for name in ("torch", "transformers", "huggingface-hub"):
        if isinstance(engine.get(name), str):
            packages[name] = engine[name]
    return EngineFacts(distribution, version, packages, complete=False), notes


def _stores_beside(folder: Path) -> tuple[Path, ...]:
    """The store of the manifest in this folder, if there is one and it reads."""
    if not (folder / MANIFEST_NAME).is_file():
        return ()
    from vdeploy.manifest import load_manifest

    try:
        return (load_manifest(folder).store_path(),)
    except VdeployError:
        return ()  # its store is only where texts may be found


# ---- git -----------------------------------------------------------------------------------


def git_input(spec: str, cwd: Path) -> Input:
    """git:REV or git:REV:PATH: the lock as committed at REV."""
    rev, has_path, path = spec[len(GIT_PREFIX):].partition(":")
    if not rev:
        raise DiffInputError(f"{spec}: name a revision, as in git:HEAD, git:HEAD~3 or git:v1.0:path/{LOCK_NAME}")
    path = path if has_path and path else f"./{LOCK_NAME}"
    root = _git(spec, cwd, "rev-parse", "--show-toplevel", failure=f"{cwd} is not inside a git repository").strip()
    _git(spec, cwd, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", failure=f"no such revision {rev!r}")
    kind = _git(spec, cwd, "cat-file", "-t", f"{rev}:{path}", failure=f"{rev} has no {path}").strip()
    if kind == "tree":
        path = f"{path.rstrip('/')}/{LOCK_NAME}"
    elif path.endswith(".toml") and posixpath.basename(path) != LOCK_NAME:
        path = posixpath.join(posixpath.dirname(path), LOCK_NAME)
    label = f"{GIT_PREFIX}{rev}:{path}"
    text = _git(spec, cwd, "show", f"{rev}:{path}", failure=f"{rev} has no {path}")
    try:
        lock = loads_lock(text, where=label, older=True)
    except LockError as exc:
        raise DiffInputError(str(exc)) from None
    engine, notes = _older_engine(lock, lambda: text)
    relative_to_cwd = path.startswith(("./", "../"))
    folder = (cwd if relative_to_cwd else Path(root)) / posixpath.dirname(path)
    return Input(lock_side(label, lock, notes, engine), _stores_beside(folder))


def _git(spec: str, cwd: Path, *args: str, failure: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise DiffInputError(f"{spec}: git is not installed, so revisions cannot be read") from None
    if done.returncode != 0:
        raise DiffInputError(f"{spec}: {failure}")
    return done.stdout


# ---- run records ---------------------------------------------------------------------------


def record_input(label: str, path: Path) -> Input:
    """A run record: what ran (argv, environment, engine found, hardware), and its lock when the
    run folder keeps a copy or the project's lock still has the record's deployment id."""
    data = _record_data(path)
    deployment = data.get("deployment") if isinstance(data.get("deployment"), str) else None
    project = _record_project(path, data)
    lock, lock_note = _record_lock(path, project, deployment)
    env = _string_table(data.get("env"))
    inherited = _string_table(data.get("inherited"))
    if inherited is not None and env is not None:
        inherited = {k: v for k, v in inherited.items() if k in env}  # --pure kept the rest out
    hardware = data.get("hardware") if isinstance(data.get("hardware"), dict) else {}
    argv = data.get("argv") if isinstance(data.get("argv"), list) else None
    run = run_facts([str(a) for a in argv] if argv is not None else None, deployment, env, inherited, hardware)
    notes = [lock_note, *_drift_notes(data.get("engine_drift"))]
    if argv is None:
        notes.append("the record has no argv: its serve flags, sources and seed are unknown")
    side = Side(label, "record", deployment, lock, _record_engine(data.get("engine")), run, tuple(notes))
    return Input(side, _stores_beside(project) if project else ())


def _record_data(path: Path) -> dict[str, Any]:
    from vdeploy.records import RecordError, read_record

    try:
        return read_record(path).to_json()
    except RecordError as exc:
        raise DiffInputError(str(exc)) from None
    except TypeError:
        # An older record lacking fields the current type requires: read what it has.
        data = json.loads(path.read_text(encoding="utf-8"))
        return data


def _record_project(path: Path, data: Mapping[str, Any]) -> Path | None:
    """The project folder a record belongs to: above .vdeploy/runs/, else its manifest's folder."""
    runs = path.parent.parent if path.name == RECORD_NAME else path.parent
    project = runs
    for _ in RUNS_DIR.split("/"):
        project = project.parent
    if (project / RUNS_DIR).resolve() == runs.resolve():
        return project
    manifest = data.get("manifest")
    return Path(manifest).parent if isinstance(manifest, str) else None


def _record_lock(path: Path, project: Path | None, deployment: str | None) -> tuple[Lock | None, str]:
    folder = path.parent if path.name == RECORD_NAME else None
    for candidate in filter(None, [folder and folder / LOCK_NAME, project and project / LOCK_NAME]):
        try:
            lock = read_lock(candidate, older=True)
        except LockError:
            continue
        if lock.deployment == deployment:
            return lock, f"its lock: {candidate} (same deployment id)"
    return None, "its lock was not found (no lock with its deployment id beside it): sources compared by commit"


def _string_table(value: Any) -> dict[str, str] | None:
    if not isinstance(value, dict):
        return None
    return {str(k): str(v) for k, v in value.items()}


def _record_engine(value: Any) -> EngineFacts | None:
    if not isinstance(value, dict) or not isinstance(value.get("distribution"), str):
        return None
    distribution, version = value["distribution"], str(value.get("version"))
    packages = _string_table(value.get("packages"))
    complete = bool(packages)
    packages = packages or {normalise_distribution(distribution): version}
    return EngineFacts(distribution, version, packages, origin="run", complete=complete)


def _drift_notes(drift: Any) -> list[str]:
    if not isinstance(drift, list) or not drift:
        return []
    said = []
    for item in drift:
        if isinstance(item, dict) and "old" in item:
            said.append(f"{item.get('what')} {item.get('old')} locked, {item.get('new') or 'not'} installed")
        elif isinstance(item, dict):
            said.append(str(item.get("what")))
    return ["ran with engine drift from its lock: " + "; ".join(said)]


def with_run(given: Input) -> Input:
    """A lock compared with a record is compared as what `up` would run from it."""
    side = given.side
    if side.run is not None or side.lock is None:
        return given
    return replace(given, side=replace(side, run=planned_run(side.lock, _cached_catalogue(side.lock))))


def _cached_catalogue(lock: Lock):
    """The locked engine's flag catalogue, if cached (it renders [serve] as `up` did); else None."""
    if lock.engine is None:
        return None
    from vdeploy.probe import load_catalogue

    try:
        return load_catalogue(lock.engine.spec, build=False)
    except VdeployError:
        return None


# ---- texts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreTexts:
    """Texts read from stores, each checked against the sha256 the lock gives it."""

    roots: tuple[Path, ...]

    def file(self, source: LockedSource, file: LockedFile) -> bytes | None:
        if file.size > MAX_TEXT_BYTES:
            return None
        return self._first(lambda store: store.blob_path(source, file), file.sha256)

    def template(self, sha256: str) -> bytes | None:
        return self._first(lambda store: store.chat_template_path(sha256), sha256)

    def _first(self, where, sha256: str) -> bytes | None:
        from vdeploy.store import Store

        for root in self.roots:
            try:
                data = where(Store(root)).read_bytes()
            except OSError:
                continue
            if len(data) <= MAX_TEXT_BYTES and hashlib.sha256(data).hexdigest() == sha256:
                return data
        return None
