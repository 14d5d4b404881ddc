"""Step 6 of the flow: run a prepared deployment as vLLM, supervise it, and record the run.

The only module that starts the engine. `up` (in the foreground or `--detach`ed) and `run`
share one supervisor, `Supervision`:

- the port is checked before anything starts, and whoever holds it is named;
- vLLM runs in its own session and process group, its output in the run folder's engine.log;
- vLLM dies with its supervisor however the supervisor ends (processes.py: the parent-death
  signal and the watchdog);
- ready means /health answers 200 *and* the socket listening on the port belongs to the
  engine's process group, so another server on the port never passes for this vLLM;
- a stop request (SIGINT, SIGTERM, SIGHUP) is acted on within a poll at any moment: the group
  gets SIGTERM, processes.STOP_GRACE_SECONDS, then SIGKILL;
- exit codes: 128 + the signal after a stop request (130, 143, 129), the engine's own code when
  it ends by itself (128 + N when a signal N ended it), 1 when it never became ready in time,
  and for `run`, CMD's code; the record always says the same and is completed, even when the
  launch fails at Popen.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vdeploy import procfs
from vdeploy.constants import LOCK_NAME, REDACTED
from vdeploy.errors import LaunchError
from vdeploy.plan import Plan, redact
from vdeploy.prepare import Prepared
from vdeploy.processes import (
    POLL_SECONDS,
    LogFollower,
    StopRequests,
    Tee,
    Watchdog,
    arm_parent_death,
    die_with_parent,
    exit_status,
    foreground_terminal,
    stop_groups,
    take_terminal,
)
from vdeploy.records import (
    STOP_REQUEST,
    SUPERVISOR_LOG,
    CommandRecord,
    RunRecord,
    is_live,
    list_records,
    new_run_id,
    now,
    register_live,
    registered_records,
    runs_dir,
    unregister_live,
)
from vdeploy.status import answers_health

HEALTH_POLL_SECONDS = 0.25
RUN_PORT_FLOOR = 20000  # `run`'s own ports: above the well-known and registered ones in common use
STARTUP_LOG_BYTES = 4 << 20  # vLLM says what it chose before it answers; request logs come later


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


def start_record(
    prepared: Prepared, env: Mapping[str, str], pure: bool, kind: str = "up",
    command: CommandRecord | None = None, detached: bool = False,
) -> RunRecord:
    """The run's record, written (and listed machine-wide) before anything starts."""
    import platform
    import socket

    from vdeploy.hardware import read_hardware
    from vdeploy.nodes import node_facts

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
        hardware=read_hardware(env),
        node=node_facts(plan.argv),
        detached=detached,
        boot_id=procfs.boot_id(),
        command=command,
    )
    record.save()
    # The lock it ran beside the record, so the run stays comparable after the project relocks.
    shutil.copyfile(prepared.manifest.lock_path, record.folder / LOCK_NAME)
    register_live(record)
    return record


# ---- the port -----------------------------------------------------------------------------


def port_of(url: str) -> int | None:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).port
    except ValueError:
        return None


def check_port_free(plan: Plan, project: Path) -> None:
    """Refuse, naming the holder, a port that a live run (of any project here) or any process holds."""
    for record in {r.run_id: r for r in [*registered_records(), *list_records(project)]}.values():
        if not record.completed and port_of(record.url) == plan.port and is_live(record):
            raise LaunchError(
                f"port {plan.port} is taken by vdeploy {record.kind} {record.run_id} of {record.manifest} "
                f"(pid {record.supervisor_pid or record.pid}); stop it with `vdeploy down`, or pass --port"
            )
    holder = procfs.describe_holders(plan.port)
    if holder is None:
        holder = _bind_refusal(plan)
    if holder is not None:
        raise LaunchError(f"port {plan.port} is taken by {holder}; stop it, or pass --port (or set [serve] port)")


