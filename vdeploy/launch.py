"""Step 6 of the flow: run a prepared deployment as vLLM and record the run.

The only module that starts the engine. vLLM runs in its own process group, so stopping `up`
(Ctrl-C, SIGTERM) stops vLLM and every child it started.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vdeploy.constants import REDACTED
from vdeploy.errors import LaunchError
from vdeploy.plan import Plan, redact
from vdeploy.prepare import Prepared
from vdeploy.records import RunRecord, new_run_id, now, runs_dir

STOP_GRACE_SECONDS = 20
HEALTH_POLL_SECONDS = 0.5


def resolve_secrets(plan: Plan, caller_env: Mapping[str, str], folder: Path) -> dict[str, str]:
    """The secret values the engine gets in its environment, read from where the manifest names
    them: [serve] api-key (into VLLM_API_KEY) and [runtime] env references (into their NAME)."""
    from vdeploy.constants import API_KEY_VARIABLE
    from vdeploy.safety import argument_problem

    values = {}
    for name, origin in plan.secrets.items():
        label = "[serve] api-key" if name == API_KEY_VARIABLE else f"[runtime] env {name}"
        kind, where = origin.split(":", 1)
        if kind == "env":
            if not caller_env.get(where):
                raise LaunchError(f"{label}: environment variable {where} is not set; export it before `vdeploy up`")
            values[name] = caller_env[where]
        else:
            path = folder / Path(where).expanduser()
            try:
                values[name] = path.read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                why = getattr(exc, "strerror", None) or "not UTF-8 text"
                raise LaunchError(f"{label}: cannot read {path} ({why}); fix the file or the path") from None
        # Only what is wrong, never the value: it is a secret.
        problem = argument_problem(f"{name}={values[name]}")
        if problem:
            raise LaunchError(f"{label}: the value read from {kind} {where} {problem}")
    return values


def engine_env(prepared: Prepared, caller_env: Mapping[str, str], pure: bool) -> dict[str, str]:
    """The engine's whole environment: the caller's (less unpinned ones with --pure), the pinned
    variables, and the secrets."""
    secrets = resolve_secrets(prepared.plan, caller_env, prepared.manifest.folder)
    return prepared.plan.child_env(caller_env, pure, secrets)


def start_record(prepared: Prepared, env: Mapping[str, str], pure: bool, kind: str = "up") -> RunRecord:
    import platform
    import socket

    plan = prepared.plan
    secrets = plan.secret_variables
    recorded_env = {k: (REDACTED if k in secrets else v) for k, v in redact(env).items()
                    if k in plan.env or k in plan.inherited or k in secrets}
    engine = prepared.engine
    run_id = new_run_id(plan.deployment)
    record = RunRecord(
        folder=runs_dir(prepared.manifest.folder) / run_id,
        run_id=run_id,
        kind=kind,
        deployment=plan.deployment,
        manifest=str(prepared.manifest.path),
        argv=list(plan.argv),
        env=recorded_env,
        inherited=redact(plan.inherited),
        pure=pure,
        engine={} if engine is None else {
            "distribution": engine.distribution, "version": engine.version, "packages": dict(engine.packages),
        },
        engine_drift=[c.to_json() for c in prepared.drift],
        url=plan.url,
        served_model_name=plan.served_model_name,
        started=now(),
        python=platform.python_version(),
        host=socket.gethostname(),
        platform=platform.platform(),
        hardware=accelerator_info(env),
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
    return poll_health(plan.url, timeout, lambda: process.poll() is None)


def poll_health(url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll url/health until it answers 200 (True), alive() turns False or the timeout passes."""
    import ssl
    import time
    import urllib.error
    import urllib.request

    context = None
    if url.startswith("https"):
        # A probe of the server we just started, often with a self-signed certificate.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=2, context=context) as answer:
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


def launch(
    prepared: Prepared,
    pure: bool,
    health_timeout: float,
    say: Callable[[str], None],
    caller_env: Mapping[str, str] | None = None,
) -> int:
    """Start vLLM, wait for health, forward stop signals, record the run; vLLM's exit code."""
    import signal
    import subprocess

    caller_env = os.environ if caller_env is None else caller_env
    plan = prepared.plan
    env = engine_env(prepared, caller_env, pure)
    record = start_record(prepared, env, pure)
    process = subprocess.Popen(list(plan.argv), env=env, start_new_session=True)
    record.pid = process.pid  # also the engine's process group id
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
            record.ready = now()
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
        record.stopped = now()
        record.exit_code = code
        record.stopped_by = signal.Signals(stopping["signal"]).name if stopping["signal"] else None
        record.save()
    return code
