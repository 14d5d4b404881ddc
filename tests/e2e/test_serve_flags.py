"""[serve] flags on the real vLLM (CPU build), each checked by what a client sees (issue 4).

One launch serves every flag that can share a server (the module's `served` fixture): api-key,
allowed-origins, HTTPS, enable-log-requests/outputs, served-model-name, max-model-len, a
[chat-template] with default-chat-template-kwargs, a separate [tokenizer] source, dtype,
max-num-seqs, enforce-eager, enable-auto-tool-choice with tool-call-parser, reasoning-parser.
The TLS refusals and the secret rules need no server. The "log flags not set" half lives in
test_up.py, whose servers run without them.
"""

from __future__ import annotations

import ast
import datetime
import http.client
import ipaddress
import json
import os
import secrets
import signal
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from engine_support import call, processes_in_group, processes_mentioning, start_up

from vdeploy.lockfile import Lock, loads_lock

ROOT = Path(__file__).resolve().parents[2]
MODEL_REPO = "serve-flags/model"
TOKENIZER_REPO = "serve-flags/tokenizer"
# The tokenizer repo holds the tiny model's tokenizer and its own chat template; the model repo
# holds none of them, so a server that answers /tokenize at all reads the [tokenizer] source.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# The key is read from a variable with a behaviour prefix (VLLM_) and no KEY/TOKEN in its name:
# redaction by name pattern alone would show it in `plan` and the run record.
KEY_VARIABLE = "VLLM_SERVING_AUTH"
KEY = "sk-serve-flags-" + secrets.token_hex(12)
AUTH = {"Authorization": f"Bearer {KEY}"}
# A secret the engine gets through [runtime] env by reference: read at `up`, never written or shown.
SECRET_VARIABLE = "SERVE_FLAGS_HF"
SECRET = "hf_serve_flags_" + secrets.token_hex(12)
ALLOWED_ORIGIN = "http://allowed.example"
MARKER = "VDEPLOY-TEMPLATE-MARK"
NAMES = ["tiny", "tiny-alias"]
MAX_MODEL_LEN = 128

MANIFEST = f"""[model]
repo = "{MODEL_REPO}"

[tokenizer]
repo = "{TOKENIZER_REPO}"

[chat-template]
file = "template.jinja"

[serve]
served-model-name = {json.dumps(NAMES)}
dtype = "float32"
max-model-len = {MAX_MODEL_LEN}
max-num-seqs = 3
enforce-eager = true
api-key = {{ env = "{KEY_VARIABLE}" }}
allowed-origins = ["{ALLOWED_ORIGIN}"]
ssl-keyfile = "tls/server.key"
ssl-certfile = "tls/server.crt"
enable-log-requests = true
enable-log-outputs = true
default-chat-template-kwargs = {{ thinking = true }}
enable-auto-tool-choice = true
tool-call-parser = "hermes"
reasoning-parser = "deepseek_r1"

[runtime]
seed = 0
# vLLM 0.32 logs a request's prompt text only at DEBUG (its outputs at INFO)
env = {{ VLLM_CPU_KVCACHE_SPACE = "1", VLLM_LOGGING_LEVEL = "DEBUG", HF_TOKEN = {{ env = "{SECRET_VARIABLE}" }} }}
"""


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repos(fake_hub, tiny_model) -> dict[str, str]:
    """The tiny model split in two repos: weights and config / tokenizer and its template."""
    files = {p.name: p.read_bytes() for p in sorted(tiny_model.iterdir())}
    return {
        MODEL_REPO: fake_hub.commit(MODEL_REPO, {k: v for k, v in files.items() if k not in TOKENIZER_FILES}),
        TOKENIZER_REPO: fake_hub.commit(TOKENIZER_REPO, {k: files[k] for k in TOKENIZER_FILES}),
    }


