"""Push and pull through a real OCI registry: Debian's docker-registry, started by the tests on 127.0.0.1.

The registry half of issue 15 (vdeploy.registry): layouts pushed and pulled keep their manifest
digest and bytes; blobs the registry has are not sent again (counted in the registry's own log);
corruption in the registry's storage is refused with nothing left behind; Basic and Bearer
authentication with credentials read the way OCI tools read them, never shown; plain HTTP only to
loopback; skopeo agrees on every digest.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from registry_server import (
    BlobRedirector,
    RegistryServer,
    TokenServer,
    htpasswd_auth,
    layout_blobs,
    layout_manifest,
    registry_binary,
    self_signed,
    tree,
    write_layout,
)
from vdeploy.errors import RegistryError, VdeployError
from vdeploy.registry import (
    AUTH_VARIABLE,
    Reference,
    base_url,
    find_credentials,
    parse_reference,
    pull_to_layout,
    push_layout,
    url_problem,
)

NEEDS_REGISTRY = "docker-registry is not installed (apt-get install docker-registry; .ci/run installs it)"


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message.strip() == message and message
    assert isinstance(exc.value, VdeployError)
    return message


def start(folder: Path, **options) -> RegistryServer:
    if registry_binary() is None:
        pytest.skip(NEEDS_REGISTRY)
    return RegistryServer(folder, **options).__enter__()


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """One open registry for the session; each test keeps to its own repository (see `repo`)."""
    server = start(tmp_path_factory.mktemp("registry"))
    yield server
    server.stop()


@pytest.fixture
def repo(request) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:80]
    return f"test/{name}"


@pytest.fixture
def files() -> dict[str, bytes]:
    """A model's files, with new random weights per test: the registry stores a blob once for all
    repositories, so a test that corrupts a stored blob must not share it with another test."""
    return {"model.safetensors": os.urandom(300_000), "config.json": b'{"architectures": ["X"]}', "tokenizer.json": b"{}" * 50}


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """A caller environment with no credentials anywhere (HOME is empty), for in-process calls."""
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def docker_config(folder: Path, entries: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(entries))
    return folder


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


# ------------------------------------------------------------------------------------------------
# Push and pull


def test_push_then_pull_into_an_empty_folder_gives_the_same_bytes_and_digest(registry, repo, tmp_path, env, files):
    digest = write_layout(tmp_path / "layout", files)
    said: list[str] = []

    pushed = push_layout(tmp_path / "layout", f"{registry.host}/{repo}:v1", environ=env, say=said.append)
    assert pushed.reference == f"{registry.host}/{repo}@{digest}"
    assert (pushed.digest, pushed.tag, pushed.uploaded, pushed.already_there) == (digest, "v1", 4, 0)
    assert ("PUT", f"/v2/{repo}/manifests/v1", 201) in registry.requests()

    pulled = pull_to_layout(f"{registry.host}/{repo}:v1", tmp_path / "pulled", environ=env, say=said.append)
    assert pulled.digest == digest and pulled.reference == pushed.reference
    assert f"{registry.host}/{repo}:v1 is {digest}" in said
    assert layout_blobs(tmp_path / "pulled") == layout_blobs(tmp_path / "layout")
    index = json.loads((tmp_path / "pulled" / "index.json").read_text())
    [entry] = index["manifests"]
    assert entry["digest"] == digest
    assert entry["annotations"] == {"org.opencontainers.image.ref.name": "v1"}
    assert json.loads((tmp_path / "pulled" / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    # Nothing else: no staging folder or temporary file left beside the layout.
    assert {p.split("/")[0] for p in tree(tmp_path / "pulled")} == {"blobs", "index.json", "oci-layout"}

    # Pulling again into the same layout keeps the blobs it holds.
    again = pull_to_layout(f"{registry.host}/{repo}@{digest}", tmp_path / "pulled", environ=env)
    assert (again.fetched, again.already_there) == (0, 4)


def test_pushing_twice_uploads_no_blob_twice(registry, repo, tmp_path, env, files):
    write_layout(tmp_path / "a", files)
    push_layout(tmp_path / "a", f"{registry.host}/{repo}:a", environ=env)
    before = len(registry.requests())

    pushed = push_layout(tmp_path / "a", f"{registry.host}/{repo}:a", environ=env)

    assert registry.blob_uploads(repo, since=before) == []
    assert (pushed.uploaded, pushed.already_there) == (0, 4)

    # Another artifact sharing all but one file sends only that file and its own config.
    changed = {**files, "model.safetensors": os.urandom(1000)}
    write_layout(tmp_path / "b", changed)
    before = len(registry.requests())
    pushed = push_layout(tmp_path / "b", f"{registry.host}/{repo}:b", environ=env)
    puts = [r for r in registry.blob_uploads(repo, since=before) if r[0] == "PUT"]
    assert len(puts) == 2 and pushed.uploaded == 2 and pushed.already_there == 2


def test_chunked_upload_sends_parts_and_keeps_the_digest(registry, repo, tmp_path, env, files):
    digest = write_layout(tmp_path / "layout", files)
    before = len(registry.requests())

    push_layout(tmp_path / "layout", f"{registry.host}/{repo}:v1", chunk_size=64 * 1024, environ=env)

    patches = [r for r in registry.blob_uploads(repo, since=before) if r[0] == "PATCH"]
    assert len(patches) == 5  # 300,000 bytes in parts of 65,536
    pulled = pull_to_layout(f"{registry.host}/{repo}:v1", tmp_path / "pulled", environ=env)
    assert pulled.digest == digest
    assert layout_blobs(tmp_path / "pulled") == layout_blobs(tmp_path / "layout")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_blob_corrupted_in_the_registry_is_refused_with_nothing_visible(registry, repo, tmp_path, env, damage, files):
    write_layout(tmp_path / "layout", files)
    pushed = push_layout(tmp_path / "layout", f"{registry.host}/{repo}:v1", environ=env)
    manifest = layout_manifest(tmp_path / "layout")
    weights = next(layer["digest"] for layer in manifest["layers"] if layer["annotations"]["org.cncf.model.filepath"] == "model.safetensors")
    stored = registry.blob_file(weights)
    data = bytearray(stored.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1
    else:
        del data[-10:]
    stored.write_bytes(bytes(data))

    # Into a new folder: it is not created.
    with pytest.raises(RegistryError) as refused:
        pull_to_layout(f"{registry.host}/{repo}:v1", tmp_path / "new", environ=env)
    message = one_line(refused)
    assert weights in message and f"{registry.host}/{repo}" in message
    assert not (tmp_path / "new").exists()

    # Into an empty folder: it stays empty.
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError):
        pull_to_layout(f"{registry.host}/{repo}@{pushed.digest}", tmp_path / "empty", environ=env)
    assert tree(tmp_path / "empty") == []

    # Into a layout that already holds another artifact: it stays as it was, byte for byte.
    other = f"{repo}-other"
    write_layout(tmp_path / "other", {"x.bin": b"other artifact"})
    push_layout(tmp_path / "other", f"{registry.host}/{other}:v1", environ=env)
    pull_to_layout(f"{registry.host}/{other}:v1", tmp_path / "existing", environ=env)
    before = {p: (tmp_path / "existing" / p).read_bytes() for p in tree(tmp_path / "existing") if (tmp_path / "existing" / p).is_file()}
    with pytest.raises(RegistryError):
        pull_to_layout(f"{registry.host}/{repo}:v1", tmp_path / "existing", environ=env)
    after = {p: (tmp_path / "existing" / p).read_bytes() for p in tree(tmp_path / "existing") if (tmp_path / "existing" / p).is_file()}
    assert after == before and tree(tmp_path / "existing") == sorted(
        [*before, "blobs", "blobs/sha256"]
    )


def test_a_manifest_corrupted_in_the_registry_is_refused(registry, repo, tmp_path, env, files):
    write_layout(tmp_path / "layout", files)
    pushed = push_layout(tmp_path / "layout", f"{registry.host}/{repo}:v1", environ=env)
    stored = registry.blob_file(pushed.digest)
    # Still a manifest the registry parses and serves, but not the bytes that were pushed.
    stored.write_bytes(stored.read_bytes().replace(b"model.safetensors", b"model.safetensorZ"))

    with pytest.raises(RegistryError) as refused:
        pull_to_layout(f"{registry.host}/{repo}:v1", tmp_path / "new", environ=env)
    assert "does not match that digest" in one_line(refused)
    assert not (tmp_path / "new").exists()


def test_a_moved_tag_does_not_change_a_pull_by_digest(registry, repo, tmp_path, env, files):
    first = write_layout(tmp_path / "first", files)
    second = write_layout(tmp_path / "second", {**files, "config.json": b'{"architectures": ["Y"]}'})
    push_layout(tmp_path / "first", f"{registry.host}/{repo}:stable", environ=env)
    push_layout(tmp_path / "second", f"{registry.host}/{repo}:stable", environ=env)

    by_digest = pull_to_layout(f"{registry.host}/{repo}@{first}", tmp_path / "by-digest", environ=env)
    by_tag = pull_to_layout(f"{registry.host}/{repo}:stable", tmp_path / "by-tag", environ=env)

    assert by_digest.digest == first and by_tag.digest == second != first
    assert layout_blobs(tmp_path / "by-digest") == layout_blobs(tmp_path / "first")
    assert layout_blobs(tmp_path / "by-tag") == layout_blobs(tmp_path / "second")
    # A digest with a tag beside it is fetched by the digest, and named by the tag.
    both = pull_to_layout(f"{registry.host}/{repo}:stable@{first}", tmp_path / "both", environ=env)
    assert both.digest == first
    [entry] = json.loads((tmp_path / "both" / "index.json").read_text())["manifests"]
    assert entry["digest"] == first and entry["annotations"]["org.opencontainers.image.ref.name"] == "stable"


def test_a_split_volume_pushes_when_the_registry_holds_the_rest(registry, repo, tmp_path, env, files):
    digest = write_layout(tmp_path / "whole", files)
    push_layout(tmp_path / "whole", f"{registry.host}/{repo}:whole", environ=env)
    write_layout(tmp_path / "volume", files, omit={"model.safetensors"})
    before = len(registry.requests())

    pushed = push_layout(tmp_path / "volume", f"{registry.host}/{repo}:volume", environ=env)

    assert pushed.digest == digest and pushed.uploaded == 0
    assert registry.blob_uploads(repo, since=before) == []


def test_a_split_volume_whose_blobs_are_nowhere_is_refused_before_sending_anything(registry, repo, tmp_path, env, files):
    write_layout(tmp_path / "volume", files, omit={"model.safetensors", "config.json"})
    manifest = layout_manifest(tmp_path / "volume")
    absent = sorted(layer["digest"] for layer in manifest["layers"] if layer["annotations"]["org.cncf.model.filepath"] != "tokenizer.json")
    before = len(registry.requests())

    with pytest.raises(RegistryError) as refused:
        push_layout(tmp_path / "volume", f"{registry.host}/{repo}:v1", environ=env)

    message = one_line(refused)
    assert all(digest in message for digest in absent) and "2 blob(s)" in message
    assert registry.blob_uploads(repo, since=before) == []
    assert not any(r[0] == "PUT" for r in registry.requests()[before:])


def test_a_damaged_layout_is_refused_at_push_and_nothing_is_tagged(registry, repo, tmp_path, env, files):
    write_layout(tmp_path / "layout", files)
    blob = next(p for p in (tmp_path / "layout" / "blobs" / "sha256").iterdir() if p.stat().st_size == 300_000)
    data = bytearray(blob.read_bytes())
    data[0] ^= 1
    blob.write_bytes(bytes(data))

    with pytest.raises(RegistryError) as refused:
        push_layout(tmp_path / "layout", f"{registry.host}/{repo}:v1", environ=env)
    assert str(blob) in one_line(refused) and "does not hash to its name" in str(refused.value)
    with pytest.raises(RegistryError) as missing:
        pull_to_layout(f"{registry.host}/{repo}:v1", tmp_path / "pulled", environ=env)
    assert "has no tag 'v1'" in one_line(missing)


def test_push_refuses_a_digest_that_is_not_the_layouts(registry, repo, tmp_path, env, files):
    write_layout(tmp_path / "layout", files)
    with pytest.raises(RegistryError) as refused:
        push_layout(tmp_path / "layout", f"{registry.host}/{repo}:v1@sha256:{'0' * 64}", environ=env)
    assert "not the digest named" in one_line(refused)


def test_push_without_a_tag_pushes_by_digest(registry, repo, tmp_path, env, files):
    digest = write_layout(tmp_path / "layout", files, tag=None)
    pushed = push_layout(tmp_path / "layout", f"{registry.host}/{repo}", environ=env)
    assert pushed.tag is None and pushed.reference.endswith(f"/{repo}@{digest}")
    assert ("PUT", f"/v2/{repo}/manifests/{digest}", 201) in registry.requests()
    pulled = pull_to_layout(pushed.reference, tmp_path / "pulled", environ=env)
    [entry] = json.loads((tmp_path / "pulled" / "index.json").read_text())["manifests"]
    assert pulled.digest == digest and "annotations" not in entry


def test_a_layout_with_several_manifests_needs_a_name(registry, repo, tmp_path, env, files):
    write_layout(tmp_path / "a", files, tag="one")
    write_layout(tmp_path / "b", {"other": b"bytes"}, tag="two")
    shutil.copytree(tmp_path / "b" / "blobs", tmp_path / "a" / "blobs", dirs_exist_ok=True)
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    index["manifests"] += json.loads((tmp_path / "b" / "index.json").read_text())["manifests"]
    (tmp_path / "a" / "index.json").write_text(json.dumps(index))

    with pytest.raises(RegistryError) as refused:
        push_layout(tmp_path / "a", f"{registry.host}/{repo}:v1", environ=env)
    assert "names 2 manifests (one, two)" in one_line(refused)
    pushed = push_layout(tmp_path / "a", f"{registry.host}/{repo}:v1", ref_name="two", environ=env)
    assert pushed.uploaded == 2


def test_pull_refuses_what_it_cannot_fetch_in_one_line(registry, repo, tmp_path, env, files):
    write_layout(tmp_path / "layout", files)
    push_layout(tmp_path / "layout", f"{registry.host}/{repo}:v1", environ=env)
    cases = {
        f"{registry.host}/{repo}:nope": "has no tag 'nope'",
        f"{registry.host}/{repo}@sha256:{'a' * 64}": "has no manifest",
        f"{registry.host}/{repo}": "name a tag or a digest",
    }
    for reference, expected in cases.items():
        with pytest.raises(RegistryError) as refused:
            pull_to_layout(reference, tmp_path / "out", environ=env)
        assert expected in one_line(refused)
        assert not (tmp_path / "out").exists()

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(RegistryError) as refused:
        pull_to_layout(f"{registry.host}/{repo}:v1", tmp_path / "busy", environ=env)
    assert "neither empty nor an OCI image layout" in one_line(refused)
    assert tree(tmp_path / "busy") == ["notes.txt"]


def test_an_unreachable_registry_is_one_line(tmp_path, env, files):
    from registry_server import free_port

    with pytest.raises(RegistryError) as refused:
        pull_to_layout(f"127.0.0.1:{free_port()}/x/y:v1", tmp_path / "out", environ=env)
    assert "connection refused" in one_line(refused)
    write_layout(tmp_path / "layout", files)
    with pytest.raises(RegistryError) as refused:
        push_layout(tmp_path / "layout", f"127.0.0.1:{free_port()}/x/y:v1", environ=env)
    assert "is the registry running there?" in one_line(refused)


def test_a_folder_that_is_not_a_layout_is_refused_at_push(tmp_path, env):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError) as refused:
        push_layout(tmp_path / "empty", "127.0.0.1:1/x/y:v1", environ=env)
    assert "is not an OCI image layout" in one_line(refused) and "vdeploy bundle" in str(refused.value)


# ------------------------------------------------------------------------------------------------
# skopeo, the containers tools' own client, agrees on every digest


@pytest.fixture
def skopeo(tmp_path):
    binary = shutil.which("skopeo")
    if binary is None:
        pytest.skip("skopeo is not installed (apt-get install skopeo)")
    home = tmp_path / "skopeo-home"
    home.mkdir()

    def run(*args: str) -> None:
        done = subprocess.run([binary, *args], capture_output=True, text=True, env={**os.environ, "HOME": str(home)})
        assert done.returncode == 0, done.stderr

    return run


def test_skopeo_copies_our_push_back_with_the_same_digest(registry, repo, tmp_path, env, skopeo, files):
    digest = write_layout(tmp_path / "layout", files)
    push_layout(tmp_path / "layout", f"{registry.host}/{repo}:v1", environ=env)

    skopeo("copy", "--src-tls-verify=false", "--preserve-digests", f"docker://{registry.host}/{repo}@{digest}", f"oci:{tmp_path / 'copy'}:v1")

    [entry] = json.loads((tmp_path / "copy" / "index.json").read_text())["manifests"]
    assert entry["digest"] == digest
    assert layout_blobs(tmp_path / "copy") == layout_blobs(tmp_path / "layout")


def test_our_pull_of_what_skopeo_pushed_has_skopeos_digest(registry, repo, tmp_path, env, skopeo, files):
    digest = write_layout(tmp_path / "layout", files)
    skopeo("copy", "--dest-tls-verify=false", "--preserve-digests", f"oci:{tmp_path / 'layout'}:v1", f"docker://{registry.host}/{repo}:v1")

    pulled = pull_to_layout(f"{registry.host}/{repo}:v1", tmp_path / "pulled", environ=env)

    assert pulled.digest == digest
    assert layout_blobs(tmp_path / "pulled") == layout_blobs(tmp_path / "layout")
    # And the layout we wrote is one skopeo reads.
    skopeo("copy", "--preserve-digests", f"oci:{tmp_path / 'pulled'}:v1", f"oci:{tmp_path / 'again'}:v1")
    assert json.loads((tmp_path / "again" / "index.json").read_text())["manifests"][0]["digest"] == digest


# ------------------------------------------------------------------------------------------------
# Credentials and authentication


USER = "alice"
PASSWORD = "pw-" + os.urandom(12).hex()


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory):
    """A registry that wants Basic authentication (htpasswd, bcrypt) from alice."""
    folder = tmp_path_factory.mktemp("basic-registry")
    if registry_binary() is None:
        pytest.skip(NEEDS_REGISTRY)
    server = start(folder, auth=htpasswd_auth(folder, {USER: PASSWORD}))
    yield server
    server.stop()


def assert_no_secret(*texts: str, folder: Path | None = None) -> None:
    for text in texts:
        assert PASSWORD not in text and basic(USER, PASSWORD) not in text
    for path in (folder.rglob("*") if folder else []):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes()


def test_basic_auth_with_a_docker_config_file(basic_registry, repo, tmp_path, env, files):
    digest = write_layout(tmp_path / "layout", files)
    reference = f"{basic_registry.host}/{repo}:v1"

    with pytest.raises(RegistryError) as refused:
        push_layout(tmp_path / "layout", reference, environ=env)
    assert f"run `docker login {basic_registry.host}` or set {AUTH_VARIABLE}=user:password" in one_line(refused)

    config = docker_config(tmp_path / "docker", {"auths": {basic_registry.host: {"auth": basic(USER, PASSWORD)}}})
    said: list[str] = []
    logged_in = {**env, "DOCKER_CONFIG": str(config)}
    pushed = push_layout(tmp_path / "layout", reference, environ=logged_in, say=said.append)
    pulled = pull_to_layout(reference, tmp_path / "pulled", environ=logged_in, say=said.append)
    assert pushed.digest == pulled.digest == digest
    assert_no_secret(*said, repr(pushed), repr(pulled), json.dumps(pushed.to_json()), folder=tmp_path / "pulled")

    wrong = docker_config(tmp_path / "wrong", {"auths": {f"https://{basic_registry.host}/v1/": {"auth": basic(USER, PASSWORD + "x")}}})
    with pytest.raises(RegistryError) as refused:
        pull_to_layout(reference, tmp_path / "other", environ={**env, "DOCKER_CONFIG": str(wrong)})
    message = one_line(refused)
    assert f"refused the credentials from {wrong / 'config.json'}" in message
    assert_no_secret(message)
    assert "x" + PASSWORD not in message and basic(USER, PASSWORD + "x") not in message


def test_basic_auth_from_the_environment_variable_and_a_credential_helper(basic_registry, repo, tmp_path, env, files):
    digest = write_layout(tmp_path / "layout", files)
    reference = f"{basic_registry.host}/{repo}:v1"

    pushed = push_layout(tmp_path / "layout", reference, environ={**env, AUTH_VARIABLE: f"{USER}:{PASSWORD}"})
    assert pushed.digest == digest

    # A docker credential helper: `docker-credential-NAME get`, the server on stdin, JSON out.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-vdeploytest"
    helper.write_text(
        "#!/bin/sh\nread server\n"
        f"if [ \"$server\" = \"{basic_registry.host}\" ]; then\n"
        f"  printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' \"$server\"\n"
        "else echo 'credentials not found in native keychain'; exit 1; fi\n"
    )
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    config = docker_config(tmp_path / "docker", {"credHelpers": {basic_registry.host: "vdeploytest"}})
    with_helper = {**env, "DOCKER_CONFIG": str(config), "PATH": f"{bin_dir}:{env['PATH']}"}
    assert find_credentials(basic_registry.host, with_helper).source == "docker-credential-vdeploytest"
    assert find_credentials("other.example", {**with_helper}) is None
    pulled = pull_to_layout(reference, tmp_path / "pulled", environ=with_helper)
    assert pulled.digest == digest

    # The auth file podman and skopeo write ($REGISTRY_AUTH_FILE), same format.
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"auths": {basic_registry.host: {"auth": basic(USER, PASSWORD)}}}))
    pulled = pull_to_layout(reference, tmp_path / "pulled-2", environ={**env, "REGISTRY_AUTH_FILE": str(auth_file)})
    assert pulled.digest == digest


def test_credentials_are_found_under_the_names_docker_login_files_them(tmp_path, env):
    hub = docker_config(tmp_path / "hub", {"auths": {"https://index.docker.io/v1/": {"auth": basic("bob", "hub-pw")}}})
    assert find_credentials("docker.io", {**env, "DOCKER_CONFIG": str(hub)}).username == "bob"
    assert find_credentials("ghcr.io", {**env, "DOCKER_CONFIG": str(hub)}) is None
    plain = docker_config(tmp_path / "plain", {"auths": {"registry.lan:5000": {"username": "carol", "password": "pw"}}})
    found = find_credentials("registry.lan:5000", {**env, "DOCKER_CONFIG": str(plain)})
    assert (found.username, found.source) == ("carol", str(plain / "config.json")) and "pw" not in repr(found)
    # ~/.docker/config.json when DOCKER_CONFIG is unset; the environment variable before any file.
    docker_config(Path(env["HOME"]) / ".docker", {"auths": {"registry.lan:5000": {"auth": basic("dave", "pw")}}})
    assert find_credentials("registry.lan:5000", env).username == "dave"
    assert find_credentials("registry.lan:5000", {**env, AUTH_VARIABLE: "ci:token"}).source == AUTH_VARIABLE


def test_credentials_that_cannot_be_used_are_refused_in_one_line(tmp_path, env):
    cases = [
        ({AUTH_VARIABLE: "no-colon-here"}, "must be user:password"),
        ({"DOCKER_CONFIG": str(docker_config(tmp_path / "a", {"auths": {"r.example": {"auth": "%%%"}}}))}, "is not base64 of user:password"),
        ({"DOCKER_CONFIG": str(docker_config(tmp_path / "b", {"credsStore": "absent-helper"}))}, "docker-credential-absent-helper, which is not on PATH"),
        ({"DOCKER_CONFIG": str(docker_config(tmp_path / "c", {"auths": {"r.example": {"identitytoken": "t0k"}}}))}, "identity token"),
    ]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{not json")
    cases.append(({"DOCKER_CONFIG": str(tmp_path / "d")}, "cannot read the registry credentials"))
    for extra, expected in cases:
        with pytest.raises(RegistryError) as refused:
            find_credentials("r.example", {**env, **extra})
        message = one_line(refused)
        assert expected in message and "no-colon-here" not in message and "t0k" not in message


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory):
    """A registry that wants Bearer tokens from a token service (the flow GHCR, Harbor and Docker Hub use)."""
    if registry_binary() is None:
        pytest.skip(NEEDS_REGISTRY)
    folder = tmp_path_factory.mktemp("token-registry")
    with TokenServer(folder, {USER: PASSWORD}) as tokens:
        server = start(folder, auth=tokens.registry_auth())
        server.tokens = tokens
        yield server
        server.stop()


def test_bearer_token_flow(token_registry, repo, tmp_path, env, files):
    digest = write_layout(tmp_path / "layout", files)
    reference = f"{token_registry.host}/{repo}:v1"
    with pytest.raises(RegistryError) as refused:
        push_layout(tmp_path / "layout", reference, environ=env)
    assert "token service" in one_line(refused) and "docker login" in str(refused.value)

    said: list[str] = []
    logged_in = {**env, AUTH_VARIABLE: f"{USER}:{PASSWORD}"}
    pushed = push_layout(tmp_path / "layout", reference, environ=logged_in, say=said.append)
    pulled = pull_to_layout(reference, tmp_path / "pulled", environ=logged_in, say=said.append)

    assert pushed.digest == pulled.digest == digest
    asked = [a for a in token_registry.tokens.asked if a["user"] == USER]
    assert {"user": USER, "service": ["vdeploy-test-registry"], "scope": [f"repository:{repo}:pull,push"]} in asked
    assert {"user": USER, "service": ["vdeploy-test-registry"], "scope": [f"repository:{repo}:pull"]} in asked
    assert_no_secret(*said, folder=tmp_path / "pulled")

    with pytest.raises(RegistryError) as refused:
        pull_to_layout(reference, tmp_path / "other", environ={**env, AUTH_VARIABLE: f"{USER}:wrong-{PASSWORD}"})
    message = one_line(refused)
    assert f"refused the credentials from {AUTH_VARIABLE}" in message and PASSWORD not in message


def test_credentials_do_not_follow_a_redirect_to_another_origin(basic_registry, repo, tmp_path, env, files):
    """Blob downloads redirected to object storage: the credentials stay with the registry."""
    digest = write_layout(tmp_path / "layout", files)
    logged_in = {**env, AUTH_VARIABLE: f"{USER}:{PASSWORD}"}
    push_layout(tmp_path / "layout", f"{basic_registry.host}/{repo}:v1", environ=logged_in)

    with BlobRedirector(basic_registry) as front:
        pulled = pull_to_layout(f"{front.host}/{repo}:v1", tmp_path / "pulled", environ=logged_in)

    assert pulled.digest == digest
    assert layout_blobs(tmp_path / "pulled") == layout_blobs(tmp_path / "layout")
    assert len(front.blob_requests) == 4  # every blob came from the other origin...
    assert not any("Authorization" in headers for headers in front.blob_requests)  # ...without credentials


# ------------------------------------------------------------------------------------------------
# Plain HTTP only to loopback; HTTPS with the usual certificate checks


@pytest.mark.parametrize(
    ("url", "plain_http", "allowed"),
    [
        ("http://127.0.0.1:5000/v2/", None, True),
        ("http://127.8.9.10/v2/", None, True),
        ("http://[::1]:5000/v2/", None, True),
        ("http://localhost:5000/v2/", None, True),
        ("http://192.0.2.1/token", None, False),
        ("http://registry.example/v2/", None, False),
        ("http://127.0.0.1.example/v2/", None, False),
        ("http://registry.example/v2/", True, True),
        ("http://127.0.0.1:5000/v2/", False, False),
        ("https://registry.example/v2/", None, True),
        ("ftp://registry.example/x", True, False),
    ],
)
def test_which_urls_may_be_contacted(url, plain_http, allowed):
    assert (url_problem(url, plain_http) is None) == allowed


def test_the_registry_is_reached_over_https_unless_it_is_loopback_or_asked():
    assert base_url(parse_reference("ghcr.io/org/model:v1"), None) == "https://ghcr.io"
    assert base_url(parse_reference("127.0.0.1:5000/org/model:v1"), None) == "http://127.0.0.1:5000"
    assert base_url(parse_reference("[::1]:5000/org/model:v1"), None) == "http://[::1]:5000"
    assert base_url(parse_reference("localhost:5000/m:v1"), False) == "https://localhost:5000"
    assert base_url(parse_reference("registry.lan:5000/m:v1"), True) == "http://registry.lan:5000"
    assert base_url(parse_reference("docker.io/library/m:v1"), None) == "https://registry-1.docker.io"


def test_a_token_service_over_plain_http_to_another_host_is_refused(tmp_path, env):
    """The registry names a realm on a non-loopback host over http: the credentials are not sent there."""
    with TokenServer(tmp_path, {USER: PASSWORD}) as tokens:
        server = start(tmp_path / "registry", auth=tokens.registry_auth(realm="http://192.0.2.1/token"))
        try:
            started = time.monotonic()
            with pytest.raises(RegistryError) as refused:
                pull_to_layout(f"{server.host}/x/y:v1", tmp_path / "out", environ={**env, AUTH_VARIABLE: f"{USER}:{PASSWORD}"})
            assert time.monotonic() - started < 10  # refused, not timed out trying
        finally:
            server.stop()
    message = one_line(refused)
    assert "http://192.0.2.1/token is plain HTTP to a host that is not loopback" in message and "--plain-http" in message
    assert tokens.asked == [] and PASSWORD not in message


def test_an_upload_location_over_plain_http_to_another_host_is_refused(tmp_path, env, files):
    """A registry that builds its URLs for another host (http.host) over http: no bytes go there."""
    server = start(tmp_path / "registry", public_host="http://registry.example:5000")
    try:
        write_layout(tmp_path / "layout", files)
        with pytest.raises(RegistryError) as refused:
            push_layout(tmp_path / "layout", f"{server.host}/x/y:v1", environ=env)
        assert "http://registry.example:5000/v2/x/y/blobs/uploads/" in one_line(refused)
        assert "plain HTTP to a host that is not loopback" in str(refused.value)
    finally:
        server.stop()


def test_https_checks_the_certificate(tmp_path, env, monkeypatch, files):
    cert, key = self_signed(tmp_path, "registry.test")
    server = start(tmp_path / "registry", tls=(cert, key))
    try:
        digest = write_layout(tmp_path / "layout", files)
        reference = f"{server.host}/x/y:v1"
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        with pytest.raises(RegistryError) as refused:
            push_layout(tmp_path / "layout", reference, plain_http=False, environ=env)
        assert "TLS certificate of 127.0.0.1 is not trusted" in one_line(refused)

        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        pushed = push_layout(tmp_path / "layout", reference, plain_http=False, environ=env)
        pulled = pull_to_layout(reference, tmp_path / "pulled", plain_http=False, environ=env)
        assert pushed.digest == pulled.digest == digest
    finally:
        server.stop()

    # A trusted certificate for another name is refused too.
    other_cert, other_key = self_signed(tmp_path, "other.test", ip="127.0.0.2")
    monkeypatch.setenv("SSL_CERT_FILE", str(other_cert))
    server = start(tmp_path / "other-registry", tls=(other_cert, other_key))
    try:
        with pytest.raises(RegistryError) as refused:
            pull_to_layout(f"{server.host}/x/y:v1", tmp_path / "other", plain_http=False, environ=env)
        assert "TLS certificate of 127.0.0.1 is not trusted (IP address mismatch" in one_line(refused)
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------
# References


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5000/org/model:v1", Reference("127.0.0.1:5000", "org/model", "v1", None)),
        ("ghcr.io/org/sub/model", Reference("ghcr.io", "org/sub/model", None, None)),
        ("localhost/m@sha256:" + "a" * 64, Reference("localhost", "m", None, "sha256:" + "a" * 64)),
        ("[::1]:5000/m:1.0_rc-2@sha256:" + "b" * 64, Reference("[::1]:5000", "m", "1.0_rc-2", "sha256:" + "b" * 64)),
        ("registry.lan:443/a__b/c-d.e:x", Reference("registry.lan:443", "a__b/c-d.e", "x", None)),
    ],
)
def test_references_parse(text, expected):
    assert parse_reference(text) == expected
    assert str(parse_reference(text)) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("model", "names no registry"),
        ("org/model:v1", "not a registry host"),
        ("https://ghcr.io/org/model", "no scheme"),
        ("ghcr.io/Org/model", "is not a repository"),
        ("ghcr.io/org//model", "is not a repository"),
        ("ghcr.io/org/model/", "is not a repository"),
        ("ghcr.io/org/model:", "is not a tag"),
        ("ghcr.io/org/model:-bad", "is not a tag"),
        ("ghcr.io/org/model:" + "t" * 129, "is not a tag"),
        ("ghcr.io/org/model@sha256:abc", "64 lowercase hex"),
        ("ghcr.io/org/model@sha512:" + "a" * 128, "only sha256"),
        ("ghcr.io/org/model@latest", "is not a digest"),
        ("ghcr.io:99999/org/model", "is not a registry host[:port]"),
        ("ghcr..io/org/model", "is not a registry host[:port]"),
        ("[::1/model", "is not a registry host[:port]"),
        ("ghcr.io/org model", "spaces"),
        ("ghcr.io/" + "a" * 300, "longer than 255"),
    ],
)
def test_malformed_references_are_one_line(text, why):
    with pytest.raises(RegistryError) as refused:
        parse_reference(text)
    message = one_line(refused)
    assert why in message and "REGISTRY[:PORT]/REPO[:TAG][@sha256:DIGEST]" in message


@pytest.mark.parametrize("text", ["alice:s3cr3t@ghcr.io/org/model:v1", "https://alice:s3cr3t@ghcr.io/org/model", "alice:s3cr3t@ghcr.io"])
def test_a_reference_with_credentials_is_refused_without_echoing_them(text):
    with pytest.raises(RegistryError) as refused:
        parse_reference(text)
    message = one_line(refused)
    assert "holds user credentials" in message and "s3cr3t" not in message and "alice" not in message