def _bind_refusal(plan: Plan) -> str | None:
    """Bind the port as vLLM will (SO_REUSEADDR, the host's family): why it fails, if it does."""
    import errno
    import socket

    host = plan.host or ""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, plan.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "a socket vdeploy cannot see (another network namespace or user?)"
            raise LaunchError(f"cannot listen on {host or '*'}:{plan.port} ({exc.strerror}); pick another --host or --port") from None
    return None


def free_loopback_port() -> int:
    """A port nothing holds now, for `run` when neither the manifest nor --port names one: taken at
    random below the kernel's ephemeral range, where no outgoing connection can be holding it by
    the time vLLM binds (as one may hold a port that bind(0) just handed out)."""
    import random
    import socket

    ranges = procfs.read_text("/sys/net/ipv4/ip_local_port_range") or ""
    low = int(ranges.split()[0]) if ranges.split() and ranges.split()[0].isdigit() else 32768
    candidates = range(RUN_PORT_FLOOR, low) if low - RUN_PORT_FLOOR >= 1000 else range(0)
    for port in random.sample(candidates, min(len(candidates), 64)):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))  # no SO_REUSEADDR: any socket on the port refuses it
            except OSError:
                continue
        if not procfs.listening_inodes(port):
            return port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- health -------------------------------------------------------------------------------


def group_listens_on(pgid: int, port: int) -> bool:
    """A process of the group holds the socket listening on the port. Where /proc cannot tell
    (no /proc/net), the answer on the port is taken as the engine's."""
    if not os.path.exists(f"{procfs.PROC}/net/tcp"):
        return True
    return bool(procfs.holders(procfs.listening_inodes(port), procfs.group_members(pgid)))


