"""Step 6 of the flow, on other machines: instead of launching here, the locked deployment as
another system's documents. Lock × options → Kubernetes (Deployment, LeaderWorkerSet, KubeRay
RayCluster), docker compose or systemd units.

Pure: `export()` reads and writes nothing (`load_for_export` and `write_export` are the edges).
Every container and unit runs `make_plan`'s argv for its node: the store is the container's, the
topology flags (--nnodes, --node-rank, --master-addr, --master-port, --headless) and --host/--port
are export's, nothing else differs. Before anything is returned, `check_*` read the documents back
for the invariants (digest-pinned images, GPU arithmetic, the verify step in every pod, the argv,
read-only offline models, names, probes, secrets by reference) and refuse in one line.

The lock reaches every pod as an immutable ConfigMap named by the hash of what it holds: a
manifest with the same inputs (so the lock is current for it; the store comes from HF_HUB_CACHE),
the lock, and the files the manifest names. Init containers run `vdeploy fetch` and
`vdeploy verify --full` on it into the models volume; vLLM mounts that volume read-only, offline.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from vdeploy.constants import LOCK_NAME, MANIFEST_NAME
from vdeploy.emit import systemd_command, systemd_environment, systemd_split, systemd_unit, to_yaml, yaml_stream
from vdeploy.errors import ExportError
from vdeploy.lockfile import Lock, dumps_lock
from vdeploy.manifest import IMAGE_DIGEST_RE, Manifest, canonical_json, sha256_hex
from vdeploy.plan import PATH_FLAGS, Launcher, Overrides, Plan, Topology, make_plan, without_topology
from vdeploy.store import Store

if TYPE_CHECKING:
    from vdeploy.flags import Catalogue

FORMATS = ("k8s", "lws", "raycluster", "compose", "systemd")
CONTAINER_FORMATS = ("k8s", "lws", "raycluster", "compose")
KUBERNETES_FORMATS = ("k8s", "lws", "raycluster")

CONFIG_ROOT = "/etc/vdeploy"  # where the ConfigMap (or compose's bind mount) puts the lock
MODELS_MOUNT = "/models"  # the models volume
CONTAINER_STORE = "/models/hub"  # the store on it, in the Hugging Face cache layout
INIT_CACHE = "/tmp/vdeploy"  # vdeploy's own cache in the init containers (parsed locks)
HUB_TOKEN_VARIABLE = "HF_TOKEN"  # read by `vdeploy fetch` for gated repos; init step only
SECRET_SUFFIX = "-secrets"  # the Kubernetes Secret <name>-secrets holds the keys, by variable name
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_PORT = 8000
SHM_SIZE = "16Gi"

# Start-up allowance: engine start, compile and graph capture, plus reading the weights at a
# pessimistic 100 MB/s from network storage. The init step's fetch and verify come before it.
STARTUP_BASE_SECONDS = 900
STARTUP_BYTES_PER_SECOND = 100_000_000
PROBE_PERIOD_SECONDS = 10

# LeaderWorkerSet fills these in, in every container (shared/notes/k8s.md §1).
LWS_RANK = "$(LWS_WORKER_INDEX)"
LWS_LEADER = "$(LWS_LEADER_ADDRESS)"
RAY_PORT = 6379
# KubeRay makes the head Service from the head container's ports: all of them must be listed.
RAY_HEAD_PORTS = (("gcs-server", RAY_PORT), ("dashboard", 8265), ("client", 10001))
RAY_RESERVED_PORTS = (RAY_PORT, 8265, 10001, 8080)  # 8080: the metrics port KubeRay adds

# Kubernetes names: a Service name is a DNS-1035 label. StatefulSet names (the LWS leader and
# each group's workers) stay within 52 characters so the controller-revision-hash label fits 63.
DNS_1035_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
LABEL_LIMIT = 63
STATEFULSET_LIMIT = 52
CONFIGMAP_LIMIT = 1_000_000  # bytes; the API server's limit is 1 MiB including the object itself
CONFIG_KEY_RE = re.compile(r"[-._a-zA-Z0-9]+")
QUANTITY_RE = re.compile(r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")

# systemd: hardening that is safe for vLLM on GPUs (shared/notes/k8s.md §6) ...
SYSTEMD_HARDENING = (
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("ProtectHostname", "yes"),
    ("ProtectProc", "invisible"),
    ("RestrictSUIDSGID", "yes"),
    ("RestrictRealtime", "yes"),
    ("LockPersonality", "yes"),
    ("SystemCallArchitectures", "native"),
    ("CapabilityBoundingSet", ""),
    ("UMask", "0077"),
)
# ... and settings never written, because they break GPUs or vLLM: PrivateDevices hides
# /dev/nvidia*; ProtectClock and DevicePolicy turn on a device allow-list that blocks the GPU;
# RestrictAddressFamilies and IPAddressDeny break vLLM's local sockets (ZMQ, localhost);
# MemoryDenyWriteExecute breaks JIT code (Triton, CUDA).
SYSTEMD_FORBIDDEN = (
    "PrivateDevices", "ProtectClock", "DevicePolicy", "RestrictAddressFamilies", "IPAddressDeny",
    "MemoryDenyWriteExecute",
)
SYSTEMD_USER = "vdeploy"
DEFAULT_VENV = "/opt/vdeploy/venv"


@dataclass(frozen=True)
class ExportOptions:
    """What `vdeploy export` was asked; None means "not given" (the lock or a default decides)."""

    image: str | None = None  # the engine image, REF@sha256:...; default [runtime] engine-image
    init_image: str | None = None  # runs `vdeploy fetch/verify`; default the engine image
    name: str | None = None
    namespace: str | None = None
    nodes: int | None = None  # default [serve] nnodes, else 1
    gpus_per_node: int | None = None  # default tensor × pipeline × data parallel / nodes
    backend: str | None = None  # lws: "mp" or "ray"; default the lock's distributed-executor-backend
    replicas: int | None = None  # lws: how many groups
    port: int | None = None
    storage_size: str | None = None  # models volume; default 1.2 × the locked bytes
    startup_timeout: int | None = None  # seconds; default from the locked bytes
    master_addr: str | None = None  # systemd, several nodes: the address of node 0
    venv: str | None = None  # systemd: where vdeploy and vLLM are installed on every node


# Which format each option applies to; any other use is refused rather than ignored.
OPTION_FORMATS = {
    "image": CONTAINER_FORMATS,
    "init_image": CONTAINER_FORMATS,
    "namespace": KUBERNETES_FORMATS,
    "backend": ("lws",),
    "replicas": ("lws",),
    "storage_size": KUBERNETES_FORMATS,
    "master_addr": ("systemd",),
    "venv": ("systemd",),
}


@dataclass(frozen=True)
class ExportFile:
    path: str  # relative to the output folder, "/"-separated
    text: str


@dataclass(frozen=True)
class Exported:
    format: str
    name: str
    files: tuple[ExportFile, ...]
    notices: tuple[str, ...] = ()  # one line each, for the person running export

    @property
    def stream(self) -> str | None:
        """The one file a Kubernetes export is, for printing (kubectl apply -f -); None otherwise."""
        return self.files[0].text if len(self.files) == 1 else None


@dataclass(frozen=True)
class ConfigTree:
    """The files every node reads the deployment from: relative path → text."""

    files: dict[str, str]
    manifest_dir: str  # the manifest's folder, relative to the tree's root ("" for the root)

    @property
    def digest(self) -> str:
        return sha256_hex(canonical_json(self.files))

    def manifest_path(self, root: str) -> str:
        return posixpath.join(root, self.manifest_dir) if self.manifest_dir else root

    def configmap_key(self, path: str) -> str:
        return path.replace("/", "_")


@dataclass(frozen=True)
class Target:
    """What every format shares, worked out once from the lock and the options."""

    format: str
    lock: Lock
    catalogue: Catalogue | None
    name: str
    namespace: str | None
    image: str | None
    init_image: str | None
    nodes: int
    gpus_per_node: int
    gpu_resource: str | None  # None: a CPU build, nothing to request
    backend: str  # "mp" or "ray"
    replicas: int
    port: int
    host: str | None
    store_root: str
    launcher: Launcher
    config: ConfigTree
    config_root: str
    storage_size: str
    startup_seconds: int
    venv: str
    master_addr: str | None

    def plan(self, topology: Topology | None) -> Plan:
        """The plan of one process: this target's store, launcher, host and port, and topology."""
        return make_plan(
            self.lock, Store(PurePosixPath(self.store_root)), self.launcher, self.catalogue,
            Overrides(host=self.host, port=self.port), None, PurePosixPath(self.config.manifest_path(self.config_root)),
            topology,
        )

    @cached_property
    def base_plan(self) -> Plan:
        """The plan as `vdeploy plan` would make it for this store: what every node's argv equals,
        the topology flags and --host/--port aside."""
        return make_plan(
            self.lock, Store(PurePosixPath(self.store_root)), self.launcher, self.catalogue, Overrides(), None,
            PurePosixPath(self.config.manifest_path(self.config_root)),
        )

    def node_topology(self, rank: int | str, master_addr: str | None) -> Topology:
        if self.backend == "ray":
            return Topology()  # one `vllm serve` on the Ray head; Ray places the workers
        return Topology.for_node(self.lock.serve, rank, master_addr, nodes=self.nodes)

    @property
    def secret_name(self) -> str:
        return f"{self.name}{SECRET_SUFFIX}"

    @property
    def configmap_name(self) -> str:
        return f"{self.name}-lock-{self.config.digest[:10]}"

    @property
    def manifest_dir(self) -> str:
        return self.config.manifest_path(self.config_root)


