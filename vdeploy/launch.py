"""Step 6 of the flow: check everything, then run the plan as vLLM and record the run.

The only module that starts processes. vLLM runs in its own process group, so stopping `up`
(Ctrl-C, SIGTERM) stops vLLM and every child it started.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vdeploy.atomic import write_atomically
from vdeploy.engine import find_launcher, installed_engine
from vdeploy.errors import LaunchError, StoreError
from vdeploy.lockfile import EngineInfo, Lock
from vdeploy.manifest import Manifest
from vdeploy.plan import PATH_FLAGS, Overrides, Plan, make_plan, redact
from vdeploy.store import Store, verify

STOP_GRACE_SECONDS = 20
HEALTH_POLL_SECONDS = 0.5


def ensure_store(manifest: Manifest, lock: Lock, store: Store, allow_fetch: bool, say: Callable[[str], None]) -> None:
    """Verify the store; fetch what is missing (verified) unless told not to."""
    from vdeploy.locking import fetch_locked

    report = verify(lock, store)
    if report.ok:
        return
    if not allow_fetch or report.extra:
        shown = "; ".join(report.problems()[:3])
        hint = "remove the extra files" if report.extra else "run `vdeploy fetch` (or drop --no-fetch)"
        raise StoreError(f"store {store.root} does not match the lock ({shown}); {hint}")
    say(f"store lacks {len(report.missing) + len(report.mismatched)} locked file(s); fetching")
    fetch_locked(manifest, lock, store, say)
    report = verify(lock, store)
    if not report.ok:
        raise StoreError(f"store {store.root} still fails verification: {'; '.join(report.problems()[:3])}")


def resolve_secrets(plan: Plan, caller_env: Mapping[str, str], folder: Path) -> dict[str, str]:
    values = {}
    for name, origin in plan.secrets.items():
        kind, where = origin.split(":", 1)
        if kind == "env":
            if not caller_env.get(where):
                raise LaunchError(f"[serve] api-key: environment variable {where} is not set; export it before `vdeploy up`")
            values[name] = caller_env[where]
        else:
            path = folder / Path(where).expanduser()
            try:
                values[name] = path.read_text().strip()
            except OSError as exc:
                raise LaunchError(f"[serve] api-key: cannot read {path} ({exc.strerror}); fix the file or the path") from None
    return values


def sampling_defaults(store: Store, lock: Lock) -> dict[str, Any]:
    """The request defaults the locked generation_config.json imposes on every request."""
    path = store.snapshot_dir(lock.model) / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
            "presence_penalty", "frequency_penalty", "max_new_tokens")
    return {k: config[k] for k in keys if k in config}


def engine_catalogue(lock: Lock, running: EngineInfo | None):
    """The flags of the engine that will run: the installed one (probed once, cached), else the
    locked one if its catalogue is cached, else None (then rendering goes by TOML types)."""
    from vdeploy.flags import load_catalogue

    if running is not None:
        return load_catalogue(running.spec)
    return load_catalogue(lock.engine.spec, build=False) if lock.engine else None


def installed_catalogue():
    """The installed engine's flag catalogue; a clear error where no engine is installed."""
    from vdeploy.flags import load_catalogue

    running = installed_engine()
    if running is None:
        raise LaunchError("no vLLM is installed here, so its flags cannot be read; install the engine (README: Install)")
    return load_catalogue(running.spec)


def plan_for(
    lock: Lock, store: Store, overrides: Overrides, caller_env: Mapping[str, str], base_dir: Path, catalogue
) -> Plan:
    """The plan, with [serve] rendered the way the given engine catalogue says (None: by TOML types)."""
    from vdeploy.flags import render_serve

    return make_plan(
        lock, store, find_launcher(), overrides, caller_env, base_dir,
        render_serve=lambda serve: render_serve(serve, catalogue),
    )


def check_tls_files(plan_serve: Mapping[str, Any], base_dir: Path) -> None:
    """TLS files must be readable when vLLM starts, and a private key private."""
    for key in PATH_FLAGS:
        if key not in plan_serve:
            continue
        path = base_dir / Path(str(plan_serve[key])).expanduser()
        if not path.is_file() or not os.access(path, os.R_OK):
            raise LaunchError(f"[serve] {key}: {path} does not exist or cannot be read; fix the path")
        if key == "ssl-keyfile" and path.stat().st_mode & 0o077:
            raise LaunchError(f"[serve] ssl-keyfile: {path} is readable by other users; run `chmod 600 {path}`")