def poll_health(url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll url/health until it answers 200 (True), alive() turns False or the timeout passes
    (`vdeploy wait-healthy`, for the exported systemd units)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if answers_health(url):
            return True
        time.sleep(HEALTH_POLL_SECONDS)
    return False


# ---- the supervisor -----------------------------------------------------------------------


class Supervision:
    """One engine under supervision, from Popen to its completed record."""

    def __init__(self, record: RunRecord, plan: Plan, env: Mapping[str, str], stops: StopRequests,
                 say: Callable[[str], None]) -> None:
        self.record, self.plan, self.env, self.stops, self.say = record, plan, env, stops, say
        self.process: Any = None
        self.watchdog: Watchdog | None = None
        self.finished = False

    # -- start

    def start(self) -> None:
        """Start vLLM. A failure here still completes the record, then says why in one line."""
        import subprocess

        if self.stops.requested:
            self.finish(self.stop_code(), self.stopped_by(), "stopped before vLLM started")
            return
        record = self.record
        identity = procfs.identity(os.getpid())
        record.supervisor_pid, record.supervisor_start = os.getpid(), identity.start if identity else None
        try:
            with open(record.engine_log, "ab") as log:
                self.process = subprocess.Popen(
                    list(self.plan.argv), env=dict(self.env), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM),
                )
            record.pid = self.process.pid  # also the engine's process group
            started = procfs.identity(self.process.pid)
            record.pid_start = started.start if started else None
            record.save()
            self.watchdog = Watchdog.start(self.process.pid)
        except (OSError, subprocess.SubprocessError) as exc:
            reason = f"cannot start vLLM ({self.plan.argv[0]}): {getattr(exc, 'strerror', None) or exc}"
            self.finish(1, None, reason)
            raise LaunchError(f"{reason}; the run record is {record.path}") from None

    # -- waiting

    def engine_exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def wait_ready(self, timeout: float) -> bool:
        """True once this engine answers /health on its port (on a headless node, which serves
        nothing: once its engine has joined node 0); otherwise finishes the run and says why."""
        headless = "--headless" in self.plan.argv
        deadline = time.monotonic() + timeout
        while True:
            if self.finished:
                return False
            if self.stops.requested:
                self.finish(self.stop_code(), self.stopped_by(), "stopped before vLLM was ready")
                return False
            if self.engine_exited():
                code = exit_status(self.process.returncode)
                reason = f"vLLM exited with code {code} before it was ready"
                holder = procfs.describe_holders(self.plan.port)
                if holder:
                    reason += f" (port {self.plan.port} is held by {holder})"
                self.finish(code, "engine", reason)
                return False
            if time.monotonic() >= deadline:
                waited = "join node 0 (no worker started loading the model)" if headless else f"answer {self.plan.url}/health"
                self.finish(1, "timeout", f"vLLM did not {waited} within {timeout:.0f} s")
                return False
            if self.joined() if headless else (
                answers_health(self.plan.url) and group_listens_on(self.process.pid, self.plan.port)
            ):
                self.record.ready = now()
                self.record.effective = self.effective_values()
                self.record.save()
                return True
            self.stops.sleep(HEALTH_POLL_SECONDS)

    def wait_engine(self) -> None:
        """Until the engine exits or a stop request comes; then finishes the run."""
        while not self.stops.requested and not self.engine_exited():
            self.stops.sleep(POLL_SECONDS * 5)
        if self.stops.requested:
            self.finish(self.stop_code(), self.stopped_by(), None)
        else:
            code = exit_status(self.process.returncode)
            self.finish(code, "engine", f"vLLM exited with code {code}")

    def startup_log(self) -> str:
        try:
            with open(self.record.engine_log, "rb") as log:
                return log.read(STARTUP_LOG_BYTES).decode(errors="replace")
        except OSError:
            return ""

    def effective_values(self) -> dict[str, Any]:
        from vdeploy.enginelog import effective_values

        return effective_values(self.startup_log())

    def joined(self) -> bool:
        from vdeploy.enginelog import has_joined

        return has_joined(self.startup_log())

    # -- ending

    def stop_code(self) -> int:
        return 128 + (self.stops.signum or signal.SIGTERM)

    def stopped_by(self) -> str:
        requested = self.record.folder / STOP_REQUEST
        if requested.is_file():
            return requested.read_text(encoding="utf-8").strip() or "down"
        return signal.Signals(self.stops.signum or signal.SIGTERM).name

    def finish(self, code: int, stopped_by: str | None, reason: str | None,
               also: Sequence[tuple[int, Any]] = ()) -> int:
        """Stop the engine's group (and `also`'s groups), complete the record; the exit code."""
        if self.finished:
            return self.record.exit_code if self.record.exit_code is not None else code
        groups = [*also]
        if self.process is not None:
            groups.insert(0, (self.process.pid, self.process))
        if groups:
            stop_groups(groups, hurry=lambda: self.stops.count > 1)
        if self.watchdog is not None:
            self.watchdog.release()
        record = self.record
        if self.process is not None:
            record.engine_exit_code = exit_status(self.process.returncode) if self.process.returncode is not None else None
        if not record.ready and not record.effective:
            record.effective = self.effective_values()
        record.stopped = now()
        record.exit_code = code
        record.stopped_by = stopped_by
        record.reason = reason
        record.save()
        unregister_live(record)
        self.finished = True
        return code


# ---- up -----------------------------------------------------------------------------------


def launch_env(prepared: Prepared, pure: bool, caller_env: Mapping[str, str] | None) -> tuple[Mapping[str, str], dict[str, str]]:
    """What every launch starts from, once the port is known to be free: the caller's environment
    and the engine's."""
    caller_env = os.environ if caller_env is None else caller_env
    env = engine_env(prepared, caller_env, pure)
    if "--headless" not in prepared.plan.argv:  # a headless node listens on no HTTP port
        check_port_free(prepared.plan, prepared.manifest.folder)
    return caller_env, env


def ready_line(plan: Plan) -> str:
    from vdeploy.nodes import node_facts

    node = node_facts(plan.argv)
    if node is not None and node["headless"]:
        head = f"{node['master_addr']}" + (f":{node['master_port']}" if node["master_port"] else "")
        return f"joined: node {node['rank']} of {node['nodes']} (headless) works with node 0 at {head} (deployment {plan.deployment[:16]})"
    where = f" as node 0 of {node['nodes']}" if node is not None else ""
    return f"ready: {plan.url}/v1 serving {plan.served_model_name!r}{where} (deployment {plan.deployment[:16]})"


