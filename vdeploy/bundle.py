"""Step 6 of the flow: a deployment's closure as one CNCF ModelPack artifact in an OCI image
layout (`vdeploy bundle`), and a store restored from it offline (`vdeploy unbundle`).

The artifact is a function of the lock: one raw layer per pinned file (model files at the root,
other sources under `_vdeploy/<role>/<store-name>/`), the chat template and the lock itself as
layers under `_vdeploy/`, a ModelPack config, and a manifest whose digest is the bundle's identity.
The format, field by field: lockfiles/BUNDLE.md.

For `vdeploy push`/`pull`: `artifact(lock, lock_bytes, store)` gives the manifest, config and
every blob (with the store file holding it); `open_bundle(paths)` reads layouts back, checked;
`restore(opened, store)` puts an opened bundle's files into a store through the store's checked
path.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from vdeploy import oci
from vdeploy.atomic import write_atomically
from vdeploy.constants import LOCK_NAME, MANIFEST_NAME, PROJECT_STATE_DIR, to_stderr
from vdeploy.errors import BundleError, LockError
from vdeploy.lockfile import Lock, LockedFile, LockedSource, loads_lock
from vdeploy.manifest import canonical_json, sha256_hex
from vdeploy.store import Fingerprints, Store, _blob_is_good, _publish, fetch

FORMAT = "1"
ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
CONFIG_TYPE = "application/vnd.cncf.model.config.v1+json"
OWN_FOLDER = "_vdeploy"
LOCK_FILEPATH = f"{OWN_FOLDER}/{LOCK_NAME}"
TEMPLATE_FILEPATH = f"{OWN_FOLDER}/chat-template.jinja"
BUNDLE_SUFFIX = ".vdeploy-bundle"
BUNDLES_DIR = f"{PROJECT_STATE_DIR}/bundles"

# Annotation keys: ModelPack's for every file, vdeploy's own under io.vdeploy.
FILEPATH = "org.cncf.model.filepath"
FILE_METADATA = "org.cncf.model.file.metadata+json"
UNTESTED = "org.cncf.model.file.mediatype.untested"
TITLE = "org.opencontainers.image.title"
ROLE = "io.vdeploy.role"
LOCK_DIGEST = "io.vdeploy.lock.digest"
FORMAT_KEY = "io.vdeploy.format"
VOLUME = "io.vdeploy.volume"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
_CODE_SUFFIXES = (".py", ".sh", ".cu", ".cpp", ".cc", ".c", ".h")
_DOC_SUFFIXES = (".md", ".rst", ".pdf", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")
_DOC_NAMES = ("readme", "license", "licence", "notice", "copying", ".gitattributes", ".gitignore")
_REF_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")



# ---- the artifact: pure functions of the lock -----------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One layer: a pinned file, the chat template or the lock, and its path in the artifact."""

    filepath: str
    role: str  # model, tokenizer, draft, code, chat-template, lock
    sha256: str
    size: int
    kind: str  # ModelPack's: weight, weight.config, doc, code
    source: LockedSource | None = None
    file: LockedFile | None = None

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"

    @property
    def label(self) -> str:
        return f"{self.role}: {self.file.path if self.file else self.filepath}"


def file_kind(path: str) -> str:
    """ModelPack's layer kind for a file, by its name (so `untested` is true)."""
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith(_WEIGHT_SUFFIXES):
        return "weight"
    if name.endswith(_CODE_SUFFIXES):
        return "code"
    if name.endswith(_DOC_SUFFIXES) or name.startswith(_DOC_NAMES):
        return "doc"
    return "weight.config"


def members_of(lock: Lock, lock_bytes: bytes, template_size: int = 0) -> list[Member]:
    """Every layer of a lock's artifact, in manifest order. Pure. (The lock pins the chat
    template's sha256, not its size: the caller knows it from the bytes.)"""
    found: list[Member] = []
    for source in lock.sources:
        for file in sorted(source.files, key=lambda f: f.path):
            if source.role == "model":
                folded = file.path.casefold()
                if folded == OWN_FOLDER or folded.startswith(OWN_FOLDER + "/"):
                    raise BundleError(
                        f"model file {file.path} collides with the bundle's own {OWN_FOLDER}/ folder; "
                        f"leave it out with [model] include, then `vdeploy lock`"
                    )
                filepath = file.path
            else:
                filepath = f"{OWN_FOLDER}/{source.role}/{source.name}/{file.path}"
            found.append(Member(filepath, source.role, file.sha256, file.size, file_kind(file.path), source, file))
    if lock.chat_template is not None:
        found.append(Member(TEMPLATE_FILEPATH, "chat-template", lock.chat_template.sha256, template_size, "weight.config"))
    found.append(Member(LOCK_FILEPATH, "lock", sha256_hex(lock_bytes), len(lock_bytes), "doc"))
    return found


def layer_descriptor(member: Member) -> dict[str, object]:
    """The manifest's descriptor of one layer, with ModelPack's and vdeploy's annotations."""
    metadata = {  # ModelPack's FileMetadata, in its field order
        "name": member.filepath.rsplit("/", 1)[-1], "mode": 0o644, "uid": 0, "gid": 0,
        "size": member.size, "mtime": "1970-01-01T00:00:00Z", "typeflag": 48,
    }
    annotations = {
        TITLE: member.filepath,
        FILEPATH: member.filepath,
        FILE_METADATA: json.dumps(metadata, separators=(",", ":"), ensure_ascii=False),
        UNTESTED: "true",
        ROLE: member.role,
    }
    if member.source is not None and member.file is not None:
        source, file = member.source, member.file
        annotations.update({
            "io.vdeploy.store-name": source.name,
            "io.vdeploy.commit": source.commit,
            "io.vdeploy.path": file.path,
            "io.vdeploy.blob": file.blob,
        })
        if source.repo is not None:
            annotations["io.vdeploy.repo"] = source.repo
        else:
            annotations["io.vdeploy.local-path"] = str(source.path)
    return {
        "mediaType": f"application/vnd.cncf.model.{member.kind}.v1.raw",
        "digest": member.digest, "size": member.size, "annotations": annotations,
    }


def manifest_annotations(lock: Lock, lock_digest: str) -> dict[str, str]:
    annotations = {
        FORMAT_KEY: FORMAT,
        LOCK_DIGEST: lock_digest,
        "io.vdeploy.deployment": lock.deployment,
        "org.opencontainers.image.revision": lock.model.commit,
    }
    if lock.engine is not None:
        annotations["io.vdeploy.engine"] = lock.engine.spec
    if lock.model.repo is not None:
        annotations["org.opencontainers.image.source"] = f"https://huggingface.co/{lock.model.repo}"
    return annotations


def ref_name(lock: Lock) -> str:
    """The layout's tag: the model's name and the deployment id's start (an OCI tag's characters)."""
    name = (lock.model.repo or lock.model.path or "model").rstrip("/").rsplit("/", 1)[-1]
    name = _REF_NAME_BAD.sub("-", name).strip(".-") or "model"
    return f"{name[:100]}-{lock.deployment[:12]}"


@dataclass(frozen=True)
class ModelFacts:
    """What the ModelPack config says of the model, read from its pinned files."""

    precision: str | None = None
    parameters: int | None = None
    format: str | None = None


def config_json(lock: Lock, layers: list[dict[str, object]], facts: ModelFacts) -> bytes:
    descriptor: dict[str, object] = {"name": lock.model.repo or str(lock.model.path), "revision": lock.model.commit}
    if lock.model.repo is not None:
        descriptor["sourceURL"] = f"https://huggingface.co/{lock.model.repo}"
    model: dict[str, object] = {}
    if facts.format:
        model["format"] = facts.format
    if facts.precision:
        model["precision"] = facts.precision
    if facts.parameters:
        model["paramSize"] = _param_size(facts.parameters)
    return canonical_json({
        "descriptor": descriptor,
        "config": model,
        "modelfs": {"type": "layers", "diffIds": [layer["digest"] for layer in layers]},
    })


def _param_size(count: int) -> str:
    for unit, scale in (("t", 10**12), ("b", 10**9), ("m", 10**6), ("k", 10**3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)


# ---- the artifact of a store --------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """A lock's closure as a ModelPack artifact: what a layout holds, or a registry push sends."""

    lock: Lock
    manifest: oci.Blob  # its bytes in .data; its digest is the bundle's identity
    config: oci.Blob
    blobs: tuple[oci.Blob, ...]  # every blob the manifest names, config first, unique by digest
    members: tuple[Member, ...]
    ref_name: str

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def file_bytes(self) -> int:
        return sum(b.size for b in self.blobs if b.data is None)

    def layout(self, volume: tuple[int, int] | None = None) -> oci.Layout:
        annotations = {VOLUME: f"{volume[0]}/{volume[1]}"} if volume else None
        index = oci.index_json(self.manifest, self.ref_name, ARTIFACT_TYPE, annotations)
        lock_member = next(m for m in self.members if m.role == "lock")
        lock_bytes = next(b.data for b in self.blobs if b.digest == lock_member.digest)
        return oci.Layout(
            index=index,
            blobs=(self.manifest, *self.blobs),
            root_files=(("README.md", self.readme().encode()), (LOCK_NAME, lock_bytes)),  # type: ignore[arg-type]
        )

    def readme(self) -> str:
        model = self.lock.model
        where = f"{model.repo} @ {model.commit}" if model.repo else f"local folder {model.path} ({model.commit})"
        engine = self.lock.engine.spec if self.lock.engine else "not pinned"
        return (
            "# A vdeploy bundle\n\n"
            "An OCI image layout (image-spec 1.1) holding one CNCF ModelPack artifact: every file the\n"
            "deployment's lock pins, one raw layer each, the chat template and the lock itself\n"
            f"(`{LOCK_FILEPATH}`, also beside this file as `{LOCK_NAME}`).\n\n"
            f"    manifest    {self.digest}\n"
            f"    deployment  {self.lock.deployment}\n"
            f"    model       {where}\n"
            f"    engine      {engine}\n"
            f"    files       {len(self.members) - 1} ({self.file_bytes} bytes)\n\n"
            "Restore the store offline, beside the project's vdeploy.toml (every volume, any order):\n\n"
            "    vdeploy unbundle BUNDLE... [path/to/vdeploy.toml]\n"
            "    vdeploy up --no-fetch\n\n"
            "Copy it with OCI tools (the manifest digest stays the same):\n\n"
            f"    skopeo copy oci-archive:BUNDLE.tar:{self.ref_name} docker://registry.example/name:tag\n\n"
            "The format: lockfiles/BUNDLE.md in vdeploy's repository.\n"
        )


def artifact(lock: Lock, lock_bytes: bytes, store: Store) -> Artifact:
    """The artifact of a lock whose files are in `store`. Reads only small files (config.json,
    safetensors headers, the chat template); the big ones are hashed while they are written."""
    template = _template_bytes(store, lock.chat_template.sha256) if lock.chat_template is not None else b""
    members = members_of(lock, lock_bytes, len(template))
    missing = [m.label for m in members if m.file is not None and not _has_blob(store, m)]
    if missing:
        raise BundleError(
            f"store {store.root} lacks {len(missing)} locked file(s) ({', '.join(missing[:3])}); run `vdeploy fetch` first"
        )
    blobs: dict[str, oci.Blob] = {}
    for member in members:
        if member.digest in blobs:
            continue
        if member.role == "lock":
            blobs[member.digest] = oci.blob_of(lock_bytes, member.label)
        elif member.role == "chat-template":
            blobs[member.digest] = oci.blob_of(template, member.label)
        else:
            path = store.blob_path(member.source, member.file)  # type: ignore[arg-type]
            blobs[member.digest] = oci.Blob(member.digest, member.size, path=path, label=member.label)
    layers = [layer_descriptor(m) for m in members]
    config = oci.blob_of(config_json(lock, layers, _model_facts(lock, store)), "config")
    manifest = oci.blob_of(canonical_json({
        "schemaVersion": 2,
        "mediaType": oci.MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": oci.descriptor(CONFIG_TYPE, config),
        "layers": layers,
        "annotations": manifest_annotations(lock, f"sha256:{sha256_hex(lock_bytes)}"),
    }), "manifest")
    return Artifact(lock, manifest, config, (config, *blobs.values()), tuple(members), ref_name(lock))


def _has_blob(store: Store, member: Member) -> bool:
    try:
        return store.blob_path(member.source, member.file).stat().st_size == member.size  # type: ignore[arg-type]
    except OSError:
        return False


def _template_bytes(store: Store, sha256: str) -> bytes:
    path = store.chat_template_path(sha256)
    try:
        data = path.read_bytes()
    except OSError:
        data = b""
    if sha256_hex(data) != sha256:
        raise BundleError(f"store {store.root} lacks the locked chat template ({sha256[:12]}…); run `vdeploy fetch` first")
    return data


def _model_facts(lock: Lock, store: Store) -> ModelFacts:
    """Precision from config.json (checked against the lock), parameters from safetensors headers."""
    model = lock.model
    precision = None
    config_file = model.file("config.json")
    if config_file is not None:
        try:
            data = store.blob_path(model, config_file).read_bytes()
            config = json.loads(data) if sha256_hex(data) == config_file.sha256 else {}
        except (OSError, ValueError):
            config = {}
        if isinstance(config, dict):
            dtype = config.get("torch_dtype") or config.get("dtype")
            precision = dtype if isinstance(dtype, str) else None
    weights = [f for f in model.files if f.path.endswith(".safetensors")]
    parameters = 0
    for file in weights:
        count = _safetensors_parameters(store.blob_path(model, file))
        if count is None:
            parameters = 0
            break
        parameters += count
    formats = {f.path.rsplit(".", 1)[-1] for f in model.files if file_kind(f.path) == "weight"}
    return ModelFacts(precision, parameters or None, formats.pop() if len(formats) == 1 else None)


def _safetensors_parameters(path: Path) -> int | None:
    try:
        with open(path, "rb") as stream:
            length = int.from_bytes(stream.read(8), "little")
            if length > 100 * 1024 * 1024:
                return None
            header = json.loads(stream.read(length))
        total = 0
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for dimension in tensor["shape"]:
                    count *= int(dimension)
                total += count
        return total
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


# ---- bundle -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleResult:
    digest: str  # the manifest digest: the bundle's identity
    deployment: str
    ref_name: str
    outputs: tuple[Path, ...]  # the folder, the tar, or the volumes in order
    files: int
    file_bytes: int
    linked: int = 0  # blobs hard-linked from the store (folder form)
    copied_bytes: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "digest": self.digest, "deployment": self.deployment, "ref_name": self.ref_name,
            "outputs": [str(p) for p in self.outputs], "files": self.files, "file_bytes": self.file_bytes,
            "linked": self.linked, "copied_bytes": self.copied_bytes,
        }


