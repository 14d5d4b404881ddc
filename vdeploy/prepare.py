"""The middle every command shares: manifest, lock, store, engine and catalogue → a Prepared
deployment holding its plan, its environment facts and its drift.

`plan`, `up`, `run`, `check` and `export` each make one `prepare(...)` call and render or run
what it returns; none of them re-derives argv, environment or engine facts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vdeploy.changes import Change
from vdeploy.constants import to_stderr
from vdeploy.engine import InstalledEngine, check_engine, describe_drift, engine_drift, find_launcher, installed_engine
from vdeploy.errors import LaunchError, StoreError
from vdeploy.lockfile import Lock, check_lock_is_current, remember_parse
from vdeploy.manifest import Manifest, load_manifest
from vdeploy.nodes import node_facts, node_topology
from vdeploy.plan import PATH_FLAGS, Overrides, Plan, Topology, format_plan, make_plan
from vdeploy.roots import record_use, using_store
from vdeploy.store import FetchReport, Store, fetch, verify

if TYPE_CHECKING:
    from vdeploy.flags import Catalogue

SAMPLING_KEYS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "max_new_tokens",
)



@dataclass(frozen=True)
class Options:
    """What a command asks of the deployment it prepares."""

    host: str | None = None  # runtime overrides: never in the lock
    port: int | None = None
    launching: bool = False  # up/run/check: the engine must be the locked one and the store verified
    allow_engine_drift: bool = False
    fetch: bool = True  # when launching, fetch what the store lacks
    node_rank: int | None = None  # multi-node: this node's place (runtime-only, like host and port)
    master_addr: str | None = None

    @property
    def overrides(self) -> Overrides:
        return Overrides(host=self.host, port=self.port)


@dataclass(frozen=True)
class Prepared:
    """A deployment ready to show or to launch. Holds no secret values."""

    manifest: Manifest
    lock: Lock
    store: Store
    engine: InstalledEngine | None  # the engine installed here
    drift: tuple[Change, ...]  # how it differs from the locked one
    catalogue: Catalogue | None
    plan: Plan
    sampling_defaults: Mapping[str, Any] = field(default_factory=dict)
    notices: tuple[str, ...] = ()  # one-line warnings a command prints before it goes on
    topology: Topology | None = None  # given by --node-rank / --master-addr; None: [serve] as locked

    def to_json(self) -> dict[str, Any]:
        data = self.plan.to_json()
        data["node"] = node_facts(self.plan.argv)
        data["sampling_defaults"] = dict(self.sampling_defaults)
        data["engine_installed"] = None if self.engine is None else self.engine.to_json()
        data["engine_drift"] = [c.to_json() for c in self.drift]
        data["notices"] = list(self.notices)
        return data

    def describe(self) -> str:
        return format_plan(self.plan, self.sampling_defaults)


def load_locked(manifest_arg: str | os.PathLike[str] | None) -> tuple[Manifest, Lock]:
    """The manifest and its lock, refusing a lock that is missing or stale."""
    manifest = load_manifest(manifest_arg)
    return manifest, check_lock_is_current(manifest)


def prepare(
    manifest_arg: str | os.PathLike[str] | None,
    options: Options = Options(),
    caller_env: Mapping[str, str] | None = None,
    say: Callable[[str], None] = to_stderr,
) -> Prepared:
    """Everything a command needs to show or launch the locked deployment.

    Launching (`options.launching`) also refuses another engine (unless drift is allowed),
    verifies the store (fetching what it lacks), checks [serve] against the engine that will run,
    and checks the TLS files; showing (`plan`) does none of that and never waits for vLLM.
    """
    caller_env = os.environ if caller_env is None else caller_env
    manifest, lock = load_locked(manifest_arg)
    # A node that cannot be is refused before the store is touched.
    topology = node_topology(lock.serve, options.node_rank, options.master_addr)
    store = Store(manifest.store_path())
    running = installed_engine()
    notices = []
    if options.launching:
        drift = check_engine(lock.engine, running, options.allow_engine_drift)
        if drift:
            notices.append(f"warning: engine drift allowed: {describe_drift(drift)}")
        if lock.engine is not None and lock.engine.environment is None:
            notices.append(
                f"note: the lock pins {lock.engine.spec} but not the rest of its environment (torch, transformers, ...); "
                "the run record keeps what is installed. Pin it with [runtime] engine-environment (`vdeploy engine freeze`)"
            )
        if lock.deterministic:
            check_deterministic(manifest, lock, running, caller_env)
        ensure_store(manifest, lock, store, options.fetch, say)
    else:
        drift = engine_drift(lock.engine, running) if running is not None else []
    catalogue = _catalogue(lock, running)
    if options.launching:
        from vdeploy.flags import check_serve

        # [serve] is checked against the engine that runs, whatever the lock was checked against.
        check_serve(manifest.serve, catalogue, manifest)
        check_tls_files(options.overrides.apply(lock.serve), manifest.folder)
    plan = make_plan(lock, store, find_launcher(), catalogue, options.overrides, caller_env, manifest.folder, topology)
    return Prepared(
        manifest=manifest, lock=lock, store=store, engine=running, drift=tuple(drift), catalogue=catalogue,
        plan=plan, sampling_defaults=sampling_defaults(store, lock), notices=tuple(notices), topology=topology,
    )


def _catalogue(lock: Lock, running: InstalledEngine | None) -> Catalogue | None:
    """The flags of the engine that will run, so `plan` renders exactly what `up` runs: the
    installed one (probed once, then cached), else the locked one if its catalogue is cached."""
    from vdeploy.probe import load_catalogue

    if running is not None:
        return load_catalogue(running.spec)
    return load_catalogue(lock.engine.spec, build=False) if lock.engine else None


def fetch_for(manifest: Manifest, lock: Lock, store: Store, say: Callable[[str], None] = to_stderr) -> FetchReport:
    """Fetch everything the lock pins; local folders and the chat template come from the manifest."""
    # The lock becomes a root of the store, and what fetch places is recorded, for `vdeploy gc`.
    with using_store(store, manifest.lock_path, lock):
        report = fetch(
            lock.sources,
            store,
            lock.chat_template,
            manifest.chat_template.data if manifest.chat_template else None,
            {s.role: s.path for s in manifest.sources if s.is_local},
            say=say,
        )
    remember_parse(manifest.lock_path)
    return report


def ensure_store(manifest: Manifest, lock: Lock, store: Store, allow_fetch: bool, say: Callable[[str], None]) -> None:
    """Verify the store; fetch what is missing (verified) unless told not to."""
    record_use(store, manifest.lock_path, lock)  # a root of the store, so `vdeploy gc` keeps its files
    report = verify(lock, store)
    if report.ok:
        return
    if not allow_fetch:
        shown = "; ".join(report.problems()[:3])
        raise StoreError(f"store {store.root} does not match the lock ({shown}); run `vdeploy fetch` (or drop --no-fetch)")
    extra = f", holds {len(report.extra)} file(s) it does not list" if report.extra else ""
    say(f"store lacks {len(report.missing) + len(report.mismatched)} locked file(s){extra}; fetching")
    fetch_for(manifest, lock, store, say)
    report = verify(lock, store)
    if not report.ok:
        raise StoreError(f"store {store.root} still fails verification: {'; '.join(report.problems()[:3])}")


def sampling_defaults(store: Store, lock: Lock) -> dict[str, Any]:
    """The request defaults the locked generation_config.json imposes on every request."""
    path = store.snapshot_dir(lock.model) / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    return {k: config[k] for k in SAMPLING_KEYS if k in config}


def check_deterministic(manifest: Manifest, lock: Lock, running: InstalledEngine | None, caller_env: Mapping[str, str]) -> None:
    """[runtime] deterministic is refused, in one line, where the engine or the hardware cannot honour it."""
    from vdeploy.determinism import batch_invariance_problem
    from vdeploy.manifest import manifest_problem

    distribution = running.distribution if running is not None else None
    gpus: list[dict[str, Any]] = []
    if distribution is None or not distribution.endswith("-cpu"):
        from vdeploy.hardware import read_hardware

        gpus = read_hardware(caller_env)["gpus"]
    problem = batch_invariance_problem(distribution, gpus, lock.serve)
    if problem:
        raise manifest_problem(manifest, "runtime", "deterministic", f"cannot run here: {problem}",
                               "remove it (and relock) to serve without it")


def check_tls_files(serve: Mapping[str, Any], base_dir: Path) -> None:
    """TLS files must be readable when vLLM starts, and a private key private."""
    for key in PATH_FLAGS:
        if key not in serve:
            continue
        path = base_dir / Path(str(serve[key])).expanduser()
        if not path.is_file() or not os.access(path, os.R_OK):
            raise LaunchError(f"[serve] {key}: {path} does not exist or cannot be read; fix the path")
        if key == "ssl-keyfile" and path.stat().st_mode & 0o077:
            raise LaunchError(f"[serve] ssl-keyfile: {path} is readable by other users; run `chmod 600 {path}`")
