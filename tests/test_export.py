"""`vdeploy export`: golden files for the examples; every format checked by what reads it (the
Kubernetes schemas, the CRDs' own schemas, the compose spec, systemd-analyze, vLLM's serve parser);
the init step run for real against the fake Hub; the refusals; the topology function.

Golden files live in tests/golden/export/<example>/<format>/. After an intended change of the
output, rewrite them with VDEPLOY_UPDATE_GOLDEN=1 and read the diff.
Schema checks read ../shared/data/schemas (VDEPLOY_SHARED_DIR overrides ../shared) and skip,
saying why, without it.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path, PurePosixPath

import pytest

from conftest import Project
from fakehub import FakeHub
from vdeploy.emit import systemd_command, systemd_split, to_yaml, yaml_stream
from vdeploy.errors import LaunchError
from vdeploy.lockfile import loads_lock
from vdeploy.plan import Launcher, Overrides, Topology, make_plan, without_topology
from vdeploy.store import Store

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).parent / "golden" / "export"
SHARED = Path(os.environ.get("VDEPLOY_SHARED_DIR") or ROOT.parent / "shared")
SCHEMAS = SHARED / "data" / "schemas"
UPDATE_GOLDEN = os.environ.get("VDEPLOY_UPDATE_GOLDEN") == "1"

IMAGE = "registry.example.com/vllm-vdeploy@sha256:" + "0123456789abcdef" * 4
CPU_IMAGE = "registry.example.com/vllm-cpu-vdeploy@sha256:" + "fedcba9876543210" * 4
LEADER = "10.0.0.1"

# The Hub examples are locked against repos of the same ids on a fake Hub of their own (so
# their commits do not depend on other tests): small synthetic files, not the real models.
HUB_EXAMPLES = {
    "multi-gpu": "Qwen/Qwen3-32B",
    "two-node": "Qwen/Qwen3-235B-A22B",
    "ray-cluster": "Qwen/Qwen2.5-72B-Instruct",
    "all-flags": "Qwen/Qwen3-0.6B",
}

CASES = [
    ("tiny", "k8s", ("--image", CPU_IMAGE)),
    ("tiny", "compose", ("--image", CPU_IMAGE)),
    ("tiny", "systemd", ()),
    ("multi-gpu", "k8s", ("--image", IMAGE)),
    ("multi-gpu", "compose", ("--image", IMAGE)),
    ("multi-gpu", "systemd", ()),
    ("two-node", "lws", ("--image", IMAGE)),
    ("two-node", "systemd", ("--master-addr", LEADER)),
    ("ray-cluster", "raycluster", ("--image", IMAGE, "--nodes", "2")),
    ("ray-cluster", "lws", ("--image", IMAGE, "--nodes", "2")),
    # Every flag of the seed (JSON values, lists, TLS paths) through systemd's quoting.
    ("all-flags", "systemd", ("--master-addr", LEADER)),
]
CASE_IDS = [f"{example}-{fmt}" for example, fmt, _ in CASES]


def synthetic_repo(repo_id: str) -> dict[str, bytes]:
    name = repo_id.split("/")[1]
    shard = lambda n: (f"{repo_id} shard {n}\n".encode() * 64)  # noqa: E731
    return {
        "config.json": json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "name": name}).encode(),
        "generation_config.json": b'{"temperature": 0.7, "top_p": 0.8}\n',
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n',
        "tokenizer_config.json": b'{"model_max_length": 32768}\n',
        "model-00001-of-00002.safetensors": shard(1),
        "model-00002-of-00002.safetensors": shard(2),
        "model.safetensors.index.json": b'{"weight_map": {}}\n',
        "README.md": b"not locked: the examples' include leaves it out\n",
    }


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as server:
        yield server


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, hub) -> Path:
    """The examples, locked: tiny as committed, the Hub examples against the module's fake Hub."""
    base = tmp_path_factory.mktemp("export")
    shutil.copytree(ROOT / "constraints", base / "constraints")
    (base / "examples" / "tiny").mkdir(parents=True)
    for name in ("vdeploy.toml", "vdeploy.lock"):
        shutil.copy(EXAMPLES / "tiny" / name, base / "examples" / "tiny" / name)
    for example, repo in HUB_EXAMPLES.items():
        hub.commit(repo, synthetic_repo(repo))
        folder = base / "examples" / example
        folder.mkdir(parents=True)
        for name in ("vdeploy.toml", "chat_template.jinja"):
            if (EXAMPLES / example / name).is_file():
                shutil.copy(EXAMPLES / example / name, folder / name)
        cli(base, hub).run_vdeploy("lock", folder)
    return base


def cli(base: Path, hub: FakeHub, cache: str = "cache-export") -> Project:
    """The real CLI. Exports run with an empty vdeploy cache: no flag catalogue, as on any machine."""
    (base / "home").mkdir(exist_ok=True)
    (base / cache).mkdir(exist_ok=True)
    return Project(folder=base, home=base / "home", hub=hub, cache=base / cache)


def run_export(workspace: Path, hub: FakeHub, example: str, fmt: str, *options: str, expect: int = 0, env=None):
    out = workspace / "out" / f"{example}-{fmt}-{abs(hash(options))}"
    shutil.rmtree(out, ignore_errors=True)
    code, stdout, stderr = cli(workspace, hub).run_vdeploy(
        "export", fmt, workspace / "examples" / example, "-o", out, *options, expect=expect, env=env,
    )
    return out, stdout, stderr


def read_tree(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8") for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(workspace, hub) -> dict[str, dict[str, str]]:
    """Every case exported once through the CLI: case id → {path: text}."""
    return {case_id: read_tree(run_export(workspace, hub, example, fmt, *options)[0])
            for case_id, (example, fmt, options) in zip(CASE_IDS, CASES)}


def documents(files: dict[str, str]) -> list[dict]:
    yaml = pytest.importorskip("yaml")
    found = []
    for path, text in files.items():
        if path.endswith(".yaml"):
            found += [d for d in yaml.safe_load_all(text) if d is not None]
    return found


def locked(workspace: Path, example: str):
    return loads_lock((workspace / "examples" / example / "vdeploy.lock").read_text())


# ---- golden files and determinism ---------------------------------------------------------------


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_export_matches_its_golden_files(exported, case_id):
    example, fmt, _ = CASES[CASE_IDS.index(case_id)]
    golden = GOLDEN / example / fmt
    files = exported[case_id]
    if UPDATE_GOLDEN:
        shutil.rmtree(golden, ignore_errors=True)
        for path, text in files.items():
            (golden / path).parent.mkdir(parents=True, exist_ok=True)
            (golden / path).write_text(text, encoding="utf-8")
    assert files, "export wrote nothing"
    assert read_tree(golden) == files, f"{case_id}: output differs from {golden}; rewrite with VDEPLOY_UPDATE_GOLDEN=1 if intended"


def test_same_lock_and_options_give_the_same_bytes_printed_or_written(workspace, hub, exported):
    project = cli(workspace, hub)
    _, printed, _ = project.run_vdeploy("export", "lws", workspace / "examples" / "two-node", "--image", IMAGE)
    assert printed == exported["two-node-lws"]["lws.yaml"]
    out, _, _ = run_export(workspace, hub, "two-node", "lws", "--image", IMAGE)
    assert read_tree(out) == exported["two-node-lws"]
    # A manifest comment changes no input: the same bytes.
    manifest = workspace / "examples" / "two-node" / "vdeploy.toml"
    original = manifest.read_text()
    try:
        manifest.write_text("# a comment of no consequence\n" + original)
        _, again, _ = project.run_vdeploy("export", "lws", workspace / "examples" / "two-node", "--image", IMAGE)
        assert again == printed
    finally:
        manifest.write_text(original)


def test_a_new_lock_rolls_the_pods_through_a_new_configmap(tmp_path, workspace, hub, exported):
    folder = tmp_path / "examples" / "multi-gpu"
    folder.mkdir(parents=True)
    text = (workspace / "examples" / "multi-gpu" / "vdeploy.toml").read_text()
    (folder / "vdeploy.toml").write_text(text.replace("max-num-seqs = 64", "max-num-seqs = 32"))
    project = cli(tmp_path, hub)
    project.run_vdeploy("lock", folder)
    _, changed, _ = project.run_vdeploy("export", "k8s", folder, "--image", IMAGE)
    before, after = documents(exported["multi-gpu-k8s"]), documents({"k8s.yaml": changed})
    names = lambda docs: {d["kind"]: d["metadata"]["name"] for d in docs}  # noqa: E731
    assert names(before)["ConfigMap"] != names(after)["ConfigMap"]
    template = lambda docs: next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]  # noqa: E731
    assert template(before)["metadata"]["annotations"] != template(after)["metadata"]["annotations"]
    assert names(before)["Deployment"] == names(after)["Deployment"] and names(before)["Service"] == names(after)["Service"]


# ---- what reads the files: Kubernetes schemas, CRD schemas, compose, systemd ---------------------


def kubernetes_validate():
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[test]')"
    )


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "LeaderWorkerSet":
        template = spec["leaderWorkerTemplate"]
        return [("leader", template["leaderTemplate"]), ("worker", template["workerTemplate"])]
    if doc["kind"] == "RayCluster":
        return [("head", spec["headGroupSpec"]["template"])] + [
            (group["groupName"], group["template"]) for group in spec.get("workerGroupSpecs", [])
        ]
    if doc["kind"] == "Deployment":
        return [("server", spec["template"])]
    return []


KUBERNETES_CASES = [case for case in CASE_IDS if not case.endswith(("compose", "systemd"))]


@pytest.mark.parametrize("case_id", KUBERNETES_CASES)
def test_core_objects_and_every_pod_template_pass_kubernetes_strict_schemas(exported, case_id):
    validate = kubernetes_validate()
    for doc in documents(exported[case_id]):
        if doc["apiVersion"] in ("v1", "apps/v1"):
            validate.validate(doc, "1.30", strict=True)
        for role, template in pod_templates(doc):
            validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role}, "template": template}, "1.30", strict=True)


def test_kubernetes_validate_catches_an_unknown_field_in_a_pod_template(exported):
    validate = kubernetes_validate()
    lws = next(d for d in documents(exported["two-node-lws"]) if d["kind"] == "LeaderWorkerSet")
    template = copy.deepcopy(lws["spec"]["leaderWorkerTemplate"]["workerTemplate"])
    template["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(validate.ValidationError):
        validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "w"}, "template": template}, "1.30", strict=True)


def crd_validator(name: str):
    """A strict validator for a CRD's openAPIV3Schema, converted as the API server reads it:
    int-or-string, nullable, and unknown fields refused where the schema lists properties."""
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    path = SCHEMAS / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared/data/schemas, or set VDEPLOY_SHARED_DIR)")

    def strict(node):
        if isinstance(node, list):
            return [strict(item) for item in node]
        if not isinstance(node, dict):
            return node
        node = {key: strict(value) for key, value in node.items()}
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.pop("nullable", False) and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node

    schema = strict(json.loads(path.read_text())["openAPIV3Schema"])
    return jsonschema.Draft202012Validator(schema)


CRD_SCHEMAS = {"LeaderWorkerSet": "lws-v0.10.0.leaderworkerset.v1.schema.json", "RayCluster": "kuberay-v1.7.0.raycluster.v1.schema.json"}


@pytest.mark.parametrize("case_id", [c for c in KUBERNETES_CASES if not c.endswith("k8s")])
def test_custom_resources_pass_their_crd_schemas_strictly(exported, case_id):
    crds = [d for d in documents(exported[case_id]) if d["kind"] in CRD_SCHEMAS]
    assert crds
    for doc in crds:
        errors = sorted(crd_validator(CRD_SCHEMAS[doc["kind"]]).iter_errors(doc), key=str)
        assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]]


@pytest.mark.parametrize("change", ["unknown field", "bad enum", "string size"])
def test_the_strict_crd_check_refuses_what_the_api_server_would(exported, change):
    lws = next(d for d in documents(exported["two-node-lws"]) if d["kind"] == "LeaderWorkerSet")
    bad = copy.deepcopy(lws)
    template = bad["spec"]["leaderWorkerTemplate"]
    if change == "unknown field":
        template["restartPolicyy"] = "None"
    elif change == "bad enum":
        template["restartPolicy"] = "Always"
    else:
        template["size"] = "2"
    assert list(crd_validator(CRD_SCHEMAS["LeaderWorkerSet"]).iter_errors(bad))