STORE_HINT = "The store is damaged: run `vdeploy verify --full`, then `vdeploy fetch` to replace the file"


def bundle(
    manifest_arg: str | os.PathLike[str] | None, out: Path | None = None, as_tar: bool = False,
    max_volume_size: int | None = None,
) -> BundleResult:
    """Write the lock's closure as an OCI layout folder, a tar, or tars of at most max_volume_size."""
    from vdeploy.prepare import load_locked

    manifest, lock = load_locked(manifest_arg)
    lock_bytes = manifest.lock_path.read_bytes()
    made = artifact(lock, lock_bytes, Store(manifest.store_path()))
    as_tar = as_tar or max_volume_size is not None
    suffix = BUNDLE_SUFFIX + (".tar" if as_tar else "")
    out = Path(out) if out is not None else manifest.folder / f"{made.ref_name}{suffix}"
    written = oci.Written()
    if not as_tar:
        oci.check_output(out, folder=True)
        written = oci.write_folder(made.layout(), out, STORE_HINT)
        outputs: tuple[Path, ...] = (out,)
    elif max_volume_size is None:
        oci.check_output(out, folder=False)
        oci.write_tar(made.layout(), out, STORE_HINT)
        outputs = (out,)
    else:
        volumes = oci.split(made.layout(), max_volume_size, lambda i, n: made.layout((i, n)).index)
        outputs = tuple(volume_path(out, number + 1, len(volumes)) for number in range(len(volumes)))
        for path in outputs:
            oci.check_output(path, folder=False)
        for layout, path in zip(volumes, outputs):
            oci.write_tar(layout, path, STORE_HINT)
    result = BundleResult(
        digest=made.digest, deployment=lock.deployment, ref_name=made.ref_name, outputs=outputs,
        files=len(made.members), file_bytes=made.file_bytes, linked=written.linked, copied_bytes=written.copied_bytes,
    )
    _record_bundle(manifest.folder, result, sha256_hex(lock_bytes))
    return result


def volume_path(out: Path, number: int, count: int) -> Path:
    """out itself for one volume; else out.1-of-3.tar, out.2-of-3.tar, ..."""
    if count == 1:
        return out
    stem = out.name[:-4] if out.name.endswith(".tar") else out.name
    return out.with_name(f"{stem}.{number}-of-{count}.tar")


def _record_bundle(folder: Path, result: BundleResult, lock_sha256: str) -> None:
    """The project remembers the bundles made from it, by digest (nothing reads it back: for people)."""
    record = {**result.to_json(), "lock_sha256": lock_sha256}
    try:
        write_atomically(folder / BUNDLES_DIR / f"{result.digest.split(':', 1)[1]}.json",
                         json.dumps(record, indent=2, sort_keys=True).encode())
    except OSError:
        pass  # a read-only project folder: the digest was printed


_SIZE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[KMGT]?)(?P<binary>i?)B?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """A byte count: 123, 500M, 50G, 1.5GB (powers of 1000), 2GiB (powers of 1024).

    Not vdeploy.flags.parse_size, which reads sizes the way vLLM does ("32K" = 32768): an archive's
    quota is decimal (Zenodo's 50 GB), and "50G" read as GiB would overflow it."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise BundleError(f"--max-volume-size {text!r}: not a size; write bytes, or 500M, 50G, 2GiB")
    base = 1024 if match["binary"] else 1000
    scale = base ** ("KMGT".find(match["unit"].upper()) + 1) if match["unit"] else 1
    return int(float(match["number"]) * scale)


# ---- reading bundles back -------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenedBundle:
    """The volumes of one bundle, checked against each other and against the lock they carry."""

    volumes: tuple[oci.Volume, ...]
    digest: str
    manifest: dict
    lock_bytes: bytes
    lock: Lock
    layers: tuple[dict, ...]
    blobs: dict[str, oci.Located]  # every blob found in any volume, by digest
    volume_numbers: tuple[tuple[int, int], ...] = ()  # (number, count) of the volumes given

    def missing(self) -> list[str]:
        return sorted({str(layer["digest"]) for layer in self.layers} - self.blobs.keys())

    def template(self) -> bytes | None:
        layer = next((l for l in self.layers if l["annotations"].get(ROLE) == "chat-template"), None)
        if layer is None:
            return None
        data = oci.read_bytes(self.blobs[layer["digest"]])
        if oci.digest_of(data) != layer["digest"]:
            raise BundleError(f"{self.blobs[layer['digest']].file}: the chat template does not match its digest; the bundle is damaged")
        return data


def open_bundle(paths: list[Path]) -> OpenedBundle:
    """Read one bundle from its volumes (folders or tars, any order) and check that they agree,
    that the manifest is a vdeploy ModelPack artifact, and that its layers are exactly the lock's."""
    if not paths:
        raise BundleError("name the bundle to restore: a layout folder or its .tar (every volume)")
    volumes = [oci.open_volume(Path(p)) for p in paths]
    chosen = [(_manifest_digest(volume), volume) for volume in volumes]
    digests = {digest for digest, _ in chosen}
    if len(digests) > 1:
        (first, a), (second, b) = chosen[0], next(c for c in chosen if c[0] != chosen[0][0])
        raise BundleError(f"{a.path} and {b.path} are volumes of different bundles ({first[7:19]}… and {second[7:19]}…); pass one bundle's volumes")
    digest = digests.pop()
    blobs: dict[str, oci.Located] = {}
    for volume in volumes:
        for key, located in volume.blobs.items():
            blobs.setdefault(key, located)
    holder = next((v for v in volumes if digest in v.blobs), None)
    if holder is None:
        raise BundleError(f"{volumes[0].path}: its manifest {digest} is missing; the bundle is incomplete, fetch a fresh copy")
    manifest = _json(oci.read_blob(holder, digest), holder.path, "manifest")
    annotations = manifest.get("annotations") or {}
    if manifest.get("artifactType") != ARTIFACT_TYPE or annotations.get(FORMAT_KEY) is None:
        raise BundleError(f"{holder.path}: not a vdeploy bundle (a ModelPack artifact with {FORMAT_KEY}); make one with `vdeploy bundle`")
    if annotations[FORMAT_KEY] != FORMAT:
        raise BundleError(f"{holder.path}: bundle format {annotations[FORMAT_KEY]!r}, this vdeploy reads {FORMAT!r}; upgrade vdeploy")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not all(isinstance(l, dict) and isinstance(l.get("annotations"), dict) for l in layers):
        raise BundleError(f"{holder.path}: the manifest's layers are malformed; the bundle is damaged")
    lock_bytes, lock = _carried_lock(holder, manifest, layers, blobs)
    for volume in volumes:
        copy = volume.files.get(LOCK_NAME)
        if copy is not None and oci.read_bytes(copy) != lock_bytes:
            raise BundleError(f"{volume.path}: its {LOCK_NAME} differs from the lock the manifest names; the bundle was altered, refusing it")
    _check_layers_match_lock(holder.path, layers, lock, lock_bytes, blobs)
    return OpenedBundle(
        tuple(volumes), digest, manifest, lock_bytes, lock, tuple(layers), blobs,
        tuple(n for n in (_volume_number(v) for v in volumes) if n is not None),
    )


