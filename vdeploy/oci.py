"""Step 6 of the flow, its container: an OCI image layout (image-spec v1.1), written as a folder
of hard links or as a deterministic tar, split into volumes, and read back with every name and
member type checked.

    oci-layout              {"imageLayoutVersion":"1.0.0"}
    index.json              the entry point: one descriptor per manifest
    blobs/sha256/<hex>      every blob, named by the sha256 of its bytes

The tar is a function of the layout alone: entries in a fixed order (`oci-layout`, `index.json`,
the other root files by name, then the blobs by digest), mtime 0, uid and gid 0, no owner names,
modes 0644 and 0755, PAX format, padded to whole 10 KiB records as tar(1) does.

This module knows nothing of vdeploy's locks: `vdeploy.bundle` says what goes in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vdeploy.errors import BundleError
from vdeploy.hashing import sha256_file, sha256_stored_file
from vdeploy.manifest import canonical_json
from vdeploy.safety import path_problem

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
BLOBS_DIR = "blobs/sha256"
LAYOUT_VERSION = canonical_json({"imageLayoutVersion": "1.0.0"})
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_COPY_CHUNK = 64 * 1024 * 1024
# The most bytes read into memory for one metadata blob (index, manifest, config, lock).
METADATA_LIMIT = 64 * 1024 * 1024


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Blob:
    """One blob of a layout: small ones held in memory, the others read from a file (the store)."""

    digest: str  # "sha256:<hex>"
    size: int
    data: bytes | None = None
    path: Path | None = None  # checked against the digest while it is written
    label: str = ""  # what it is, for messages: "model: model.safetensors"

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


def blob_of(data: bytes, label: str = "") -> Blob:
    return Blob(digest_of(data), len(data), data=data, label=label)


def descriptor(media_type: str, blob: Blob, **fields: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": blob.digest, "size": blob.size, **fields}


def index_json(manifest: Blob, ref_name: str, artifact_type: str | None = None,
               annotations: dict[str, str] | None = None) -> bytes:
    """An image index naming one manifest, tagged `ref_name`."""
    entry = descriptor(MANIFEST_TYPE, manifest, annotations={REF_NAME: ref_name})
    if artifact_type:
        entry["artifactType"] = artifact_type
    index: dict[str, object] = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": [entry]}
    if annotations:
        index["annotations"] = annotations
    return canonical_json(index)


@dataclass(frozen=True)
class Layout:
    """What one OCI layout holds."""

    index: bytes
    blobs: tuple[Blob, ...]  # unique by digest
    root_files: tuple[tuple[str, bytes], ...] = ()  # beside index.json; OCI tools ignore them

    def entries(self) -> list[tuple[str, bytes | Blob | None]]:
        """Every member in tar order: (name, bytes or blob, or None for a folder)."""
        listed: list[tuple[str, bytes | Blob | None]] = [(LAYOUT_FILE, LAYOUT_VERSION), (INDEX_FILE, self.index)]
        listed += sorted(self.root_files)
        listed += [("blobs/", None), ("blobs/sha256/", None)]
        listed += [(f"{BLOBS_DIR}/{blob.hex}", blob) for blob in sorted(self.blobs, key=lambda b: b.hex)]
        return listed


class BlobMismatch(BundleError):
    """A store file did not hash to its digest while it was written into a layout."""


# ---- writing: a folder ------------------------------------------------------------------------


@dataclass
class Written:
    linked: int = 0  # blobs hard-linked from the store: no bytes copied
    copied: int = 0
    copied_bytes: int = 0


def write_folder(layout: Layout, out: Path, hint: str) -> Written:
    """Write the layout as a folder. Store files are hard-linked (copied only where a link cannot
    be made) and each is hashed once in place; the folder appears only when all matched."""
    written = Written()
    staging = _staging_path(out)
    shutil.rmtree(staging, ignore_errors=True)
    blobs_dir = staging / BLOBS_DIR
    blobs_dir.mkdir(parents=True)
    try:
        for name, content in layout.entries():
            if isinstance(content, bytes):
                (staging / name).write_bytes(content)
            elif isinstance(content, Blob) and content.data is not None:
                (staging / name).write_bytes(content.data)

        def place(blob: Blob) -> tuple[Blob, str, bool]:
            target = blobs_dir / blob.hex
            try:
                os.link(blob.path, target)  # type: ignore[arg-type]
                linked = True
            except OSError:  # another file system, or links not allowed: copy
                shutil.copyfile(blob.path, target)  # type: ignore[arg-type]
                linked = False
            return blob, sha256_stored_file(target), linked

        from_files = _largest_first([b for b in layout.blobs if b.data is None])
        with ThreadPoolExecutor(max_workers=cores()) as pool:
            results = list(pool.map(place, from_files))
        _refuse_mismatches([(blob, digest) for blob, digest, _ in results], hint)
        for blob, _, linked in results:
            if linked:
                written.linked += 1
            else:
                written.copied += 1
                written.copied_bytes += blob.size
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def check_output(out: Path, folder: bool) -> None:
    """Refuse to write over anything but an earlier bundle of the same form: a layout folder
    (holding oci-layout) for a folder, a file for a tar."""
    if out.is_symlink() or (out.exists() and out.is_dir() != folder):
        raise BundleError(f"{out}: exists and is not a bundle {'folder' if folder else 'tar'}; remove it or pass another -o")
    if folder and out.is_dir() and not (out / LAYOUT_FILE).is_file():
        raise BundleError(f"{out}: exists and is not a bundle; remove it or pass another -o")


def _swap_into_place(staging: Path, out: Path) -> None:
    if out.is_dir() and not out.is_symlink():
        check_output(out, folder=True)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def _staging_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def _largest_first(blobs: list[Blob]) -> list[Blob]:
    # Big files first, so no core idles at the end on one late large file.
    return sorted(blobs, key=lambda b: (-b.size, b.hex))


def _refuse_mismatches(results: list[tuple[Blob, str]], hint: str) -> None:
    bad = [(blob, digest) for blob, digest in results if digest != blob.hex]
    if bad:
        blob, digest = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise BlobMismatch(
            f"{blob.label or blob.digest}: {blob.path} hashes to {digest[:12]}…, the lock pins {blob.hex[:12]}…{more}; "
            f"nothing was written. {hint}"
        )


# ---- writing: a deterministic tar ---------------------------------------------------------------


def _header(name: str, size: int, folder: bool) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if folder else size
    info.mtime = 0
    info.mode = 0o755 if folder else 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.DIRTYPE if folder else tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _member_size(name: str, content: bytes | Blob | None) -> int:
    size = 0 if content is None else len(content) if isinstance(content, bytes) else content.size
    return len(_header(name, size, content is None)) + size + (-size % tarfile.BLOCKSIZE)


def _tar_size(body: int) -> int:
    """The whole tar: members, two zero blocks, padded to a whole record."""
    total = body + 2 * tarfile.BLOCKSIZE
    return total + (-total % tarfile.RECORDSIZE)


def tar_size(layout: Layout) -> int:
    return _tar_size(sum(_member_size(name, content) for name, content in layout.entries()))


def write_tar(layout: Layout, out: Path, hint: str) -> None:
    """Write the layout as one tar. Store files are copied in the kernel (copy_file_range) while
    other cores hash them; the tar appears, by rename, only when every one matched."""
    staging = _staging_path(out)
    from_files = _largest_first([b for b in layout.blobs if b.data is None])
    copied: dict[str, tuple[int, int]] = {}  # digest -> (device, inode) of the file copied
    try:
        with ThreadPoolExecutor(max_workers=cores()) as pool:
            hashing = {blob.digest: pool.submit(_hash_with_identity, blob.path) for blob in from_files}
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _reserve(fd, tar_size(layout))
                for name, content in layout.entries():
                    _write_member(fd, name, content, copied)
                end = os.lseek(fd, 0, os.SEEK_CUR)
                _write_all(fd, b"\0" * (_tar_size(end) - end))
            finally:
                os.close(fd)
            results = []
            for blob in from_files:
                digest, identity = hashing[blob.digest].result()
                # The bytes hashed must be the bytes copied: the same file, not one put in its place.
                results.append((blob, digest if identity == copied[blob.digest] else "changed while being copied"))
        _refuse_mismatches(results, hint)
        os.replace(staging, out)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def _hash_with_identity(path: Path) -> tuple[str, tuple[int, int]]:
    info = os.stat(path)
    return sha256_stored_file(path), (info.st_dev, info.st_ino)


def _write_member(fd: int, name: str, content: bytes | Blob | None, copied: dict[str, tuple[int, int]]) -> None:
    if content is None:
        _write_all(fd, _header(name, 0, True))
        return
    data = content if isinstance(content, bytes) else content.data
    size = len(data) if data is not None else content.size  # type: ignore[union-attr]
    _write_all(fd, _header(name, size, False))
    if data is not None:
        _write_all(fd, data)
    else:
        blob: Blob = content  # type: ignore[assignment]
        source = os.open(blob.path, os.O_RDONLY)  # type: ignore[arg-type]
        try:
            info = os.fstat(source)
            if info.st_size != blob.size:
                raise BlobMismatch(f"{blob.label}: {blob.path} has {info.st_size} bytes, the lock pins {blob.size}; nothing was written")
            copied[blob.digest] = (info.st_dev, info.st_ino)
            copy_range(source, fd, 0, blob.size)
        finally:
            os.close(source)
    _write_all(fd, b"\0" * (-size % tarfile.BLOCKSIZE))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _reserve(fd: int, size: int) -> None:
    """Allocate a file's blocks up front: writing into them then costs about a sixth less."""
    if size and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            pass  # a file system without it (or a full disk, which the writes will report)


def copy_range(source: int, target: int, offset: int, size: int) -> None:
    """Copy size bytes from source at offset to target's position: in the kernel where it can."""
    done = 0
    while done < size:
        try:
            count = os.copy_file_range(source, target, min(size - done, _COPY_CHUNK), offset + done)
        except (AttributeError, OSError):
            count = 0
        if count == 0:
            chunk = os.pread(source, min(size - done, _COPY_CHUNK), offset + done)
            if not chunk:
                raise BundleError(f"a blob ends {size - done} bytes early: the bundle is truncated; fetch a fresh copy")
            _write_all(target, chunk)
            count = len(chunk)
        done += count


# ---- volumes ------------------------------------------------------------------------------------


def split(layout: Layout, max_size: int, index_for: Callable[[int, int], bytes]) -> list[Layout]:
    """Tars of at most max_size bytes, each a whole layout: the in-memory blobs (manifest, config,
    lock) in every one, the file blobs spread first-fit, largest first. index_for(i, n) is volume
    i's index.json."""
    shared = tuple(b for b in layout.blobs if b.data is not None)
    files = _largest_first([b for b in layout.blobs if b.data is None])
    most = max(1, len(files))  # no more volumes than files, so this index is the longest
    base = sum(_member_size(n, c) for n, c in Layout(index_for(most, most), shared, layout.root_files).entries())
    # A tar is its members, two zero blocks, padded to whole records: the members may fill this much.
    room = (max_size // tarfile.RECORDSIZE) * tarfile.RECORDSIZE - 2 * tarfile.BLOCKSIZE - base
    if room <= 0:
        raise BundleError(f"--max-volume-size {max_size} is smaller than one volume's metadata ({_tar_size(base)} bytes); raise it")
    volumes: list[list[Blob]] = []
    free: list[int] = []
    for blob in files:
        need = _member_size(f"{BLOBS_DIR}/{blob.hex}", blob)
        if need > room:
            raise BundleError(
                f"--max-volume-size {max_size} cannot hold {blob.label or blob.digest} ({blob.size} bytes) "
                f"with a volume's metadata; raise it to at least {_tar_size(base + need)}"
            )
        for number, left in enumerate(free):
            if need <= left:
                volumes[number].append(blob)
                free[number] -= need
                break
        else:
            volumes.append([blob])
            free.append(room - need)
    volumes = volumes or [[]]
    return [
        Layout(index_for(number + 1, len(volumes)), shared + tuple(blobs), layout.root_files)
        for number, blobs in enumerate(volumes)
    ]


# ---- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Located:
    """Where a member's bytes are: a file, from an offset (a layout folder's blob, or a tar member)."""

    file: Path
    offset: int
    size: int
    whole_file: bool = False  # the file is exactly these bytes (a folder's blob): it may be hard-linked


@dataclass(frozen=True)
class Volume:
    """One layout, a folder or a tar, with its members checked: plain files only, no name outside."""

    path: Path
    files: dict[str, Located]  # root files by name: oci-layout, index.json, ...
    blobs: dict[str, Located]  # by digest, "sha256:<hex>"

    def index(self) -> dict:
        if self.files.get(LAYOUT_FILE) is None or self.files.get(INDEX_FILE) is None:
            raise BundleError(f"{self.path}: not an OCI image layout (no oci-layout or index.json); pass a bundle made by `vdeploy bundle`")
        try:
            layout = json.loads(read_bytes(self.files[LAYOUT_FILE]))
            index = json.loads(read_bytes(self.files[INDEX_FILE]))
        except ValueError as exc:
            raise BundleError(f"{self.path}: unreadable oci-layout or index.json ({exc}); fetch a fresh copy") from None
        if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != "1.0.0":
            raise BundleError(f"{self.path}: oci-layout is not image layout version 1.0.0")
        if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            raise BundleError(f"{self.path}: index.json lists no manifests")
        return index


def open_volume(path: Path) -> Volume:
    if path.is_dir():
        return _open_folder(path)
    if path.is_file():
        return _open_tar(path)
    raise BundleError(f"{path}: no such bundle (a layout folder or its .tar)")


def read_bytes(located: Located, limit: int = METADATA_LIMIT) -> bytes:
    if located.size > limit:
        raise BundleError(f"{located.file}: a metadata member of {located.size} bytes is larger than any vdeploy writes")
    with open(located.file, "rb") as stream:
        stream.seek(located.offset)
        data = stream.read(located.size)
    if len(data) != located.size:
        raise BundleError(f"{located.file}: ends inside a member; the bundle is truncated, fetch a fresh copy")
    return data


def read_blob(volume: Volume, digest: str) -> bytes:
    """A small blob's bytes, checked against its digest."""
    data = read_bytes(volume.blobs[digest])
    if digest_of(data) != digest:
        raise BundleError(f"{volume.path}: blob {digest} does not match its digest; the bundle is damaged, fetch a fresh copy")
    return data


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a plain file"


def _refuse_member(bundle: Path, name: str, kind: str) -> BundleError:
    return BundleError(f"{bundle}: {name} is {kind}; a bundle holds only plain files, refusing it")


def _open_folder(path: Path) -> Volume:
    files: dict[str, Located] = {}
    blobs: dict[str, Located] = {}
    for entry in os.scandir(path):
        info = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(info.st_mode):
            files[entry.name] = Located(Path(entry.path), 0, info.st_size, whole_file=True)
        elif not stat.S_ISDIR(info.st_mode):
            raise _refuse_member(path, entry.name, _kind(info.st_mode))
    folder = path
    for part in BLOBS_DIR.split("/"):
        folder = folder / part
        try:
            info = os.lstat(folder)
        except FileNotFoundError:
            return Volume(path, files, blobs)
        if not stat.S_ISDIR(info.st_mode):
            raise _refuse_member(path, str(folder.relative_to(path)), _kind(info.st_mode))
    for entry in os.scandir(folder):
        info = entry.stat(follow_symlinks=False)
        name = f"{BLOBS_DIR}/{entry.name}"
        if not stat.S_ISREG(info.st_mode):
            raise _refuse_member(path, name, _kind(info.st_mode))
        if not _HEX64.fullmatch(entry.name):
            raise BundleError(f"{path}: {name} is not named by a sha256 digest; refusing the bundle")
        blobs[f"sha256:{entry.name}"] = Located(Path(entry.path), 0, info.st_size, whole_file=True)
    return Volume(path, files, blobs)


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a fifo"
    if member.issparse():
        return "a sparse file"
    return "not a plain file"


def _open_tar(path: Path) -> Volume:
    files: dict[str, Located] = {}
    blobs: dict[str, Located] = {}
    seen: set[str] = set()
    end = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:  # reads the headers only; seeks over the data
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name in ("", "."):
                    continue
                problem = path_problem(name.rstrip("/") if member.isdir() else name)
                if problem:
                    raise BundleError(f"{path}: member {name!r} {problem}: it would land outside the layout; refusing the bundle")
                if name in seen:
                    raise BundleError(f"{path}: member {name} appears twice; refusing the bundle")
                seen.add(name)
                if member.isdir():
                    continue
                if not member.isreg() or member.issparse():
                    raise _refuse_member(path, name, _tar_kind(member))
                if member.offset_data + member.size > end:
                    raise BundleError(f"{path}: {name} runs past the end of the file; the tar is truncated, fetch a fresh copy")
                located = Located(path, member.offset_data, member.size)
                if name.startswith(BLOBS_DIR + "/"):
                    digest = name[len(BLOBS_DIR) + 1:]
                    if not _HEX64.fullmatch(digest):
                        raise BundleError(f"{path}: {name} is not named by a sha256 digest; refusing the bundle")
                    blobs[f"sha256:{digest}"] = located
                elif "/" not in name:
                    files[name] = located
    except (tarfile.TarError, EOFError) as exc:
        raise BundleError(f"{path}: not a readable plain tar ({exc}); bundles are uncompressed tars or layout folders") from None
    return Volume(path, files, blobs)


def stage(located: Located, target: Path) -> tuple[str, bool]:
    """Put a blob's bytes at target (a hard link where the bundle is a folder on this file system,
    else a kernel copy); return the sha256 of what is now there, and whether it was linked."""
    # A link only to one's own file: another user could change the bytes of a file they own
    # after it was checked here.
    if located.whole_file and os.stat(located.file).st_uid == os.getuid():
        try:
            os.link(located.file, target)
        except OSError:
            pass  # another file system: copy
        else:
            # Another program's file, so read, not mapped: a mapping of a file truncated under it
            # would kill the process.
            return sha256_file(target), True
    source = os.open(located.file, os.O_RDONLY)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _reserve(fd, located.size)
            copy_range(source, fd, located.offset, located.size)
        finally:
            os.close(fd)
    finally:
        os.close(source)
    return sha256_stored_file(target), False
