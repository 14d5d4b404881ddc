"""Carrying a bundle through an OCI registry: push an OCI layout's artifact, pull one into a layout.

A small client of the OCI distribution API (stdlib only): `push_layout` sends the one manifest an
image layout's index.json points to, with its config and layers, and `pull_to_layout` fetches an
artifact by digest into a layout. `vdeploy push` is "bundle to a layout, push the layout" and
`vdeploy pull` is "pull into a layout, unbundle it", so this module knows nothing of locks or stores.

What it promises:
- The manifest keeps its digest: the layout's exact bytes are sent, and a pull checks the bytes
  it gets against the digest it asked for.
- A pulled blob is checked (size and sha256, while it streams) before it is renamed into
  blobs/sha256/; a failed pull leaves nothing it wrote behind.
- A blob the registry already has is not sent again (HEAD first).
- Credentials, read the way OCI tools read them (see `find_credentials`), go only to the registry
  (and its token service); never over plain HTTP except to loopback or when asked for
  (`plain_http=True`); and never into an error message, a result or a file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vdeploy.atomic import write_atomically
from vdeploy.errors import RegistryError
from vdeploy.hashing import sha256_file
from vdeploy.manifest import canonical_json
from vdeploy.store import _human

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
# An index is accepted too, so that a tag naming one resolves to its real digest (then is refused).
_ACCEPT_MANIFESTS = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_VERSION = "1.0.0"

# "user:password" for the registry a command names: for CI, where no one runs `docker login`.
AUTH_VARIABLE = "VDEPLOY_REGISTRY_AUTH"

# Blobs moved at once, each on its own connection (skopeo moves up to 6).
TRANSFER_JOBS = 4
BLOCK_SIZE = 1024 * 1024
TIMEOUT = 60.0
# Manifests are small; this bounds what a hostile registry can make vdeploy hold in memory.
MAX_MANIFEST_SIZE = 64 * 1024 * 1024
MAX_REDIRECTS = 5
# Digests named in one refusal; the rest are counted, so the line stays readable.
MAX_LISTED = 8
# A bearer token is renewed this long before it expires, so no request starts with a stale one.
TOKEN_MARGIN = 15.0

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[A-Za-z0-9=_-]+")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
_REFERENCE_FORM = "write REGISTRY[:PORT]/REPO[:TAG][@sha256:DIGEST], e.g. ghcr.io/org/model:v1"
# Docker Hub's names: what people write, where its API lives, and the key `docker login` uses.
_DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")
_DOCKER_HUB_API = "registry-1.docker.io"
_DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"


# ------------------------------------------------------------------------------------------------
# References


@dataclass(frozen=True)
class Reference:
    """REGISTRY[:PORT]/REPO[:TAG][@sha256:DIGEST], parsed; the registry is always named."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def host(self) -> str:
        """The host without port or IPv6 brackets."""
        return urllib.parse.urlsplit(f"//{self.registry}").hostname or self.registry

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def by_digest(self, digest: str) -> str:
        """The name a paper cites: REGISTRY/REPO@sha256:..."""
        return f"{self.name}@{digest}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def parse_reference(text: str) -> Reference:
    """Parse a registry reference; a malformed one is refused in one line saying the right form."""

    def refuse(why: str):
        raise RegistryError(f"malformed registry reference {text!r}: {why}; {_REFERENCE_FORM}")

    before, at, after = text.split("://", 1)[-1].partition("@")
    if at and ("/" not in before or "/" in after):
        # user:password@host/...: a password must not be echoed, so the reference is not either.
        raise RegistryError(
            f"malformed registry reference: it holds user credentials, which belong in `docker login` "
            f"or {AUTH_VARIABLE}; {_REFERENCE_FORM}"
        )
    if not text or text != text.strip() or any(ch.isspace() for ch in text):
        refuse("it is empty or holds spaces")
    if "://" in text:
        refuse("a reference has no scheme (for a registry without TLS, pass --plain-http)")
    name, _, digest = text.partition("@")
    if at:
        if not _ANY_DIGEST.fullmatch(digest):
            refuse(f"{digest!r} is not a digest")
        if not digest.startswith("sha256:"):
            refuse(f"digest algorithm {digest.split(':')[0]!r} is not supported, only sha256")
        if not _DIGEST.fullmatch(digest):
            refuse("a sha256 digest is 64 lowercase hex digits")
    registry, slash, rest = name.partition("/")
    if not slash or not rest:
        refuse("it names no registry (vdeploy has no default registry)")
    if not ("." in registry or ":" in registry or registry == "localhost" or registry.startswith("[")):
        refuse(f"{registry!r} is not a registry host (no '.' or ':PORT'), and vdeploy has no default registry")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, _, tag = rest.rpartition(":")
        if not _TAG.fullmatch(tag):
            refuse(f"{tag!r} is not a tag (letters, digits, _ . -, at most 128, not starting with . or -)")
    if not _registry_is_valid(registry):
        refuse(f"{registry!r} is not a registry host[:port]")
    components = rest.split("/")
    if not all(_PATH_COMPONENT.fullmatch(part) for part in components):
        refuse(f"{rest!r} is not a repository (lowercase letters, digits and . _ - between /)")
    if len(f"{registry}/{rest}") > 255:
        refuse("the name is longer than 255 characters")
    return Reference(registry=registry, repository=rest, tag=tag, digest=digest or None)


def _registry_is_valid(registry: str) -> bool:
    host, port = registry, None
    if registry.startswith("["):
        inside, bracket, after = registry[1:].partition("]")
        if not bracket:
            return False
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            return False
        if after:
            if not after.startswith(":"):
                return False
            port = after[1:]
    else:
        host, colon, port = registry.partition(":")
        if not colon:
            port = None
        if not _DOMAIN.fullmatch(host):
            return False
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        return False
    return True


# ------------------------------------------------------------------------------------------------
# Credentials


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or token) for one registry, and where they were found."""

    username: str
    password: str = field(repr=False)
    source: str

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def secrets(self) -> list[str]:
        """Every form of the password that could end up in text: it, and the Basic header's value."""
        return [self.password, self.basic().split(" ", 1)[1]]