def _json(data: bytes, where: Path, what: str) -> dict:
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise BundleError(f"{where}: the {what} is not a JSON object; the bundle is damaged")
    return value


def _manifest_digest(volume: oci.Volume) -> str:
    index = volume.index()
    entries = [m for m in index["manifests"] if isinstance(m, dict) and m.get("mediaType") == oci.MANIFEST_TYPE]
    ours = [m for m in entries if m.get("artifactType") == ARTIFACT_TYPE] or entries
    if len(ours) != 1 or not isinstance(ours[0].get("digest"), str):
        raise BundleError(f"{volume.path}: index.json names {len(ours)} candidate manifests, a vdeploy bundle has one")
    return ours[0]["digest"]


def _volume_number(volume: oci.Volume) -> tuple[int, int] | None:
    text = str((volume.index().get("annotations") or {}).get(VOLUME, ""))
    match = re.fullmatch(r"([0-9]+)/([0-9]+)", text)
    return (int(match[1]), int(match[2])) if match else None


def _carried_lock(holder: oci.Volume, manifest: dict, layers: list[dict], blobs: dict[str, oci.Located]) -> tuple[bytes, Lock]:
    named = manifest["annotations"].get(LOCK_DIGEST)
    lock_layers = [l for l in layers if l["annotations"].get(ROLE) == "lock"]
    if len(lock_layers) != 1 or lock_layers[0].get("digest") != named:
        raise BundleError(f"{holder.path}: the manifest's lock layer and its {LOCK_DIGEST} disagree; the bundle was altered, refusing it")
    if named not in blobs:
        raise BundleError(f"{holder.path}: the bundle's lock ({named}) is missing; the bundle is incomplete, fetch a fresh copy")
    lock_bytes = oci.read_bytes(blobs[named])
    if oci.digest_of(lock_bytes) != named:
        raise BundleError(f"{blobs[named].file}: the bundle's lock does not match its digest; the bundle is damaged, fetch a fresh copy")
    try:
        lock = loads_lock(lock_bytes.decode("utf-8"), where=f"{holder.path} ({LOCK_FILEPATH})")
    except UnicodeDecodeError:
        raise BundleError(f"{holder.path}: the bundle's lock is not UTF-8 text; refusing it") from None
    return lock_bytes, lock


