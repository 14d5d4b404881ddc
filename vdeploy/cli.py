"""The command line: parse, call one function, render. Heavy imports stay inside the commands."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from vdeploy.errors import VdeployError

app = typer.Typer(
    name="vdeploy",
    help="Declarative, locked, reproducible vLLM deployments.",
    no_args_is_help=True,
    # --install-completion / --show-completion: about 2 ms of CPU on `--help` (benchmarks/completion_cost.py).
    add_completion=True,
    # Pretty exceptions print local variables, which can hold a token.
    pretty_exceptions_enable=False,
    # Plain help: importing rich to draw boxes would double the start-up of `--help`.
    rich_markup_mode=None,
)

ManifestArg = Annotated[
    Optional[Path],
    typer.Argument(help="The manifest, or a folder holding vdeploy.toml.", show_default="./vdeploy.toml"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def say(line: str = "") -> None:
    typer.echo(line, err=True)


def emit_json(value: object) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


@app.command()
def lock(
    manifest: ManifestArg = None,
    update: Annotated[bool, typer.Option("--update", help="Move every source to its revision's newest commit.")] = False,
    locked: Annotated[
        bool, typer.Option("--locked", help="Write nothing; exit 1 if locking would change the lock (for CI).")
    ] = False,
) -> None:
    """Resolve the manifest against the Hub and write vdeploy.lock beside it."""
    from vdeploy.manifest import load_manifest
    from vdeploy.resolve import dtype_warning, lock_manifest

    loaded = load_manifest(manifest)
    outcome = lock_manifest(loaded, update=update, say=say, locked=locked)
    if warning := dtype_warning(loaded):
        say(warning)
    for check in outcome.skipped:
        say(f"skipped: {check}")
    if update and not outcome.moved:
        say("no source moved")
    state = "up to date:" if locked or not outcome.written else "wrote"
    files = sum(len(s.files) for s in outcome.lock.sources)
    say(f"{state} {loaded.lock_path} ({files} files, deployment {outcome.lock.deployment[:16]})")


@app.command()
def fetch(manifest: ManifestArg = None) -> None:
    """Download the locked files into the store, each checked against its sha256."""
    from vdeploy.prepare import fetch_for, load_locked
    from vdeploy.store import Store

    loaded, current = load_locked(manifest)
    store = Store(loaded.store_path())
    report = fetch_for(loaded, current, store, say)
    say(
        f"store {store.root}: {report.downloaded} downloaded ({report.downloaded_bytes} bytes), "
        f"{report.reused} reused, {report.imported} imported, {report.present} already present"
    )


@app.command()
def verify(
    manifest: ManifestArg = None,
    full: Annotated[bool, typer.Option("--full", help="Re-hash every file, ignoring recorded fingerprints.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Check the store against the lock: missing, extra and mismatching files."""
    from vdeploy.lockfile import read_lock
    from vdeploy.manifest import load_manifest
    from vdeploy.store import Store, verify as verify_store

    loaded = load_manifest(manifest)
    report = verify_store(read_lock(loaded.lock_path), Store(loaded.store_path()), full=full)
    if as_json:
        emit_json(report.to_json())
    else:
        for problem in report.problems():
            say(problem)
        mode = "full" if full else "fast"
        # fetch downloads what is missing or wrong and removes links the lock does not list.
        verdict = "ok" if report.ok else f"{len(report.problems())} problem(s); run `vdeploy fetch`"
        say(f"verify ({mode}): {report.checked} files: {verdict}")
    if not report.ok:
        raise typer.Exit(1)


HostOption = Annotated[Optional[str], typer.Option("--host", help="Bind address (runtime-only; not in the lock).")]
PortOption = Annotated[Optional[int], typer.Option("--port", help="Port (runtime-only; not in the lock).")]
NodeRankOption = Annotated[Optional[int], typer.Option(
    "--node-rank", help="Multi-node: this node's rank, 0 to nnodes-1; ranks but 0 run headless (runtime-only).",
)]
MasterAddrOption = Annotated[Optional[str], typer.Option(
    "--master-addr", help="Multi-node: node 0's address (default: the lock's master-addr; runtime-only).",
)]