def launch(
    prepared: Prepared,
    pure: bool,
    health_timeout: float,
    say: Callable[[str], None],
    caller_env: Mapping[str, str] | None = None,
) -> int:
    """`vdeploy up` in the foreground: vLLM's log on stdout, until it exits or is stopped."""
    _, env = launch_env(prepared, pure, caller_env)
    with StopRequests() as stops:
        record = start_record(prepared, env, pure)
        session = Supervision(record, prepared.plan, env, stops, say)
        try:
            session.start()
            follower = LogFollower(record.engine_log, sys.stdout.buffer)
            follower.start()
            try:
                if session.wait_ready(health_timeout):
                    say(f"{ready_line(prepared.plan)}, run {record.run_id}; Ctrl-C stops it")
                    session.wait_engine()
            finally:
                follower.stop()
        finally:
            code = session.finish(1, None, "vdeploy itself failed; see its error")
    if record.reason and record.stopped_by in ("engine", "timeout"):
        say(f"{record.reason}; its log: {record.engine_log}")
    return code


def launch_detached(
    prepared: Prepared,
    pure: bool,
    health_timeout: float,
    say: Callable[[str], None],
    caller_env: Mapping[str, str] | None = None,
) -> int:
    """`vdeploy up --detach`: a supervisor of its own (a forked copy of this process, in a new
    session) starts vLLM and watches it as the foreground `up` would; this process returns once
    the engine is ready. Until then the supervisor dies with this process (a stop request here is
    passed on); after, it runs on until `vdeploy down` or the engine's own end."""
    _, env = launch_env(prepared, pure, caller_env)
    record = start_record(prepared, env, pure, detached=True)
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    try:
        child = os.fork()
    except OSError as exc:
        reason = f"cannot start a supervisor: {exc.strerror}"
        Supervision(record, prepared.plan, env, StopRequests(), say).finish(1, None, reason)
        raise LaunchError(f"{reason}; the run record is {record.path}") from None
    if child == 0:  # pragma: no cover - runs in the forked supervisor; its effects are tested
        os.close(read_end)
        _run_detached_supervisor(record, prepared.plan, env, health_timeout, write_end, parent)
    os.close(write_end)
    with StopRequests() as stops:
        answer = _wait_for_supervisor(read_end, child, stops)
    os.close(read_end)
    if answer == b"ready":
        say(f"{ready_line(prepared.plan)}, detached as run {record.run_id}; `vdeploy down {record.run_id}` stops it")
        return 0
    _, status = os.waitpid(child, 0)
    code = exit_status(-os.WTERMSIG(status)) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    from vdeploy.records import read_record

    ended = read_record(record.path)
    say(f"{ended.reason or 'the supervisor ended'}; its log: {record.engine_log}")
    return code


def _wait_for_supervisor(read_end: int, child: int, stops: StopRequests) -> bytes:
    """The supervisor's "ready", or b"" when it ended first; a stop request here is passed on."""
    import select

    passed_on = False
    answer = b""
    while True:
        if stops.requested and not passed_on:
            os.kill(child, stops.signum or signal.SIGTERM)
            passed_on = True
        readable, _, _ = select.select([read_end], [], [], POLL_SECONDS)
        if readable:
            chunk = os.read(read_end, 64)
            if not chunk:
                return answer
            answer += chunk
            if answer == b"ready":
                return answer