def _check_layers_match_lock(where: Path, layers: list[dict], lock: Lock, lock_bytes: bytes, blobs: dict[str, oci.Located]) -> None:
    """The manifest's layers must be exactly those the lock gives (so every file restored is one
    the lock pins, at the path it pins); the template's size is taken from its layer."""
    template = next((l for l in layers if l["annotations"].get(ROLE) == "chat-template"), {})
    members = members_of(lock, lock_bytes, template.get("size") if isinstance(template.get("size"), int) else 0)
    expected = [layer_descriptor(m) for m in members]
    if expected != layers:
        difference = next((f"{e['annotations'][FILEPATH]}" for e, l in zip(expected, layers) if e != l), None)
        shown = difference or f"{len(layers)} layers, the lock gives {len(expected)}"
        raise BundleError(f"{where}: the manifest's layers disagree with the lock it carries (at {shown}); the bundle was altered, refusing it")


# ---- unbundle -----------------------------------------------------------------------------------


@dataclass
class RestoreReport:
    restored: int = 0  # blobs put into the store from the bundle
    present: int = 0  # already in the store, verified
    linked: int = 0  # of the restored: hard-linked from a bundle folder (no bytes copied)
    restored_bytes: int = 0


@dataclass(frozen=True)
class UnbundleResult:
    digest: str
    deployment: str
    store: Path
    lock_path: Path
    lock_written: bool
    report: RestoreReport = field(default_factory=RestoreReport)

    def to_json(self) -> dict[str, object]:
        return {
            "digest": self.digest, "deployment": self.deployment, "store": str(self.store),
            "lock": str(self.lock_path), "lock_written": self.lock_written, "restored": self.report.restored,
            "present": self.report.present, "linked": self.report.linked, "restored_bytes": self.report.restored_bytes,
        }


def split_arguments(arguments: list[Path]) -> tuple[list[Path], Path | None]:
    """`unbundle BUNDLE... [MANIFEST]`: the last argument is the manifest when it is a .toml file
    or a folder holding vdeploy.toml (and no layout)."""
    if len(arguments) > 1:
        last = Path(arguments[-1])
        if (last.is_file() and last.suffix == ".toml") or (
            last.is_dir() and (last / MANIFEST_NAME).is_file() and not (last / oci.LAYOUT_FILE).exists()
        ):
            return list(arguments[:-1]), last
    return list(arguments), None


def unbundle(arguments: list[Path], say: Callable[[str], None] = to_stderr) -> UnbundleResult:
    """Restore the store of the manifest from a bundle, offline, and write its lock if absent."""
    from vdeploy.lockfile import remember_parse
    from vdeploy.manifest import load_manifest
    from vdeploy.roots import using_store

    paths, manifest_arg = split_arguments(arguments)
    opened = open_bundle(paths)
    manifest = load_manifest(manifest_arg)
    _check_project_lock(manifest, opened)
    _refuse_missing(opened)
    store = Store(manifest.store_path())
    lock_path = manifest.lock_path
    with using_store(store, lock_path, opened.lock, opened.lock_bytes):
        report = restore(opened, store, say)
        written = not lock_path.exists()
        if written:
            write_atomically(lock_path, opened.lock_bytes)
            remember_parse(lock_path)
    return UnbundleResult(opened.digest, opened.lock.deployment, store.root, lock_path, written, report)


def _check_project_lock(manifest, opened: OpenedBundle) -> None:
    from vdeploy.changes import summarise
    from vdeploy.lockfile import stale_changes

    lock_path = manifest.lock_path
    if lock_path.exists():
        if lock_path.read_bytes() != opened.lock_bytes:
            raise LockError(
                f"{lock_path}: differs from the lock in the bundle (deployment {opened.lock.deployment[:16]}); "
                "restore it (unbundle, pull) beside the manifest it was made from, or move this lock away"
            )
        return
    changes = stale_changes(opened.lock, manifest)
    if changes:
        raise LockError(
            f"{manifest.path}: the bundle's lock was made from another manifest ({summarise(changes)}); "
            "restore it (unbundle, pull) beside the manifest it was made from"
        )