@app.command()
def plan(
    manifest: ManifestArg = None,
    host: HostOption = None,
    port: PortOption = None,
    node_rank: NodeRankOption = None,
    master_addr: MasterAddrOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the exact argv and environment `vdeploy up` will use (no vLLM import).

    With --node-rank K: only how node K's plan differs from node 0's."""
    from vdeploy.prepare import Options, prepare

    prepared = prepare(manifest, Options(host=host, port=port, node_rank=node_rank, master_addr=master_addr))
    if node_rank is not None:
        from vdeploy.changes import render_changes
        from vdeploy.nodes import rank_changes

        head = prepare(manifest, Options(host=host, port=port, node_rank=0, master_addr=master_addr))
        changes = rank_changes(head.plan, prepared.plan)
        if as_json:
            emit_json({"node_rank": node_rank, "deployment": prepared.plan.deployment,
                       "changes": [c.to_json() for c in changes]})
            return
        nodes = prepared.topology.nodes if prepared.topology else 1
        typer.echo(f"# node {node_rank} of {nodes} against node 0 (deployment {prepared.plan.deployment[:16]}, the same on every node)")
        typer.echo("\n".join(render_changes(changes)) if changes else "  no difference")
        return
    if as_json:
        emit_json(prepared.to_json())
    else:
        typer.echo(prepared.describe())


PureOption = Annotated[bool, typer.Option("--pure", help="Drop the caller's unpinned VLLM_*/HF_*/... variables.")]
NoFetchOption = Annotated[bool, typer.Option("--no-fetch", help="Fail instead of fetching missing files.")]
DriftOption = Annotated[
    bool, typer.Option("--allow-engine-drift", help="Run on an engine other than the locked one (recorded).")
]
TimeoutOption = Annotated[float, typer.Option("--timeout", help="Seconds to wait for /health.")]


@app.command()
def up(
    manifest: ManifestArg = None,
    host: HostOption = None,
    port: PortOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check everything, print the plan, start nothing.")] = False,
    detach: Annotated[
        bool, typer.Option("--detach", help="Return once /health answers; vLLM runs on (`vdeploy down` stops it).")
    ] = False,
    pure: PureOption = False,
    no_fetch: NoFetchOption = False,
    allow_engine_drift: DriftOption = False,
    timeout: TimeoutOption = 900,
    node_rank: NodeRankOption = None,
    master_addr: MasterAddrOption = None,
) -> None:
    """Verify the store (fetching what it lacks), then launch vLLM from the lock.

    Multi-node: run `up --node-rank K --master-addr ADDR` on each node; rank 0 serves, the others
    run headless and are ready once their engine has joined."""
    from vdeploy.launch import engine_env, launch, launch_detached
    from vdeploy.prepare import Options, prepare

    options = Options(host=host, port=port, launching=True, allow_engine_drift=allow_engine_drift, fetch=not no_fetch,
                      node_rank=node_rank, master_addr=master_addr)
    prepared = prepare(manifest, options, say=say)
    for notice in prepared.notices:
        say(notice)
    if dry_run:
        engine_env(prepared, os.environ, pure)  # the secrets must be readable, as for a launch
        typer.echo(prepared.describe())
        return
    start = launch_detached if detach else launch
    raise typer.Exit(start(prepared, pure, timeout, say))


def split_command(words: list[str], argv: list[str]) -> tuple[Optional[Path], list[str]]:
    """`run [MANIFEST] [options] -- CMD...`: click drops the `--`, so the raw argv says where CMD starts."""
    if "--" not in argv:
        raise typer.BadParameter("put the command after --, as in: vdeploy run examples/tiny -- python eval.py")
    command = argv[argv.index("--") + 1:]
    if not command or words[len(words) - len(command):] != command:
        raise typer.BadParameter("name a command after --, as in: vdeploy run -- python eval.py")
    before = words[: len(words) - len(command)]
    if len(before) > 1:
        raise typer.BadParameter(f"one manifest before --, not {len(before)}: {' '.join(before)}")
    return (Path(before[0]) if before else None), command


@app.command()
def run(
    words: Annotated[Optional[list[str]], typer.Argument(metavar="[MANIFEST] -- CMD [ARGS]...", show_default=False)] = None,
    host: HostOption = None,
    port: PortOption = None,
    pure: PureOption = False,
    no_fetch: NoFetchOption = False,
    allow_engine_drift: DriftOption = False,
    timeout: TimeoutOption = 900,
) -> None:
    """Serve the deployment, run CMD against it (OPENAI_BASE_URL, ...), stop it; exit with CMD's code."""
    from vdeploy.launch import check_command, free_loopback_port, run_command
    from vdeploy.manifest import load_manifest
    from vdeploy.prepare import Options, prepare

    manifest, command = split_command(list(words or []), sys.argv)
    check_command(command)
    serve = load_manifest(manifest).serve
    # Two runs of different projects never collide: a free loopback port unless one is named.
    if port is None and "port" not in serve:
        port = free_loopback_port()
        host = host or ("127.0.0.1" if "host" not in serve else None)
    options = Options(host=host, port=port, launching=True, allow_engine_drift=allow_engine_drift, fetch=not no_fetch)
    prepared = prepare(manifest, options, say=say)
    for notice in prepared.notices:
        say(notice)
    raise typer.Exit(run_command(prepared, command, pure, timeout, say))


@app.command()
def check(
    manifest: ManifestArg = None,
    record: Annotated[bool, typer.Option("--record", help="Write the answers as the golden ones (vdeploy.golden.json).")] = False,
    url: Annotated[
        Optional[str], typer.Option("--url", help="Ask this live server (e.g. from `up --detach`) instead of starting one.")
    ] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Largest logprob difference still `same` (0: bit-identical).")] = 0.0,
    concurrency: Annotated[
        int, typer.Option("--concurrency", help="Also send the checks N at a time and report how far batched answers move.")
    ] = 1,
    pure: PureOption = False,
    no_fetch: NoFetchOption = False,
    allow_engine_drift: DriftOption = False,
    timeout: TimeoutOption = 900,
    as_json: JsonOption = False,
) -> None:
    """Ask the [[check]] prompts and compare the answers with the golden ones; exit 1 naming any that drifted."""
    from vdeploy.check import CheckOptions, check as run_checks

    options = CheckOptions(url=url, record=record, tolerance=tolerance, concurrency=concurrency, pure=pure,
                           fetch=not no_fetch, allow_engine_drift=allow_engine_drift, timeout=timeout)
    report = run_checks(manifest, options, say)
    if as_json:
        emit_json(report.to_json())
    else:
        typer.echo("\n".join(report.render()))
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def status(
    manifest: ManifestArg = None,
    all_projects: Annotated[bool, typer.Option("--all", help="Every project's live deployments on this machine.")] = False,
    as_json: JsonOption = False,
) -> None:
    """The live deployments started from this project: run id, state, health, pid, URL, uptime."""
    from vdeploy.status import machine_status, project_status

    if all_projects:
        rows, where = machine_status(), "this machine"
    else:
        from vdeploy.manifest import find_manifest

        found = find_manifest(manifest)  # only where it is: status needs no parse
        rows, where = project_status(found.parent), str(found)
    if as_json:
        emit_json([row.to_json() for row in rows])
        return
    if not rows:
        say(f"no live deployments of {where}")
    for row in rows:
        typer.echo(row.describe())


@app.command()
def down(
    manifest: Annotated[
        Optional[str], typer.Argument(metavar="[MANIFEST] [RUN-ID]", help="The manifest (default ./vdeploy.toml), then the run.")
    ] = None,
    run_id: Annotated[Optional[str], typer.Argument(hidden=True)] = None,
) -> None:
    """Stop one live deployment of this project (the only one, or RUN-ID) and complete its record."""
    from vdeploy.manifest import load_manifest
    from vdeploy.status import choose_run, stop_run

    if run_id is None and manifest is not None and not Path(manifest).exists():
        manifest, run_id = None, manifest  # a lone word that is no path is a run id
    loaded = load_manifest(manifest)
    record = stop_run(choose_run(loaded.folder, run_id, loaded.path), say)
    code = "?" if record.exit_code is None else record.exit_code
    say(f"stopped {record.run_id} (exit {code}; record {record.path})")


@app.command()
def runs(manifest: ManifestArg = None, as_json: JsonOption = False) -> None:
    """List the run records `up` and `run` wrote beside this manifest (schema: README)."""
    from vdeploy.manifest import load_manifest
    from vdeploy.records import EXITED, list_records, run_state

    records = list_records(load_manifest(manifest).folder)
    if as_json:
        emit_json([r.listing() for r in records])
        return
    if not records:
        say("no runs yet")
    for run in records:
        state = run_state(run)
        if state == EXITED:
            state = "exited ?" if run.exit_code is None else f"exit {run.exit_code}"
        typer.echo(f"{run.started}  {run.kind:<3}  {run.deployment[:16]}  {state:>8}  {run.url}  {run.path}")


engine_app = typer.Typer(help="The engine: freeze its installed environment for a manifest to pin.", no_args_is_help=True)
app.add_typer(engine_app, name="engine")


@engine_app.command("freeze")
def engine_freeze(
    file: Annotated[Optional[Path], typer.Argument(help="Where to write the constraints file (default: print it).")] = None,
) -> None:
    """Write the installed engine's environment (vLLM and what it pulls in) as exact pins."""
    from vdeploy.atomic import default_mode, write_atomically
    from vdeploy.engine import freeze_text, installed_engine
    from vdeploy.errors import EngineError

    engine = installed_engine()
    if engine is None:
        raise EngineError("no vLLM is installed here, so there is no engine environment to freeze; install the engine first")
    text = freeze_text(engine)
    if file is None:
        typer.echo(text, nl=False)
        return
    write_atomically(file, text.encode(), mode=default_mode())
    pins = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    say(f"wrote {file} ({pins} pins of {engine.spec}); name it as [runtime] engine-environment = \"{file}\"")


@app.command()
def flags(
    word: Annotated[Optional[str], typer.Argument(help="Show only flags whose name contains this word.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List the `vllm serve` flags the installed engine accepts (its own parser, cached)."""
    from vdeploy.probe import installed_catalogue

    catalogue = installed_catalogue()
    found = catalogue.search(word or "")
    if as_json:
        emit_json({"engine": catalogue.engine, "digest": catalogue.digest, "flags": [
            {"name": f.name, "options": list(f.option_strings), "kind": f.kind, "type": f.type_name,
             "choices": None if f.choices is None else list(f.choices), "default": f.default}
            for f in found
        ]})
        return
    for flag in found:
        choices = f"  {{{', '.join(map(str, flag.choices))}}}" if flag.choices else ""
        typer.echo(f"{' '.join(flag.option_strings):<48} {flag.kind:<10} default {flag.default!r}{choices}")
    say(f"{len(found)} of {len(catalogue.flags)} flags of {catalogue.engine}")


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="Where to write vdeploy.toml.")] = Path("."),
    from_command: Annotated[
        Optional[str], typer.Option("--from-command", help="An existing `vllm serve ...` command line to translate.")
    ] = None,
    repo: Annotated[Optional[str], typer.Option("--repo", help="The model's Hub repo id, for a new manifest.")] = None,
    engine: Annotated[
        Optional[str], typer.Option("--engine", help="[runtime] engine to write (default: the installed vLLM).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing vdeploy.toml.")] = False,
) -> None:
    """Write a vdeploy.toml: from an existing `vllm serve` command, or a starter for --repo."""
    from vdeploy.init import init_manifest

    target = init_manifest(folder, from_command, repo, engine, force)
    say(f"wrote {target}; next: `vdeploy lock {target.parent}`")


@app.command()
def bundle(
    manifest: ManifestArg = None,
    out: Annotated[
        Optional[Path], typer.Option("-o", "--output", help="Where to write it (default: beside the manifest, named by model and deployment).")
    ] = None,
    tar: Annotated[bool, typer.Option("--tar", help="Write one deterministic tar instead of a folder.")] = False,
    max_volume_size: Annotated[
        Optional[str], typer.Option("--max-volume-size", help="Split into tars of at most SIZE (e.g. 50G, 2GiB), each a valid layout.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Write every locked file and the lock as an OCI layout holding one ModelPack artifact; print its digest."""
    from vdeploy.bundle import bundle as write_bundle, parse_size

    size = parse_size(max_volume_size) if max_volume_size is not None else None
    result = write_bundle(manifest, out, tar, size)
    if as_json:
        emit_json(result.to_json())
        return
    how = f", {result.linked} hard-linked from the store" if result.linked else ""
    for path in result.outputs:
        say(f"wrote {path}")
    say(f"bundled {result.files} files ({result.file_bytes} bytes{how}) of deployment {result.deployment[:16]}")
    typer.echo(result.digest)


@app.command()
def unbundle(
    paths: Annotated[
        list[Path], typer.Argument(help="The bundle: its folder or tar (every volume, any order), then optionally the manifest.")
    ],
    as_json: JsonOption = False,
) -> None:
    """Restore the store offline from a bundle, verified, and write its lock beside the manifest if absent."""
    from vdeploy.bundle import unbundle as restore_bundle

    result = restore_bundle(paths, say)
    if as_json:
        emit_json(result.to_json())
        return
    report = result.report
    linked = f", {report.linked} hard-linked" if report.linked else ""
    say(f"store {result.store}: {report.restored} restored ({report.restored_bytes} bytes{linked}), {report.present} already present")
    if result.lock_written:
        say(f"wrote {result.lock_path}")
    say(f"restored {result.digest} (deployment {result.deployment[:16]}); next: `vdeploy up --no-fetch`")


PlainHttpOption = Annotated[
    bool, typer.Option("--plain-http", help="Allow plain HTTP to a registry that is not on loopback (loopback needs no flag).")
]


@app.command(no_args_is_help=True)
def push(
    words: Annotated[list[str], typer.Argument(metavar="[MANIFEST] REGISTRY/REPO[:TAG]", show_default=False)],
    plain_http: PlainHttpOption = False,
    as_json: JsonOption = False,
) -> None:
    """Push the deployment's bundle artifact to an OCI registry (blobs it has are not sent); print REGISTRY/REPO@sha256:..."""
    from vdeploy.carry import push as push_artifact

    if len(words) > 2:
        raise typer.BadParameter(f"one manifest and one reference, not {len(words)} words: {' '.join(words)}")
    manifest, reference = (None, words[0]) if len(words) == 1 else (Path(words[0]), words[1])
    result = push_artifact(manifest, reference, plain_http or None, say)
    if as_json:
        emit_json(result.to_json())
        return
    pushed = result.pushed
    say(f"pushed {result.files} files of deployment {result.deployment[:16]}: {pushed.uploaded} blob(s) sent "
        f"({pushed.uploaded_bytes} bytes), {pushed.already_there} already there")
    typer.echo(pushed.reference)


@app.command(no_args_is_help=True)
def pull(
    reference: Annotated[str, typer.Argument(metavar="REF", help="REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:...", show_default=False)],
    folder: Annotated[Optional[Path], typer.Argument(metavar="[DIR]", help="The project: its vdeploy.toml names the store.", show_default=".")] = None,
    plain_http: PlainHttpOption = False,
    as_json: JsonOption = False,
) -> None:
    """Pull a pushed deployment into the store, every blob verified, and write its lock if absent (then `up --no-fetch`)."""
    from vdeploy.carry import pull as pull_artifact

    result = pull_artifact(reference, folder, plain_http or None, say)
    if as_json:
        emit_json(result.to_json())
        return
    report = result.restored.report
    say(f"store {result.restored.store}: {report.restored} restored ({report.restored_bytes} bytes), {report.present} already present")
    if result.restored.lock_written:
        say(f"wrote {result.restored.lock_path}")
    say(f"pulled deployment {result.restored.deployment[:16]}; next: `vdeploy up --no-fetch`")
    typer.echo(result.pulled.reference)


@app.command()
def gc(
    manifest: ManifestArg = None,
    store: Annotated[
        Optional[Path], typer.Option("--store", help="The store to clean (default: the manifest's, else the Hugging Face cache).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed, and how many bytes; remove nothing.")] = False,
    roots: Annotated[bool, typer.Option("--roots", help="List the locks that use the store, live and dead; remove nothing.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Remove what vdeploy placed in the store that no live lock pins (files other tools put there stay)."""
    from vdeploy.gc import collect, root_states, store_for

    chosen = store_for(manifest, store)
    if roots:
        states = root_states(chosen)
        if as_json:
            emit_json([state.to_json() for state in states])
            return
        for state in states:
            why = f"  ({state.why})" if state.why else ""
            typer.echo(f"{state.state:<8} {state.record.lock_path}  deployment {state.record.deployment[:16]}, {len(state.record.pins)} paths{why}")
        say(f"store {chosen.root}: {len(states)} root(s)")
        return
    report = collect(chosen, dry_run, say)
    if as_json:
        emit_json(report.to_json())
        return
    verb = "would remove" if dry_run else "removed"
    if report.removed:
        typer.echo("\n".join(f"{verb} {path} ({size} bytes)" for path, size in report.removed))
    for path in report.in_use:
        say(f"kept {path}: a download holds its lock")
    for path in report.still_linked:
        say(f"kept {path}: a snapshot entry vdeploy did not place links to it")
    shared = f"; {report.shared_bytes} of them stay on disk through other hard links" if report.shared_bytes else ""
    dead = sum(1 for r in report.roots if r.state == "dead")
    say(f"store {chosen.root}: {verb} {len(report.removed)} file(s), {report.removed_bytes} bytes{shared}; "
        f"{len(report.roots) - dead} live root(s), {dead} dead")


@app.command()
def export(
    format: Annotated[str, typer.Argument(help="k8s | lws | raycluster | compose | systemd", show_default=False)],
    manifest: ManifestArg = None,
    output: Annotated[
        Optional[Path], typer.Option("-o", "--output", help="Write the files into this folder (default: print k8s/lws/raycluster).")
    ] = None,
    image: Annotated[Optional[str], typer.Option("--image", help="The engine image, REPO@sha256:... (default: [runtime] engine-image).")] = None,
    init_image: Annotated[Optional[str], typer.Option("--init-image", help="Image running `vdeploy fetch/verify` (default: the engine image).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Name of the objects (default: the served model name).")] = None,
    namespace: Annotated[Optional[str], typer.Option("--namespace", help="Kubernetes namespace (default: kubectl's).")] = None,
    nodes: Annotated[Optional[int], typer.Option("--nodes", help="Nodes (default: [serve] nnodes, else 1).")] = None,
    gpus_per_node: Annotated[Optional[int], typer.Option("--gpus-per-node", help="GPUs per node (default: parallel sizes / nodes).")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="lws: mp or ray (must match the lock).")] = None,
    replicas: Annotated[Optional[int], typer.Option("--replicas", help="lws: how many groups.")] = None,
    port: PortOption = None,
    storage_size: Annotated[Optional[str], typer.Option("--storage-size", help="Models volume size (default: 1.2 × the locked bytes).")] = None,
    startup_timeout: Annotated[Optional[int], typer.Option("--startup-timeout", help="Seconds allowed for loading (default: from the locked bytes).")] = None,
    master_addr: Annotated[Optional[str], typer.Option("--master-addr", help="systemd, several nodes: the address of node 0.")] = None,
    venv: Annotated[Optional[str], typer.Option("--venv", help="systemd: where vdeploy and vLLM are installed on each node.")] = None,
) -> None:
    """Write the locked deployment for Kubernetes (Deployment, LeaderWorkerSet, RayCluster), compose or systemd."""
    from vdeploy.errors import ExportError
    from vdeploy.export import ExportOptions, export as export_documents, load_for_export, write_export

    options = ExportOptions(
        image=image, init_image=init_image, name=name, namespace=namespace, nodes=nodes, gpus_per_node=gpus_per_node,
        backend=backend, replicas=replicas, port=port, storage_size=storage_size, startup_timeout=startup_timeout,
        master_addr=master_addr, venv=venv,
    )
    loaded, current, catalogue = load_for_export(manifest)
    exported = export_documents(format, loaded, current, catalogue, options)
    if output is None and exported.stream is None:
        raise ExportError(f"export {format} writes several files ({', '.join(f.path for f in exported.files[:2])}, ...); pass -o DIR")
    for notice in exported.notices:
        say(notice)
    if output is None:
        typer.echo(exported.stream, nl=False)
        return
    written = write_export(exported, output)
    say(f"wrote {len(written)} file(s) to {output} ({format}, {exported.name}, deployment {current.deployment[:16]})")


@app.command("wait-healthy")
def wait_healthy(
    url: Annotated[str, typer.Argument(help="The server's base URL, e.g. http://127.0.0.1:8000.")],
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 1800,
) -> None:
    """Wait until URL/health answers 200 (systemd's ExecStartPost: "started" means healthy)."""
    from vdeploy.errors import LaunchError
    from vdeploy.launch import poll_health

    if not poll_health(url, timeout):
        raise LaunchError(f"{url.rstrip('/')}/health did not answer 200 within {timeout:.0f} s")


@app.command()
def diff(
    old: Annotated[Optional[str], typer.Argument(
        help="A lock, a manifest or project folder, git:REV[:PATH], or a run record.", show_default="git:HEAD",
    )] = None,
    new: Annotated[Optional[str], typer.Argument(help="The same kinds of input.", show_default="./vdeploy.lock")] = None,
    as_json: JsonOption = False,
) -> None:
    """What differs between two deployments, and whether it can change the answers.

    No argument: ./vdeploy.lock against git:HEAD (what is not committed). One: it against
    ./vdeploy.lock. Exit 0 same, 1 different, 2 error."""
    from vdeploy.sides import diff_inputs

    try:
        result = diff_inputs(old, new)
    except (VdeployError, OSError) as exc:
        # diff(1)'s codes: 1 means "different", so an unreadable input is 2.
        if os.environ.get("VDEPLOY_DEBUG"):
            raise
        where = f": {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
        typer.secho(f"error: {exc.strerror if isinstance(exc, OSError) else exc}{where}", fg="red", err=True)
        raise typer.Exit(2)
    if as_json:
        emit_json(result.to_json())
    else:
        typer.echo("\n".join(result.render()))
    raise typer.Exit(0 if result.same else 1)


def keep_only_the_command_named(argv: list[str]) -> None:
    """Typer builds every command's parameters at each start (about 2 ms a command); a call that
    names a command needs only that one. `vdeploy --help`, shell completion and a name that is not
    a command keep them all, so their listings and suggestions are whole. The `engine` group always
    stays, which also keeps the app a group."""
    if len(argv) < 2 or argv[1].startswith("-") or any(k.startswith("_VDEPLOY_COMPLETE") for k in os.environ):
        return
    named = [c for c in app.registered_commands if (c.name or c.callback.__name__.replace("_", "-")) == argv[1]]
    if named or argv[1] in {group.name for group in app.registered_groups}:
        app.registered_commands = named


def main() -> None:
    """Entry point: a VdeployError becomes one red line and exit code 1."""
    from vdeploy.errors import UsageError

    keep_only_the_command_named(sys.argv)
    try:
        app()
    except VdeployError as exc:
        if os.environ.get("VDEPLOY_DEBUG"):
            raise
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2 if isinstance(exc, UsageError) else 1)
    except OSError as exc:
        # The file system said no (permissions, a full disk): the user's to fix, not a crash.
        if os.environ.get("VDEPLOY_DEBUG"):
            raise
        where = f": {exc.filename}" if exc.filename else ""
        typer.secho(f"error: {exc.strerror or exc}{where}; set VDEPLOY_DEBUG=1 for details", fg="red", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
