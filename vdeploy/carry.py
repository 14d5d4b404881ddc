"""Step 6 beside the bundle: a deployment carried through an OCI registry (`vdeploy push`, `vdeploy pull`).

push = the bundle's artifact written as a layout (hard links into the store) + registry.push_layout:
the registry gets the manifest `vdeploy bundle` would write, byte for byte, so the digest printed is
the bundle's. pull = registry.pull_to_layout (every blob checked while it streams) + the unbundle
path (open_bundle checks the layers against the carried lock, restore hashes each blob again before
store._publish places it): no byte reaches a snapshot unchecked, and a lock already beside the
manifest that differs from the artifact's is refused before the store is touched.

Both temporary layouts live inside the store's folder, so the links cost nothing and a restore moves
files instead of copying them; both are removed however the command ends. Credentials stay inside
vdeploy.registry: nothing here writes them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vdeploy.constants import to_stderr
from vdeploy.registry import Pulled, Pushed, parse_reference

TEMP_PREFIX = ".vdeploy-carry-"



@dataclass(frozen=True)
class PushResult:
    pushed: Pushed
    deployment: str
    files: int
    file_bytes: int

    def to_json(self) -> dict[str, object]:
        return {**self.pushed.to_json(), "deployment": self.deployment, "files": self.files, "file_bytes": self.file_bytes}


@dataclass(frozen=True)
class PullResult:
    pulled: Pulled
    restored: object  # bundle.UnbundleResult

    def to_json(self) -> dict[str, object]:
        pulled = {k: v for k, v in self.pulled.to_json().items() if k != "layout"}  # a temporary folder, gone
        return {**self.restored.to_json(), **pulled}  # type: ignore[attr-defined]


class _TempLayout:
    """A hidden folder inside the store's folder (made if absent, and removed again if it was):
    on the store's file system, so links and renames between it and the store are free."""

    def __init__(self, store_root: Path) -> None:
        self.store_root = store_root
        self.made_root = not store_root.exists()

    def __enter__(self) -> Path:
        self.store_root.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.store_root))
        return self.folder / "layout"

    def __exit__(self, *_) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.made_root:
            try:
                os.rmdir(self.store_root)  # only if nothing was restored into it
            except OSError:
                pass


def push(
    manifest_arg: str | os.PathLike[str] | None, reference: str, plain_http: bool | None = None,
    say: Callable[[str], None] = to_stderr,
) -> PushResult:
    """Push the locked deployment's bundle artifact to REGISTRY/REPO[:TAG]; blobs there already are not sent."""
    from vdeploy import oci
    from vdeploy.bundle import STORE_HINT, artifact
    from vdeploy.prepare import load_locked
    from vdeploy.registry import push_layout
    from vdeploy.store import Store

    ref = parse_reference(reference)  # a malformed reference fails before any file is read
    manifest, lock = load_locked(manifest_arg)
    store = Store(manifest.store_path())
    made = artifact(lock, manifest.lock_path.read_bytes(), store)
    with _TempLayout(store.root) as layout:
        oci.write_folder(made.layout(), layout, STORE_HINT)
        pushed = push_layout(layout, ref, ref_name=made.ref_name, plain_http=plain_http, say=say)
    return PushResult(pushed, lock.deployment, len(made.members), made.file_bytes)


def pull(
    reference: str, folder: str | os.PathLike[str] | None = None, plain_http: bool | None = None,
    say: Callable[[str], None] = to_stderr,
) -> PullResult:
    """Pull an artifact into the store of the manifest in `folder` (default: here), verified, and write
    its lock beside the manifest if absent; a different lock there is refused."""
    from vdeploy.bundle import unbundle
    from vdeploy.manifest import load_manifest
    from vdeploy.registry import pull_to_layout

    ref = parse_reference(reference)
    manifest = load_manifest(folder)  # the project must be there before anything is downloaded
    with _TempLayout(manifest.store_path()) as layout:
        pulled = pull_to_layout(ref, layout, plain_http=plain_http, say=say)
        restored = unbundle([layout, manifest.path], say)
    return PullResult(pulled, restored)