def compose_validator():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    path = SCHEMAS / "compose-spec.schema.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared/data/schemas, or set VDEPLOY_SHARED_DIR)")
    return jsonschema.Draft7Validator(json.loads(path.read_text()))


@pytest.mark.parametrize("case_id", [c for c in CASE_IDS if c.endswith("compose")])
def test_compose_files_pass_the_compose_spec(exported, case_id):
    validator = compose_validator()
    (document,) = documents(exported[case_id])
    assert not [e.message for e in validator.iter_errors(document)]
    typo = copy.deepcopy(document)
    typo["services"]["vllm"]["shm_sise"] = "16gb"
    assert list(validator.iter_errors(typo))


def systemd_analyze_problems(folder: Path) -> list[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    units = sorted(p.name for p in folder.glob("*.service"))
    done = subprocess.run([tool, "verify", "--man=no", *units], cwd=folder, capture_output=True, text=True)
    lines = (done.stdout + done.stderr).splitlines()
    # The binaries live on the nodes, not here: the only complaint a parse-clean unit may get.
    return [line for line in lines if line.strip() and "is not executable" not in line]


@pytest.mark.parametrize("case_id", [c for c in CASE_IDS if c.endswith("systemd")])
def test_systemd_units_are_clean_for_systemd_analyze(tmp_path, exported, case_id):
    for path, text in exported[case_id].items():
        if path.endswith(".service"):
            (tmp_path / path).write_text(text)
    assert systemd_analyze_problems(tmp_path) == []
    unit = next(tmp_path.glob("*-store.service"))
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nProtectKernelTunabels=yes\n"))
    assert any("ProtectKernelTunabels" in line for line in systemd_analyze_problems(tmp_path))


# ---- the invariants, read off the files ----------------------------------------------------------


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("case_id", KUBERNETES_CASES)
def test_every_pod_verifies_the_lock_first_and_mounts_the_models_read_only_offline(exported, case_id):
    docs = documents(exported[case_id])
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    assert configmap["immutable"] is True and configmap["metadata"]["name"].split("-lock-")[1] in str(docs)
    templates = [t for d in docs for t in pod_templates(d)]
    assert templates
    for role, template in templates:
        spec = template["spec"]
        fetch, verify = spec["initContainers"]
        assert fetch["command"][:2] == ["vdeploy", "fetch"] and verify["command"][:3] == ["vdeploy", "verify", "--full"]
        assert fetch["command"][2] == verify["command"][3] and fetch["command"][2].startswith("/etc/vdeploy")
        assert {m["name"]: m.get("readOnly", False) for m in fetch["volumeMounts"]} == {"models": False, "vdeploy-config": True}
        assert spec["enableServiceLinks"] is False
        config = next(v for v in spec["volumes"] if v["name"] == "vdeploy-config")["configMap"]
        assert config["name"] == configmap["metadata"]["name"]
        assert {i["key"] for i in config["items"]} == set(configmap["data"])
        for container in [*spec["initContainers"], *spec["containers"]]:
            assert "@sha256:" in container["image"] and len(container["image"].split("@sha256:")[1]) == 64
        for container in spec["containers"]:
            assert [m.get("readOnly") for m in container["volumeMounts"] if m["name"] == "models"] == [True]
            env = env_of(container)
            assert env["HF_HUB_OFFLINE"]["value"] == "1" and env["HF_HUB_CACHE"]["value"] == "/models/hub"
            assert "HF_TOKEN" not in env
        assert env_of(fetch)["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True


@pytest.mark.parametrize("case_id", KUBERNETES_CASES)
def test_names_fit_kubernetes_limits_and_serving_pods_allow_for_loading(exported, case_id):
    docs = documents(exported[case_id])
    for doc in docs:
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
        for value in doc["metadata"]["labels"].values():
            assert len(value) <= 63
        if doc["kind"] == "LeaderWorkerSet":
            size, replicas = doc["spec"]["leaderWorkerTemplate"]["size"], doc["spec"]["replicas"]
            assert len(f"{name}-{replicas - 1}-{size - 1}") <= 63 and len(f"{name}-{replicas - 1}") <= 52
            assert doc["spec"]["startupPolicy"] == "LeaderCreated"
            assert doc["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupAfterStart"
        if doc["kind"] == "RayCluster":
            head = doc["spec"]["headGroupSpec"]["template"]
            assert head["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
            ports = {p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
            assert {6379, 8265, 10001, 8000} <= ports
            assert all(isinstance(v, str) for v in doc["spec"]["headGroupSpec"]["rayStartParams"].values())
    serving = [t for d in docs for role, t in pod_templates(d) if role in ("server", "leader", "head")]
    for template in serving:
        container = template["spec"]["containers"][0]
        startup = container["startupProbe"]
        assert startup["httpGet"]["path"] == "/health" and startup["periodSeconds"] * startup["failureThreshold"] >= 900
        assert container["readinessProbe"]["httpGet"]["path"] == container["livenessProbe"]["httpGet"]["path"] == "/health"


def test_a_gpu_deployment_requests_its_gpus_and_a_cpu_build_none(exported):
    for case_id, gpus in (("multi-gpu-k8s", 4), ("two-node-lws", 8), ("ray-cluster-raycluster", 4)):
        for doc in documents(exported[case_id]):
            for _, template in pod_templates(doc):
                assert template["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == gpus
    tiny = next(d for d in documents(exported["tiny-k8s"]) if d["kind"] == "Deployment")
    assert "resources" not in tiny["spec"]["template"]["spec"]["containers"][0]
    compose = documents(exported["multi-gpu-compose"])[0]["services"]["vllm"]
    assert compose["deploy"]["resources"]["reservations"]["devices"] == [{"driver": "nvidia", "count": 4, "capabilities": ["gpu"]}]


def test_secrets_are_references_and_their_values_appear_nowhere(workspace, hub):
    secret = "sk-this-value-must-not-leak-0123456789"
    outputs = {}
    for fmt, options in (("lws", ("--image", IMAGE)), ("systemd", ("--master-addr", LEADER))):
        out, stdout, stderr = run_export(workspace, hub, "two-node", fmt, *options, env={"VLLM_API_KEY": secret, "HF_TOKEN": secret})
        outputs[fmt] = read_tree(out)
        assert secret not in stdout + stderr + "".join(outputs[fmt].values())
    lws = next(d for d in documents(outputs["lws"]) if d["kind"] == "LeaderWorkerSet")
    for template in (lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"], lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]):
        key = env_of(template["spec"]["containers"][0])["VLLM_API_KEY"]
        assert key == {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "qwen3-235b-secrets", "key": "VLLM_API_KEY"}}}
    node0 = outputs["systemd"]["qwen3-235b-node0.service"]
    assert "EnvironmentFile=/etc/vdeploy/qwen3-235b/secrets.env" in node0 and "VLLM_API_KEY" not in node0.replace("secrets.env", "")
    store = outputs["systemd"]["qwen3-235b-store.service"]
    assert "EnvironmentFile=-/etc/vdeploy/qwen3-235b/hub.env" in store


def test_systemd_units_are_hardened_without_what_breaks_gpus(exported):
    from vdeploy.export import SYSTEMD_FORBIDDEN, SYSTEMD_HARDENING

    units = {p: t for p, t in exported["two-node-systemd"].items() if p.endswith(".service")}
    assert sorted(units) == ["qwen3-235b-node0.service", "qwen3-235b-node1.service", "qwen3-235b-store.service"]
    for text in units.values():
        keys = {line.split("=", 1)[0] for line in text.splitlines() if "=" in line and not line.startswith("#")}
        assert not keys & set(SYSTEMD_FORBIDDEN)
        for key, value in SYSTEMD_HARDENING:
            assert f"{key}={value}\n" in text
    node0, node1 = units["qwen3-235b-node0.service"], units["qwen3-235b-node1.service"]
    assert "ExecStartPost=/opt/vdeploy/venv/bin/vdeploy wait-healthy http://127.0.0.1:8000" in node0
    assert "ExecStartPost" not in node1 and "--headless" in node1 and "--headless" not in node0
    for text in (node0, node1):
        assert "Requires=qwen3-235b-store.service" in text and "StateDirectory" not in text


# ---- the argv in every container: the plan's for its node, and vLLM's parser agrees ---------------


def node_argvs(workspace: Path, exported) -> list[tuple[str, list[str], list[str]]]:
    """(where, argv the container runs, the plan's argv for that node) for every vLLM process."""
    from vdeploy.export import container_argv

    found = []
    for case_id, (example, fmt, _) in zip(CASE_IDS, CASES):
        lock = locked(workspace, example)
        files = exported[case_id]
        container_launcher = Launcher.for_engine(lock.engine)
        store = Store(PurePosixPath("/models/hub"))

        def plan(topology=None, host="0.0.0.0", store=store, launcher=container_launcher, lock=lock):
            return list(make_plan(lock, store, launcher, None, Overrides(host=host, port=8000), None, None, topology).argv)

        if fmt == "systemd":
            name = "tiny" if example == "tiny" else next(p for p in files if p.endswith("-store.service")).removesuffix("-store.service")
            launcher = Launcher.for_engine(lock.engine, "/opt/vdeploy/venv/bin")
            units = sorted(p for p in files if p.endswith(".service") and not p.endswith("-store.service"))
            for rank, unit in enumerate(units):
                line = next(l for l in files[unit].splitlines() if l.startswith("ExecStart="))
                topology = Topology.for_node(lock.serve, rank, LEADER) if len(units) > 1 else None
                expected = make_plan(lock, Store(PurePosixPath(f"/var/lib/vdeploy/{name}/hub")), launcher, None,
                                     Overrides(port=8000), None, None, topology).argv
                found.append((f"{case_id} {unit}", systemd_split(line.removeprefix("ExecStart=")), list(expected)))
            continue
        if fmt == "compose":
            vllm = documents(files)[0]["services"]["vllm"]
            argv = [w.replace("$$", "$") for w in [*vllm["entrypoint"], *vllm["command"]]]
            found.append((case_id, argv, plan()))
            continue
        for doc in documents(files):
            if doc["kind"] == "Deployment":
                container = doc["spec"]["template"]["spec"]["containers"][0]
                found.append((case_id, container_argv(container, {}, False), plan()))
            elif doc["kind"] == "LeaderWorkerSet":
                size = doc["spec"]["leaderWorkerTemplate"]["size"]
                address = f"{doc['metadata']['name']}-0.{doc['metadata']['name']}.default"
                leader = doc["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
                worker = doc["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
                if "ray" in json.dumps(leader["command"]):
                    found.append((f"{case_id} leader", container_argv(leader, {}, True), plan()))
                    continue
                env = {"LWS_LEADER_ADDRESS": address, "LWS_WORKER_INDEX": "0"}
                found.append((f"{case_id} leader", container_argv(leader, env, False), plan(Topology.for_node(lock.serve, 0, address))))
                for rank in range(1, size):
                    env = {"LWS_LEADER_ADDRESS": address, "LWS_WORKER_INDEX": str(rank)}
                    found.append((f"{case_id} worker {rank}", container_argv(worker, env, False), plan(Topology.for_node(lock.serve, rank, address))))
            elif doc["kind"] == "RayCluster":
                head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
                found.append((f"{case_id} head", container_argv(head, {}, True), plan()))
    return found


def test_every_container_runs_the_plan_argv_for_its_node(workspace, exported):
    argvs = node_argvs(workspace, exported)
    # 2 Deployments, 2 compose files, 6 systemd nodes, 2 LWS ranks, 2 Ray heads (RayCluster, LWS)
    assert len(argvs) == 14
    for where, argv, expected in argvs:
        assert argv == expected, where
        assert without_topology(argv) == without_topology(expected)


def test_the_engines_own_parser_reads_every_container_argv_as_the_plan_for_its_node(tmp_path, workspace, exported):
    from vdeploy.engine import installed_engine
    from vdeploy.probe import parse_engine_argvs

    if installed_engine() is None:
        pytest.skip("needs vLLM installed (its serve parser)")
    argvs = node_argvs(workspace, exported)

    def as_parsed_here(argv):
        # vLLM checks that a chat template path exists: the stores move here, on both sides alike.
        moved = [re.sub(r"^(/models/hub|/var/lib/vdeploy/[a-z0-9-]+/hub)", str(tmp_path), a) for a in argv]
        for flag, value in zip(moved, moved[1:]):
            if flag == "--chat-template":
                Path(value).parent.mkdir(parents=True, exist_ok=True)
                Path(value).write_text("{{ messages }}")
        return moved[3:] if moved[1] == "-m" else moved[2:]

    parsed = parse_engine_argvs(sys.executable, [as_parsed_here(a) for _, a, _ in argvs] + [as_parsed_here(e) for _, _, e in argvs])
    containers, plans = parsed[:len(argvs)], parsed[len(argvs):]
    for (where, argv, _), ours, plan in zip(argvs, containers, plans):
        assert ours == plan, where
    by_where = {where: ns for (where, _, _), ns in zip(argvs, containers)}
    worker = by_where["two-node-lws worker 1"]
    assert (worker["nnodes"], worker["node_rank"], worker["headless"]) == (2, 1, True)
    assert worker["master_addr"] == "qwen3-235b-0.qwen3-235b.default"
    leader = by_where["two-node-lws leader"]
    assert (leader["node_rank"], leader["headless"], leader["host"], leader["port"]) == (0, False, "0.0.0.0", 8000)
    assert by_where["ray-cluster-raycluster head"]["distributed_executor_backend"] == "ray"
    assert by_where["ray-cluster-raycluster head"]["nnodes"] == 1
    assert by_where["two-node-systemd qwen3-235b-node1.service"]["master_addr"] == LEADER
    every_flag = by_where["all-flags-systemd qwen3-node1.service"]
    assert (every_flag["nnodes"], every_flag["node_rank"], every_flag["master_port"], every_flag["headless"]) == (2, 1, 29501, True)
    assert every_flag["default_chat_template_kwargs"] == {"enable_thinking": False}


# ---- the init step, for real --------------------------------------------------------------------


def run_init_step(command: list[str], env: dict[str, str], root: Path, hub: FakeHub) -> subprocess.CompletedProcess:
    """A container's or unit's `vdeploy ...` command, with its absolute paths moved under root."""
    move = lambda text: text.replace("/etc/vdeploy", str(root / "etc" / "vdeploy")).replace("/models", str(root / "models")).replace("/var/lib", str(root / "var" / "lib")).replace("/tmp/vdeploy", str(root / "tmp"))  # noqa: E731
    child = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VDEPLOY_"))}
    child.update({k: move(v) for k, v in env.items()})
    child.update(HF_ENDPOINT=hub.url, PYTHONPATH=str(ROOT))
    assert command[0].endswith("vdeploy")
    return subprocess.run([sys.executable, "-m", "vdeploy", *[move(a) for a in command[1:]]], env=child, capture_output=True, text=True, timeout=120)


def test_the_pods_init_containers_fetch_and_verify_the_shipped_lock(tmp_path, hub, exported):
    docs = documents(exported["two-node-lws"])
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    lws = next(d for d in docs if d["kind"] == "LeaderWorkerSet")
    spec = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    items = next(v for v in spec["volumes"] if v["name"] == "vdeploy-config")["configMap"]["items"]
    for item in items:  # what kubelet does with the ConfigMap volume
        path = tmp_path / "etc" / "vdeploy" / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(configmap["data"][item["key"]])
    for init in spec["initContainers"]:
        env = {e["name"]: e["value"] for e in init["env"] if "value" in e}
        done = run_init_step(init["command"], env, tmp_path, hub)
        assert done.returncode == 0, f"{init['name']}: {done.stderr}"
    # vLLM's model argument is a verified snapshot on the volume.
    args = spec["containers"][0]["args"]
    snapshot = tmp_path / "models" / args[0].removeprefix("/models/")
    assert (snapshot / "config.json").is_file() and (snapshot / "model-00002-of-00002.safetensors").is_file()
    # And a corrupted blob stops the pod before vLLM starts.
    blob = (snapshot / "model-00002-of-00002.safetensors").resolve()
    blob.write_bytes(b"x" * blob.stat().st_size)
    verify = spec["initContainers"][1]
    done = run_init_step(verify["command"], {e["name"]: e["value"] for e in verify["env"] if "value" in e}, tmp_path, hub)
    assert done.returncode == 1 and "mismatch" in done.stderr


def test_the_systemd_store_unit_fetches_and_verifies_from_the_shipped_tree(tmp_path, hub, exported):
    files = exported["multi-gpu-systemd"]
    for path, text in files.items():
        if path.startswith("vdeploy/"):
            target = tmp_path / "etc" / "vdeploy" / "qwen3-32b" / path.removeprefix("vdeploy/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    unit = files["qwen3-32b-store.service"].splitlines()
    env = dict(systemd_split(l.removeprefix("Environment="))[0].split("=", 1) for l in unit if l.startswith("Environment="))
    env = {k: v.replace("/var/cache/vdeploy/qwen3-32b/vdeploy", "/tmp/vdeploy") for k, v in env.items()}
    for line in (l for l in unit if l.startswith("ExecStart=")):
        done = run_init_step(systemd_split(line.removeprefix("ExecStart=")), env, tmp_path, hub)
        assert done.returncode == 0, done.stderr
    assert list((tmp_path / "var" / "lib" / "vdeploy" / "qwen3-32b" / "hub").glob("models--Qwen--Qwen3-32B/snapshots/*/config.json"))


def test_the_tiny_example_ships_its_constraints_file_where_the_manifest_names_it(tmp_path, hub, exported):
    """tiny names ../../constraints/engine-cpu.txt: the tree keeps that layout, so the pod's
    `vdeploy fetch` loads the manifest and finds its lock current (then imports the local folder)."""
    sys.path.insert(0, str(EXAMPLES / "tiny"))
    from build_model import build_model

    files = exported["tiny-compose"]
    assert {"vdeploy/examples/tiny/vdeploy.toml", "vdeploy/examples/tiny/vdeploy.lock", "vdeploy/constraints/engine-cpu.txt"} <= set(files)
    for path, text in files.items():
        if path.startswith("vdeploy/"):
            target = tmp_path / "etc" / "vdeploy" / path.removeprefix("vdeploy/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    # The local folder is not shipped; here it is mounted beside the manifest.
    build_model(tmp_path / "etc" / "vdeploy" / "examples" / "tiny" / "model")
    compose = documents(files)[0]["services"]
    for step in ("vdeploy-fetch", "vdeploy-verify"):
        service = compose[step]
        done = run_init_step([*service["entrypoint"], *service["command"]], service["environment"], tmp_path, hub)
        assert done.returncode == 0, done.stderr


# ---- refusals: one line, exit 1, nothing written ------------------------------------------------------


REFUSALS = [
    ("multi-gpu", "k8s", ("--image", "vllm/vllm-openai:v0.32.0"), "not pinned by digest"),
    ("multi-gpu", "k8s", (), "no engine image"),
    ("multi-gpu", "k8s", ("--image", IMAGE, "--init-image", "vdeploy:latest"), "--init-image vdeploy:latest is not pinned by digest"),
    ("multi-gpu", "k8s", ("--image", IMAGE, "--gpus-per-node", "3"), "tensor-parallel 4 = 4 GPU(s), but 1 node(s) × 3"),
    ("two-node", "lws", ("--image", IMAGE, "--nodes", "3"), "--nodes 3, but the lock runs on [serve] nnodes = 2"),
    ("two-node", "k8s", ("--image", IMAGE), "export k8s runs one node, and this deployment spans 2"),
    ("two-node", "compose", ("--image", IMAGE), "export compose runs one node"),
    ("two-node", "raycluster", ("--image", IMAGE), "distributed-executor-backend = \"ray\""),
    ("two-node", "lws", ("--image", IMAGE, "--backend", "ray"), "set [serve] distributed-executor-backend = \"ray\""),
    ("two-node", "lws", ("--image", IMAGE, "--name", "a" * 51), "at most 50"),
    ("two-node", "lws", ("--image", IMAGE, "--name", "Qwen_3"), "lowercase letters"),
    ("two-node", "systemd", (), "needs --master-addr"),
    ("two-node", "systemd", ("--master-addr", LEADER, "--venv", "relative/venv"), "--venv"),
    ("ray-cluster", "systemd", ("--nodes", "2"), "export raycluster or lws"),
    ("ray-cluster", "raycluster", ("--image", IMAGE, "--nodes", "2", "--port", "6379"), "Ray's ports"),
    ("multi-gpu", "k8s", ("--image", IMAGE, "--venv", "/opt/v"), "--venv does not apply to `export k8s`"),
    ("multi-gpu", "systemd", ("--image", IMAGE), "--image does not apply"),
    ("multi-gpu", "helm", (), "unknown export format 'helm'"),
    ("multi-gpu", "compose", ("--image", IMAGE, "--startup-timeout", "5"), "at least a minute"),
]


@pytest.mark.parametrize("example,fmt,options,message", REFUSALS, ids=[f"{r[1]}-{r[3][:30]}" for r in REFUSALS])
def test_export_refuses_in_one_line_and_writes_nothing(workspace, hub, example, fmt, options, message):
    out, stdout, stderr = run_export(workspace, hub, example, fmt, *options, expect=1)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert not out.exists()


def test_tls_flags_are_refused_for_containers(tmp_path, hub):
    folder = tmp_path / "examples" / "tls"
    folder.mkdir(parents=True)
    hub.commit("Qwen/Qwen3-32B", synthetic_repo("Qwen/Qwen3-32B"))
    text = (EXAMPLES / "multi-gpu" / "vdeploy.toml").read_text().replace('port = 8000\n', 'port = 8000\nssl-keyfile = "tls/key.pem"\nssl-certfile = "tls/cert.pem"\n')
    (folder / "vdeploy.toml").write_text(text)
    project = cli(tmp_path, hub)
    project.run_vdeploy("lock", folder)
    _, _, stderr = project.run_vdeploy("export", "k8s", folder, "--image", IMAGE, expect=1)
    assert "ssl-" in stderr and "terminate TLS" in stderr
    out = tmp_path / "units"
    project.run_vdeploy("export", "systemd", folder, "-o", out)
    assert "--ssl-keyfile /etc/vdeploy/qwen3-32b/tls/key.pem" in (out / "qwen3-32b.service").read_text()


def test_the_lock_pinned_image_is_used_and_another_given_image_is_warned_about(tmp_path, hub):
    folder = tmp_path / "examples" / "pinned"
    folder.mkdir(parents=True)
    pinned = "registry.example.com/pinned@sha256:" + "ab" * 32
    text = (EXAMPLES / "multi-gpu" / "vdeploy.toml").read_text().replace(
        'engine = "vllm==0.32.0"', f'engine = "vllm==0.32.0"\nengine-image = "{pinned}"'
    )
    (folder / "vdeploy.toml").write_text(text)
    hub.commit("Qwen/Qwen3-32B", synthetic_repo("Qwen/Qwen3-32B"))
    project = cli(tmp_path, hub)
    project.run_vdeploy("lock", folder)
    _, printed, stderr = project.run_vdeploy("export", "k8s", folder)
    assert printed.count(f"image: \"{pinned}\"") == 3 and "warning" not in stderr
    _, printed, stderr = project.run_vdeploy("export", "k8s", folder, "--image", IMAGE)
    assert f"image: \"{pinned}\"" not in printed and f"warning: --image {IMAGE} is not the lock's engine-image {pinned}" in stderr


def test_files_formats_need_an_output_folder(workspace, hub):
    _, _, stderr = cli(workspace, hub).run_vdeploy("export", "systemd", workspace / "examples" / "multi-gpu", expect=1)
    assert "pass -o DIR" in stderr


# ---- the shipped manifest ------------------------------------------------------------------------------


def test_the_shipped_manifest_has_the_same_inputs_as_every_example(tmp_path):
    from vdeploy.export import config_tree
    from vdeploy.lockfile import Lock, LockedSource
    from vdeploy.manifest import load_manifest

    for manifest_path in sorted(EXAMPLES.glob("*/vdeploy.toml")):
        manifest = load_manifest(manifest_path)
        stub = Lock(deployment="0" * 64, manifest_hash=manifest.inputs_hash(), inputs=manifest.inputs(),
                    model=LockedSource(role="model", commit="0" * 40, files=(), repo="a/b", revision="main", name="models--a--b"))
        tree = config_tree(manifest, stub)
        root = tmp_path / manifest_path.parent.name
        for path, text in tree.files.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(text)
        shipped = load_manifest(root / tree.manifest_dir)
        assert shipped.inputs() == manifest.inputs(), manifest_path
        assert shipped.download_dir is None


# ---- the topology function (export, and `up --node-rank` on several hosts) ------------------------------


def all_flags_lock():
    from vdeploy.lockfile import Lock, LockedSource
    from vdeploy.manifest import load_manifest

    manifest = load_manifest(EXAMPLES / "all-flags")
    return Lock(deployment="d" * 64, manifest_hash="", inputs={}, serve=manifest.serve,
                model=LockedSource(role="model", commit="0" * 40, files=(), repo="Qwen/Qwen3-0.6B", name="models--Qwen--Qwen3-0.6B"))


def test_topology_replaces_the_locks_topology_flags_with_the_nodes_own():
    lock = all_flags_lock()  # nnodes 2, node-rank 0, master-addr 10.0.0.1, master-port 29501
    store, launcher = Store(PurePosixPath("/m")), Launcher.cli("vllm")
    as_locked = make_plan(lock, store, launcher).argv
    node1 = make_plan(lock, store, launcher, topology=Topology.for_node(lock.serve, 1, "head.example")).argv
    flag = lambda argv, name: argv[argv.index(name) + 1]  # noqa: E731
    assert (flag(node1, "--nnodes"), flag(node1, "--node-rank"), flag(node1, "--master-addr"), flag(node1, "--master-port")) == ("2", "1", "head.example", "29501")
    assert "--headless" in node1 and "--headless" not in as_locked
    assert without_topology(node1) == without_topology(as_locked)
    assert [a for a in node1 if a.startswith("--")].count("--node-rank") == 1
    single = make_plan(lock, store, launcher, topology=Topology()).argv
    assert not {"--nnodes", "--node-rank", "--master-addr", "--master-port", "--headless"} & set(single)


@pytest.mark.parametrize("args,message", [
    ((2, "h"), "--node-rank 2 is outside 0..1"),
    ((1, None), "--master-addr is needed"),
    ((-1, "h"), "outside"),
])
def test_topology_refuses_a_node_that_cannot_run(args, message):
    with pytest.raises(LaunchError, match=message):
        Topology.for_node({"nnodes": 2}, *args)


def test_without_topology_drops_exactly_the_owned_flags_and_their_values():
    argv = ["vllm", "serve", "/m", "--host", "0.0.0.0", "--nnodes", "2", "--headless", "--max-model-len", "32K",
            "--port=9000", "--node-rank", "1", "--master-addr", "h", "--master-port", "1", "--seed", "0"]
    assert without_topology(argv) == ("vllm", "serve", "/m", "--max-model-len", "32K", "--seed", "0")


# ---- the emitters ---------------------------------------------------------------------------------------


TRICKY = [
    "", "yes", "No", "on", "null", "~", "1", "0.9", "1e3", ".inf", "0x1f", "0755", "1_000", "32K", "-1",
    "--max-model-len", "--port=8000", "a b", "a: b", "#x", "x #y", "@x", "`x", "[a]", "{a}", "*a", "&a", "!a",
    "%a", "|", ">", "-", "?", "a\nb", "a\nb\n", "a\nb\n\n", "\nx", "  x\ny", "x  \ny", "x\n  y\n", "é\nü",
    "\u2028x\ny", "tab\tin", "\t\nx", "$(LWS_WORKER_INDEX)", "nvidia.com/gpu", "---\n...\n", "a\r\nb", "\x00", "\x85\na",
    '{"enable_thinking":false}',
]


def test_yaml_round_trips_tricky_strings_through_a_real_reader():
    yaml = pytest.importorskip("yaml")
    data = {"list": TRICKY, "map": {s: s for s in TRICKY if s}, "nested": [[1, [2, {}]], {}, [], {"a": [{"b": "x\ny\n", "c": [1]}]}],
            "none": None, "bool": False, "int": 3, "float": 0.5}
    assert yaml.safe_load(to_yaml(data)) == data
    assert list(yaml.safe_load_all(yaml_stream([{"a": 1}, {"b": [1, 2]}], "header\nline"))) == [{"a": 1}, {"b": [1, 2]}]


def test_systemd_quoting_round_trips():
    argv = ["/opt/v/bin/vllm", "b c", '{"x":1}', "$HOME", "%h", "a\\b", "", "$$", 'q"q', "new\nline"]
    assert systemd_split(systemd_command(argv)) == argv


# ---- wait-healthy ---------------------------------------------------------------------------------------


def health_server(answers: list[int]):
    """A real HTTP server whose /health answers the given statuses in turn, then the last forever."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status = answers.pop(0) if len(answers) > 1 else answers[0]
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_wait_healthy_returns_once_health_answers_200(project):
    server = health_server([503, 503, 200])
    try:
        _, _, stderr = project.run_vdeploy("wait-healthy", f"http://127.0.0.1:{server.server_address[1]}", "--timeout", "30")
        assert stderr == ""
    finally:
        server.shutdown()


def test_wait_healthy_fails_in_one_line_after_its_timeout(project):
    server = health_server([503])
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        _, _, stderr = project.run_vdeploy("wait-healthy", url, "--timeout", "1", expect=1)
        assert stderr.strip() == f"error: {url}/health did not answer 200 within 1 s"
    finally:
        server.shutdown()


def test_the_cli_module_still_imports_no_yaml_library():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, vdeploy.cli, vdeploy.export; print(sorted(m for m in sys.modules if m.split('.')[0] in ('yaml', 'jsonschema', 'kubernetes_validate')))"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.stdout.strip() == "[]", done.stderr


def test_shlex_join_and_split_keep_the_ray_head_argv():
    # The Ray head runs vLLM from a shell script line; quoting must survive JSON-valued flags.
    argv = ["vllm", "serve", "/m", "--speculative-config", '{"method":"ngram","num_speculative_tokens":3}', "--x", "a b"]
    assert shlex.split(shlex.join(argv)) == argv


# ---- the checks made before writing refuse what breaks an invariant ----------------------------------


def target_for(workspace: Path, example: str, fmt: str, **options):
    from vdeploy.export import ExportOptions, make_target
    from vdeploy.manifest import load_manifest

    manifest = load_manifest(workspace / "examples" / example)
    return make_target(fmt, manifest, locked(workspace, example), None, ExportOptions(**options), [])


def first_template(docs: list[dict], kind: str, role: int = 0) -> dict:
    return pod_templates(next(d for d in docs if d["kind"] == kind))[role][1]


KUBERNETES_BREAKS = {
    "no verify step": lambda docs: first_template(docs, "LeaderWorkerSet", 1)["spec"]["initContainers"].pop(1),
    "fetch of another lock": lambda docs: first_template(docs, "LeaderWorkerSet")["spec"]["initContainers"][0]["command"].__setitem__(2, "/etc/other"),
    "models writable": lambda docs: first_template(docs, "LeaderWorkerSet", 1)["spec"]["containers"][0]["volumeMounts"][0].pop("readOnly"),
    "online": lambda docs: env_of(first_template(docs, "LeaderWorkerSet")["spec"]["containers"][0])["HF_HUB_OFFLINE"].__setitem__("value", "0"),
    "tagged image": lambda docs: first_template(docs, "LeaderWorkerSet", 1)["spec"]["initContainers"][1].__setitem__("image", "vdeploy:latest"),
    "literal key": lambda docs: env_of(first_template(docs, "LeaderWorkerSet")["spec"]["containers"][0])["VLLM_API_KEY"].update(value="sk", valueFrom=None),
    "another flag": lambda docs: first_template(docs, "LeaderWorkerSet", 1)["spec"]["containers"][0]["args"].append("--enforce-eager"),
    "wrong rank": lambda docs: first_template(docs, "LeaderWorkerSet")["spec"]["containers"][0]["args"].__setitem__(
        first_template(docs, "LeaderWorkerSet")["spec"]["containers"][0]["args"].index("--node-rank") + 1, "1"),
    "short start-up": lambda docs: first_template(docs, "LeaderWorkerSet")["spec"]["containers"][0]["startupProbe"].__setitem__("failureThreshold", 3),
    "LeaderReady": lambda docs: next(d for d in docs if d["kind"] == "LeaderWorkerSet")["spec"].__setitem__("startupPolicy", "LeaderReady"),
    "default restart policy": lambda docs: next(d for d in docs if d["kind"] == "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"].__setitem__("restartPolicy", "RecreateGroupOnPodRestart"),
    "Service named like the set": lambda docs: next(d for d in docs if d["kind"] == "Service")["metadata"].__setitem__("name", "qwen3-235b"),
    "mutable ConfigMap": lambda docs: next(d for d in docs if d["kind"] == "ConfigMap").pop("immutable"),
}


@pytest.mark.parametrize("change", list(KUBERNETES_BREAKS))
def test_the_kubernetes_check_refuses_a_broken_invariant(workspace, exported, change):
    from vdeploy.export import kubernetes_problem

    target = target_for(workspace, "two-node", "lws", image=IMAGE)
    docs = documents(exported["two-node-lws"])
    assert kubernetes_problem(target, docs) is None
    KUBERNETES_BREAKS[change](docs)
    assert kubernetes_problem(target, docs) is not None


def test_the_ray_head_check_reads_the_argv_off_its_script(workspace, exported):
    from vdeploy.export import kubernetes_problem

    target = target_for(workspace, "ray-cluster", "raycluster", image=IMAGE, nodes=2)
    docs = documents(exported["ray-cluster-raycluster"])
    assert kubernetes_problem(target, docs) is None
    head = first_template(docs, "RayCluster")["spec"]["containers"][0]
    head["command"][2] = head["command"][2].replace("--seed 0", "--seed 1")
    assert "not the plan's" in kubernetes_problem(target, docs)


def test_the_compose_and_systemd_checks_refuse_a_broken_invariant(workspace, exported):
    from vdeploy.export import Unit, compose_problem, systemd_problem

    target = target_for(workspace, "multi-gpu", "compose", image=IMAGE)
    (compose,) = documents(exported["multi-gpu-compose"])
    assert compose_problem(target, compose) is None
    for break_it in (
        lambda c: c["services"]["vllm"]["volumes"][0].pop("read_only"),
        lambda c: c["services"]["vllm"].pop("depends_on"),
        lambda c: c["services"]["vllm"]["command"].append("--enforce-eager"),
        lambda c: c["services"]["vllm"]["environment"].__setitem__("VLLM_API_KEY", "sk"),
    ):
        broken = copy.deepcopy(compose)
        break_it(broken)
        assert compose_problem(target, broken) is not None

    target = target_for(workspace, "two-node", "systemd", master_addr=LEADER)
    files = exported["two-node-systemd"]

    def unit(path: str, edit=lambda text: text) -> Unit:
        sections, name = [], None
        for line in edit(files[path]).splitlines():
            if line.startswith("["):
                name = line.strip("[]")
                sections.append((name, []))
            elif "=" in line and not line.startswith("#"):
                sections[-1][1].append(tuple(line.split("=", 1)))
        return Unit(path, tuple((n, tuple(e)) for n, e in sections), "")

    paths = ["qwen3-235b-store.service", "qwen3-235b-node0.service", "qwen3-235b-node1.service"]
    assert systemd_problem(target, [unit(p) for p in paths]) is None
    for path, edit in (
        (paths[0], lambda t: t.replace("verify --full", "verify")),
        (paths[1], lambda t: t.replace("ProtectSystem=strict\n", "ProtectSystem=strict\nPrivateDevices=yes\n")),
        (paths[2], lambda t: t.replace("--node-rank 1", "--node-rank 0")),
        (paths[2], lambda t: t.replace("Requires=qwen3-235b-store.service\n", "")),
        (paths[1], lambda t: t.replace("NoNewPrivileges=yes\n", "")),
    ):
        assert systemd_problem(target, [unit(p, edit if p == path else (lambda t: t)) for p in paths]) is not None