def find_credentials(registry: str, environ: Mapping[str, str]) -> Credentials | None:
    """The credentials OCI tools would use for this registry, or None for anonymous access.

    In order: $VDEPLOY_REGISTRY_AUTH ("user:password", for CI); then the first auth file with an
    entry for the registry: $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json (podman,
    skopeo), $XDG_CONFIG_HOME/containers/auth.json, $DOCKER_CONFIG/config.json or
    ~/.docker/config.json. An entry is `auths[host].auth` (base64 user:password) or
    username/password, or a credential helper (`credHelpers[host]`, else `credsStore`) run as
    `docker-credential-NAME get`. Identity tokens (OAuth2 refresh tokens) are not supported.
    """
    value = environ.get(AUTH_VARIABLE)
    if value:
        user, colon, password = value.partition(":")
        if not colon or not user or not password:
            raise RegistryError(f"{AUTH_VARIABLE} must be user:password (for a token: any user name, the token as password)")
        return Credentials(user, password, AUTH_VARIABLE)
    for path in _auth_files(environ):
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            raise RegistryError(f"cannot read the registry credentials in {path}: {_reason(exc)}; fix or remove it") from None
        if not isinstance(config, dict):
            raise RegistryError(f"{path} is not a JSON object; fix or remove it")
        found = _credentials_in(config, path, registry, environ)
        if found is not None:
            return found
    return None


def _auth_files(environ: Mapping[str, str]) -> list[Path]:
    home = Path(environ.get("HOME") or os.path.expanduser("~"))
    files = []
    if environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(environ["REGISTRY_AUTH_FILE"]))
    if environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    files.append(Path(environ.get("XDG_CONFIG_HOME") or home / ".config") / "containers" / "auth.json")
    files.append(Path(environ.get("DOCKER_CONFIG") or home / ".docker") / "config.json")
    return files


def _auth_keys(registry: str) -> set[str]:
    """The names an auth file may file this registry under."""
    if registry in _DOCKER_HUB:
        return {*_DOCKER_HUB, _DOCKER_HUB_AUTH_KEY}
    return {registry}


def _normalise_auth_key(key: str) -> str:
    """`https://host:port/v1/` and `host:port` name the same registry in an auth file."""
    if key == _DOCKER_HUB_AUTH_KEY:
        return key
    if "://" in key:
        key = urllib.parse.urlsplit(key).netloc
    return key.split("/", 1)[0]


def _credentials_in(config: dict, path: Path, registry: str, environ: Mapping[str, str]) -> Credentials | None:
    keys = _auth_keys(registry)
    helpers = config.get("credHelpers") or {}
    for key, helper in helpers.items() if isinstance(helpers, dict) else ():
        if _normalise_auth_key(key) in keys:
            return _from_helper(str(helper), registry, path, environ)
    auths = config.get("auths") or {}
    for key, entry in auths.items() if isinstance(auths, dict) else ():
        if _normalise_auth_key(key) not in keys or not isinstance(entry, dict):
            continue
        if entry.get("identitytoken"):
            raise RegistryError(
                f"{path} holds an identity token for {registry}, which vdeploy does not support; "
                f"set {AUTH_VARIABLE}=user:password (or a token as password) instead"
            )
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError, TypeError):
                decoded = ""
            user, colon, password = decoded.partition(":")
            if not colon or not user:
                raise RegistryError(f"{path}: auths[{key!r}].auth is not base64 of user:password; run `docker login {registry}` again")
            return Credentials(user, password, str(path))
        if entry.get("username") and entry.get("password"):
            return Credentials(str(entry["username"]), str(entry["password"]), str(path))
    if config.get("credsStore"):
        return _from_helper(str(config["credsStore"]), registry, path, environ)
    return None


def _from_helper(helper: str, registry: str, path: Path, environ: Mapping[str, str]) -> Credentials | None:
    """Ask a docker credential helper (`docker-credential-NAME get`, server URL on stdin)."""
    program = f"docker-credential-{helper}"
    server = _DOCKER_HUB_AUTH_KEY if registry in _DOCKER_HUB else registry
    executable = shutil.which(program, path=environ.get("PATH"))
    if executable is None:
        raise RegistryError(
            f"{path} names the credential helper {program}, which is not on PATH; install it, "
            f"or set {AUTH_VARIABLE}=user:password"
        )
    try:
        done = subprocess.run(
            [executable, "get"], input=server, capture_output=True, text=True, timeout=60, env=dict(environ),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RegistryError(f"the credential helper {program} failed: {_reason(exc)}") from None
    if done.returncode != 0:
        # Helpers answer "credentials not found" with an error exit: anonymous access, as docker does.
        if "not found" in (done.stdout + done.stderr).lower():
            return None
        raise RegistryError(f"the credential helper {program} failed (exit {done.returncode}) for {registry}; run `docker login {registry}`")
    try:
        answer = json.loads(done.stdout)
        user, secret = str(answer["Username"]), str(answer["Secret"])
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"the credential helper {program} answered something that is not its JSON for {registry}") from None
    if user == "<token>":
        raise RegistryError(
            f"{program} holds an identity token for {registry}, which vdeploy does not support; "
            f"set {AUTH_VARIABLE}=user:password (or a token as password) instead"
        )
    return Credentials(user, secret, program)


# ------------------------------------------------------------------------------------------------
# Transport: which URLs may be contacted, and how


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: the only hosts plain HTTP goes to without being asked."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def base_url(reference: Reference, plain_http: bool | None) -> str:
    """The registry's API origin: HTTPS, or plain HTTP for loopback (plain_http None) or when asked (True)."""
    plain = plain_http if plain_http is not None else is_loopback(reference.host)
    netloc = _DOCKER_HUB_API if reference.registry in _DOCKER_HUB else reference.registry
    return f"{'http' if plain else 'https'}://{netloc}"


def url_problem(url: str, plain_http: bool | None) -> str | None:
    """Why vdeploy will not contact this URL (registry, token service, redirect, upload location), or None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{_safe_url(url)} is not an http(s) URL"
    if parts.scheme == "http":
        allowed = plain_http if plain_http is not None else is_loopback(parts.hostname)
        if not allowed:
            return (
                f"{_safe_url(url)} is plain HTTP to a host that is not loopback; vdeploy uses HTTPS there "
                f"(pass --plain-http only for a registry you trust on a network you trust)"
            )
    return None


def _safe_url(url: str) -> str:
    """A URL for a message: no user info, no query (a token service's query may carry anything)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _origin(url: str) -> tuple[str, str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


def _reason(exc: BaseException) -> str:
    return " ".join((getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).split())


def _summary(status: int, body: bytes) -> str:
    """An HTTP error answer in a few words: the distribution API's error codes, else the text."""
    parts = []
    try:
        errors = json.loads(body).get("errors") or []
        for error in errors[:3]:
            text = f"{error.get('code', '')}: {error.get('message', '')}".strip(": ")
            detail = error.get("detail")
            if isinstance(detail, str) and detail:
                text += f" ({detail})"
            parts.append(text)
    except (ValueError, AttributeError, TypeError):
        pass
    if not parts:
        text = re.sub(r"<[^>]*>", " ", body[:2048].decode("utf-8", "replace"))
        parts = [text] if text.strip() else []
    said = " ".join("; ".join(parts).split())
    if len(said) > 200:
        said = said[:197] + "..."
    return f"HTTP {status}" + (f" {said}" if said else "")


class _Stopped(Exception):
    """Another transfer failed; this one gives up quietly."""


class _FileBody:
    """length bytes of a file from offset, hashed as they are sent onto the same running sha256."""

    def __init__(self, path: Path, offset: int, length: int, hashed_so_far) -> None:
        self.path, self.offset, self.length = path, offset, length
        self.start = hashed_so_far
        self.hash = hashed_so_far.copy()

    def send(self, conn: http.client.HTTPConnection, stop: threading.Event | None) -> None:
        self.hash = self.start.copy()  # a re-send (after a 401) starts over
        buffer = bytearray(min(BLOCK_SIZE, max(self.length, 1)))
        view = memoryview(buffer)
        left = self.length
        with open(self.path, "rb", buffering=0) as stream:
            stream.seek(self.offset)
            while left:
                if stop is not None and stop.is_set():
                    raise _Stopped()
                count = stream.readinto(view[: min(len(buffer), left)])
                if not count:
                    raise _ShortFile(self.path)
                self.hash.update(view[:count])
                conn.send(view[:count])
                left -= count


class _ShortFile(Exception):
    def __init__(self, path: Path) -> None:
        self.path = path


class _Session:
    """Connections to one registry (one per thread, kept alive), its authentication, its errors."""

    def __init__(
        self, reference: Reference, actions: str, plain_http: bool | None, environ: Mapping[str, str], timeout: float,
    ) -> None:
        self.reference = reference
        self.where = reference.name
        self.plain_http = plain_http
        self.environ = environ
        self.timeout = timeout
        self.base = base_url(reference, plain_http)
        self.origin = _origin(self.base)
        self.scopes = {f"repository:{reference.repository}:{actions}"}
        self._local = threading.local()
        self._opened: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._authorization: str | None = None
        self._bearer: tuple[str, str | None, float] | None = None  # realm, service, expiry
        self._credentials: Credentials | None | bool = False  # False: not looked up yet
        self._secrets: set[str] = set()
        self._tls = ssl.create_default_context()

    # -- errors ----------------------------------------------------------------------------------

    def error(self, message: str) -> RegistryError:
        """A one-line RegistryError naming the registry and repository, with every secret removed."""
        text = " ".join(f"{self.where}: {message}".split())
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret:
                text = text.replace(secret, "<redacted>")
        return RegistryError(text)

    # -- connections -----------------------------------------------------------------------------

    def _connection(self, origin: tuple[str, str, int]) -> tuple[http.client.HTTPConnection, bool]:
        connections = self._local.__dict__.setdefault("connections", {})
        if origin in connections:
            return connections[origin], True
        scheme, host, port = origin
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._tls, blocksize=BLOCK_SIZE)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout, blocksize=BLOCK_SIZE)
        connections[origin] = conn
        with self._lock:
            self._opened.append(conn)
        return conn, False

    def discard(self, origin: tuple[str, str, int]) -> None:
        """Close this thread's connection to origin (after an error or an unread answer)."""
        conn = self._local.__dict__.get("connections", {}).pop(origin, None)
        if conn is not None:
            conn.close()

    def drain(self, response: http.client.HTTPResponse, url: str, limit: int = 1024 * 1024) -> bytes:
        """Read an answer's body (up to limit); a connection left holding unread bytes is closed."""
        data = response.read(limit)
        if not response.isclosed():
            self.discard(_origin(url))
        return data

    def close(self) -> None:
        with self._lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()

    def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: _FileBody | bytes | None,
        stop: threading.Event | None = None,
    ) -> http.client.HTTPResponse:
        """One request on this thread's kept-alive connection; once more on a fresh one if the old one had closed."""
        problem = url_problem(url, self.plain_http)
        if problem:
            raise self.error(f"refused to contact {problem}")
        origin = _origin(url)
        parts = urllib.parse.urlsplit(url)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        for attempt in (1, 2):
            conn, reused = self._connection(origin)
            try:
                conn.putrequest(method, target, skip_accept_encoding=True)
                for name, value in headers.items():
                    conn.putheader(name, value)
                if isinstance(body, _FileBody):
                    conn.putheader("Content-Length", str(body.length))
                elif body is not None:
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders()
                if isinstance(body, _FileBody):
                    body.send(conn, stop)
                elif body:
                    conn.send(body)
                return conn.getresponse()
            except (_Stopped, _ShortFile):
                self.discard(origin)
                raise
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.discard(origin)
                if reused and attempt == 1:
                    continue  # the server closed an idle kept-alive connection
                raise self.error(f"{_safe_url(url)} closed the connection ({_reason(exc)}); try again") from None
            except ssl.SSLCertVerificationError as exc:
                self.discard(origin)
                raise self.error(
                    f"the TLS certificate of {origin[1]} is not trusted ({exc.verify_message}); add its CA to the "
                    f"system's trust store or point SSL_CERT_FILE at it"
                ) from None
            except ssl.SSLError as exc:
                self.discard(origin)
                raise self.error(
                    f"TLS with {origin[1]}:{origin[2]} failed ({exc.reason or _reason(exc)}); if that registry "
                    f"serves plain HTTP, pass --plain-http"
                ) from None
            except socket.gaierror:
                self.discard(origin)
                raise self.error(f"cannot resolve the host {origin[1]}; check the registry name") from None
            except (TimeoutError, socket.timeout):
                self.discard(origin)
                raise self.error(f"{_safe_url(url)} did not answer within {self.timeout:.0f} s; try again") from None
            except ConnectionRefusedError:
                self.discard(origin)
                raise self.error(
                    f"cannot connect to {origin[1]}:{origin[2]} (connection refused); is the registry running there?"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                self.discard(origin)
                raise self.error(f"talking to {_safe_url(url)} failed: {_reason(exc)}") from None
        raise AssertionError("unreachable")

    # -- authentication --------------------------------------------------------------------------

    def credentials(self) -> Credentials | None:
        """Looked up only when the registry asks, so nothing is read or sent to registries that do not."""
        with self._lock:
            if self._credentials is False:
                self._credentials = find_credentials(self.reference.registry, self.environ)
                if self._credentials is not None:
                    self._secrets.update(self._credentials.secrets())
            return self._credentials

    def _authorization_for(self, url: str) -> str | None:
        """The Authorization header for this URL: only the registry's own origin gets one."""
        if _origin(url) != self.origin:
            return None
        with self._lock:
            bearer = self._bearer
        if bearer is not None and time.monotonic() > bearer[2] - TOKEN_MARGIN:
            self._fetch_token(bearer[0], bearer[1], set())
        with self._lock:
            return self._authorization

    def _login_hint(self) -> str:
        return f"run `docker login {self.reference.registry}` or set {AUTH_VARIABLE}=user:password"

    def _authenticate(self, challenge: str, sent: str | None) -> None:
        """Answer a 401's WWW-Authenticate (Basic or Bearer); refuse if it would repeat what failed."""
        scheme, params = _parse_challenge(challenge)
        if scheme == "basic":
            credentials = self.credentials()
            if credentials is None:
                raise self.error(f"the registry asks for credentials; {self._login_hint()}")
            if sent == credentials.basic():
                raise self.error(f"the registry refused the credentials from {credentials.source}; {self._login_hint()}")
            with self._lock:
                self._authorization = credentials.basic()
        elif scheme == "bearer" and params.get("realm"):
            scopes = {params["scope"]} if params.get("scope") else set()
            if sent is not None and sent.startswith("Bearer ") and params.get("error") != "insufficient_scope":
                raise self._denied(401)
            self._fetch_token(params["realm"], params.get("service"), scopes)
        else:
            raise self.error(f"the registry asks for an authentication vdeploy does not speak ({challenge.split(' ')[0] or 'none'})")

    def _denied(self, status: int, summary: str = "") -> RegistryError:
        credentials = self.credentials()
        action = "push to" if any(scope.endswith("push") for scope in self.scopes) else "pull from"
        summary = summary or f"HTTP {status}"
        if credentials is None:
            return self.error(f"the registry does not let anonymous users {action} it ({summary}); {self._login_hint()}")
        if status == 401:
            return self.error(f"the registry refused the credentials from {credentials.source} ({summary}); {self._login_hint()}")
        return self.error(
            f"the registry does not let the credentials from {credentials.source} {action} it ({summary}); "
            f"check the user's permissions, or {self._login_hint()}"
        )

    def _fetch_token(self, realm: str, service: str | None, scopes: set[str]) -> None:
        """The token flow of the distribution spec: GET realm?service=&scope= (Basic if we have credentials)."""
        with self._lock:
            self.scopes |= scopes
            wanted = sorted(self.scopes)
        query = ([("service", service)] if service else []) + [("scope", scope) for scope in wanted]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        credentials = self.credentials()
        headers = {"Authorization": credentials.basic()} if credentials else {}
        response = self._send("GET", url, headers, None)
        body = self.drain(response, url)
        if response.status in (401, 403):
            if credentials is None:
                raise self.error(f"the registry's token service at {_safe_url(realm)} wants credentials; {self._login_hint()}")
            raise self.error(
                f"the token service at {_safe_url(realm)} refused the credentials from {credentials.source} "
                f"({_summary(response.status, body)}); {self._login_hint()}"
            )
        if response.status != 200:
            raise self.error(f"the token service at {_safe_url(realm)} answered {_summary(response.status, body)}")
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
            lifetime = float(answer.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise self.error(f"the token service at {_safe_url(realm)} answered without a token")
        with self._lock:
            self._secrets.add(token)
            self._authorization = f"Bearer {token}"
            self._bearer = (realm, service, time.monotonic() + max(lifetime, 2 * TOKEN_MARGIN))

    # -- requests --------------------------------------------------------------------------------

    def request(
        self, method: str, path_or_url: str, headers: Mapping[str, str] | None = None,
        body: _FileBody | bytes | None = None, stop: threading.Event | None = None, follow: bool = False,
    ) -> tuple[http.client.HTTPResponse, str]:
        """A request answered with authentication (and redirects when follow=True).

        Returns the response (its body unread) and the URL that answered. A 401 is answered once
        by authenticating and sending again; a body is a file part, re-read for the second send.
        """
        url = self.base + path_or_url if path_or_url.startswith("/") else path_or_url
        authenticated = False
        redirects = 0
        while True:
            sent = self._authorization_for(url)
            all_headers = {"User-Agent": "vdeploy", **(headers or {})}
            if sent:
                all_headers["Authorization"] = sent
            response = self._send(method, url, all_headers, body, stop)
            if response.status == 401 and _origin(url) == self.origin and not authenticated:
                challenge = response.getheader("WWW-Authenticate") or ""
                self.drain(response, url)
                self._authenticate(challenge, sent)
                authenticated = True
                continue
            if follow and response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                self.drain(response, url)
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise self.error(f"{_safe_url(url)} redirected more than {MAX_REDIRECTS} times")
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            return response, url

    def call(
        self, method: str, path_or_url: str, expect: Iterable[int], what: str,
        headers: Mapping[str, str] | None = None, body: _FileBody | bytes | None = None,
        stop: threading.Event | None = None, limit: int = MAX_MANIFEST_SIZE,
    ) -> tuple[http.client.HTTPResponse, bytes, str]:
        """A request whose answer is read whole; any status not in expect is one line saying `what` failed."""
        response, url = self.request(method, path_or_url, headers, body, stop)
        data = self.drain(response, url, limit + 1)
        if len(data) > limit:
            raise self.error(f"{what}: the answer is larger than {_human(limit)}")
        if response.status not in expect:
            raise self.failed(what, response.status, data)
        return response, data, url

    def failed(self, what: str, status: int, body: bytes) -> RegistryError:
        summary = _summary(status, body)
        if status in (401, 403):
            return self._denied(status, summary)
        return self.error(f"{what} failed: {summary}")

    def ping(self) -> None:
        """GET /v2/: is this a registry, and does it want authentication? (answered before any upload)."""
        response, url = self.request("GET", "/v2/")
        body = self.drain(response, url)
        if response.status == 200:
            return
        if response.status == 404:
            raise self.error(f"{self.base} does not serve the OCI distribution API (GET /v2/ answered 404); check the registry's address")
        raise self.failed(f"GET {_safe_url(url)}", response.status, body)


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` → ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {key.lower(): value for key, value in re.findall(r'(\w+)\s*=\s*"([^"]*)"', rest)}
    for key, value in re.findall(r'(\w+)\s*=\s*([^",\s]+)', rest):
        params.setdefault(key.lower(), value)
    return scheme.lower(), params


# ------------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class Descriptor:
    """A blob as a manifest names it."""

    media_type: str
    digest: str
    size: int

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


@dataclass(frozen=True)
class _Artifact:
    """A manifest and what it names, read from a layout or a registry."""

    descriptor: Descriptor
    data: bytes
    artifact_type: str | None
    blobs: tuple[Descriptor, ...]  # config first, then layers, each digest once


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise RegistryError(f"{where} is not a descriptor object")
    digest, size, media_type = value.get("digest"), value.get("size"), value.get("mediaType")
    if not isinstance(digest, str) or not _ANY_DIGEST.fullmatch(digest):
        raise RegistryError(f"{where} has no valid digest")
    if not _DIGEST.fullmatch(digest):
        raise RegistryError(f"{where} uses digest {digest.split(':')[0]}, and vdeploy handles sha256 only")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(f"{where} has no valid size")
    return Descriptor(media_type if isinstance(media_type, str) else "", digest, size)


def _artifact(descriptor: Descriptor, data: bytes, where: str) -> _Artifact:
    """Parse an image manifest's bytes (already checked against the descriptor); an index is refused."""
    try:
        manifest = json.loads(data)
    except ValueError:
        raise RegistryError(f"{where}: the manifest {descriptor.digest} is not JSON") from None
    if not isinstance(manifest, dict):
        raise RegistryError(f"{where}: the manifest {descriptor.digest} is not a JSON object")
    media_type = manifest.get("mediaType") or descriptor.media_type
    if media_type in INDEX_TYPES or "manifests" in manifest:
        raise RegistryError(
            f"{where}: {descriptor.digest} is an image index (several manifests), not one artifact; name the artifact's own digest"
        )
    if manifest.get("schemaVersion") != 2 or not isinstance(manifest.get("layers"), list):
        raise RegistryError(f"{where}: {descriptor.digest} is not an OCI image manifest (schemaVersion 2 with layers)")
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(f"{where}: {descriptor.digest} has media type {media_type!r}, not an image manifest")
    named = [_descriptor(manifest.get("config"), f"{where}: the config of {descriptor.digest}")]
    named += [_descriptor(layer, f"{where}: layer {i} of {descriptor.digest}") for i, layer in enumerate(manifest["layers"])]
    unique = {blob.digest: blob for blob in reversed(named)}
    blobs = tuple(dict.fromkeys(blob.digest for blob in named))
    for blob in named:
        if blob.size != unique[blob.digest].size:
            raise RegistryError(f"{where}: {descriptor.digest} gives {blob.digest} two sizes")
    artifact_type = manifest.get("artifactType")
    return _Artifact(
        Descriptor(media_type, descriptor.digest, descriptor.size), data,
        artifact_type if isinstance(artifact_type, str) else None, tuple(unique[d] for d in blobs),
    )


def _blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise RegistryError(f"{path.parent} is not an OCI image layout (no {path.name}); make one with `vdeploy bundle`") from None
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path}: cannot read {what}: {_reason(exc)}") from None


def _check_layout_version(layout: Path) -> None:
    marker = _read_json(layout / "oci-layout", "the layout marker")
    if not isinstance(marker, dict) or marker.get("imageLayoutVersion") != LAYOUT_VERSION:
        raise RegistryError(f"{layout / 'oci-layout'}: not an OCI image layout version {LAYOUT_VERSION}")


def read_layout_artifact(layout: Path, ref_name: str | None = None) -> _Artifact:
    """The manifest index.json points to (the one named ref_name when there are several), checked."""
    _check_layout_version(layout)
    index = _read_json(layout / "index.json", "the index")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise RegistryError(f"{layout / 'index.json'} names no manifest; make the layout with `vdeploy bundle`")
    names = [(m.get("annotations") or {}).get(REF_NAME) if isinstance(m, dict) else None for m in manifests]
    if ref_name is not None:
        chosen = [m for m, name in zip(manifests, names) if name == ref_name]
        if not chosen:
            raise RegistryError(f"{layout / 'index.json'} has no manifest named {ref_name!r} (it has: {', '.join(map(str, names))})")
    else:
        chosen = manifests
    if len(chosen) > 1:
        raise RegistryError(
            f"{layout / 'index.json'} names {len(chosen)} manifests ({', '.join(map(str, names))}); say which one to push"
        )
    descriptor = _descriptor(chosen[0], f"{layout / 'index.json'}")
    path = _blob_path(layout, descriptor.digest)
    try:
        with open(path, "rb") as stream:
            data = stream.read(min(descriptor.size, MAX_MANIFEST_SIZE) + 1)
    except FileNotFoundError:
        raise RegistryError(f"{layout}: the manifest blob {descriptor.digest} is missing; the layout is incomplete") from None
    except OSError as exc:
        raise RegistryError(f"{path}: {_reason(exc)}") from None
    if len(data) != descriptor.size or hashlib.sha256(data).hexdigest() != descriptor.hex:
        raise RegistryError(f"{layout}: the manifest blob {descriptor.digest} does not match its digest; the layout is damaged")
    return _artifact(descriptor, data, str(layout))


def _present_blobs(layout: Path, blobs: Iterable[Descriptor]) -> dict[str, Path]:
    """The blobs this layout holds (a split volume may hold some); a wrong size is refused."""
    present = {}
    for blob in blobs:
        path = _blob_path(layout, blob.digest)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        if not path.is_file() or size != blob.size:
            raise RegistryError(f"{path} has {size} bytes where the manifest says {blob.size}; the layout is damaged")
        present[blob.digest] = path
    return present


# ------------------------------------------------------------------------------------------------
# Push


@dataclass(frozen=True)
class Pushed:
    """What a push did: the digest reference, and how many blobs were sent or already there."""

    reference: str
    digest: str
    tag: str | None
    uploaded: int
    uploaded_bytes: int
    already_there: int

    def to_json(self) -> dict[str, object]:
        return {
            "reference": self.reference, "digest": self.digest, "tag": self.tag,
            "uploaded": self.uploaded, "uploaded_bytes": self.uploaded_bytes, "already_there": self.already_there,
        }


def _quiet(_: str) -> None:
    return None


def push_layout(
    layout_dir: str | os.PathLike[str],
    reference: str | Reference,
    *,
    ref_name: str | None = None,
    plain_http: bool | None = None,
    chunk_size: int | None = None,
    environ: Mapping[str, str] | None = None,
    say: Callable[[str], None] = _quiet,
    timeout: float = TIMEOUT,
    jobs: int = TRANSFER_JOBS,
) -> Pushed:
    """Push the layout's manifest, and every blob it names that the registry lacks, to REGISTRY/REPO[:TAG].

    The manifest's exact bytes are sent, so its digest is the layout's. A blob absent from the
    layout (a split volume) must already be in the registry's repository; if any is in neither,
    nothing is sent and the refusal lists them. Tagged when the reference has a tag, else pushed
    by digest. chunk_size sends blobs in parts of that many bytes (PATCH) instead of one PUT.
    """
    ref = parse_reference(reference) if isinstance(reference, str) else reference
    layout = Path(layout_dir)
    artifact = read_layout_artifact(layout, ref_name)
    if ref.digest and ref.digest != artifact.descriptor.digest:
        raise RegistryError(f"{ref}: the layout's manifest is {artifact.descriptor.digest}, not the digest named")
    present = _present_blobs(layout, artifact.blobs)
    session = _Session(ref, "pull,push", plain_http, os.environ if environ is None else environ, timeout)
    try:
        session.ping()
        in_registry = _run_jobs(artifact.blobs, lambda blob, stop: _blob_exists(session, blob), jobs)
        missing = [blob.digest for blob, there in zip(artifact.blobs, in_registry) if not there and blob.digest not in present]
        if missing:
            listed = ", ".join(missing[:MAX_LISTED]) + (f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else "")
            raise session.error(
                f"{len(missing)} blob(s) are neither in {layout} nor in the registry: {listed}; "
                f"push from a layout that holds them (all volumes of the bundle)"
            )
        to_send = [blob for blob, there in zip(artifact.blobs, in_registry) if not there]
        if not to_send:
            say(f"{ref.name}: all {len(artifact.blobs)} blob(s) already there")
        else:
            say(f"{ref.name}: sending {len(to_send)} blob(s), {_human(sum(b.size for b in to_send))}; "
                f"{len(artifact.blobs) - len(to_send)} already there")
        _run_jobs(to_send, lambda blob, stop: _upload(session, blob, present[blob.digest], chunk_size, stop), jobs)
        target = ref.tag or artifact.descriptor.digest
        response, _, _ = session.call(
            "PUT", f"/v2/{ref.repository}/manifests/{target}", (200, 201), f"putting the manifest as {target}",
            headers={"Content-Type": artifact.descriptor.media_type}, body=artifact.data,
        )
        answered = response.getheader("Docker-Content-Digest")
        if answered and answered != artifact.descriptor.digest:
            raise session.error(
                f"the registry stored the manifest as {answered}, not {artifact.descriptor.digest}; it rewrote the bytes"
            )
    finally:
        session.close()
    return Pushed(
        reference=ref.by_digest(artifact.descriptor.digest), digest=artifact.descriptor.digest, tag=ref.tag,
        uploaded=len(to_send), uploaded_bytes=sum(blob.size for blob in to_send),
        already_there=len(artifact.blobs) - len(to_send),
    )


def _run_jobs(blobs: Iterable[Descriptor], work: Callable, jobs: int) -> list:
    """work(blob, stop) for every blob on up to `jobs` threads, results in order; the first failure stops the rest."""
    blobs = list(blobs)
    stop = threading.Event()
    if len(blobs) <= 1 or jobs <= 1:
        return [work(blob, stop) for blob in blobs]
    results: dict[int, Any] = {}
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=min(jobs, len(blobs))) as pool:
        futures = {pool.submit(_in_thread, work, blob, stop): i for i, blob in enumerate(blobs)}
        for future in as_completed(futures):
            try:
                results[futures[future]] = future.result()
            except _Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001 - the first failure is re-raised below
                if failure is None:
                    failure = exc
                stop.set()
    if failure is not None:
        raise failure
    return [results[i] for i in range(len(blobs))]


def _in_thread(work: Callable, blob: Descriptor, stop: threading.Event):
    if stop.is_set():
        raise _Stopped()
    return work(blob, stop)


def _blob_exists(session: _Session, blob: Descriptor) -> bool:
    response, _, _ = session.call("HEAD", f"/v2/{session.reference.repository}/blobs/{blob.digest}", (200, 404), f"checking blob {blob.digest}")
    return response.status == 200


def _upload(session: _Session, blob: Descriptor, path: Path, chunk_size: int | None, stop: threading.Event) -> None:
    """POST an upload, then PUT the bytes with ?digest= (or PATCH them in parts, then PUT)."""
    repository = session.reference.repository
    what = f"uploading blob {blob.digest}"
    response, _, url = session.call("POST", f"/v2/{repository}/blobs/uploads/", (202,), what, body=b"", stop=stop)
    location = _location(session, response, url, what)
    running = hashlib.sha256()
    try:
        if chunk_size and blob.size > chunk_size:
            for offset in range(0, blob.size, chunk_size):
                part = _FileBody(path, offset, min(chunk_size, blob.size - offset), running)
                headers = {
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{offset + part.length - 1}",
                }
                response, _, url = session.call("PATCH", location, (202,), what, headers=headers, body=part, stop=stop)
                running = part.hash
                location = _location(session, response, url, what)
            part = _FileBody(path, blob.size, 0, running)
        else:
            part = _FileBody(path, 0, blob.size, running)
        separator = "&" if urllib.parse.urlsplit(location).query else "?"
        final = f"{location}{separator}digest={urllib.parse.quote(blob.digest)}"
        response, data, _ = _put_blob(session, final, part, stop)
    except _ShortFile:
        raise session.error(f"{path} became shorter while it was sent; is something writing to the layout?") from None
    if part.hash.hexdigest() != blob.hex:
        raise session.error(f"{path} does not hash to its name {blob.digest}; the layout is damaged, make it again") from None
    if response.status != 201:
        raise session.failed(what, response.status, data)


def _put_blob(session: _Session, url: str, part: _FileBody, stop: threading.Event):
    response, url = session.request("PUT", url, {"Content-Type": "application/octet-stream"}, part, stop)
    return response, session.drain(response, url), url


def _location(session: _Session, response: http.client.HTTPResponse, url: str, what: str) -> str:
    location = response.getheader("Location")
    if not location:
        raise session.error(f"{what}: the registry gave no upload location")
    return urllib.parse.urljoin(url, location)


# ------------------------------------------------------------------------------------------------
# Pull


@dataclass(frozen=True)
class Pulled:
    """What a pull did: the digest reference, where the layout is, how many blobs came or were kept."""

    reference: str
    digest: str
    tag: str | None
    layout: str
    fetched: int
    fetched_bytes: int
    already_there: int

    def to_json(self) -> dict[str, object]:
        return {
            "reference": self.reference, "digest": self.digest, "tag": self.tag, "layout": self.layout,
            "fetched": self.fetched, "fetched_bytes": self.fetched_bytes, "already_there": self.already_there,
        }


def pull_to_layout(
    reference: str | Reference,
    layout_dir: str | os.PathLike[str],
    *,
    plain_http: bool | None = None,
    environ: Mapping[str, str] | None = None,
    say: Callable[[str], None] = _quiet,
    timeout: float = TIMEOUT,
    jobs: int = TRANSFER_JOBS,
) -> Pulled:
    """Fetch an artifact by digest (a tag is resolved first, and said) into an OCI layout folder.

    The folder is new, empty, or a layout already (blobs it holds and that check out are kept).
    Every blob is checked, size and sha256 while it streams, before it is renamed into
    blobs/sha256/; index.json gains the manifest last, named by the tag. Any failure removes what
    this pull placed, so a refused pull leaves the folder as it found it.
    """
    ref = parse_reference(reference) if isinstance(reference, str) else reference
    if not ref.tag and not ref.digest:
        raise RegistryError(f"{ref}: name a tag or a digest to pull (REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:...)")
    layout = Path(layout_dir)
    existed = _check_pull_target(layout)
    session = _Session(ref, "pull", plain_http, os.environ if environ is None else environ, timeout)
    placed: list[Path] = []
    try:
        session.ping()
        digest = ref.digest or _resolve_tag(session, ref.tag)
        if not ref.digest:
            say(f"{ref.name}:{ref.tag} is {digest}")
        artifact = _fetch_manifest(session, digest)
        layout.mkdir(parents=True, exist_ok=True)
        (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".vdeploy-pull-", dir=layout))
        try:
            results = _run_jobs(
                artifact.blobs, lambda blob, stop: _fetch_blob(session, layout, staging, blob, stop, placed), jobs
            )
            manifest_path = _blob_path(layout, digest)
            if not (manifest_path.is_file() and sha256_file(manifest_path) == artifact.descriptor.hex):
                (staging / artifact.descriptor.hex).write_bytes(artifact.data)
                os.replace(staging / artifact.descriptor.hex, manifest_path)
                placed.append(manifest_path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _add_to_index(layout, artifact, ref.tag)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        if existed is None:
            shutil.rmtree(layout, ignore_errors=True)
        elif existed == "empty":
            for child in layout.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        raise
    finally:
        session.close()
    fetched = [blob for blob, path in zip(artifact.blobs, results) if path is not None]
    say(f"{ref.name}: fetched {len(fetched)} blob(s), {_human(sum(b.size for b in fetched))}; "
        f"{len(artifact.blobs) - len(fetched)} already in {layout}")
    return Pulled(
        reference=ref.by_digest(digest), digest=digest, tag=ref.tag, layout=str(layout),
        fetched=len(fetched), fetched_bytes=sum(blob.size for blob in fetched),
        already_there=len(artifact.blobs) - len(fetched),
    )


def _check_pull_target(layout: Path) -> str | None:
    """None if the folder does not exist, "empty", or "layout"; anything else is refused."""
    if not layout.exists():
        return None
    if not layout.is_dir():
        raise RegistryError(f"{layout} is not a folder; pull into a new or empty folder, or an OCI layout")
    if not any(layout.iterdir()):
        return "empty"
    if not (layout / "oci-layout").exists():
        raise RegistryError(f"{layout} is neither empty nor an OCI image layout; pull into a new or empty folder")
    _check_layout_version(layout)
    return "layout"


def _resolve_tag(session: _Session, tag: str) -> str:
    """A tag's manifest digest: the registry's Docker-Content-Digest, else the sha256 of the bytes."""
    path = f"/v2/{session.reference.repository}/manifests/{tag}"
    headers = {"Accept": _ACCEPT_MANIFESTS}
    response, _, _ = session.call("HEAD", path, (200, 404), f"resolving the tag {tag}", headers=headers)
    if response.status == 404:
        raise session.error(f"the repository has no tag {tag!r}; check the name, or pull by digest")
    digest = response.getheader("Docker-Content-Digest")
    if digest and _DIGEST.fullmatch(digest):
        return digest
    _, data, _ = session.call("GET", path, (200,), f"resolving the tag {tag}", headers=headers)
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _fetch_manifest(session: _Session, digest: str) -> _Artifact:
    path = f"/v2/{session.reference.repository}/manifests/{digest}"
    headers = {"Accept": _ACCEPT_MANIFESTS}
    response, data, _ = session.call("GET", path, (200, 404), f"fetching the manifest {digest}", headers=headers)
    if response.status == 404:
        raise session.error(f"the repository has no manifest {digest}; check the digest and the repository")
    if hashlib.sha256(data).hexdigest() != digest.split(":", 1)[1]:
        raise session.error(f"the manifest the registry sent for {digest} does not match that digest; nothing was written")
    media_type = (response.getheader("Content-Type") or "").split(";")[0].strip()
    return _artifact(Descriptor(media_type, digest, len(data)), data, session.where)


def _fetch_blob(
    session: _Session, layout: Path, staging: Path, blob: Descriptor, stop: threading.Event, placed: list[Path],
) -> Path | None:
    """Stream one blob into staging, checking size and sha256, then rename it into blobs/sha256/.

    Returns the path it placed (also added to `placed`, at once, for the clean-up of a failed
    pull), or None when the layout already held the right bytes.
    """
    target = _blob_path(layout, blob.digest)
    if target.is_file() and target.stat().st_size == blob.size and sha256_file(target) == blob.hex:
        return None
    response, url = session.request("GET", f"/v2/{session.reference.repository}/blobs/{blob.digest}", stop=stop, follow=True)
    origin = _origin(url)
    if response.status != 200:
        data = session.drain(response, url)
        if response.status == 404:
            raise session.error(f"the registry lacks blob {blob.digest}, which the manifest names; push the artifact again")
        raise session.failed(f"fetching blob {blob.digest}", response.status, data)
    announced = response.getheader("Content-Length")
    if announced is not None and announced.isdigit() and int(announced) != blob.size:
        session.discard(origin)
        raise session.error(f"the registry sends {announced} bytes for blob {blob.digest}, the manifest says {blob.size}; nothing was written")
    staged = staging / blob.hex
    digest = hashlib.sha256()
    received = 0
    buffer = bytearray(BLOCK_SIZE)
    view = memoryview(buffer)
    with open(staged, "wb") as out:
        while True:
            if stop.is_set():
                session.discard(origin)
                raise _Stopped()
            try:
                count = response.readinto(buffer)
            except (OSError, http.client.HTTPException) as exc:
                session.discard(origin)
                raise session.error(f"fetching blob {blob.digest} broke off ({_reason(exc)}); try again") from None
            if not count:
                break
            received += count
            if received > blob.size:
                break
            digest.update(view[:count])
            out.write(view[:count])
    if received != blob.size or digest.hexdigest() != blob.hex:
        session.discard(origin)
        got = f"{received} bytes" if received != blob.size else f"sha256:{digest.hexdigest()}"
        raise session.error(
            f"blob {blob.digest} from the registry does not match its digest (got {got}): the registry's copy is "
            f"corrupt; nothing was written. Push the artifact again, or ask the registry's admin to repair it"
        )
    os.replace(staged, target)
    placed.append(target)
    return target


def _add_to_index(layout: Path, artifact: _Artifact, tag: str | None) -> None:
    """Name the manifest in index.json (by the tag, replacing what the tag named), and write oci-layout."""
    marker = layout / "oci-layout"
    if not marker.exists():
        write_atomically(marker, canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))
    index_path = layout / "index.json"
    index = json.loads(index_path.read_bytes()) if index_path.exists() else {}
    if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
        raise RegistryError(f"{index_path} is not an image index; pull into a new or empty folder")
    entry: dict[str, Any] = {
        "mediaType": artifact.descriptor.media_type, "digest": artifact.descriptor.digest, "size": artifact.descriptor.size,
    }
    if artifact.artifact_type:
        entry["artifactType"] = artifact.artifact_type
    if tag:
        entry["annotations"] = {REF_NAME: tag}

    def replaced(old: Any) -> bool:
        name = (old.get("annotations") or {}).get(REF_NAME) if isinstance(old, dict) else None
        return name == tag if tag else (name is None and old.get("digest") == artifact.descriptor.digest)

    kept = [old for old in index.get("manifests", []) if not replaced(old)]
    index.update(schemaVersion=2, mediaType=OCI_INDEX, manifests=[*kept, entry])
    write_atomically(index_path, canonical_json(index))
