"""`vdeploy bundle` and `vdeploy unbundle`, through the real CLI: the OCI layout and its ModelPack
artifact, the round trip into an empty store, reproducibility, volumes, real OCI tools, and every
refusal."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from lock_edits import edited_lock

from store_tree import tree

ROOT = Path(__file__).resolve().parents[1]
# The image-spec and ModelPack schemas live in shared/, beside the repository (not in it).
SCHEMAS = ROOT.parent / "shared" / "data" / "schemas"

CONFIG = b'{"architectures": ["TinyModel"], "torch_dtype": "float32"}\n'
TOKENIZER = b'{"vocab": {"a": 0}}\n'
OTHER_TOKENIZER = b'{"vocab": {"b": 0}}\n'
NESTED = b"deep\n"
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


def safetensors(name: str, rows: int, seed: bytes) -> bytes:
    """A real safetensors file of one float32 tensor [rows, 16] (the artifact's config counts it)."""
    size = rows * 16 * 4
    header = json.dumps({name: {"dtype": "F32", "shape": [rows, 16], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    data = b"".join(hashlib.sha256(seed + i.to_bytes(4, "little")).digest() for i in range(size // 32 + 1))[:size]
    return len(header).to_bytes(8, "little") + header + data


SHARD_1 = safetensors("a", 1024, b"one")  # 64 KiB
SHARD_2 = safetensors("b", 768, b"two")  # 48 KiB

MANIFEST = """[model]
repo = "{model}"

[tokenizer]
repo = "{tokenizer}"

[chat-template]
file = "chat.jinja"
"""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def commit_repos(fake_hub, repo: str) -> tuple[str, str]:
    fake_hub.commit(repo, {
        "config.json": CONFIG, "tokenizer.json": TOKENIZER, "sub/dir/nested.txt": NESTED, "README.md": b"# card\n",
        "model-00001-of-00002.safetensors": SHARD_1, "model-00002-of-00002.safetensors": SHARD_2,
    })
    tokenizer = f"{repo}-tok"
    fake_hub.commit(tokenizer, {"tokenizer.json": OTHER_TOKENIZER, "tokenizer_config.json": b"{}\n"})
    return repo, tokenizer


@pytest.fixture(scope="module")
def repos(fake_hub) -> tuple[str, str]:
    return commit_repos(fake_hub, "test/bundle-model")


def write_project(project, repos: tuple[str, str]) -> None:
    (project.folder / "chat.jinja").write_text(TEMPLATE)
    project.write_manifest(MANIFEST.format(model=repos[0], tokenizer=repos[1]))


def locked_project(project, repos):
    write_project(project, repos)
    # The session's first lock reads the engine's flags: slow on a busy machine.
    project.run_vdeploy("lock", timeout=300)
    project.run_vdeploy("fetch")
    return project


@pytest.fixture(scope="module")
def source(make_project, repos):
    """A project locked and fetched from the fake Hub (the store `fetch` makes), shared by the
    module's tests: they read it and write their bundles elsewhere, never change it."""
    return locked_project(make_project("source"), repos)


@pytest.fixture
def own_source(project, fake_hub, repo_id):
    """A locked and fetched project of this test's own, to change."""
    return locked_project(project, commit_repos(fake_hub, repo_id))


@pytest.fixture
def target(make_project, repos):
    """The same manifest in another folder, with its own empty store and no lock."""
    other = make_project("target")
    write_project(other, repos)
    return other


@dataclass(frozen=True)
class Bundled:
    folder: Path  # its blobs are hard links into the source's store: never change them
    tar: Path
    digest: str


@pytest.fixture(scope="module")
def bundled(source, tmp_path_factory) -> Bundled:
    """The source bundled once as a folder and once as a tar (the same artifact)."""
    where = tmp_path_factory.mktemp("bundled")
    digest = bundle(source, "-o", where / "out")
    assert bundle(source, "--tar", "-o", where / "b.tar") == digest
    return Bundled(where / "out", where / "b.tar", digest)


def bundle(project, *args: str) -> str:
    _, out, _ = project.run_vdeploy("bundle", *args)
    digest = out.strip()
    assert digest.startswith("sha256:") and len(digest) == 71, out
    return digest


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def assert_nothing_restored(project) -> None:
    assert not project.lock.exists()
    leftovers = [p for p in project.store.rglob("*") if "snapshots" in p.parts or ".vdeploy-unbundle" in p.name]
    assert leftovers == []
    assert list(project.store.glob("models--*")) == []


def layout_json(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_bytes())


def manifest_of(folder: Path) -> tuple[str, dict]:
    digest = layout_json(folder, "index.json")["manifests"][0]["digest"]
    return digest, json.loads((folder / "blobs" / "sha256" / digest[7:]).read_bytes())


# ---- the layout --------------------------------------------------------------------------------


def test_bundle_writes_an_oci_layout_holding_one_modelpack_artifact_of_the_lock(source, bundled, repos):
    out = bundled.folder
    index = layout_json(out, "index.json")
    assert layout_json(out, "oci-layout") == {"imageLayoutVersion": "1.0.0"}
    assert [m["digest"] for m in index["manifests"]] == [bundled.digest]
    # every blob is named by the sha256 of its bytes
    for blob in (out / "blobs" / "sha256").iterdir():
        assert sha256(blob.read_bytes()) == blob.name
    _, manifest = manifest_of(out)
    assert manifest["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    layers = {layer["annotations"]["org.cncf.model.filepath"]: layer for layer in manifest["layers"]}
    tokenizer = "_vdeploy/tokenizer/models--" + repos[1].replace("/", "--")
    assert sorted(layers) == sorted([
        "README.md", "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "sub/dir/nested.txt", "tokenizer.json", f"{tokenizer}/tokenizer.json", f"{tokenizer}/tokenizer_config.json",
        "_vdeploy/chat-template.jinja", "_vdeploy/vdeploy.lock",
    ])
    # one raw layer per file, named by its sha256, typed so that modctl can extract it (".raw")
    assert layers["config.json"]["digest"] == f"sha256:{sha256(CONFIG)}"
    assert layers["model-00001-of-00002.safetensors"]["mediaType"] == "application/vnd.cncf.model.weight.v1.raw"
    assert layers["README.md"]["mediaType"] == "application/vnd.cncf.model.doc.v1.raw"
    assert all(layer["mediaType"].endswith(".raw") for layer in layers.values())
    assert all(l["annotations"]["org.opencontainers.image.title"] == path for path, l in layers.items())
    assert layers["tokenizer.json"]["annotations"]["io.vdeploy.repo"] == repos[0]
    # the lock is a layer, byte for byte, and the manifest names its digest
    lock_layer = layers["_vdeploy/vdeploy.lock"]
    assert (out / "blobs" / "sha256" / lock_layer["digest"][7:]).read_bytes() == source.lock.read_bytes()
    assert manifest["annotations"]["io.vdeploy.lock.digest"] == lock_layer["digest"]
    assert (out / "vdeploy.lock").read_bytes() == source.lock.read_bytes()
    assert layers["_vdeploy/chat-template.jinja"]["digest"] == f"sha256:{sha256(TEMPLATE.encode())}"
    # the ModelPack config: diffIds are the layers, facts read from the pinned files
    config = json.loads((out / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_bytes())
    assert config["modelfs"] == {"type": "layers", "diffIds": [layer["digest"] for layer in manifest["layers"]]}
    assert config["config"] == {"format": "safetensors", "precision": "float32", "paramSize": "28.7k"}
    # the identity is recorded beside the manifest
    assert bundled.digest in (source.folder / ".vdeploy" / "bundles" / f"{bundled.digest[7:]}.json").read_text()


def test_bundle_hard_links_the_store_blobs_instead_of_copying(source, bundled):
    from vdeploy.lockfile import loads_lock
    from vdeploy.store import Store

    lock = loads_lock(source.lock.read_text())
    store = Store(source.store)
    for locked in lock.sources:
        for file in locked.files:
            # small git files are named by git blob id in the store, by sha256 in the layout
            layout_blob = bundled.folder / "blobs" / "sha256" / file.sha256
            assert os.stat(layout_blob).st_ino == os.stat(store.blob_path(locked, file)).st_ino


def load_schemas():
    jsonschema = pytest.importorskip("jsonschema", reason="the schema checks need jsonschema (pip install -e '.[test]')")
    if not SCHEMAS.is_dir():
        pytest.skip(f"the OCI and ModelPack schemas are not here ({SCHEMAS}): they live in shared/, beside the repository")
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4

    oci = SCHEMAS / "oci-image-spec"
    resources = []
    for path in oci.glob("*.json"):
        schema = json.loads(path.read_text())
        resource = Resource.from_contents(schema, default_specification=DRAFT4)
        # They $ref each other by file name, relative to ids under /schema/ and /schema/image/.
        for uri in (schema.get("id"), f"https://opencontainers.org/schema/{path.name}",
                    f"https://opencontainers.org/schema/image/{path.name}"):
            if uri:
                resources.append((uri, resource))
    registry = Registry().with_resources(resources)

    def validator(name: str):
        return jsonschema.Draft4Validator(json.loads((oci / name).read_text()), registry=registry)

    modelpack = jsonschema.Draft202012Validator(json.loads((SCHEMAS / "modelpack-config-schema.json").read_text()))
    return validator("image-layout-schema.json"), validator("image-index-schema.json"), validator("image-manifest-schema.json"), modelpack


def test_the_layout_is_valid_by_the_image_spec_and_modelpack_schemas(bundled, tmp_path, source):
    layout_schema, index_schema, manifest_schema, config_schema = load_schemas()
    out = bundled.folder
    _, manifest = manifest_of(out)
    config = json.loads((out / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_bytes())
    layout_schema.validate(layout_json(out, "oci-layout"))
    index_schema.validate(layout_json(out, "index.json"))
    manifest_schema.validate(manifest)
    config_schema.validate(config)
    # the checks bite: ModelPack allows no extra key, the image spec no malformed descriptor
    assert not config_schema.is_valid({**config, "vdeployLock": "x"})
    assert not manifest_schema.is_valid({**manifest, "config": {"mediaType": "not a media type", "digest": "x", "size": 1}})
    # every volume of a split bundle is a valid layout too
    bundle(source, "--max-volume-size", "110K", "-o", tmp_path / "part.tar")
    from vdeploy.oci import open_volume, read_blob

    volumes = sorted(tmp_path.glob("part.*-of-*.tar"))
    assert len(volumes) > 1
    for path in volumes:
        volume = open_volume(path)
        index_schema.validate(volume.index())
        manifest_schema.validate(json.loads(read_blob(volume, bundled.digest)))


# ---- the round trip ------------------------------------------------------------------------------


def test_unbundle_into_an_empty_store_gives_the_store_fetch_makes_and_bundles_back_the_same(
    source, bundled, target, fake_hub, repos,
):
    fake_hub.clear_requests()
    _, _, err = target.run_vdeploy("unbundle", bundled.tar, target.folder)
    assert fake_hub.requests == []  # offline: nothing asked of the Hub
    assert f"restored {bundled.digest}" in err
    assert target.lock.read_bytes() == source.lock.read_bytes()
    assert tree(target.store) == tree(source.store)
    target.run_vdeploy("verify", "--full")
    # huggingface_hub itself, offline, finds the locked snapshot by the revision's name
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repos[0], revision="main", cache_dir=target.store, local_files_only=True))
    assert (folder / "sub" / "dir" / "nested.txt").read_bytes() == NESTED
    assert (folder / "model-00001-of-00002.safetensors").read_bytes() == SHARD_1
    # bundling the restored store gives the same artifact and the same tar, byte for byte
    assert bundle(target, "--tar", "-o", target.folder / "again.tar") == bundled.digest
    assert (target.folder / "again.tar").read_bytes() == bundled.tar.read_bytes()
    # a second unbundle finds everything in place
    _, _, again = target.run_vdeploy("unbundle", bundled.tar)
    assert "0 restored" in again and "already present" in again


def test_bundling_twice_gives_the_same_bytes_whatever_the_umask_and_file_times(own_source, tmp_path):
    first = bundle(own_source, "--tar", "-o", tmp_path / "a.tar")
    for blob in own_source.store.glob("models--*/blobs/*"):
        os.utime(blob, (1_000_000, 1_000_000))
    done = subprocess.run(
        [sys.executable, "-m", "vdeploy", "bundle", "--tar", "-o", str(tmp_path / "b.tar")], cwd=own_source.folder,
        env=own_source.env(), capture_output=True, text=True, preexec_fn=lambda: os.umask(0o077),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == first
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:2]] == ["oci-layout", "index.json"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    assert {m.mode for m in members} == {0o644, 0o755}


def test_unbundle_from_a_folder_on_the_same_file_system_links_instead_of_copying(source, bundled, target):
    _, _, err = target.run_vdeploy("unbundle", bundled.folder, target.folder)
    assert "hard-linked" in err
    restored = next(target.store.glob("models--*/blobs/" + sha256(SHARD_1)))
    assert os.stat(restored).st_ino == os.stat(bundled.folder / "blobs" / "sha256" / sha256(SHARD_1)).st_ino
    assert tree(target.store) == tree(source.store)


def test_a_store_of_a_local_folder_source_is_bundled_and_restored(project, make_project):
    ckpt = project.folder / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "config.json").write_bytes(CONFIG)
    (ckpt / "model.safetensors").write_bytes(SHARD_1)
    (ckpt / "sub" / "notes.txt").write_bytes(NESTED)
    manifest = '[model]\npath = "ckpt"\n\n[store]\ndownload-dir = "store"\n'
    project.write_manifest(manifest)
    project.run_vdeploy("lock")
    digest = bundle(project, "--tar", "-o", project.folder / "local.tar")
    other = make_project("local-target")
    other.write_manifest(manifest)  # no ckpt/ folder here: the bundle alone restores it
    other.run_vdeploy("unbundle", project.folder / "local.tar")
    assert tree(other.folder / "store") == tree(project.folder / "store")
    assert list((other.folder / "store").glob("models--vdeploy-local--ckpt/snapshots/*/sub/notes.txt"))
    other.run_vdeploy("verify", "--full")
    assert bundle(other, "--tar", "-o", other.folder / "again.tar") == digest


# ---- volumes -------------------------------------------------------------------------------------


def test_volumes_are_each_a_layout_and_restore_in_any_order(source, bundled, target, tmp_path):
    from vdeploy.oci import open_volume, read_blob

    assert bundle(source, "--max-volume-size", "110K", "-o", tmp_path / "part.tar") == bundled.digest
    volumes = sorted(tmp_path.glob("part.*-of-*.tar"))
    assert len(volumes) >= 2 and all(v.stat().st_size <= 110_000 for v in volumes)
    seen: set[str] = set()
    for path in volumes:
        volume = open_volume(path)
        assert volume.index()["manifests"][0]["digest"] == bundled.digest
        assert bundled.digest in volume.blobs  # each volume carries the manifest, config and lock
        seen |= volume.blobs.keys()
    manifest = json.loads(read_blob(open_volume(volumes[0]), bundled.digest))
    assert {layer["digest"] for layer in manifest["layers"]} <= seen

    _, _, err = target.run_vdeploy("unbundle", *volumes[1:], target.folder, expect=1)
    assert "pass volume(s) 1 of" in error_line(err) and "nothing was restored" in err
    assert_nothing_restored(target)

    target.run_vdeploy("unbundle", *reversed(volumes), target.folder)
    assert tree(target.store) == tree(source.store)


def test_a_volume_size_smaller_than_a_file_is_refused_naming_it(source, tmp_path):
    _, _, err = source.run_vdeploy("bundle", "--max-volume-size", "50K", "-o", tmp_path / "x.tar", expect=1)
    assert "cannot hold model: model-00001-of-00002.safetensors" in error_line(err) and "raise it to at least" in err
    assert list(tmp_path.glob("*.tar")) == []


# ---- refusals ------------------------------------------------------------------------------------


def damaged_copy(bundled: Bundled, where: Path) -> Path:
    """The folder bundle copied byte for byte (no links back into the store), to damage."""
    copy = where / "copy"
    shutil.copytree(bundled.folder, copy)
    return copy


def test_a_flipped_byte_is_refused_and_nothing_is_restored(bundled, target, tmp_path):
    # in a tar
    data = bytearray(bundled.tar.read_bytes())
    data[data.find(SHARD_2[-64:])] ^= 0x01
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    _, _, err = target.run_vdeploy("unbundle", tmp_path / "bad.tar", target.folder, expect=1)
    assert "model-00002-of-00002.safetensors hashes to" in error_line(err) and "nothing was restored" in err
    assert_nothing_restored(target)
    # in a folder
    copy = damaged_copy(bundled, tmp_path)
    (copy / "blobs" / "sha256" / sha256(CONFIG)).write_bytes(CONFIG.replace(b"float32", b"float16"))
    _, _, err = target.run_vdeploy("unbundle", copy, target.folder, expect=1)
    assert "config.json hashes to" in error_line(err)
    assert_nothing_restored(target)


def rewrite_tar(original: Path, out: Path, extra: tarfile.TarInfo) -> None:
    with tarfile.open(original) as old, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as new:
        for member in old.getmembers():
            new.addfile(member, old.extractfile(member) if member.isfile() else None)
        new.addfile(extra)


@pytest.mark.parametrize("kind, name, expected", [
    (tarfile.SYMTYPE, "blobs/sha256/" + "0" * 64, "is a symbolic link"),
    (tarfile.LNKTYPE, "README.txt", "is a hard link"),
    (tarfile.CHRTYPE, "dev", "is a device"),
    (tarfile.BLKTYPE, "disk", "is a device"),
    (tarfile.FIFOTYPE, "pipe", "is a fifo"),
    (tarfile.REGTYPE, "../escape", "would land outside the layout"),
    (tarfile.REGTYPE, "/etc/escape", "would land outside the layout"),
    (tarfile.REGTYPE, "blobs/../../escape", "would land outside the layout"),
])
def test_a_tar_member_that_is_not_a_plain_file_inside_the_layout_is_refused(bundled, target, tmp_path, kind, name, expected):
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    rewrite_tar(bundled.tar, tmp_path / "evil.tar", member)
    _, _, err = target.run_vdeploy("unbundle", tmp_path / "evil.tar", target.folder, expect=1)
    assert expected in error_line(err)
    assert_nothing_restored(target)


def test_a_link_in_a_folder_bundle_is_refused(bundled, target, tmp_path):
    copy = damaged_copy(bundled, tmp_path)
    blob = copy / "blobs" / "sha256" / sha256(CONFIG)
    blob.unlink()
    blob.symlink_to("/etc/hostname")
    _, _, err = target.run_vdeploy("unbundle", copy, target.folder, expect=1)
    assert "is a symbolic link" in error_line(err)
    assert_nothing_restored(target)


def replace_lock(copy: Path, edit) -> None:
    """Swap the bundle's lock for an edited one, keeping every digest consistent, so that only
    the disagreement between the lock and the manifest's layers is left to catch."""
    blobs = copy / "blobs" / "sha256"
    index = layout_json(copy, "index.json")
    _, manifest = manifest_of(copy)
    lock_layer = next(l for l in manifest["layers"] if l["annotations"]["io.vdeploy.role"] == "lock")
    new_lock = edit((blobs / lock_layer["digest"][7:]).read_bytes())
    (blobs / sha256(new_lock)).write_bytes(new_lock)
    lock_layer.update(digest=f"sha256:{sha256(new_lock)}", size=len(new_lock))
    manifest["annotations"]["io.vdeploy.lock.digest"] = lock_layer["digest"]
    data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    (blobs / sha256(data)).write_bytes(data)
    index["manifests"][0].update(digest=f"sha256:{sha256(data)}", size=len(data))
    (copy / "index.json").write_text(json.dumps(index))
    (copy / "vdeploy.lock").unlink()


def test_a_lock_that_disagrees_with_the_manifest_layers_is_refused(bundled, target, tmp_path):
    copy = damaged_copy(bundled, tmp_path)
    # the lock now pins other bytes for config.json than the layer the manifest lists, and
    # agrees with itself (its deployment id recomputed), so only the layers can catch it
    def other_config(data):
        for file in data["model"]["files"]:
            if file["path"] == "config.json":
                file["sha256"] = file["blob"] = sha256(b"other")

    replace_lock(copy, lambda lock: edited_lock(lock.decode(), other_config).encode())
    _, _, err = target.run_vdeploy("unbundle", copy, target.folder, expect=1)
    assert "disagree with the lock it carries (at config.json)" in error_line(err)
    assert_nothing_restored(target)


def test_a_root_lock_copy_that_differs_from_the_lock_layer_is_refused(source, bundled, target, tmp_path):
    copy = damaged_copy(bundled, tmp_path)
    (copy / "vdeploy.lock").write_bytes(source.lock.read_bytes() + b"\n")
    _, _, err = target.run_vdeploy("unbundle", copy, target.folder, expect=1)
    assert "differs from the lock the manifest names" in error_line(err)
    assert_nothing_restored(target)


def test_unbundle_refuses_a_bundle_whose_lock_differs_from_the_one_present(source, bundled, target):
    target.lock.write_bytes(source.lock.read_bytes().replace(b"seed = 0", b"seed = 1"))
    _, _, err = target.run_vdeploy("unbundle", bundled.tar, target.folder, expect=1)
    assert "vdeploy.lock: differs from the lock in the bundle" in error_line(err)
    assert list(target.store.glob("models--*")) == []


def test_unbundle_refuses_a_bundle_made_from_another_manifest(bundled, target):
    target.manifest.write_text(target.manifest.read_text().replace("[runtime]", "[runtime]\nseed = 7"))
    _, _, err = target.run_vdeploy("unbundle", bundled.tar, target.folder, expect=1)
    assert "the bundle's lock was made from another manifest" in error_line(err) and "runtime.seed" in err
    assert_nothing_restored(target)


def test_volumes_of_different_bundles_are_refused(own_source, target, tmp_path):
    bundle(own_source, "--tar", "-o", tmp_path / "a.tar")
    own_source.manifest.write_text(own_source.manifest.read_text().replace("[runtime]", "[runtime]\nseed = 7"))
    own_source.run_vdeploy("lock")
    bundle(own_source, "--tar", "-o", tmp_path / "b.tar")
    _, _, err = target.run_vdeploy("unbundle", tmp_path / "a.tar", tmp_path / "b.tar", target.folder, expect=1)
    assert "are volumes of different bundles" in error_line(err)


def test_a_model_file_colliding_with_the_bundles_own_folder_is_refused(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, {"config.json": CONFIG, "_VDeploy/vdeploy.lock": b"not the lock\n"})
    project.write_manifest(f'[model]\nrepo = "{repo_id}"\n')
    project.run_vdeploy("lock")
    project.run_vdeploy("fetch")
    _, _, err = project.run_vdeploy("bundle", "-o", project.folder / "out", expect=1)
    assert "model file _VDeploy/vdeploy.lock collides with the bundle's own _vdeploy/ folder" in error_line(err)
    assert not (project.folder / "out").exists()


def test_bundle_refuses_a_store_that_lacks_or_damages_a_locked_file(own_source, tmp_path):
    where = tmp_path / "bundles"  # the project and its home are in tmp_path too
    where.mkdir()
    shard = next(own_source.store.glob("models--*/blobs/" + sha256(SHARD_2)))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    _, _, err = own_source.run_vdeploy("bundle", "--tar", "-o", where / "b.tar", expect=1)
    assert "model: model-00002-of-00002.safetensors" in error_line(err) and "vdeploy fetch" in err
    assert not (where / "b.tar").exists()
    _, _, err = own_source.run_vdeploy("bundle", "-o", where / "out", expect=1)
    assert "hashes to" in error_line(err)
    assert list(where.iterdir()) == []
    shard.unlink()
    _, _, err = own_source.run_vdeploy("bundle", "-o", where / "out", expect=1)
    assert "lacks 1 locked file(s) (model: model-00002-of-00002.safetensors); run `vdeploy fetch` first" in error_line(err)


def test_neither_a_foreign_folder_nor_a_non_bundle_is_taken(source, tmp_path):
    (tmp_path / "notes").mkdir()
    _, _, err = source.run_vdeploy("bundle", "-o", tmp_path / "notes", expect=1)
    assert "exists and is not a bundle" in error_line(err)
    _, _, err = source.run_vdeploy("unbundle", source.manifest, expect=1)
    assert "not a readable plain tar" in error_line(err)


# ---- real OCI tools ----------------------------------------------------------------------------


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install {name}); .ci/run installs it")
    return found


def raw_digest(reference: str) -> str:
    done = subprocess.run([tool("skopeo"), "inspect", "--raw", reference], capture_output=True, check=True)
    return f"sha256:{sha256(done.stdout)}"


def ref_name(folder: Path) -> str:
    return layout_json(folder, "index.json")["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]


def test_skopeo_copies_the_layout_and_its_tar_keeping_the_digest(source, bundled, target, tmp_path):
    skopeo = tool("skopeo")
    ref = ref_name(bundled.folder)
    assert raw_digest(f"oci:{bundled.folder}:{ref}") == bundled.digest
    assert raw_digest(f"oci-archive:{bundled.tar}:{ref}") == bundled.digest
    copied, archive = tmp_path / "copied", tmp_path / "copied.tar"
    subprocess.run([skopeo, "copy", "--quiet", f"oci:{bundled.folder}:{ref}", f"oci:{copied}:x"], check=True)
    subprocess.run([skopeo, "copy", "--quiet", f"oci:{bundled.folder}:{ref}", f"oci-archive:{archive}:x"], check=True)
    assert raw_digest(f"oci:{copied}:x") == bundled.digest
    assert raw_digest(f"oci-archive:{archive}:x") == bundled.digest
    # what skopeo wrote restores a store too
    _, _, err = target.run_vdeploy("unbundle", archive, target.folder)
    assert f"restored {bundled.digest}" in err
    assert tree(target.store) == tree(source.store)


def test_umoci_lists_the_layouts_tag(bundled):
    umoci = tool("umoci")
    listed = subprocess.run([umoci, "ls", "--layout", str(bundled.folder)], capture_output=True, text=True, check=True).stdout
    assert listed.split() == [ref_name(bundled.folder)]


def test_json_results_name_the_digest_the_outputs_and_what_was_restored(source, bundled, target, tmp_path):
    _, out, _ = source.run_vdeploy("bundle", "--tar", "-o", tmp_path / "j.tar", "--json")
    made = json.loads(out)
    assert made["digest"] == bundled.digest and made["outputs"] == [str(tmp_path / "j.tar")]
    assert made["files"] == 10 and made["file_bytes"] > len(SHARD_1) + len(SHARD_2)
    _, out, _ = target.run_vdeploy("unbundle", tmp_path / "j.tar", target.folder, "--json")
    restored = json.loads(out)
    assert restored["digest"] == bundled.digest and restored["lock_written"] and restored["restored"] == 8


def test_volume_sizes_count_in_powers_of_1000_unless_binary():
    from vdeploy.bundle import parse_size
    from vdeploy.errors import BundleError

    assert parse_size("123") == 123
    assert parse_size("50G") == parse_size("50GB") == 50 * 10**9
    assert parse_size("1.5M") == 1_500_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("80k") == 80_000
    with pytest.raises(BundleError, match="not a size"):
        parse_size("lots")