# ---- the run -----------------------------------------------------------------------------


@dataclass
class RunRecord:
    path: Path
    data: dict[str, Any]

    def save(self) -> None:
        write_atomically(self.path, (json.dumps(self.data, indent=2, sort_keys=True) + "\n").encode())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def start_record(manifest: Manifest, plan: Plan, env: Mapping[str, str], engine: EngineInfo, drift: str | None, pure: bool) -> RunRecord:
    import platform
    import socket

    started = datetime.now(timezone.utc)
    name = f"{started.strftime('%Y%m%dT%H%M%S%fZ')}-{plan.deployment[:12]}.json"
    secrets = plan.secret_variables
    recorded_env = {k: ("<redacted>" if k in secrets else v) for k, v in redact(env).items()
                    if k in plan.env or k in plan.inherited or k in secrets}
    record = RunRecord(
        path=manifest.folder / ".vdeploy" / "runs" / name,
        data={
            "deployment": plan.deployment,
            "manifest": str(manifest.path),
            "argv": list(plan.argv),
            "env": recorded_env,
            "inherited": redact(plan.inherited),
            "pure": pure,
            "engine": {
                "distribution": engine.distribution, "version": engine.version,
                "torch": engine.torch, "transformers": engine.transformers,
                "huggingface_hub": engine.huggingface_hub,
            },
            "engine_drift": drift,
            "python": platform.python_version(),
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "accelerator": accelerator_info(env),
            "url": plan.url,
            "served_model_name": plan.served_model_name,
            "started": started.isoformat(timespec="milliseconds"),
            "ready": None,
            "stopped": None,
            "exit_code": None,
        },
    )
    record.save()
    return record


def accelerator_info(env: Mapping[str, str]) -> dict[str, Any]:
    import platform
    import shutil
    import subprocess

    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        info["cuda_visible_devices"] = env["CUDA_VISIBLE_DEVICES"]
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            info["gpus"] = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def wait_healthy(plan: Plan, process: Any, timeout: float) -> bool:
    """Poll /health until it answers 200, the process dies, or the timeout passes."""
    import ssl
    import time
    import urllib.error
    import urllib.request

    context = None
    if plan.url.startswith("https"):
        # A probe of the server we just started, often with a self-signed certificate.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{plan.url}/health", timeout=2, context=context) as answer:
                if answer.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(HEALTH_POLL_SECONDS)
    return False


def stop_group(process: Any, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM the engine's process group, then SIGKILL whatever is left after the grace period."""
    import signal
    import subprocess

    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_plan(
    manifest: Manifest,
    plan: Plan,
    env: dict[str, str],
    engine: EngineInfo,
    drift: str | None,
    pure: bool,
    health_timeout: float,
    say: Callable[[str], None],
) -> int:
    """Start vLLM, wait for health, forward stop signals, record the run; vLLM's exit code."""
    import signal
    import subprocess

    record = start_record(manifest, plan, env, engine, drift, pure)
    process = subprocess.Popen(list(plan.argv), env=env, start_new_session=True)
    record.data["pid"] = process.pid  # also the engine's process group id
    record.save()
    stopping = {"signal": None}

    def forward(signum: int, _frame: Any) -> None:
        stopping["signal"] = signum
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if wait_healthy(plan, process, health_timeout):
            record.data["ready"] = _now()
            record.save()
            say(f"ready: {plan.url}/v1 serving {plan.served_model_name!r} (deployment {plan.deployment[:16]}); Ctrl-C stops it")
        elif process.poll() is None and stopping["signal"] is None:
            say(f"vLLM did not answer {plan.url}/health within {health_timeout:.0f} s; stopping it")
            stop_group(process)
        elif stopping["signal"] is None:
            say(f"vLLM exited with code {process.returncode} before it was ready; its log is above")
        while process.poll() is None:
            try:
                process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                if stopping["signal"] is not None:
                    stop_group(process)
    finally:
        stop_group(process, grace=5)  # children that outlive the engine's main process
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        code = process.returncode if process.returncode is not None else 1
        if code < 0:
            code = 128 - code
        record.data["stopped"] = _now()
        record.data["exit_code"] = code
        record.data["stopped_by"] = signal.Signals(stopping["signal"]).name if stopping["signal"] else None
        record.save()
    return code


def list_runs(manifest: Manifest) -> list[dict[str, Any]]:
    folder = manifest.folder / ".vdeploy" / "runs"
    runs = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        data["record"] = str(path)
        runs.append(data)
    return runs