def _run_detached_supervisor(record: RunRecord, plan: Plan, env: Mapping[str, str], health_timeout: float,
                             ready_fd: int, parent: int) -> None:  # pragma: no cover - see launch_detached
    """The forked supervisor's life: never returns."""
    code = 1
    try:
        os.setsid()
        # Until ready, a detached start dies with the `up --detach` that asked for it.
        arm_parent_death(signal.SIGTERM, parent)
        with open(os.devnull, "rb") as null:
            os.dup2(null.fileno(), 0)
        with open(record.folder / SUPERVISOR_LOG, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)

        def say(line: str) -> None:
            print(f"{now()} {line}", file=sys.stderr, flush=True)

        with StopRequests() as stops:
            session = Supervision(record, plan, env, stops, say)
            try:
                session.start()
                if session.wait_ready(health_timeout):
                    arm_parent_death(0, parent)
                    os.write(ready_fd, b"ready")
                    os.close(ready_fd)
                    say(f"ready: run {record.run_id}")
                    session.wait_engine()
            finally:
                code = session.finish(1, None, "the detached supervisor failed; see supervisor.log")
            say(f"ended: exit {code}, stopped by {record.stopped_by}: {record.reason or ''}")
    except BaseException:  # noqa: BLE001 - everything goes to supervisor.log; the process must end here
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


# ---- run ----------------------------------------------------------------------------------


def command_env(prepared: Prepared, env: Mapping[str, str], caller_env: Mapping[str, str], record: RunRecord) -> dict[str, str]:
    """CMD's environment: the caller's, plus where the deployment answers and what it is."""
    from vdeploy.constants import API_KEY_VARIABLE

    plan = prepared.plan
    key = env.get(API_KEY_VARIABLE) if API_KEY_VARIABLE in plan.secrets else None
    return {
        **caller_env,
        "OPENAI_BASE_URL": f"{plan.url}/v1",
        "OPENAI_API_KEY": key or "EMPTY",
        "VDEPLOY_DEPLOYMENT": plan.deployment,
        "VDEPLOY_MODEL": plan.served_model_name,
        "VDEPLOY_RUN": str(record.folder),
    }


def run_command(
    prepared: Prepared,
    command: Sequence[str],
    pure: bool,
    health_timeout: float,
    say: Callable[[str], None],
    caller_env: Mapping[str, str] | None = None,
) -> int:
    """`vdeploy run -- CMD`: serve, run CMD against the server, stop the server; CMD's exit code."""
    caller_env, env = launch_env(prepared, pure, caller_env)
    with StopRequests() as stops:
        record = start_record(prepared, env, pure, kind="run",
                              command=CommandRecord(argv=list(command), cwd=os.getcwd()))
        session = Supervision(record, prepared.plan, env, stops, say)
        try:
            session.start()
            if session.wait_ready(health_timeout):
                say(f"{ready_line(prepared.plan)}, run {record.run_id}; running {shlex.join(command)}")
                _run_against(session, prepared, command, command_env(prepared, env, caller_env, record))
        finally:
            code = session.finish(1, None, "vdeploy itself failed; see its error")
    say(run_ending(record))
    return code


def serve_during(
    prepared: Prepared,
    work: Callable[[RunRecord], Any],
    doing: str,
    pure: bool,
    health_timeout: float,
    say: Callable[[str], None],
    caller_env: Mapping[str, str] | None = None,
    kind: str = "check",
) -> tuple[int, Any, RunRecord]:
    """Serve the deployment as `run` does, call work(record) once it is ready (in a thread, while
    the engine and stop requests are watched), then stop it: (exit code, work's value, record).
    An exception raised by work is raised here, after the engine is stopped and the record completed."""
    import threading

    caller_env, env = launch_env(prepared, pure, caller_env)
    outcome: dict[str, Any] = {}

    def call(record: RunRecord) -> None:
        try:
            outcome["value"] = work(record)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread below
            outcome["error"] = exc

    with StopRequests() as stops:
        record = start_record(prepared, env, pure, kind=kind)
        session = Supervision(record, prepared.plan, env, stops, say)
        try:
            session.start()
            if session.wait_ready(health_timeout):
                say(f"{ready_line(prepared.plan)}, run {record.run_id}; {doing}")
                thread = threading.Thread(target=call, args=(record,), name=f"vdeploy-{kind}", daemon=True)
                thread.start()
                while thread.is_alive() and not session.engine_exited() and not stops.requested:
                    thread.join(POLL_SECONDS / 2)
                if not thread.is_alive():
                    failed = "error" in outcome
                    session.finish(1 if failed else 0, kind, f"{kind} failed: {outcome['error']}" if failed else None)
                elif stops.requested:
                    session.finish(session.stop_code(), session.stopped_by(), None)
                else:
                    engine_code = exit_status(session.process.returncode)
                    session.finish(engine_code or 1, "engine", f"vLLM exited with code {engine_code} during {kind}")
        finally:
            code = session.finish(1, None, "vdeploy itself failed; see its error")
    if "error" in outcome and record.stopped_by == kind:
        raise outcome["error"]
    if record.stopped_by != kind:
        say(run_ending(record))
    return code, outcome.get("value"), record


def run_ending(record: RunRecord) -> str:
    """`run`'s last line: how the run ended, and where to look."""
    if record.stopped_by in ("engine", "timeout", None):
        return f"{record.reason}; vLLM's log: {record.engine_log}"
    if record.stopped_by == "command" and record.command is not None and record.command.exit_code is not None:
        return f"the command exited with code {record.command.exit_code}; vLLM stopped; record: {record.path}"
    return f"{record.reason or f'stopped by {record.stopped_by}'}; record: {record.path}"


def check_command(command: Sequence[str]) -> None:
    """CMD must be there before vLLM starts for it (a typo should not cost a minute of start-up)."""
    import shutil

    if shutil.which(command[0]) is None:
        where = "on the PATH" if os.sep not in command[0] else "there"
        raise LaunchError(f"{command[0]}: no executable of that name {where}; check the command after --")


def _run_against(session: Supervision, prepared: Prepared, command: Sequence[str], env: Mapping[str, str]) -> None:
    """Run CMD (its output live here and in command.log) until it, the engine or a stop request ends."""
    import subprocess

    record, stops = session.record, session.stops
    assert record.command is not None
    log_fd = os.open(record.command_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    # CMD runs in its own process group, so stopping it stops what it started; on a terminal that
    # group gets the terminal while CMD runs (Ctrl-C and reads reach CMD, as under a shell).
    terminal = foreground_terminal()
    try:
        try:
            process = subprocess.Popen(
                list(command), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                process_group=0, preexec_fn=die_with_parent(signal.SIGTERM, terminal),
            )
        except OSError as exc:
            code = 126 if isinstance(exc, PermissionError) else 127
            session.finish(code, "command", f"cannot run {command[0]!r}: {exc.strerror or exc}")
            return
        if terminal is not None:
            try:
                os.tcsetpgrp(terminal, process.pid)
            except OSError:
                pass
        record.command.pid, record.command.started = process.pid, now()
        record.save()
        if session.watchdog is not None:
            session.watchdog.tell(f"watch {process.pid}")
        tees = [Tee(process.stdout, sys.stdout.buffer, log_fd), Tee(process.stderr, sys.stderr.buffer, log_fd)]
        for tee in tees:
            tee.start()
        while process.poll() is None and not session.engine_exited() and not stops.requested:
            time.sleep(POLL_SECONDS / 2)
        record.command.stopped = now()  # when CMD ended, or was asked to
        if process.poll() is not None:
            code, stopped_by, reason = exit_status(process.returncode), "command", None
        elif stops.requested:
            code, stopped_by, reason = session.stop_code(), session.stopped_by(), None
        else:
            engine_code = exit_status(session.process.returncode)
            code, stopped_by = engine_code or 1, "engine"
            reason = f"vLLM exited with code {engine_code} while the command ran; the command was stopped"
        session.finish(code, stopped_by, reason, also=[(process.pid, process)])
        record.command.exit_code = exit_status(process.returncode) if process.returncode is not None else None
        record.save()
        for tee in tees:
            tee.join(timeout=5)
    finally:
        if terminal is not None:
            take_terminal(terminal)
        os.close(log_fd)