def _refuse_missing(opened: OpenedBundle) -> None:
    missing = opened.missing()
    if not missing:
        return
    shown = ", ".join(d[7:19] + "…" for d in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    hint = "fetch a complete copy of the bundle"
    if opened.volume_numbers:
        count = opened.volume_numbers[0][1]
        absent = sorted(set(range(1, count + 1)) - {n for n, _ in opened.volume_numbers})
        if absent:
            hint = f"pass volume(s) {', '.join(map(str, absent))} of {count} too"
    raise BundleError(f"the bundle lacks {len(missing)} blob(s) ({shown}); nothing was restored: {hint}")


def restore(opened: OpenedBundle, store: Store, say: Callable[[str], None] = to_stderr) -> RestoreReport:
    """Put every file of the bundle's lock into the store, the way `fetch` would have.

    Every blob is first staged beside its place and hashed; only when all match are they moved
    into place (store._publish, the one checked way into blobs/), and `fetch` itself then links
    the snapshots, writes the refs and the chat template, finding every blob present.
    """
    lock = opened.lock
    report = RestoreReport()
    fingerprints = Fingerprints(store)
    jobs: dict[Path, tuple[LockedSource, LockedFile]] = {}
    for source in lock.sources:
        for file in source.files:
            jobs.setdefault(store.blob_path(source, file), (source, file))
    todo = []
    for blob, (source, file) in jobs.items():
        if _blob_is_good(blob, file, fingerprints):
            report.present += 1
        else:
            todo.append((blob, source, file))
    template = opened.template()  # read before anything is placed: a damaged one places nothing
    staged = _stage_all(opened, store, todo)
    for blob, source, file, target, (digest, linked) in staged:
        with store.blob_lock(source, file):
            _publish(target, blob, file, lambda d: f"{blob}: changed while being restored", digest)
        fingerprints.record(blob, file.sha256)
        report.restored += 1
        report.restored_bytes += file.size
        report.linked += linked
    fingerprints.save()
    fetch(lock.sources, store, lock.chat_template, template, say=lambda line: None)
    return report


def _stage_all(opened: OpenedBundle, store: Store, todo: list) -> list:
    """Stage and hash every blob in parallel; on any failure remove all of them (and the folders
    made for them) and refuse, so nothing half-restored is left."""
    token = secrets.token_hex(4)
    made_folders = [d for d in {blob.parent.parent for blob, _, _ in todo} if not d.exists()]

    def stage_one(item):
        blob, source, file = item
        blob.parent.mkdir(parents=True, exist_ok=True)
        target = blob.with_name(f"{blob.name}.vdeploy-unbundle-{token}")
        return blob, source, file, target, oci.stage(opened.blobs[f"sha256:{file.sha256}"], target)

    todo = sorted(todo, key=lambda item: -item[2].size)
    with ThreadPoolExecutor(max_workers=oci.cores()) as pool:
        futures = [pool.submit(stage_one, item) for item in todo]
        wait(futures)
    failure: BaseException | None = next((f.exception() for f in futures if f.exception() is not None), None)
    results = [f.result() for f in futures if f.exception() is None]
    bad = [r for r in results if r[4][0] != r[2].sha256]
    if failure is not None or bad:
        for blob, _, _, target, _ in results:
            target.unlink(missing_ok=True)
        for blob, _, _ in todo:
            for leftover in blob.parent.glob(f"*.vdeploy-unbundle-{token}"):
                leftover.unlink(missing_ok=True)
        for folder in made_folders:
            _remove_empty_tree(folder)
        if failure is not None:
            raise failure
        blob, source, file, _, (digest, _) = bad[0]
        where = opened.blobs[f"sha256:{file.sha256}"].file
        raise BundleError(
            f"{where}: the blob of {source.role}: {file.path} hashes to {digest[:12]}…, not {file.sha256[:12]}…"
            f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; nothing was restored: the bundle is damaged, fetch a fresh copy"
        )
    return results


def _remove_empty_tree(folder: Path) -> None:
    for dirpath, _, _ in sorted(os.walk(folder), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass
