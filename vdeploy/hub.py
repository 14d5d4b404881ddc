"""Step 2 of the flow: ask the Hub, through huggingface_hub, what a revision is and what it holds.

The only module that talks to the Hub. huggingface_hub is imported inside the functions, so
commands that never touch the network (plan, verify, --help) do not pay for it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from vdeploy.errors import SourceError

# huggingface_hub hands a download to its file in chunks of this size (10 MiB by default); a fetch
# stops at the next chunk after Ctrl-C, so this bounds how long that takes: 2 s on a 1 MiB/s link.
DOWNLOAD_CHUNK_SIZE = 2 * 1024 * 1024


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    git_oid: str  # the git blob id (of the LFS pointer, for LFS files)
    lfs_sha256: str | None  # the content's sha256, for LFS files


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@contextmanager
def hub_errors(repo: str, what: str) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one line naming the repo and what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise SourceError(f"{repo}: gated repo; accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"{repo}: no such repo at {endpoint()} (a private one needs HF_TOKEN); check [model] repo"
        ) from None
    except RevisionNotFoundError:
        raise SourceError(f"{repo}: {what}: revision not found; check the revision in the manifest") from None
    except RemoteEntryNotFoundError:
        raise SourceError(f"{repo}: {what}: file not found on the Hub") from None
    except LocalEntryNotFoundError:
        raise SourceError(f"{repo}: {what}: the Hub is unreachable and the file is not in the store") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise SourceError(f"{repo}: {what}: the Hub answered HTTP {status}; try again later") from None
    except (OSError, ValueError) as exc:
        # httpx errors and huggingface_hub's size check land here
        raise SourceError(f"{repo}: {what}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    except Exception as exc:
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            raise SourceError(f"{repo}: {what}: cannot reach {endpoint()} ({type(exc).__name__})") from None
        raise


def resolve_commit(repo: str, revision: str) -> str:
    """The commit sha a branch, tag or commit names right now (one request)."""
    from huggingface_hub import HfApi

    with hub_errors(repo, f"revision {revision!r}"):
        info = HfApi().model_info(repo, revision=revision)
    if not info.sha:
        raise SourceError(f"{repo}: the Hub gave no commit for revision {revision!r}")
    return info.sha


def list_files(repo: str, commit: str) -> list[RemoteFile]:
    """Every file at a commit, with sizes and hashes, from one (paginated) tree listing."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    with hub_errors(repo, f"tree at {commit[:12]}"):
        entries = list(HfApi().list_repo_tree(repo, revision=commit, recursive=True))
    return [
        RemoteFile(
            path=entry.path,
            size=entry.size,
            git_oid=entry.blob_id,
            lfs_sha256=entry.lfs.sha256 if entry.lfs else None,
        )
        for entry in entries
        if isinstance(entry, RepoFile)
    ]


def download(repo: str, commit: str, path: str, out: IO[bytes], resume_from: int = 0, size: int | None = None) -> None:
    """Stream one file at a commit into out (appending from resume_from), as huggingface_hub does."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    constants.DOWNLOAD_CHUNK_SIZE = DOWNLOAD_CHUNK_SIZE  # read by http_get at each call
    url = hf_hub_url(repo, path, revision=commit)
    with hub_errors(repo, path):
        http_get(
            url,
            out,
            resume_size=resume_from,
            headers=build_hf_headers(),
            expected_size=size,
            displayed_filename=path,
        )


def read_small_file(repo: str, commit: str, path: str, size: int) -> bytes:
    buffer = io.BytesIO()
    download(repo, commit, path, buffer, size=size)
    return buffer.getvalue()