def write_tls(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (mode 600), in folder/tls/."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (folder / "tls").mkdir(exist_ok=True)
    cert_file, key_file = folder / "tls" / "server.crt", folder / "tls" / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    key_file.chmod(0o600)
    return cert_file, key_file


def write_template(folder: Path) -> None:
    """The tiny model's template with a marker after the BOS token: a template of our own."""
    original = (ROOT / "examples" / "tiny" / "chat_template.jinja").read_text()
    changed = original.replace("{{- bos_token -}}", "{{- bos_token + '" + MARKER + "' -}}")
    assert changed != original
    (folder / "template.jinja").write_text(changed)


@dataclass
class Served:
    project: object
    running: object
    context: ssl.SSLContext
    lock: Lock
    plan_text: str
    plan_json: str

    @property
    def url(self) -> str:
        return self.running.url

    def ask(self, path: str, body: dict | None = None, headers: dict[str, str] | None = None, auth: bool = True):
        return call(self.url, path, body, {**(AUTH if auth else {}), **(headers or {})}, context=self.context)

    def log_after(self, needle: str, timeout: float = 10) -> str:
        """The server log, once it holds needle (or after timeout)."""
        deadline = time.monotonic() + timeout
        while needle not in (text := self.running.output()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return text

    def run_records(self) -> list[Path]:
        return sorted((self.project.folder / ".vdeploy" / "runs").glob("*/record.json"))

    def last_run(self) -> dict:
        return json.loads(self.run_records()[-1].read_text())


@pytest.fixture(scope="module")
def served(make_project, repos):
    """One `vdeploy up` of the tiny model with every live-checked flag; stopped at the end."""
    project = make_project("serve-flags")
    cert_file, _ = write_tls(project.folder)
    write_template(project.folder)
    project.write_manifest(MANIFEST)
    project.run_vdeploy("lock")
    project.run_vdeploy("fetch")
    with_key = {KEY_VARIABLE: KEY, SECRET_VARIABLE: SECRET}
    _, plan_text, plan_err = project.run_vdeploy("plan", env=with_key)
    _, plan_json, _ = project.run_vdeploy("plan", "--json", env=with_key)
    context = ssl.create_default_context(cafile=str(cert_file))
    running = start_up(project, "--no-fetch", env=with_key, scheme="https")
    try:
        yield Served(project, running, context, loads_lock(project.lock.read_text()), plan_text + plan_err, plan_json)
    finally:
        running.stop()
        records = sorted((project.folder / ".vdeploy" / "runs").glob("*/record.json"))
        pid = json.loads(records[-1].read_text()).get("pid") if records else None
        for leftover in processes_in_group(pid) if pid else []:
            os.kill(leftover, signal.SIGKILL)  # only vLLM's own processes, started above


# ---- the live checks --------------------------------------------------------------------------


def test_api_key_is_required_and_the_right_key_is_accepted(served):
    assert served.ask("/v1/models", auth=False)[0] == 401
    assert served.ask("/v1/models", auth=False, headers={"Authorization": "Bearer sk-wrong"})[0] == 401
    status, models, _ = served.ask("/v1/models")
    assert status == 200, models


def test_api_key_is_in_no_command_line_lock_or_plan(served):
    running_from_store = processes_mentioning(str(served.project.store))
    assert running_from_store, "the scan must see the running vLLM processes"
    assert processes_mentioning(KEY) == [], "the API key is on a command line (visible in ps)"
    assert "--api-key" not in served.last_run()["argv"]
    lock_text = served.project.lock.read_text()
    assert KEY not in lock_text and f'env = "{KEY_VARIABLE}"' in lock_text
    for shown in (served.plan_text, served.plan_json):
        assert KEY not in shown
        assert f"env:{KEY_VARIABLE}" in shown  # named, never shown


def test_a_secret_in_runtime_env_reaches_the_engine_and_nothing_else(served):
    engine = processes_mentioning(str(served.project.store))
    environments = [Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in engine]
    assert any(f"HF_TOKEN={SECRET}".encode() in environment for environment in environments)
    assert processes_mentioning(SECRET) == []
    assert SECRET not in served.project.lock.read_text() and f'env = "{SECRET_VARIABLE}"' in served.project.lock.read_text()
    for shown in (served.plan_text, served.plan_json):
        assert SECRET not in shown and f"env:{SECRET_VARIABLE}" in shown


def test_allowed_origin_gets_the_cors_header_and_another_does_not(served):
    status, _, headers = served.ask("/v1/models", headers={"Origin": ALLOWED_ORIGIN})
    assert status == 200
    assert {k.lower(): v for k, v in headers.items()}.get("access-control-allow-origin") == ALLOWED_ORIGIN
    status, _, headers = served.ask("/v1/models", headers={"Origin": "http://other.example"})
    assert status == 200
    assert "access-control-allow-origin" not in {k.lower() for k in headers}


def test_the_server_speaks_https_with_the_test_certificate_only(served):
    assert served.url.startswith("https://")
    assert served.ask("/health", auth=False)[0] == 200
    with pytest.raises(urllib.error.URLError) as untrusted:
        urllib.request.urlopen(served.url + "/health", timeout=30, context=ssl.create_default_context())
    assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError)
    plain = "http://" + served.url.removeprefix("https://")
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
        urllib.request.urlopen(plain + "/health", timeout=30)


def test_served_model_names_are_listed_and_answer(served):
    status, models, _ = served.ask("/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == NAMES
    status, body, _ = served.ask("/v1/completions", {"model": "tiny-alias", "prompt": "Hello", "max_tokens": 2})
    assert status == 200, body
    assert served.ask("/v1/completions", {"model": "llama", "prompt": "Hello", "max_tokens": 2})[0] == 404


def test_max_model_len_refuses_a_longer_prompt(served):
    _, models, _ = served.ask("/v1/models")
    assert {m["max_model_len"] for m in models["data"]} == {MAX_MODEL_LEN}
    status, body, _ = served.ask("/v1/completions", {"model": "tiny", "prompt": "word " * 200, "max_tokens": 4})
    assert status == 400, body
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in body["error"]["message"]


def rendered_prompt(served, **extra) -> str:
    """The text the chat template makes of one user message, read back through the tokenizer."""
    status, tokens, _ = served.ask("/tokenize", {
        "model": "tiny", "messages": [{"role": "user", "content": "Hi there"}], **extra,
    })
    assert status == 200, tokens
    status, text, _ = served.ask("/detokenize", {"model": "tiny", "tokens": tokens["tokens"]})
    assert status == 200, text
    return text["prompt"]


def test_chat_template_file_and_its_default_kwargs_shape_the_prompt(served):
    prompt = rendered_prompt(served)
    assert MARKER in prompt  # our [chat-template], not the tokenizer repo's chat_template.jinja
    assert prompt.endswith("<|im_start|>assistant\n<think>")  # thinking = true by default
    unthinking = rendered_prompt(served, chat_template_kwargs={"thinking": False})
    assert MARKER in unthinking and unthinking.endswith("<|im_start|>assistant\n")  # a request may override


def test_the_tokenizer_comes_from_its_own_locked_source(served):
    lock = served.lock
    assert lock.tokenizer is not None and lock.tokenizer.repo == TOKENIZER_REPO
    assert {f.path for f in lock.tokenizer.files} == set(TOKENIZER_FILES)
    assert not {f.path for f in lock.model.files} & set(TOKENIZER_FILES)
    snapshot = served.project.store / f"models--{TOKENIZER_REPO.replace('/', '--')}" / "snapshots" / lock.tokenizer.commit
    assert f"--tokenizer {snapshot}" in served.plan_text
    argv = served.last_run()["argv"]
    assert argv[argv.index("--tokenizer") + 1] == str(snapshot)
    engine_line = config_line(served.running.output(), "Initializing a V1 LLM engine")
    assert f"tokenizer='{snapshot}'" in engine_line  # what the engine loaded
    assert served.ask("/tokenize", {"model": "tiny", "prompt": "Hello world"})[0] == 200


def config_line(log: str, start: str) -> str:
    found = [line for line in log.splitlines() if start in line]
    assert found, f"no log line with {start!r}"
    return found[0]


def test_dtype_max_num_seqs_and_enforce_eager_reach_the_engine(served):
    log = served.running.output()
    engine_line = config_line(log, "Initializing a V1 LLM engine")
    for shown in ("dtype=torch.float32", f"max_seq_len={MAX_MODEL_LEN}", "enforce_eager=True"):
        assert shown in engine_line
    args_line = config_line(log, "non-default args: ")
    args = ast.literal_eval(args_line.split("non-default args: ", 1)[1])
    assert args["dtype"] == "float32" and args["max_num_seqs"] == 3 and args["enforce_eager"] is True
    assert "api_key" not in args


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}


def test_auto_tool_choice_is_accepted(served):
    # Without --enable-auto-tool-choice and --tool-call-parser, vLLM 0.32 answers this with 400
    # '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'.
    status, body, _ = served.ask("/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER_TOOL], "tool_choice": "auto", "max_tokens": 8,
    })
    assert status == 200, body
    assert body["choices"][0]["message"]["role"] == "assistant"