# ---- the edges ------------------------------------------------------------------------------


def load_for_export(manifest_arg: Any) -> tuple[Manifest, Lock, Catalogue | None]:
    """The manifest, its current lock, and the locked engine's flag catalogue if cached here.

    Not the installed engine's: the image runs the locked one, and the output must not depend
    on what happens to be installed where export runs.
    """
    from vdeploy.prepare import load_locked
    from vdeploy.probe import load_catalogue

    manifest, lock = load_locked(manifest_arg)
    catalogue = load_catalogue(lock.engine.spec, build=False) if lock.engine is not None else None
    return manifest, lock, catalogue


def write_export(exported: Exported, folder: Any) -> list[Any]:
    """Write every file under folder (created); returns the paths written."""
    from pathlib import Path

    from vdeploy.atomic import write_atomically

    written = []
    for item in exported.files:
        path = Path(folder) / item.path
        write_atomically(path, item.text.encode("utf-8"))
        written.append(path)
    return written


# ---- the middle -----------------------------------------------------------------------------


def export(
    format: str, manifest: Manifest, lock: Lock, catalogue: Catalogue | None = None,
    options: ExportOptions = ExportOptions(),
) -> Exported:
    """The documents that run this locked deployment on `format`; refuses in one line if it cannot."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; one of: {', '.join(FORMATS)}")
    notices: list[str] = []
    target = make_target(format, manifest, lock, catalogue, options, notices)
    builder = {
        "k8s": build_k8s, "lws": build_lws, "raycluster": build_raycluster,
        "compose": build_compose, "systemd": build_systemd,
    }[format]
    files = builder(target, notices)
    return Exported(format=format, name=target.name, files=tuple(files), notices=tuple(notices))


def make_target(
    format: str, manifest: Manifest, lock: Lock, catalogue: Catalogue | None, options: ExportOptions,
    notices: list[str],
) -> Target:
    """Everything the formats share, each option and each fact of the lock checked on the way."""
    refuse_inapplicable_options(format, options)
    serve = lock.serve
    refuse_tls_files(format, serve)
    image = engine_image(options.image, lock, format in CONTAINER_FORMATS, notices)
    if options.init_image is not None:
        require_digest(options.init_image, "--init-image")
    backend = choose_backend(format, serve, options.backend)
    sizes = parallel_sizes(serve)
    nodes = choose_nodes(format, serve, options.nodes, options.gpus_per_node, world_size(sizes), backend)
    gpus_per_node = check_parallelism(sizes, nodes, options.gpus_per_node)
    replicas = options.replicas if options.replicas is not None else 1
    if replicas < 1:
        raise ExportError(f"--replicas {replicas}: at least one group")
    port = choose_port(format, serve, options.port)
    name = choose_name(format, options.name, lock, nodes, replicas)
    check_places(options)
    venv = options.venv or DEFAULT_VENV
    if format == "systemd" and nodes > 1 and not options.master_addr:
        raise ExportError(f"export systemd on {nodes} nodes needs --master-addr: the address of node 0, which every node connects to")
    if format == "systemd":
        store_root, config_root = f"/var/lib/vdeploy/{name}/hub", f"{CONFIG_ROOT}/{name}"
        launcher, host = Launcher.for_engine(lock.engine, f"{venv}/bin"), None
    else:
        # Listen on the pod's address, not its loopback.
        store_root, config_root = CONTAINER_STORE, CONFIG_ROOT
        launcher, host = Launcher.for_engine(lock.engine), "0.0.0.0"
    locked_bytes = sum(f.size for source in lock.sources for f in source.files)
    cpu_build = lock.engine is not None and lock.engine.distribution != "vllm"
    target = Target(
        format=format, lock=lock, catalogue=catalogue, name=name, namespace=options.namespace,
        image=image, init_image=options.init_image or image, nodes=nodes, gpus_per_node=gpus_per_node,
        gpu_resource=None if cpu_build else GPU_RESOURCE, backend=backend, replicas=replicas, port=port, host=host,
        store_root=store_root, launcher=launcher, config=config_tree(manifest, lock), config_root=config_root,
        storage_size=storage_size(options.storage_size, locked_bytes),
        startup_seconds=startup_seconds(options.startup_timeout, locked_bytes), venv=venv,
        master_addr=options.master_addr,
    )
    add_notices(target, notices)
    return target


def refuse_inapplicable_options(format: str, options: ExportOptions) -> None:
    for option, formats in OPTION_FORMATS.items():
        if getattr(options, option) is not None and format not in formats:
            flag = "--" + option.replace("_", "-")
            raise ExportError(f"{flag} does not apply to `export {format}` (only to {', '.join(formats)})")


def refuse_tls_files(format: str, serve: Mapping[str, Any]) -> None:
    if format in CONTAINER_FORMATS:
        for key in PATH_FLAGS:
            if key in serve:
                raise ExportError(
                    f"[serve] {key}: export {format} cannot ship TLS files into containers; terminate TLS in "
                    "front of vLLM (an Ingress, Gateway or proxy), or export systemd"
                )
    elif any(str(serve.get(key, "")).startswith("~") for key in PATH_FLAGS):
        raise ExportError("[serve] ssl-*: a path starting with ~ means another home on each node; write it absolute")


def choose_port(format: str, serve: Mapping[str, Any], asked: int | None) -> int:
    port = asked if asked is not None else int(serve.get("port", DEFAULT_PORT))
    if not 0 < port < 65536:
        raise ExportError(f"--port {port} is not a TCP port")
    if format == "raycluster" and port in RAY_RESERVED_PORTS:
        raise ExportError(f"--port {port} is one of Ray's ports on the head ({', '.join(map(str, RAY_RESERVED_PORTS))}); pick another")
    return port


def check_places(options: ExportOptions) -> None:
    """The options that become names and paths on the other side."""
    namespace = options.namespace
    if namespace is not None and (len(namespace) > LABEL_LIMIT or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", namespace)):
        raise ExportError(f"--namespace {namespace!r} is not a Kubernetes namespace name (lowercase letters, digits, '-')")
    if options.venv is not None and (not options.venv.startswith("/") or not re.fullmatch(r"[A-Za-z0-9_./+-]+", options.venv)):
        raise ExportError(f"--venv {options.venv!r} must be an absolute path of plain characters")
    if options.master_addr is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]+", options.master_addr):
        raise ExportError(f"--master-addr {options.master_addr!r} is not a host name or address")


def startup_seconds(asked: int | None, locked_bytes: int) -> int:
    """The time vLLM gets to answer /health once it starts (after the init step)."""
    if asked is None:
        loading = STARTUP_BASE_SECONDS + -(-locked_bytes // STARTUP_BYTES_PER_SECOND)
        asked = -(-loading // 60) * 60
    if asked < 60:
        raise ExportError(f"--startup-timeout {asked}: vLLM needs at least a minute to start")
    return -(-asked // PROBE_PERIOD_SECONDS) * PROBE_PERIOD_SECONDS


def storage_size(asked: str | None, locked_bytes: int) -> str:
    size = asked or f"{max(1, -(-locked_bytes * 12 // 10 // 2**30))}Gi"
    if not QUANTITY_RE.fullmatch(size):
        raise ExportError(f"--storage-size {size!r} is not a Kubernetes quantity like 200Gi")
    return size


def engine_image(given: str | None, lock: Lock, containers: bool, notices: list[str]) -> str | None:
    locked = lock.engine.image if lock.engine is not None else None
    if not containers:
        return None
    if given is None:
        if locked is None:
            raise ExportError(
                "no engine image: pin it in the manifest ([runtime] engine-image = \"repo@sha256:...\") and lock, "
                "or pass --image REPO@sha256:..."
            )
        return locked
    require_digest(given, "--image")
    if locked is not None and given != locked:
        notices.append(f"warning: --image {given} is not the lock's engine-image {locked}")
    return given


def require_digest(image: str, flag: str) -> None:
    if not IMAGE_DIGEST_RE.fullmatch(image):
        raise ExportError(
            f"{flag} {image} is not pinned by digest (a tag can move); write it as REPO@sha256:<64 hex> "
            "(`docker buildx imagetools inspect IMAGE` prints the digest)"
        )


def choose_backend(format: str, serve: Mapping[str, Any], asked: str | None) -> str:
    """ray when the lock runs vLLM's Ray executor, else mp; the argv is the lock's, so a backend
    other than the locked one is a new lock, not an export option."""
    locked = serve.get("distributed-executor-backend")
    backend = "ray" if locked == "ray" else "mp"
    if asked is not None and asked not in ("mp", "ray"):
        raise ExportError(f"--backend {asked!r}: one of mp, ray")
    if format == "raycluster" and backend != "ray" or asked is not None and asked != backend:
        wanted = "ray" if format == "raycluster" else asked
        raise ExportError(
            f"export {format}{' --backend ' + asked if asked else ''} runs vLLM's {wanted} executor, but the lock's is "
            f"{locked or 'the default (mp)'}; set [serve] distributed-executor-backend = \"{wanted}\" and lock"
        )
    return backend


def parallel_sizes(serve: Mapping[str, Any]) -> dict[str, int]:
    sizes = {}
    for key in ("tensor-parallel-size", "pipeline-parallel-size", "data-parallel-size"):
        value = serve.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ExportError(f"[serve] {key} = {value!r} is not a positive integer")
        sizes[key] = value
    return sizes


def world_size(sizes: Mapping[str, int]) -> int:
    return sizes["tensor-parallel-size"] * sizes["pipeline-parallel-size"] * sizes["data-parallel-size"]


def choose_nodes(
    format: str, serve: Mapping[str, Any], asked: int | None, gpus_per_node: int | None, world: int, backend: str,
) -> int:
    """[serve] nnodes; else --nodes; else the GPUs over --gpus-per-node; else one node."""
    locked = serve.get("nnodes")
    if locked is not None and asked is not None and int(locked) != asked:
        raise ExportError(f"--nodes {asked}, but the lock runs on [serve] nnodes = {locked}; change nnodes and lock")
    if locked is not None:
        nodes = int(locked)
    elif asked is not None:
        nodes = asked
    elif gpus_per_node is not None and gpus_per_node > 0 and world % gpus_per_node == 0:
        nodes = world // gpus_per_node
    else:
        nodes = 1
    if nodes < 1:
        raise ExportError(f"--nodes {nodes}: at least one")
    if nodes > 1 and format in ("k8s", "compose"):
        raise ExportError(f"export {format} runs one node, and this deployment spans {nodes}; export lws, raycluster or systemd")
    if nodes > 1 and format == "systemd" and backend == "ray":
        raise ExportError(f"export systemd runs vLLM's mp executor across nodes; a Ray deployment on {nodes} nodes: export raycluster or lws")
    return nodes


def check_parallelism(sizes: Mapping[str, int], nodes: int, asked: int | None) -> int:
    """tensor × pipeline × data parallel = nodes × GPUs per node; returns GPUs per node."""
    world = world_size(sizes)
    shown = " × ".join(f"{k.removesuffix('-size')} {v}" for k, v in sizes.items() if v > 1) or "one GPU"
    if asked is not None and asked < 1:
        raise ExportError(f"--gpus-per-node {asked}: at least one")
    per_node = asked if asked is not None else world // nodes
    if per_node * nodes != world:
        hint = f"--gpus-per-node {world // nodes}" if world % nodes == 0 else "another node count, or other parallel sizes in [serve]"
        raise ExportError(
            f"{shown} = {world} GPU(s), but {nodes} node(s) × {per_node} GPU(s) per node = {per_node * nodes}; use {hint}"
        )
    return per_node


def choose_name(format: str, asked: str | None, lock: Lock, nodes: int, replicas: int) -> str:
    """--name, or the served model name made a DNS label; checked against every name it grows into."""
    from vdeploy.plan import served_name

    limit = name_limit(format, nodes, replicas)
    if asked is None:
        derived = re.sub(r"[^a-z0-9]+", "-", served_name(lock).lower()).strip("-")
        if not derived or not derived[0].isalpha():
            derived = f"vllm-{derived}".rstrip("-")
        name = derived[:limit].rstrip("-")
    else:
        name = asked
    if not DNS_1035_RE.fullmatch(name):
        raise ExportError(f"--name {name!r}: a Kubernetes name is lowercase letters, digits and '-', starting with a letter")
    if len(name) > limit:
        raise ExportError(f"--name {name!r} is {len(name)} characters; {format} names grow into longer ones, so at most {limit}")
    return name


def name_limit(format: str, nodes: int, replicas: int) -> int:
    if format == "lws":
        group, worker = len(f"-{replicas - 1}"), len(f"-{nodes - 1}")
        # Worker StatefulSets are <name>-<group>; pods <name>-<group>-<worker>.
        return min(STATEFULSET_LIMIT - group, LABEL_LIMIT - group - worker)
    if format == "raycluster":
        return LABEL_LIMIT - len("-head-svc")
    return LABEL_LIMIT


def add_notices(target: Target, notices: list[str]) -> None:
    lock = target.lock
    if target.catalogue is None and lock.engine is not None:
        notices.append(
            f"note: no flag catalogue of {lock.engine.spec} is cached here; [serve] is rendered by TOML types, as `vdeploy plan` does"
        )
    for source in lock.sources:
        if source.is_local:
            notices.append(
                f"note: [{source.role}] is the local folder {source.path}: the init step cannot download it; "
                "fill the models volume with this store first (vdeploy fetch here, then copy it)"
            )
    plan = target.base_plan
    if target.format in KUBERNETES_FORMATS:
        keys = " ".join(f"--from-literal={name}=..." for name in plan.secrets)
        if keys:
            notices.append(f"the pods read {', '.join(plan.secrets)} from Secret {target.secret_name}: kubectl create secret generic {target.secret_name} {keys}")
        notices.append(f"a gated repo needs {HUB_TOKEN_VARIABLE} in Secret {target.secret_name} (optional; read by the fetch step only)")
    if target.format == "raycluster" and "ray" not in (lock.engine.pins if lock.engine else {}):
        notices.append("note: rayVersion left out: the lock does not pin ray ([runtime] engine-environment); KubeRay then assumes a recent Ray")
    if target.format == "systemd":
        notices.append(
            f"install on every node: the units in /etc/systemd/system, vdeploy/ as {target.config_root}, "
            f"vdeploy and {lock.engine.spec if lock.engine else 'vLLM'} in {target.venv}, a system user {SYSTEMD_USER}"
        )
        if plan.secrets:
            notices.append(f"{target.config_root}/secrets.env (mode 600) holds {', '.join(f'{k}=...' for k in plan.secrets)}")


# ---- the shipped configuration ----------------------------------------------------------------


def container_manifest(manifest: Manifest) -> str:
    """A manifest with the same inputs as `manifest` (so its lock is current for it), no [store]:
    the store is where HF_HUB_CACHE points on the node."""
    import tomli_w

    data: dict[str, Any] = {"model": manifest.model.requested()}
    if manifest.tokenizer is not None:
        data["tokenizer"] = manifest.tokenizer.requested()
    template = manifest.chat_template
    if template is not None:
        data["chat-template"] = {"text": template.text} if template.text is not None else {"file": template.file_as_written}
    runtime: dict[str, Any] = {"seed": manifest.seed}
    if manifest.env:
        runtime["env"] = dict(manifest.env)
    if manifest.engine is not None:
        runtime["engine"] = manifest.engine
    if manifest.engine_environment is not None:
        runtime["engine-environment"] = manifest.engine_environment.file_as_written
    if manifest.engine_image is not None:
        runtime["engine-image"] = manifest.engine_image
    data["runtime"] = runtime
    data["policy"] = {
        "trust-remote-code": manifest.policy.trust_remote_code, "allow-pickle": manifest.policy.allow_pickle,
    }
    # [serve] last: its sub-tables (api-key = { env = ... }) would otherwise end the tables above.
    data["serve"] = dict(manifest.serve)
    header = (
        "# Written by `vdeploy export` from the manifest's inputs; its lock is current for it.\n"
        "# No [store]: the store is wherever HF_HUB_CACHE points on the node.\n"
    )
    return header + tomli_w.dumps(data)


def config_tree(manifest: Manifest, lock: Lock) -> ConfigTree:
    """The container manifest, the lock, and the files the manifest names, laid out so that their
    relative paths, as written in the manifest, still hold."""
    named = []
    if manifest.chat_template is not None and manifest.chat_template.file_as_written is not None:
        named.append(("[chat-template] file", manifest.chat_template.file_as_written, manifest.chat_template.data))
    if manifest.engine_environment is not None:
        named.append(("[runtime] engine-environment", manifest.engine_environment.file_as_written, manifest.engine_environment.data))
    depth = 0
    for key, written, _ in named:
        if written.startswith(("/", "~")) or "\\" in written:
            raise ExportError(f"{manifest.path}: {key} = {written!r}: export ships files relative to the manifest; write it relative")
        parts = posixpath.normpath(written).split("/")
        depth = max(depth, len(parts) - len([p for p in parts if p != ".."]))
    folders = manifest.folder.parts[1:]
    if depth > len(folders):
        raise ExportError(f"{manifest.path}: a file it names lies above the file system's root")
    base = "/".join(folders[len(folders) - depth:]) if depth else ""
    files = {posixpath.join(base, MANIFEST_NAME): container_manifest(manifest), posixpath.join(base, LOCK_NAME): dumps_lock(lock)}
    for key, written, data in named:
        path = posixpath.normpath(posixpath.join(base, written))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ExportError(f"{manifest.path}: {key} {written} is not UTF-8 text") from None
        if path in files and files[path] != text:
            raise ExportError(f"{manifest.path}: {key} {written} would overwrite {path} beside the manifest; rename it")
        files[path] = text
    tree = ConfigTree(files=dict(sorted(files.items())), manifest_dir=base)
    keys = [tree.configmap_key(p) for p in tree.files]
    bad = next((p for p, k in zip(tree.files, keys) if not CONFIG_KEY_RE.fullmatch(k) or len(k) > 253), None)
    if bad is not None or len(set(keys)) != len(keys):
        raise ExportError(f"{manifest.path}: the file name {bad or 'of two files'} cannot be a ConfigMap key; use letters, digits, '-', '_' and '.'")
    size = sum(len(text.encode()) for text in tree.files.values())
    if size > CONFIGMAP_LIMIT:
        raise ExportError(f"the lock and the files it needs take {size} bytes; a ConfigMap holds at most 1 MiB")
    return tree


# ---- Kubernetes -------------------------------------------------------------------------------


def k8s_literal(text: str) -> str:
    """text as kubelet must pass it on: `$(` and `$$` would be expanded there, so their `$` doubles."""
    return re.sub(r"\$(?=[$(])", "$$", text)


def k8s_expand(text: str, env: Mapping[str, str]) -> str:
    """What kubelet makes of a command, argument or env value: $(NAME) → env, $$ → $."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("$(", i):
            end = text.find(")", i + 2)
            if end != -1:
                name = text[i + 2:end]
                out.append(env.get(name, text[i:end + 1]))
                i = end + 1
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def k8s_argv(argv: Sequence[str]) -> list[str]:
    """argv for a pod: literal, except the LWS placeholders export puts after --node-rank/--master-addr."""
    out = []
    for i, arg in enumerate(argv):
        placeholder = i > 0 and argv[i - 1] in ("--node-rank", "--master-addr") and arg in (LWS_RANK, LWS_LEADER)
        out.append(arg if placeholder else k8s_literal(arg))
    return out


def metadata(target: Target, name: str, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if target.namespace is not None:
        meta["namespace"] = target.namespace
    meta["labels"] = labels(target)
    meta.update(extra)
    return meta


def labels(target: Target, role: str | None = None) -> dict[str, str]:
    found = {
        "app.kubernetes.io/name": target.name,
        "app.kubernetes.io/managed-by": "vdeploy",
        "vdeploy.dev/deployment": target.lock.deployment[:16],
    }
    if role is not None:
        found["vdeploy.dev/role"] = role
    return found


def pod_metadata(target: Target, role: str, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "labels": {**labels(target, role), "vdeploy.dev/config": target.config.digest[:10]},
        "annotations": {
            **(annotations or {}),
            "vdeploy.dev/deployment": target.lock.deployment,
            "vdeploy.dev/config-sha256": target.config.digest,
        },
    }


def configmap(target: Target) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(target, target.configmap_name),
        "immutable": True,
        "data": {target.config.configmap_key(path): text for path, text in target.config.files.items()},
    }


def config_volume(target: Target) -> dict[str, Any]:
    items = [{"key": target.config.configmap_key(path), "path": path} for path in target.config.files]
    return {"name": "vdeploy-config", "configMap": {"name": target.configmap_name, "items": items}}


def init_containers(target: Target) -> list[dict[str, Any]]:
    """`vdeploy fetch` then `vdeploy verify --full` of the shipped lock into the models volume."""
    env = [
        {"name": "HF_HUB_CACHE", "value": CONTAINER_STORE},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": "VDEPLOY_CACHE_DIR", "value": INIT_CACHE},
    ]
    token = {
        "name": HUB_TOKEN_VARIABLE,
        "valueFrom": {"secretKeyRef": {"name": target.secret_name, "key": HUB_TOKEN_VARIABLE, "optional": True}},
    }
    mounts = [
        {"name": "models", "mountPath": MODELS_MOUNT},
        {"name": "vdeploy-config", "mountPath": CONFIG_ROOT, "readOnly": True},
    ]
    return [
        {"name": "vdeploy-fetch", "image": target.init_image, "command": init_command(target, "fetch"), "env": [*env, token], "volumeMounts": mounts},
        {"name": "vdeploy-verify", "image": target.init_image, "command": init_command(target, "verify"), "env": env, "volumeMounts": mounts},
    ]


def init_command(target: Target, step: str) -> list[str]:
    if step == "fetch":
        return ["vdeploy", "fetch", target.manifest_dir]
    return ["vdeploy", "verify", "--full", target.manifest_dir]


def engine_env(target: Target, plan: Plan, host_ip: bool) -> list[dict[str, Any]]:
    """The plan's pinned environment, its secrets from the Secret, and the pod's IP where vLLM
    talks to other nodes."""
    env: list[dict[str, Any]] = [{"name": k, "value": k8s_literal(v)} for k, v in plan.env.items()]
    env += [
        {"name": variable, "valueFrom": {"secretKeyRef": {"name": target.secret_name, "key": variable}}}
        for variable in plan.secrets
    ]
    if host_ip:
        env.append({"name": "VLLM_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    return env


def engine_mounts() -> list[dict[str, Any]]:
    return [
        {"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]


def probes(target: Target) -> dict[str, Any]:
    check = {"httpGet": {"path": "/health", "port": "http"}}
    return {
        "startupProbe": {
            **check, "periodSeconds": PROBE_PERIOD_SECONDS, "timeoutSeconds": 5,
            "failureThreshold": target.startup_seconds // PROBE_PERIOD_SECONDS,
        },
        "readinessProbe": {**check, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**check, "periodSeconds": 30, "timeoutSeconds": 10, "failureThreshold": 5},
    }


def resources(target: Target) -> dict[str, Any]:
    if target.gpu_resource is None:
        return {}
    return {"resources": {"limits": {target.gpu_resource: target.gpus_per_node}}}


def engine_container(
    target: Target, name: str, plan: Plan | None, serving: bool, host_ip: bool,
    script: str | None = None, ports: Sequence[tuple[str, int]] = (),
) -> dict[str, Any]:
    """A container of the engine image: vLLM (plan), or a shell script (Ray), or Ray's own command."""
    container: dict[str, Any] = {"name": name, "image": target.image}
    if script is not None:
        container["command"] = ["bash", "-c", k8s_literal(script)]
    elif plan is not None:
        count = len(target.launcher.command)
        container["command"] = list(target.launcher.command)
        container["args"] = k8s_argv(plan.argv)[count:]
    env_plan = plan if plan is not None else target.base_plan
    container["env"] = engine_env(target, env_plan, host_ip)
    if serving:
        ports = [*ports, ("http", target.port)]
    if ports:
        container["ports"] = [{"name": port_name, "containerPort": number} for port_name, number in ports]
    container.update(resources(target))
    container["volumeMounts"] = engine_mounts()
    if serving:
        container.update(probes(target))
    return container


def pod_spec(target: Target, containers: list[dict[str, Any]], models_volume: dict[str, Any] | None) -> dict[str, Any]:
    volumes = [] if models_volume is None else [{"name": "models", **models_volume}]
    volumes += [config_volume(target), {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}}]
    return {
        # A Service named like an engine variable (vllm → VLLM_PORT) would reach vLLM as one.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,
        "initContainers": init_containers(target),
        "containers": containers,
        "volumes": volumes,
    }


def service(target: Target, selector: Mapping[str, str], name: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(target, name or target.name),
        "spec": {
            "type": "ClusterIP",
            "selector": dict(selector),
            "ports": [{"name": "http", "port": target.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def stream_header(target: Target) -> str:
    keys = "".join(f" --from-literal={name}=..." for name in target.base_plan.secrets)
    return "\n".join([
        f"vdeploy export {target.format}: deployment {target.lock.deployment}",
        f"Generated from the lock; do not edit. Secrets are read from Secret {target.secret_name}, never written here:",
        f"  kubectl create secret generic {target.secret_name}{keys} [--from-literal={HUB_TOKEN_VARIABLE}=... for a gated repo]",
    ])


def kubernetes_file(target: Target, documents: list[dict[str, Any]]) -> ExportFile:
    check_kubernetes(target, documents)
    return ExportFile(f"{target.format}.yaml", yaml_stream(documents, stream_header(target)))


def build_k8s(target: Target, notices: list[str]) -> list[ExportFile]:
    plan = target.plan(target.node_topology(0, None))
    selector = {"app.kubernetes.io/name": target.name}
    container = engine_container(target, "vllm", plan, serving=True, host_ip=False)
    claim = f"{target.name}-models"
    documents = [
        configmap(target),
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": metadata(target, claim),
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": target.storage_size}}},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata(target, target.name),
            "spec": {
                "replicas": 1,
                # One ReadWriteOnce volume: the old pod lets go of it before the new one starts.
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": selector},
                "template": {
                    "metadata": pod_metadata(target, "server"),
                    "spec": pod_spec(target, [container], {"persistentVolumeClaim": {"claimName": claim}}),
                },
            },
        },
        service(target, selector),
    ]
    return [kubernetes_file(target, documents)]


def build_lws(target: Target, notices: list[str]) -> list[ExportFile]:
    ray = target.backend == "ray"
    if ray:
        leader = engine_container(
            target, "vllm", None, serving=True, host_ip=True, script=ray_lws_leader_script(target),
            ports=(("gcs-server", RAY_PORT),),
        )
        worker = engine_container(target, "ray-worker", None, serving=False, host_ip=True, script=ray_lws_worker_script(target))
    else:
        leader_plan = target.plan(target.node_topology(0, LWS_LEADER))
        worker_plan = target.plan(target.node_topology(LWS_RANK, LWS_LEADER)) if target.nodes > 1 else leader_plan
        leader = engine_container(target, "vllm", leader_plan, serving=True, host_ip=target.nodes > 1)
        worker = engine_container(target, "vllm", worker_plan, serving=False, host_ip=True)
    template = {
        "size": target.nodes,
        # A pod restarting after the group started recreates the group; while a pod is Pending
        # (its init containers fetching and verifying) nothing is recreated (LWS >= 0.9).
        "restartPolicy": "RecreateGroupAfterStart",
        "leaderTemplate": {"metadata": pod_metadata(target, "leader"), "spec": pod_spec(target, [leader], None)},
        "workerTemplate": {"metadata": pod_metadata(target, "worker"), "spec": pod_spec(target, [worker], None)},
        "volumeClaimTemplates": [{
            "metadata": {"name": "models"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": target.storage_size}}},
        }],
        # Each pod keeps its verified store when the group is recreated or the set deleted.
        "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
    }
    documents = [
        configmap(target),
        {
            "apiVersion": "leaderworkerset.x-k8s.io/v1",
            "kind": "LeaderWorkerSet",
            "metadata": metadata(target, target.name),
            "spec": {
                "replicas": target.replicas,
                # vLLM's leader answers /health only once every rank joined: LeaderReady would deadlock.
                "startupPolicy": "LeaderCreated",
                "leaderWorkerTemplate": template,
            },
        },
        # LWS itself makes a headless Service named like the set (the pods' subdomain).
        service(
            target, {"leaderworkerset.sigs.k8s.io/name": target.name, "leaderworkerset.sigs.k8s.io/worker-index": "0"},
            f"{target.name}-leader",
        ),
    ]
    return [kubernetes_file(target, documents)]


def ray_gpu_option(target: Target) -> str:
    return f" --num-gpus={target.gpus_per_node}" if target.gpu_resource is not None else ""


def vllm_exec(target: Target) -> str:
    """The last line of a Ray head's script: vLLM replaces the shell. vLLM itself waits (up to
    30 minutes) for the placement group, i.e. for the workers' GPUs to join."""
    return "exec " + shlex.join(target.plan(target.node_topology(0, None)).argv)


def ray_lws_leader_script(target: Target) -> str:
    return "\n".join([
        # Without a head of ours vLLM would start a Ray of its own: stop instead.
        "set -e",
        f"ray start --head --port={RAY_PORT}{ray_gpu_option(target)}",
        vllm_exec(target),
    ]) + "\n"


def ray_lws_worker_script(target: Target) -> str:
    # The leader's head may not be up yet (it verifies its store too): join when it is.
    return (
        f'until ray start --address="$LWS_LEADER_ADDRESS:{RAY_PORT}"{ray_gpu_option(target)} --block; '
        "do sleep 5; done\n"
    )


def ray_head_script(target: Target) -> str:
    return "\n".join([
        "set -e",
        "ulimit -n 65536 || true",
        "$KUBERAY_GEN_RAY_START_CMD &",
        # vLLM would start a Ray of its own if the head were not up yet.
        "until ray status >/dev/null 2>&1; do sleep 2; done",
        vllm_exec(target),
    ]) + "\n"


def build_raycluster(target: Target, notices: list[str]) -> list[ExportFile]:
    models = {"emptyDir": {"sizeLimit": target.storage_size}}
    head = engine_container(
        target, "ray-head", None, serving=True, host_ip=True, script=ray_head_script(target), ports=RAY_HEAD_PORTS,
    )
    gpus = {"num-gpus": str(target.gpus_per_node)} if target.gpu_resource is not None else {}
    spec: dict[str, Any] = {}
    ray_version = target.lock.engine.pins.get("ray") if target.lock.engine is not None else None
    if ray_version is not None:
        spec["rayVersion"] = ray_version
    spec["headGroupSpec"] = {
        "serviceType": "ClusterIP",
        "rayStartParams": {"dashboard-host": "0.0.0.0", **gpus},
        "template": {
            # Keep our command; KubeRay's `ray start` arrives in $KUBERAY_GEN_RAY_START_CMD.
            "metadata": pod_metadata(target, "head", {"ray.io/overwrite-container-cmd": "true"}),
            "spec": pod_spec(target, [head], models),
        },
    }
    if target.nodes > 1:
        worker = engine_container(target, "ray-worker", None, serving=False, host_ip=True)
        spec["workerGroupSpecs"] = [{
            "groupName": "workers",
            "replicas": target.nodes - 1,
            "minReplicas": target.nodes - 1,
            "maxReplicas": target.nodes - 1,
            "numOfHosts": 1,
            "rayStartParams": gpus,
            "template": {"metadata": pod_metadata(target, "worker"), "spec": pod_spec(target, [worker], models)},
        }]
    documents = [
        configmap(target),
        {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": metadata(target, target.name), "spec": spec},
    ]
    return [kubernetes_file(target, documents)]


# ---- the checks Kubernetes documents pass before they are written ---------------------------------


@dataclass(frozen=True)
class PodRole:
    """A pod template found in the documents, and what its engine container must run."""

    where: str
    template: Mapping[str, Any]
    argv_env: Mapping[str, str] | None  # kubelet's values for the placeholders; None: no vLLM argv
    topology: Topology | None
    serving: bool
    script: bool  # the argv is the last line of a shell script


def pod_roles(target: Target, documents: Sequence[Mapping[str, Any]]) -> list[PodRole]:
    roles = []
    leader_address = f"{target.name}-0.{target.name}.{target.namespace or 'default'}"
    for doc in documents:
        kind, spec = doc.get("kind"), doc.get("spec", {})
        if kind == "Deployment":
            roles.append(PodRole("Deployment", spec["template"], {}, target.node_topology(0, None), True, False))
        elif kind == "LeaderWorkerSet":
            template = spec["leaderWorkerTemplate"]
            ray = target.backend == "ray"
            leader_env = {"LWS_WORKER_INDEX": "0", "LWS_LEADER_ADDRESS": leader_address}
            roles.append(PodRole(
                "LeaderWorkerSet leader", template["leaderTemplate"], leader_env,
                target.node_topology(0, None if ray else leader_address), True, ray,
            ))
            for rank in range(1, target.nodes):
                env = None if ray else {"LWS_WORKER_INDEX": str(rank), "LWS_LEADER_ADDRESS": leader_address}
                topology = None if ray else target.node_topology(rank, leader_address)
                roles.append(PodRole(f"LeaderWorkerSet worker {rank}", template["workerTemplate"], env, topology, False, False))
        elif kind == "RayCluster":
            head = spec["headGroupSpec"]["template"]
            roles.append(PodRole("RayCluster head", head, {}, target.node_topology(0, None), True, True))
            for group in spec.get("workerGroupSpecs", []):
                roles.append(PodRole(f"RayCluster group {group['groupName']}", group["template"], None, None, False, False))
    return roles


def check_kubernetes(target: Target, documents: Sequence[Mapping[str, Any]]) -> None:
    """Every invariant, read back off the documents; the first broken one refuses the export."""
    problem = kubernetes_problem(target, documents)
    if problem is not None:
        raise ExportError(f"refusing to write export {target.format}: {problem}")


def kubernetes_problem(target: Target, documents: Sequence[Mapping[str, Any]]) -> str | None:
    names = [doc["metadata"]["name"] for doc in documents]
    for name in names:
        if len(name) > 253 or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name):
            return f"{name!r} is not a Kubernetes object name"
    for doc in documents:
        if doc["kind"] == "Service" and (len(doc["metadata"]["name"]) > LABEL_LIMIT or not DNS_1035_RE.fullmatch(doc["metadata"]["name"])):
            return f"Service name {doc['metadata']['name']!r} is not a DNS-1035 label"
        if doc["kind"] == "ConfigMap" and not doc.get("immutable"):
            return f"ConfigMap {doc['metadata']['name']} is not immutable"
        if doc["kind"] == "LeaderWorkerSet":
            if doc["metadata"]["name"] in [d["metadata"]["name"] for d in documents if d["kind"] == "Service"]:
                return "a Service named like the LeaderWorkerSet collides with the headless Service LWS makes"
            spec = doc["spec"]
            if spec.get("startupPolicy") != "LeaderCreated":
                return "the LeaderWorkerSet's startupPolicy is not LeaderCreated (vLLM's leader is Ready only after every rank joined)"
            if spec["leaderWorkerTemplate"].get("restartPolicy") != "RecreateGroupAfterStart":
                return "the LeaderWorkerSet's restartPolicy is not RecreateGroupAfterStart (a slow verify would recreate the group forever)"
            for group in range(target.replicas):
                pod = f"{doc['metadata']['name']}-{group}-{target.nodes - 1}"
                if len(pod) > LABEL_LIMIT or len(f"{doc['metadata']['name']}-{group}") > STATEFULSET_LIMIT:
                    return f"LeaderWorkerSet pod name {pod} is too long for Kubernetes"
    roles = pod_roles(target, documents)
    if not roles:
        return "no pod template"
    for role in roles:
        problem = pod_problem(target, role)
        if problem is not None:
            return f"{role.where}: {problem}"
    return None


def pod_problem(target: Target, role: PodRole) -> str | None:
    spec = role.template["spec"]
    inits = spec.get("initContainers", [])
    if [c.get("name") for c in inits[:2]] != ["vdeploy-fetch", "vdeploy-verify"]:
        return "does not start with the vdeploy-fetch and vdeploy-verify init containers"
    if inits[0]["command"] != init_command(target, "fetch") or inits[1]["command"] != init_command(target, "verify"):
        return "its init containers do not run `vdeploy fetch` and `vdeploy verify --full` on the shipped lock"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    config = volumes.get("vdeploy-config", {}).get("configMap", {})
    if config.get("name") != target.configmap_name:
        return f"does not mount the lock's ConfigMap {target.configmap_name}"
    for container in [*inits, *spec["containers"]]:
        if not IMAGE_DIGEST_RE.fullmatch(container.get("image", "")):
            return f"container {container['name']} runs an image not pinned by digest"
        problem = env_problem(target, container)
        if problem is not None:
            return f"container {container['name']}: {problem}"
    for init in inits[:2]:
        if not any(m["name"] == "models" and m["mountPath"] == MODELS_MOUNT and not m.get("readOnly") for m in init["volumeMounts"]):
            return f"init container {init['name']} does not mount the models volume at {MODELS_MOUNT}"
    for container in spec["containers"]:
        models = [m for m in container.get("volumeMounts", []) if m["name"] == "models"]
        if not models or not all(m.get("readOnly") for m in models):
            return f"container {container['name']} does not mount the models volume read-only"
        offline = {e["name"]: e.get("value") for e in container.get("env", [])}
        if offline.get("HF_HUB_OFFLINE") != "1":
            return f"container {container['name']} runs without HF_HUB_OFFLINE=1"
    engine = spec["containers"][0]
    if role.argv_env is not None and role.topology is not None:
        problem = argv_problem(target, container_argv(engine, role.argv_env, role.script), role.topology)
        if problem is not None:
            return problem
    if role.serving:
        startup = engine.get("startupProbe", {})
        if startup.get("httpGet", {}).get("path") != "/health":
            return "the serving container has no start-up probe on /health"
        if startup["periodSeconds"] * startup["failureThreshold"] < target.startup_seconds:
            return f"the start-up probe allows less than {target.startup_seconds} s for loading the model"
        for probe in ("readinessProbe", "livenessProbe"):
            if engine.get(probe, {}).get("httpGet", {}).get("path") != "/health":
                return f"the serving container's {probe} is not on /health"
    return None


def env_problem(target: Target, container: Mapping[str, Any]) -> str | None:
    """Secrets only by reference: the variables that hold them come from a Secret, and every
    literal value is one the plan pins or vdeploy sets."""
    secret_variables = {*target.base_plan.secrets, HUB_TOKEN_VARIABLE}
    allowed = {*target.base_plan.env, "HF_HUB_DISABLE_TELEMETRY", "VDEPLOY_CACHE_DIR"}
    for entry in container.get("env", []):
        name = entry["name"]
        if "value" in entry and (name in secret_variables or name not in allowed):
            return f"{name} is given a literal value; secrets come only from Secret {target.secret_name}"
        reference = entry.get("valueFrom", {}).get("secretKeyRef")
        if reference is not None and (reference.get("name") != target.secret_name or reference.get("key") != name):
            return f"{name} is read from {reference}, not from key {name} of Secret {target.secret_name}"
        if name in secret_variables and reference is None:
            return f"{name} is not read from Secret {target.secret_name}"
    return None


def container_argv(container: Mapping[str, Any], env: Mapping[str, str], script: bool) -> list[str]:
    """The argv kubelet starts (placeholders filled in); for a script, its `exec` line's."""
    words = [k8s_expand(w, env) for w in [*container.get("command", []), *container.get("args", [])]]
    if not script:
        return words
    last = words[-1].rstrip("\n").split("\n")[-1]
    if not last.startswith("exec "):
        return []
    return shlex.split(last)[1:]


def argv_problem(target: Target, argv: Sequence[str], topology: Topology) -> str | None:
    expected = target.plan(topology).argv
    if tuple(argv) != expected:
        return f"runs {shlex.join(argv)!r}, not the plan's {shlex.join(expected)!r}"
    if without_topology(argv) != without_topology(target.base_plan.argv):
        return "its argv differs from the plan's in more than the topology flags"
    return None


# ---- docker compose -----------------------------------------------------------------------------


def compose_literal(text: str) -> str:
    """text as compose must pass it on: compose interpolates $VAR and ${VAR}, so every $ doubles."""
    return text.replace("$", "$$")


def build_compose(target: Target, notices: list[str]) -> list[ExportFile]:
    plan = target.plan(target.node_topology(0, None))
    count = len(target.launcher.command)
    config = {"type": "bind", "source": "./vdeploy", "target": CONFIG_ROOT, "read_only": True}
    store_env = {"HF_HUB_CACHE": CONTAINER_STORE, "HF_HUB_DISABLE_TELEMETRY": "1", "VDEPLOY_CACHE_DIR": INIT_CACHE}

    def init_service(step: str) -> dict[str, Any]:
        command = init_command(target, step)
        service: dict[str, Any] = {
            "image": target.init_image,
            "entrypoint": command[:1],
            "command": command[1:],
            "environment": dict(store_env),
        }
        if step == "fetch":
            service["env_file"] = [{"path": "hub.env", "required": False}]
        else:
            service["depends_on"] = {"vdeploy-fetch": {"condition": "service_completed_successfully"}}
        service["volumes"] = [{"type": "volume", "source": "models", "target": MODELS_MOUNT}, config]
        return service

    # Published where the lock listens: every interface for host = "0.0.0.0", else loopback only.
    everywhere = target.lock.serve.get("host") in ("0.0.0.0", "::")
    publish = "" if everywhere else "127.0.0.1:"
    health = (
        "import urllib.request; "
        f"urllib.request.urlopen('http://127.0.0.1:{target.port}/health', timeout=5)"
    )
    engine: dict[str, Any] = {
        "image": target.image,
        "entrypoint": [compose_literal(w) for w in plan.argv[:count]],
        "command": [compose_literal(w) for w in plan.argv[count:]],
        "depends_on": {"vdeploy-verify": {"condition": "service_completed_successfully"}},
        "environment": {k: compose_literal(v) for k, v in plan.env.items()},
    }
    if plan.secrets:
        engine["env_file"] = [{"path": "secrets.env", "required": True}]
        notices.append(f"secrets.env beside compose.yaml (mode 600) holds {', '.join(f'{k}=...' for k in plan.secrets)}")
    engine.update({
        "volumes": [{"type": "volume", "source": "models", "target": MODELS_MOUNT, "read_only": True}],
        "ports": [f"{publish}{target.port}:{target.port}"],
        "shm_size": SHM_SIZE.replace("Gi", "gb"),
        "ulimits": {"memlock": -1, "stack": 67108864},
        "healthcheck": {
            "test": ["CMD", "python3", "-c", health],
            "interval": "10s",
            "timeout": "10s",
            "retries": 3,
            "start_period": f"{target.startup_seconds}s",
        },
        "restart": "unless-stopped",
    })
    if target.gpu_resource is not None:
        engine["deploy"] = {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "count": target.gpus_per_node, "capabilities": ["gpu"]},
        ]}}}
    document = {
        "name": target.name,
        "services": {"vdeploy-fetch": init_service("fetch"), "vdeploy-verify": init_service("verify"), "vllm": engine},
        "volumes": {"models": {}},
    }
    check_compose(target, document)
    header = (
        f"vdeploy export compose: deployment {target.lock.deployment}\n"
        f"Generated from the lock; do not edit. Published on {publish or 'every interface:'}{target.port}."
    )
    files = [ExportFile("compose.yaml", "".join(f"# {line}\n" for line in header.splitlines()) + to_yaml(document))]
    return files + config_files(target)


def config_files(target: Target) -> list[ExportFile]:
    return [ExportFile(f"vdeploy/{path}", text) for path, text in target.config.files.items()]


def check_compose(target: Target, document: Mapping[str, Any]) -> None:
    problem = compose_problem(target, document)
    if problem is not None:
        raise ExportError(f"refusing to write export compose: {problem}")


def compose_problem(target: Target, document: Mapping[str, Any]) -> str | None:
    services = document["services"]
    unescape = lambda words: [w.replace("$$", "$") for w in words]  # noqa: E731
    for step, after in (("fetch", None), ("verify", "vdeploy-fetch")):
        service = services.get(f"vdeploy-{step}")
        if service is None or unescape([*service["entrypoint"], *service["command"]]) != init_command(target, step):
            return f"no vdeploy-{step} service running `{shlex.join(init_command(target, step))}`"
        if after is not None and service.get("depends_on", {}).get(after, {}).get("condition") != "service_completed_successfully":
            return f"vdeploy-{step} does not wait for {after}"
    engine = services["vllm"]
    if engine.get("depends_on", {}).get("vdeploy-verify", {}).get("condition") != "service_completed_successfully":
        return "vllm does not wait for vdeploy-verify to succeed"
    for name, service in services.items():
        if not IMAGE_DIGEST_RE.fullmatch(service["image"]):
            return f"service {name} runs an image not pinned by digest"
    if not all(v.get("read_only") for v in engine["volumes"] if v["source"] == "models"):
        return "vllm does not mount the models volume read-only"
    if engine["environment"].get("HF_HUB_OFFLINE") != "1":
        return "vllm runs without HF_HUB_OFFLINE=1"
    secret_variables = {*target.base_plan.secrets, HUB_TOKEN_VARIABLE}
    if any(name in secret_variables for service in services.values() for name in service.get("environment", {})):
        return "a secret is written into compose.yaml; it belongs in secrets.env / hub.env"
    return argv_problem(target, unescape([*engine["entrypoint"], *engine["command"]]), target.node_topology(0, None))


# ---- systemd ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    file: str
    sections: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    header: str

    def values(self, key: str) -> list[str]:
        return [value for _, entries in self.sections for k, value in entries if k == key]


def build_systemd(target: Target, notices: list[str]) -> list[ExportFile]:
    name = target.name
    cache = f"/var/cache/vdeploy/{name}"
    store_file = f"{name}-store.service"
    vdeploy_bin = f"{target.venv}/bin/vdeploy"
    deployment = target.lock.deployment
    store = Unit(
        store_file,
        (
            ("Unit", (
                ("Description", f"vdeploy {name}: fetch and fully verify the locked model files"),
                ("Wants", "network-online.target"),
                ("After", "network-online.target"),
                # Stopped with the engine's unit, so every start of the engine verifies again.
                ("StopWhenUnneeded", "yes"),
            )),
            ("Service", (
                ("Type", "oneshot"),
                ("RemainAfterExit", "yes"),
                ("User", SYSTEMD_USER),
                ("Group", SYSTEMD_USER),
                ("StateDirectory", f"vdeploy/{name}"),
                ("CacheDirectory", f"vdeploy/{name}"),
                ("Environment", systemd_environment("HF_HUB_CACHE", target.store_root)),
                ("Environment", systemd_environment("HF_HUB_DISABLE_TELEMETRY", "1")),
                ("Environment", systemd_environment("VDEPLOY_CACHE_DIR", f"{cache}/vdeploy")),
                ("EnvironmentFile", f"-{target.config_root}/hub.env"),
                ("ExecStart", systemd_command([vdeploy_bin, *init_command(target, "fetch")[1:]])),
                ("ExecStart", systemd_command([vdeploy_bin, *init_command(target, "verify")[1:]])),
                ("TimeoutStartSec", "infinity"),
                *SYSTEMD_HARDENING,
            )),
        ),
        f"vdeploy export systemd: deployment {deployment}\nGenerated from the lock; do not edit.",
    )
    units = [store]
    for rank in range(target.nodes):
        plan = target.plan(target.node_topology(rank, target.master_addr))
        node = "" if target.nodes == 1 else f" node {rank} of {target.nodes}"
        service: list[tuple[str, str]] = [
            ("Type", "exec"),
            ("User", SYSTEMD_USER),
            ("Group", SYSTEMD_USER),
            ("CacheDirectory", f"vdeploy/{name}"),
        ]
        service += [("Environment", systemd_environment(k, v)) for k, v in plan.env.items()]
        # The engine's caches, on a writable path (ProtectSystem=strict, ProtectHome).
        service += [
            ("Environment", systemd_environment(k, v)) for k, v in (
                ("HOME", cache), ("XDG_CACHE_HOME", cache), ("VLLM_CACHE_ROOT", f"{cache}/vllm"),
                ("TRITON_CACHE_DIR", f"{cache}/triton"),
            )
        ]
        if plan.secrets:
            service.append(("EnvironmentFile", f"{target.config_root}/secrets.env"))
        service.append(("ExecStart", systemd_command(plan.argv)))
        if rank == 0:
            # "Started" means healthy: vLLM has no sd_notify.
            service.append(("ExecStartPost", systemd_command(
                [vdeploy_bin, "wait-healthy", plan.url, "--timeout", str(target.startup_seconds)]
            )))
        service += [
            ("TimeoutStartSec", str(target.startup_seconds + 60)),
            ("TimeoutStopSec", "60"),
            ("Restart", "on-failure"),
            ("RestartSec", "10"),
            ("LimitNOFILE", "65536"),
            ("LimitMEMLOCK", "infinity"),
            *SYSTEMD_HARDENING,
        ]
        after = ["network-online.target", store_file]
        if target.gpu_resource is not None:
            # NoNewPrivileges stops the setuid nvidia-modprobe: the driver is loaded before.
            after.append("nvidia-persistenced.service")
        units.append(Unit(
            f"{name}.service" if target.nodes == 1 else f"{name}-node{rank}.service",
            (
                ("Unit", (
                    ("Description", f"vLLM {name}{node} (vdeploy deployment {deployment[:16]})"),
                    ("Requires", store_file),
                    ("Wants", "network-online.target"),
                    ("After", " ".join(after)),
                )),
                ("Service", tuple(service)),
                ("Install", (("WantedBy", "multi-user.target"),)),
            ),
            f"vdeploy export systemd: deployment {deployment}{', ' + node.strip() if node else ''}\nGenerated from the lock; do not edit.",
        ))
    check_systemd(target, units)
    files = [ExportFile(unit.file, systemd_unit(unit.sections, unit.header)) for unit in units]
    return files + config_files(target)


def check_systemd(target: Target, units: Sequence[Unit]) -> None:
    problem = systemd_problem(target, units)
    if problem is not None:
        raise ExportError(f"refusing to write export systemd: {problem}")


def systemd_problem(target: Target, units: Sequence[Unit]) -> str | None:
    store, nodes = units[0], units[1:]
    steps = [systemd_split(line) for line in store.values("ExecStart")]
    if [step[1:] for step in steps] != [init_command(target, "fetch")[1:], init_command(target, "verify")[1:]]:
        return f"{store.file} does not run `vdeploy fetch` and `vdeploy verify --full`"
    for unit in units:
        for key in SYSTEMD_FORBIDDEN:
            if unit.values(key):
                return f"{unit.file} sets {key}, which breaks GPUs or vLLM"
        if dict(SYSTEMD_HARDENING).items() - {(k, v) for _, entries in unit.sections for k, v in entries}:
            return f"{unit.file} lacks some of the hardening"
    for rank, unit in enumerate(nodes):
        if store.file not in unit.values("Requires") or store.file not in " ".join(unit.values("After")).split():
            return f"{unit.file} does not start after {store.file}"
        env = dict(line.strip('"').split("=", 1) for line in unit.values("Environment"))
        if env.get("HF_HUB_OFFLINE") != "1":
            return f"{unit.file} runs without HF_HUB_OFFLINE=1"
        if any(name in env for name in target.base_plan.secrets):
            return f"{unit.file} holds a secret; it belongs in secrets.env"
        problem = argv_problem(target, systemd_split(unit.values("ExecStart")[0]), target.node_topology(rank, target.master_addr))
        if problem is not None:
            return f"{unit.file}: {problem}"
    return None


__all__ = [
    "FORMATS", "ExportOptions", "Exported", "ExportFile", "export", "load_for_export", "write_export",
    "k8s_expand", "container_argv", "config_tree", "container_manifest",
]
