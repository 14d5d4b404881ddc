"""Step 5 of the flow: the exact command, as data. Lock × store × overrides → argv and environment.

Pure: no network, no vLLM, no file reads; `vdeploy plan` prints exactly what `vdeploy up` runs.
The store and the launcher are arguments, so a plan can be made for another machine: a
container's `/models` store and `vllm serve` in an image plan the same way (`vdeploy export`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from vdeploy.constants import API_KEY_VARIABLE, BATCH_INVARIANT_VARIABLE, REDACTED, SECRET_NAME_RE
from vdeploy.errors import LaunchError, LockError, UsageError
from vdeploy.lockfile import LockedEngine, Lock
from vdeploy.store import Store

if TYPE_CHECKING:
    from vdeploy.flags import Catalogue

MODULE_LAUNCHER = "vllm.entrypoints.openai.api_server"

# The caller's variables that can change what vLLM does; shown by plan, recorded by up,
# and removed by `up --pure` unless the manifest pins them.
BEHAVIOUR_PREFIXES = (
    "VLLM_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_", "NCCL_",
    "OMP_", "MKL_", "KMP_", "TOKENIZERS_", "RAY_", "NVIDIA_",
)
BEHAVIOUR_NAMES = frozenset({
    "PYTHONHASHSEED", "PYTHONPATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "XDG_CACHE_HOME",
})

PATH_FLAGS = ("ssl-keyfile", "ssl-certfile", "ssl-ca-certs")

# Flags whose value may change at `up` without a new lock (they never change answers).
RUNTIME_OVERRIDES = ("host", "port")

# Flags that place one process in a multi-node deployment: where it runs, not what it serves.
# Topology owns them (`vdeploy export`, and `up --node-rank` on several hosts).
TOPOLOGY_FLAGS = ("nnodes", "node-rank", "master-addr", "master-port", "headless")


@dataclass(frozen=True)
class Launcher:
    """How to start the engine: `vllm serve MODEL` or `python -m ...api_server --model MODEL`."""

    command: tuple[str, ...]
    model_positional: bool

    @classmethod
    def module(cls, python: str) -> Launcher:
        return cls((python, "-m", MODULE_LAUNCHER), model_positional=False)

    @classmethod
    def cli(cls, vllm: str) -> Launcher:
        return cls((vllm, "serve"), model_positional=True)

    @classmethod
    def for_engine(cls, engine: LockedEngine | None, bin_dir: str = "") -> Launcher:
        """The launcher on a machine or image where the locked engine is installed in bin_dir ("": on
        PATH). Only the `vllm` distribution's console script works (engine.find_launcher says why)."""
        prefix = f"{bin_dir.rstrip('/')}/" if bin_dir else ""
        if engine is None or engine.distribution == "vllm":
            return cls.cli(f"{prefix}vllm")
        return cls.module(f"{prefix}python3" if not bin_dir else f"{prefix}python")


@dataclass(frozen=True)
class Plan:
    argv: tuple[str, ...]
    env: dict[str, str]  # pinned: set for the engine on every run
    secrets: dict[str, str]  # engine variable → where its value comes from ("env:NAME" / "file:PATH")
    inherited: dict[str, str]  # caller's behaviour-changing variables that are not pinned
    deployment: str
    engine: LockedEngine | None
    served_model_name: str
    host: str | None
    port: int
    code: tuple[str, ...] = ()  # the remote code that will run, one line per file and auto_map entry

    @property
    def secret_variables(self) -> frozenset[str]:
        """Every variable holding a secret: the engine's (VLLM_API_KEY) and the caller's it is read from."""
        return frozenset(self.secrets) | secret_source_variables(self.secrets)

    def child_env(self, caller_env: Mapping[str, str], pure: bool, secret_values: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in caller_env.items() if not (pure and k in self.inherited)}
        env.update(self.env)
        env.update(secret_values)
        return env

    def to_json(self) -> dict[str, Any]:
        engine = None
        if self.engine is not None:
            engine = {"distribution": self.engine.distribution, "version": self.engine.version, "pins": self.engine.pins}
            if self.engine.image is not None:
                engine["image"] = self.engine.image
        return {
            "argv": list(self.argv),
            "env": dict(self.env),
            "secrets": dict(self.secrets),
            "inherited": redact(self.inherited),
            "deployment": self.deployment,
            "engine": engine,
            "served_model_name": self.served_model_name,
            "url": self.url,
            "code": list(self.code),
        }

    @property
    def url(self) -> str:
        scheme = "https" if any(a.split("=", 1)[0] == "--ssl-certfile" for a in self.argv) else "http"
        return f"{scheme}://{url_host(self.host)}:{self.port}"


def url_host(host: str | None) -> str:
    """The host part of a URL to reach a server listening on `host`: an address that listens
    everywhere is reached on loopback, and an IPv6 address goes in brackets (zone as %25)."""
    if host in (None, "", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    if ":" in host:
        return "[" + host.replace("%", "%25") + "]"
    return host


@dataclass(frozen=True)
class Overrides:
    host: str | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        from vdeploy.flags import PORT_BOUNDS, host_problem

        if self.host is not None and host_problem(self.host):
            raise UsageError(f"--host {self.host!r} {host_problem(self.host)}; give one like 127.0.0.1, ::1 or my-host.example")
        if self.port is not None and not PORT_BOUNDS["ge"] <= self.port <= PORT_BOUNDS["le"]:
            raise UsageError(f"--port {self.port} is out of range; give a port from {PORT_BOUNDS['ge']} to {PORT_BOUNDS['le']}")

    def apply(self, serve: dict[str, Any]) -> dict[str, Any]:
        merged = dict(serve)
        for key in RUNTIME_OVERRIDES:
            value = getattr(self, key)
            if value is not None:
                merged[key] = value
        return merged


@dataclass(frozen=True)
class Topology:
    """Where one process sits in a deployment spread over `nodes` machines (vLLM's multiprocessing
    backend): its rank, and the address and port of rank 0. Runtime facts: never in the lock.

    `node_rank` and `master_addr` may be text an orchestrator fills in (LeaderWorkerSet:
    "$(LWS_WORKER_INDEX)"). Every rank but 0 runs headless. One node means no topology flags at all.
    """

    nodes: int = 1
    node_rank: int | str = 0
    master_addr: str | None = None
    master_port: int | None = None

    @classmethod
    def for_node(
        cls, serve: Mapping[str, Any], node_rank: int | str = 0, master_addr: str | None = None,
        master_port: int | None = None, nodes: int | None = None,
    ) -> Topology:
        """Node `node_rank` of the locked deployment: nnodes (unless given) and master-port (unless
        given) come from the lock's [serve]; rank and address from where it runs."""
        nodes = int(serve.get("nnodes", 1)) if nodes is None else nodes
        port = serve.get("master-port") if master_port is None else master_port
        topology = cls(nodes, node_rank, master_addr, None if port is None else int(port))
        problem = topology.problem()
        if problem is not None:
            raise LaunchError(problem)
        return topology

    @property
    def headless(self) -> bool:
        return self.node_rank != 0

    def problem(self) -> str | None:
        """Why this topology cannot run, in one line naming the flag; None when it can."""
        if self.nodes < 1:
            return f"--nodes {self.nodes}: a deployment runs on at least one node"
        if isinstance(self.node_rank, int) and not 0 <= self.node_rank < self.nodes:
            return f"--node-rank {self.node_rank} is outside 0..{self.nodes - 1} (nnodes = {self.nodes})"
        if self.nodes > 1 and not self.master_addr:
            return f"--master-addr is needed: the address of node 0, which all {self.nodes} nodes connect to"
        return None

    def apply(self, serve: Mapping[str, Any]) -> dict[str, Any]:
        """[serve] with the lock's topology flags replaced by this node's."""
        merged = {k: v for k, v in serve.items() if k not in TOPOLOGY_FLAGS}
        if self.nodes > 1:
            merged["nnodes"] = self.nodes
            merged["node-rank"] = self.node_rank
            merged["master-addr"] = self.master_addr
            if self.master_port is not None:
                merged["master-port"] = self.master_port
            if self.headless:
                merged["headless"] = True
        return merged


def without_topology(argv: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """argv without the flags Topology and Overrides own (--nnodes ... --headless, --host, --port):
    what every node of a deployment runs identically."""
    owned = {f"--{name}" for name in (*TOPOLOGY_FLAGS, *RUNTIME_OVERRIDES)}
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
            continue
        option = arg.split("=", 1)[0]
        if option in owned or option == "--no-headless":
            # headless takes no value; the others take one unless it is glued on with "="
            skip_value = option not in ("--headless", "--no-headless") and "=" not in arg
            continue
        kept.append(arg)
    return tuple(kept)


def is_behaviour_variable(name: str) -> bool:
    return name.startswith(BEHAVIOUR_PREFIXES) or name in BEHAVIOUR_NAMES


def redact(env: Mapping[str, str]) -> dict[str, str]:
    return {k: (REDACTED if SECRET_NAME_RE.search(k) else v) for k, v in sorted(env.items())}


def served_name(lock: Lock) -> str:
    names = lock.serve.get("served-model-name")
    if isinstance(names, list) and names:
        return str(names[0])
    if isinstance(names, str):
        return names
    return lock.model.repo or Path(lock.model.path or "model").name


def secret_sources(serve: Mapping[str, Any], env: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Where each secret the engine gets is read from at `up` ("env:NAME" / "file:PATH"), by the
    engine variable it lands in: api-key = { env = "X" } → VLLM_API_KEY, and each [runtime] env
    variable written as a reference, NAME = { env = "X" } / { file = "p" } → NAME."""
    secrets = {}
    for name, ref in sorted((env or {}).items()):
        if isinstance(ref, Mapping):
            kind, value = next(iter(ref.items()))
            secrets[name] = f"{kind}:{value}"
    refs = serve.get("api-key")
    if refs is not None:
        ref = refs[0] if isinstance(refs, list) else refs
        kind, value = next(iter(ref.items()))
        secrets[API_KEY_VARIABLE] = f"{kind}:{value}"
    return secrets


def pinned_env(env: Mapping[str, Any]) -> dict[str, str]:
    """The [runtime] env variables written as values (references are secrets: see secret_sources)."""
    return {name: value for name, value in env.items() if isinstance(value, str)}


def secret_source_variables(secrets: Mapping[str, str]) -> frozenset[str]:
    """The caller's variables that secret_sources reads keys from."""
    return frozenset(o.split(":", 1)[1] for o in secrets.values() if o.startswith("env:"))


def remote_code(lock: Lock) -> tuple[str, ...]:
    """What trust-remote-code will run, if the policy allows it and a source asks for it."""
    if not lock.trusts_remote_code or not any(s.auto_map for s in lock.sources):
        return ()
    lines = []
    for source in lock.sources:
        where = source.repo or source.path
        lines += [f"{source.role} {where}: {e.describe()}" for e in source.auto_map]
        lines += [f"{source.role} {where}: {f.path} sha256 {f.sha256}" for f in source.code_files]
    return tuple(lines)


def code_revision(lock: Lock) -> str:
    """The commit transformers loads remote code at. Code in the model's own folder is read from the
    snapshot whatever this says; it matters for code in another repo, which the lock pins (one at most)."""
    return lock.code[0].commit if lock.code else lock.model.commit


def supports_fingerprint(engine: LockedEngine | None) -> bool:
    """--fingerprint-mode custom exists from vLLM 0.32 on."""
    if engine is None:
        return False
    numbers = re.findall(r"\d+", engine.version)[:2]
    return len(numbers) == 2 and (int(numbers[0]), int(numbers[1])) >= (0, 32)


def make_plan(
    lock: Lock,
    store: Store,
    launcher: Launcher,
    catalogue: Catalogue | None = None,
    overrides: Overrides = Overrides(),
    caller_env: Mapping[str, str] | None = None,
    base_dir: PurePath | None = None,
    topology: Topology | None = None,
) -> Plan:
    """The argv and environment `up` will use. A pure function of its arguments.

    `store` may name a store on another machine (`Store(PurePosixPath("/models"))`) and
    `launcher` a command there; [serve] is rendered as `catalogue` (None: by TOML types) says.
    `topology` places the process in a multi-node deployment (None: [serve] as locked).
    """
    from vdeploy.flags import looks_like_option, option_value, render_serve

    serve = overrides.apply(lock.serve)
    if topology is not None:
        serve = topology.apply(serve)
    if lock.draft is not None:
        # The draft model runs from its locked snapshot, like the main model.
        draft = {k: v for k, v in serve["speculative-config"].items() if k != "revision"}
        serve["speculative-config"] = {**draft, "model": str(store.snapshot_dir(lock.draft))}
    if base_dir is not None:
        # File-valued flags are written relative to the manifest; vLLM gets absolute paths.
        for key in PATH_FLAGS:
            if isinstance(serve.get(key), str):
                serve[key] = str(base_dir / os.path.expanduser(serve[key]))
    model_dir = str(store.snapshot_dir(lock.model))
    if looks_like_option(model_dir):
        raise LockError(f"the model folder {model_dir} would reach vLLM as a flag; use a store whose path is absolute")
    argv: list[str] = list(launcher.command)
    # Every value below is glued to its flag when it could pass for one (option_value).
    argv += [model_dir] if launcher.model_positional else option_value("--model", model_dir)
    if "served-model-name" not in serve:
        argv += option_value("--served-model-name", served_name(lock))
    if lock.tokenizer is not None:
        argv += option_value("--tokenizer", str(store.snapshot_dir(lock.tokenizer)))
    if lock.chat_template is not None:
        argv += option_value("--chat-template", str(store.chat_template_path(lock.chat_template.sha256)))
    if "generation-config" not in serve:
        # Explicit: the locked model folder's generation_config.json (what "auto" means today).
        argv += option_value("--generation-config", model_dir)
    argv += option_value("--seed", str(lock.seed))
    code = remote_code(lock)
    if code:
        argv += ["--trust-remote-code", *option_value("--code-revision", code_revision(lock))]
    if supports_fingerprint(lock.engine) and "fingerprint-mode" not in serve:
        argv += ["--fingerprint-mode", "custom", *option_value("--fingerprint-value", lock.deployment)]
    argv += render_serve(serve, catalogue)

    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_CACHE": str(store.root),
        **pinned_env(lock.env),
    }
    if lock.deterministic:
        env[BATCH_INVARIANT_VARIABLE] = "1"
    caller_env = caller_env or {}
    secrets = secret_sources(serve, lock.env)
    # A key read from, say, $VLLM_SERVING_AUTH is shown and recorded by name only.
    hidden = secret_source_variables(secrets)
    inherited = {
        k: (REDACTED if k in hidden else v) for k, v in sorted(caller_env.items())
        if is_behaviour_variable(k) and k not in env and k not in secrets
    }
    port = serve.get("port", 8000)
    return Plan(
        argv=tuple(argv),
        env=dict(sorted(env.items())),
        secrets=secrets,
        inherited=inherited,
        deployment=lock.deployment,
        engine=lock.engine,
        served_model_name=served_name(lock),
        host=serve.get("host"),
        port=int(port),
        code=code,
    )


def format_plan(plan: Plan, sampling_defaults: Mapping[str, Any] | None = None) -> str:
    """The plan as a person reads it: one argument per line, then the environment."""
    lines = [f"# deployment {plan.deployment}"]
    if plan.engine is not None:
        pinned = len(plan.engine.pins) - 1
        rest = f" with {pinned} more packages pinned" if pinned else ", the rest of its environment not pinned"
        lines.append(f"# engine {plan.engine.spec}{rest}")
    if plan.env.get(BATCH_INVARIANT_VARIABLE) == "1":
        lines.append(f"# deterministic: vLLM's batch-invariant mode ({BATCH_INVARIANT_VARIABLE}=1)")
    lines.append("argv:")
    argv = list(plan.argv)
    first = next((i for i, a in enumerate(argv) if a.startswith("--")), len(argv))
    lines.append("  " + " ".join(argv[:first]))
    i = first
    while i < len(argv):
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        lines.append("    " + " ".join([argv[i], *(_quoted(v) for v in argv[i + 1:j])]))
        i = j
    lines.append("env (pinned):")
    lines += [f"  {k}={v}" for k, v in plan.env.items()]
    for name, origin in plan.secrets.items():
        lines.append(f"  {name}=<from {origin}>")
    if plan.inherited:
        lines.append("env (inherited from your shell, not pinned; `up --pure` removes them):")
        lines += [f"  {k}={v}" for k, v in redact(plan.inherited).items()]
    if plan.code:
        lines.append("remote code that will run ([policy] trust-remote-code = \"pinned\"):")
        lines += [f"  {line}" for line in plan.code]
    if sampling_defaults:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(sampling_defaults.items()))
        lines.append(f"sampling defaults from the locked generation_config.json: {shown}")
    lines.append(f"serves {plan.served_model_name!r} at {plan.url}")
    return "\n".join(lines)


def _quoted(value: str) -> str:
    import shlex

    return shlex.quote(value)