def token_id(served, text: str) -> int:
    _, tokens, _ = served.ask("/tokenize", {"model": "tiny", "prompt": text, "add_special_tokens": False})
    assert len(tokens["tokens"]) == 1, tokens
    return tokens["tokens"][0]


def forced_chat(served, text: str, token: str, count: int = 3) -> dict:
    """A chat completion whose every output token is forced to token."""
    status, body, _ = served.ask("/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": count,
        "logit_bias": {str(token_id(served, token)): 100},
    })
    assert status == 200, body
    return body


def test_reasoning_parser_splits_reasoning_from_content(served):
    # deepseek_r1: text before </think> (or all of it, with none) is reasoning; without a
    # reasoning parser "HelloHelloHello" would be the message content.
    message = forced_chat(served, "Say hello", "Hello")["choices"][0]["message"]
    assert message.get("reasoning") == "HelloHelloHello" and message["content"] is None
    message = forced_chat(served, "Stop thinking", "</think>")["choices"][0]["message"]
    assert not message.get("reasoning") and message["content"] == "</think></think>"


def test_log_requests_and_outputs_show_the_prompt_and_the_answer(served):
    prompt = "serve-flags-prompt-" + secrets.token_hex(4)
    body = forced_chat(served, prompt, "</think>")
    log = served.log_after(f"Generated response {body['id']}")
    assert prompt in log  # enable-log-requests (at DEBUG): the prompt text
    assert f"Generated response {body['id']}: output: '</think></think>'" in log  # enable-log-outputs


def test_stopping_leaves_no_process_and_no_key_in_the_log_or_run_record(served):
    code = served.running.stop()
    run = served.last_run()
    assert code == run["exit_code"] == 143, served.running.output()[-3000:]
    assert processes_in_group(run["pid"]) == [], "vLLM processes outlived `vdeploy up`"
    assert processes_mentioning(str(served.project.store)) == [], "a process still runs from the store"
    log = served.running.output()
    assert "Generated response" in log and KEY not in log
    assert len(served.run_records()) == 1
    record = served.run_records()[0].read_text()
    assert KEY not in record and SECRET not in record and SECRET not in log
    assert run["env"]["VLLM_API_KEY"] == "<redacted>" and run["env"][KEY_VARIABLE] == "<redacted>"
    assert run["env"]["HF_TOKEN"] == "<redacted>"


# ---- refusals before launch (no server) -----------------------------------------------------


TLS_MANIFEST = f"""[model]
repo = "{MODEL_REPO}"

[tokenizer]
repo = "{TOKENIZER_REPO}"

[serve]
ssl-keyfile = "tls/server.key"
ssl-certfile = "tls/server.crt"
"""


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_tls_files_are_checked_before_launch(project, repos):
    cert_file, key_file = write_tls(project.folder)
    project.write_manifest(TLS_MANIFEST)
    project.run_vdeploy("lock")
    project.run_vdeploy("fetch")
    _, out, _ = project.run_vdeploy("up", "--dry-run")
    assert f"--ssl-keyfile {key_file}" in out and "https://" in out

    key_file.chmod(0o644)
    _, _, err = project.run_vdeploy("up", "--dry-run", expect=1)
    line = one_line(err)
    assert "[serve] ssl-keyfile" in line and "readable by other users" in line and "chmod 600" in line

    key_file.chmod(0o600)
    cert_file.unlink()
    _, _, err = project.run_vdeploy("up", "--dry-run", expect=1)
    line = one_line(err)
    assert "[serve] ssl-certfile" in line and str(cert_file) in line and "does not exist" in line


def test_api_key_takes_one_reference(project):
    # vLLM reads one key from VLLM_API_KEY: a second reference would be dropped without a word.
    project.write_manifest(f"""[model]
repo = "{MODEL_REPO}"

[serve]
api-key = [{{ env = "KEY_ONE" }}, {{ env = "KEY_TWO" }}]
""")
    _, _, err = project.run_vdeploy("lock", expect=1)
    line = one_line(err)
    assert "[serve] api-key" in line and "VLLM_API_KEY" in line and ":5:" in line
