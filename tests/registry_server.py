"""A real OCI registry for tests: Debian's `docker-registry` (the reference distribution server).

    with RegistryServer(tmp) as registry:            # 127.0.0.1:<free port>, storage under tmp
        registry.host                                  # "127.0.0.1:PORT"
        registry.requests()                            # [(method, path, status)] from its access log
        registry.blob_file("sha256:...")               # the stored bytes, to corrupt on purpose

Also: Basic auth with an htpasswd file (bcrypt from the system's libcrypt, no extra package), a
token service for the Bearer flow (RS256 JWTs the registry checks against a certificate), TLS
with a self-signed certificate, and a tiny stdlib OCI layout writer.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import datetime
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REGISTRY_BINARY = "docker-registry"
SERVICE = "vdeploy-test-registry"
ISSUER = "vdeploy-test-issuer"

MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
WEIGHT = "application/vnd.cncf.model.weight.v1.raw"


def registry_binary() -> str | None:
    return shutil.which(REGISTRY_BINARY)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# ------------------------------------------------------------------------------------------------
# The registry


@dataclass
class RegistryServer:
    """docker-registry serving on 127.0.0.1:<free port> with its storage in `folder`."""

    folder: Path
    auth: dict | None = None  # the config's `auth:` section
    tls: tuple[Path, Path] | None = None  # certificate, key
    public_host: str | None = None  # the config's http.host: the URL it builds locations from
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.folder / "storage"

    @property
    def log(self) -> Path:
        return self.folder / "registry.log"

    def config(self) -> dict:
        http = {"addr": self.host, "headers": {"X-Content-Type-Options": ["nosniff"]}}
        if self.tls:
            http["tls"] = {"certificate": str(self.tls[0]), "key": str(self.tls[1])}
        if self.public_host:
            http["host"] = self.public_host
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
            "http": http,
        }
        if self.auth:
            config["auth"] = self.auth
        return config

    def __enter__(self) -> "RegistryServer":
        self.folder.mkdir(parents=True, exist_ok=True)
        # JSON is YAML: no yaml package needed to write the registry's configuration.
        config = self.folder / "config.yml"
        config.write_text(json.dumps(self.config(), indent=1))
        binary = registry_binary()
        if binary is None:
            raise RuntimeError("docker-registry is not installed")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not listen on {self.host}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __exit__(self, *_) -> None:
        self.stop()

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request answered so far, from the registry's own log."""
        answered = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if str(entry.get("msg", "")).startswith("response completed"):
                path = urllib.parse.urlsplit(entry["http.request.uri"]).path
                answered.append((entry["http.request.method"], path, entry["http.response.status"]))
        return answered

    def blob_uploads(self, repository: str, since: int = 0) -> list[tuple[str, str, int]]:
        """Requests that sent blob bytes or opened an upload in this repository (after request number `since`)."""
        prefix = f"/v2/{repository}/blobs/uploads/"
        return [r for r in self.requests()[since:] if r[1].startswith(prefix) and r[0] in ("POST", "PUT", "PATCH")]

    def blob_file(self, digest: str) -> Path:
        hexdigest = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


class BlobRedirector:
    """A front for a registry whose blob downloads answer 307 to another origin, as registries on
    object storage (S3, a CDN) do; that origin serves the stored bytes and keeps the headers it got.

    Only GET and HEAD pass the front (for pulls); everything else is the registry's own answer.
    """

    def __init__(self, registry: RegistryServer) -> None:
        self.registry = registry
        self.blob_requests: list[dict[str, str]] = []
        self.front = ThreadingHTTPServer(("127.0.0.1", 0), self._front_handler())
        # Another loopback address: another origin, still plain HTTP without being asked.
        self.blobs = ThreadingHTTPServer(("127.0.0.2", 0), self._blob_handler())

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.front.server_address[1]}"

    def __enter__(self) -> "BlobRedirector":
        for server in (self.front, self.blobs):
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_) -> None:
        for server in (self.front, self.blobs):
            server.shutdown()
            server.server_close()

    def _front_handler(self):
        outer = self

        class Front(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def relay(self, method: str) -> None:
                import http.client

                conn = http.client.HTTPConnection("127.0.0.1", outer.registry.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                blob = re.fullmatch(r"/v2/.+/blobs/(sha256:[0-9a-f]{64})", self.path)
                # A blob download is checked by the registry (HEAD, with the caller's credentials) and redirected.
                conn.request("HEAD" if blob else method, self.path, headers=headers)
                answer = conn.getresponse()
                body = answer.read()
                if blob and method == "GET" and answer.status == 200:
                    self.send_response(307)
                    self.send_header("Location", f"http://127.0.0.2:{outer.blobs.server_address[1]}/b/{blob.group(1)}?sig=x")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding", "date", "server"):
                        self.send_header(key, value)
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                self.relay("GET")

            def do_HEAD(self) -> None:
                self.relay("HEAD")

        return Front

    def _blob_handler(self):
        outer = self

        class Blobs(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                outer.blob_requests.append(dict(self.headers.items()))
                data = outer.registry.blob_file(urllib.parse.urlsplit(self.path).path.rsplit("/", 1)[1]).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Blobs


# ------------------------------------------------------------------------------------------------
# Authentication


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for an htpasswd file, from the system's libcrypt (libxcrypt): no package needed."""
    name = ctypes.util.find_library("crypt")
    if name is None:
        raise RuntimeError("libcrypt is not available")
    lib = ctypes.CDLL(name)
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    salt = lib.crypt_gensalt(b"$2y$", 5, None, 0)
    hashed = lib.crypt(password.encode(), salt)
    if not hashed or not hashed.startswith(b"$2"):
        raise RuntimeError("libcrypt cannot make bcrypt hashes here")
    return hashed.decode()


def htpasswd_auth(folder: Path, users: dict[str, str]) -> dict:
    """The registry's `auth:` section for Basic auth with these users."""
    path = folder / "htpasswd"
    path.write_text("".join(f"{user}:{bcrypt_hash(password)}\n" for user, password in users.items()))
    return {"htpasswd": {"realm": "vdeploy-test", "path": str(path)}}


def self_signed(folder: Path, name: str, ip: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate (and its key) for `name` and the IP, valid for a day: for TLS and for signing tokens."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ))
    return cert_path, key_path


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The registry token service of the distribution spec: GET /token?service=&scope= with Basic auth.

    It grants every requested action to `users` (and nothing to anonymous callers unless
    anonymous=True), as a JWT signed RS256 with a key whose certificate the registry trusts.
    """

    def __init__(self, folder: Path, users: dict[str, str], anonymous: bool = False) -> None:
        self.folder = folder
        self.users = users
        self.anonymous = anonymous
        self.cert, self.key = self_signed(folder, "token-issuer")
        self.asked: list[dict] = []  # what each token request asked, without credentials
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def registry_auth(self, realm: str | None = None) -> dict:
        return {"token": {"realm": realm or self.realm, "service": SERVICE, "issuer": ISSUER, "rootcertbundle": str(self.cert)}}

    def __enter__(self) -> "TokenServer":
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.server.shutdown()
        self.server.server_close()

    def token(self, subject: str, scopes: list[str]) -> str:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding

        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64url(canonical(header))}.{_b64url(canonical(claims))}"
        signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def _handler(self):
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                user = None
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    name, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if service.users.get(name) != password:
                        return self._answer(401, {"details": "wrong user name or password"})
                    user = name
                service.asked.append({"user": user, "service": query.get("service"), "scope": query.get("scope", [])})
                if user is None and not service.anonymous:
                    return self._answer(401, {"details": "credentials needed"})
                token = service.token(user or "", query.get("scope", []) if user else [])
                self._answer(200, {"token": token, "access_token": token, "expires_in": 300})

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


# ------------------------------------------------------------------------------------------------
# A tiny OCI layout writer (stdlib): one artifact manifest, one raw layer per file


def write_layout(
    folder: Path, files: dict[str, bytes | Path], tag: str | None = "v1", omit: set[str] = frozenset(), name: str = "model",
) -> str:
    """Write an OCI image layout holding one ModelPack-style artifact of these files; return its digest.

    A file is given as its bytes, or as a Path to a file that is hard-linked in (large files).
    `omit` names files whose blobs are left out, as a split volume would.
    """
    blobs = folder / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    layers = []
    for path, data in sorted(files.items()):
        if isinstance(data, Path):
            with open(data, "rb") as stream:
                hexdigest, size = hashlib.file_digest(stream, "sha256").hexdigest(), data.stat().st_size
            if path not in omit and not (blobs / hexdigest).exists():
                os.link(data, blobs / hexdigest)
        else:
            hexdigest, size = hashlib.sha256(data).hexdigest(), len(data)
            if path not in omit:
                put(data)
        layers.append({
            "mediaType": WEIGHT, "digest": f"sha256:{hexdigest}", "size": size,
            "annotations": {"org.opencontainers.image.title": path, "org.cncf.model.filepath": path},
        })
    config = canonical({
        "descriptor": {"name": name},
        "config": {"format": "safetensors"},
        "modelfs": {"type": "layers", "diffIds": [layer["digest"] for layer in layers]},
    })
    manifest = canonical({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": MODEL_ARTIFACT,
        "config": {"mediaType": MODEL_CONFIG, "digest": put(config), "size": len(config)},
        "layers": layers,
    })
    digest = put(manifest)
    descriptor = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": len(manifest),
                  "artifactType": MODEL_ARTIFACT}
    if tag:
        descriptor["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (folder / "oci-layout").write_bytes(canonical({"imageLayoutVersion": "1.0.0"}))
    (folder / "index.json").write_bytes(canonical({"schemaVersion": 2, "manifests": [descriptor]}))
    return digest


def layout_manifest(folder: Path) -> dict:
    """The manifest a one-artifact layout's index.json points to."""
    [entry] = json.loads((folder / "index.json").read_text())["manifests"]
    return json.loads((folder / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_text())


def layout_blobs(folder: Path) -> dict[str, bytes]:
    """Every blob of a layout, by file name."""
    return {path.name: path.read_bytes() for path in (folder / "blobs" / "sha256").iterdir()}


def tree(folder: Path) -> list[str]:
    """Every path below folder, relative, sorted: to show that nothing appeared."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []
