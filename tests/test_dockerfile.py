"""The production image, checked without Docker (no engine runs here): by reading the Dockerfile, and by
running what the image would run.

The Dockerfile's CMD is THE production command: `production_command()` parses it, and both this module
and tests/test_restart.py start exactly that (only the listen address changed). Its options live in
gunicorn.conf.py; `gunicorn_settings()` asks gunicorn itself (`--print-config`) what they resolve to, so
the tests read each value from where the service does. The HEALTHCHECK is run against real HTTP servers;
the files the image copies (as .dockerignore filters the build context) are copied to an empty folder and
must serve the API there on their own.
"""

import ast
import contextlib
import fnmatch
import functools
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest

import database
from tests.conftest import SECRET, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
README = REPO_ROOT / "README.md"
LOCK_FILE = "requirements.lock"
GUNICORN_CONFIG = "gunicorn.conf.py"

Auth = Callable[[str], dict[str, str]]

# Generous: several workers importing the app at once on a loaded two-core machine.
START_UP_SECONDS = 60
PROMPT_SECONDS = 15
# Kubernetes' default terminationGracePeriodSeconds (and ECS's stopTimeout): SIGKILL follows SIGTERM after it.
PLATFORM_KILL_SECONDS = 30
# The longest one statement can hold a request: the server's statement_timeout, or on a pooler (no
# statement_timeout there) the stall watchdog's deadline, its cancel's grace and one tick of its loop.
LONGEST_STATEMENT_SECONDS = (
    database.STATEMENT_TIMEOUT_MS / 1000 + database.STALL_MARGIN_SECONDS + database.CANCEL_GRACE_SECONDS + 0.5
)
# A worker's start-up holds its event loop, so gunicorn hears no heartbeat from it meanwhile: connecting
# (5 s at most) and waiting for another worker's migration lock (15 s at most) must fit in the timeout.
LONGEST_START_UP_WAIT_SECONDS = database.CONNECT_TIMEOUT_SECONDS + database.STATEMENT_TIMEOUT_MS / 1000
# What gunicorn logs when it had to end a worker by force: after graceful_timeout, or a missed heartbeat.
FORCED_STOP_MARKERS = ("SIGKILL", "WORKER TIMEOUT")
# Files the service reads at run time besides its modules.
RUNTIME_FILES = ["alembic.ini", "routes/__init__.py", "routes/tasks.py", "routes/health.py", "migrations/env.py"]


# --- Reading the Dockerfile ---------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword (upper case) and the rest of its (joined) lines."""

    keyword: str
    arguments: str


def dockerfile_instructions(text: str | None = None) -> list[Instruction]:
    """The Dockerfile's instructions in order, continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for line in (DOCKERFILE.read_text() if text is None else text).splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def instructions_named(keyword: str) -> list[Instruction]:
    """Every instruction with this keyword, in order."""
    return [instruction for instruction in dockerfile_instructions() if instruction.keyword == keyword]


def exec_form(arguments: str) -> list[str]:
    """An exec-form (JSON array of strings) command; the shell form is refused: its `sh -c` would be PID 1,
    and SIGTERM would never reach the service."""
    try:
        command = json.loads(arguments)
    except json.JSONDecodeError:
        pytest.fail(f"not the exec form (a JSON array): {arguments}", pytrace=False)
    assert isinstance(command, list) and command and all(isinstance(part, str) for part in command), arguments
    return command


def production_command() -> list[str]:
    """The Dockerfile's CMD: the production command, exactly as the image runs it."""
    commands = instructions_named("CMD")
    assert len(commands) == 1, "the Dockerfile must have exactly one CMD"
    return exec_form(commands[0].arguments)


def option_value(command: list[str], option: str) -> str:
    """The value of `option` in `command`, given as `--option value` or `--option=value`."""
    for position, part in enumerate(command):
        if part == option and position + 1 < len(command):
            return command[position + 1]
        if part.startswith(f"{option}="):
            return part.split("=", 1)[1]
    pytest.fail(f"{option} is not in the production command {command}", pytrace=False)


def gunicorn_settings(command: list[str]) -> dict[str, Any]:
    """Every setting gunicorn resolves for `command` (config file, environment and command line), by name.

    Asked of gunicorn itself, `--print-config`, in this repository with this process's environment, as
    the service would start; that also loads the app, which must succeed. Values are Python literals where
    they read as one (`['0.0.0.0:8000']`, `4`, `None`), the text otherwise (`uvicorn_worker.UvicornWorker`).
    """
    return dict(_resolved_gunicorn_settings(tuple(command)))


@functools.cache
def _resolved_gunicorn_settings(command: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    program, *arguments = command
    assert program == "gunicorn", f"the production command starts with {program!r}, not gunicorn"
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    with tempfile.TemporaryDirectory() as scratch:  # the app is loaded: give it a database of its own
        printed = subprocess.run(
            [sys.executable, "-m", "gunicorn", *arguments, "--print-config"],
            cwd=REPO_ROOT,
            env=environment | {"DATABASE_URL": f"sqlite:///{scratch}/todo.db"},
            capture_output=True,
            text=True,
            timeout=START_UP_SECONDS,
        )
    assert printed.returncode == 0, printed.stderr
    settings: list[tuple[str, Any]] = []
    for line in printed.stdout.splitlines():
        name, separator, text = line.partition(" = ")
        if not separator or not name.strip().isidentifier():
            continue
        try:
            value: Any = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        settings.append((name.strip(), value))
    assert {"bind", "workers", "graceful_timeout"} <= {name for name, _ in settings}, printed.stdout
    return tuple(settings)


def runnable_here(command: list[str], host: str, port: int) -> list[str]:
    """The production command as this machine runs it: with this virtualenv's Python, listening on `host:port`.

    gunicorn's command line wins over its config file, so `--bind` here replaces the configured address.
    """
    program, *arguments = command
    assert program == "gunicorn", f"the production command starts with {program!r}, not gunicorn"
    assert not [part for part in arguments if part in {"-b", "--bind"} or part.startswith(("-b=", "--bind="))], (
        "the address is gunicorn.conf.py's `bind`; given on the command line too, gunicorn would listen on both"
    )
    return [sys.executable, "-m", "gunicorn", *arguments, "--bind", f"{host}:{port}"]


def graceful_shutdown_seconds(command: list[str]) -> int:
    """How long the production command lets requests in flight finish after SIGTERM (gunicorn's graceful_timeout)."""
    return int(gunicorn_settings(command)["graceful_timeout"])


def worker_count(command: list[str]) -> int:
    """How many worker processes the production command starts."""
    return int(gunicorn_settings(command)["workers"])


def listening_port(command: list[str]) -> str:
    """The port the production command listens on (in the image), from its single bind address."""
    addresses = gunicorn_settings(command)["bind"]
    assert isinstance(addresses, list) and len(addresses) == 1, f"one address to listen on: {addresses}"
    _, separator, port = addresses[0].rpartition(":")
    assert separator and port.isdigit(), addresses
    return port


def assert_stopped_gracefully(output: str) -> None:
    """No traceback, and no worker that gunicorn had to kill (graceful_timeout passed, or a heartbeat missed)."""
    assert "Traceback" not in output, output[-4000:]
    assert not [marker for marker in FORCED_STOP_MARKERS if marker in output], output[-4000:]


def healthcheck_command() -> tuple[list[str], str]:
    """The HEALTHCHECK's exec-form command, and its options (`--interval=...` and so on)."""
    checks = instructions_named("HEALTHCHECK")
    assert len(checks) == 1, "the Dockerfile must have exactly one HEALTHCHECK"
    options, separator, command = checks[0].arguments.partition("CMD ")
    assert separator, f"HEALTHCHECK without CMD: {checks[0].arguments}"
    return exec_form(command), options


def copy_sources(instruction: Instruction) -> tuple[list[str], str]:
    """A COPY's source patterns (relative to the build context) and its destination."""
    parts = [part for part in shlex.split(instruction.arguments) if not part.startswith("--")]
    assert len(parts) >= 2, f"COPY {instruction.arguments}"
    return parts[:-1], parts[-1]


def readme_production_command() -> list[str]:
    """The first bash block of README.md's "Running in production" section, as the shell would split it."""
    text = README.read_text()
    assert "\n## Running in production" in text, "README.md has no 'Running in production' section"
    section = text.split("\n## Running in production", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block, "the 'Running in production' section has no ```bash block"
    return shlex.split(block.group(1).replace("\\\n", " "), comments=True)


# --- The build context --------------------------------------------------------------------------


def ignore_patterns() -> list[str]:
    """The patterns of .dockerignore."""
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "exceptions (!) are not supported by is_ignored()"
    return patterns


def is_ignored(relative_path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `relative_path` out of the build context, as far as these patterns go.

    A pattern matches the path or any folder above it (a matched folder goes with all it holds), and
    `**/` matches any number of folders, none included. fnmatch's `*` also crosses `/`, so this errs
    towards ignoring more, never less, than Docker: a file it keeps, Docker keeps too.
    """
    parts = PurePosixPath(relative_path).parts
    prefixes = ["/".join(parts[: depth + 1]) for depth in range(len(parts))]
    for pattern in patterns:
        forms = {pattern.strip("/"), pattern.strip("/").removeprefix("**/")}
        if any(fnmatch.fnmatchcase(prefix, form) for prefix in prefixes for form in forms):
            return True
    return False


def context_files(source: Path) -> list[Path]:
    """The files of the build context under `source` (a file or a folder), .dockerignore applied."""
    patterns = ignore_patterns()
    candidates = [source] if source.is_file() else sorted(path for path in source.rglob("*") if path.is_file())
    return [path for path in candidates if not is_ignored(path.relative_to(REPO_ROOT).as_posix(), patterns)]


def image_files() -> dict[str, Path]:
    """What the image's COPY instructions put in its WORKDIR: path there -> file in this repository."""
    workdirs = instructions_named("WORKDIR")
    assert len(workdirs) == 1, "one WORKDIR, set before the files are copied"
    workdir = PurePosixPath(workdirs[0].arguments)
    copied: dict[str, Path] = {}
    for instruction in instructions_named("COPY"):
        patterns, destination = copy_sources(instruction)
        target = PurePosixPath(destination)
        if target.is_absolute():
            target = target.relative_to(workdir)
        for pattern in patterns:
            matches = sorted(REPO_ROOT.glob(pattern))
            assert matches, f"COPY {pattern}: nothing in the repository matches"
            for source in matches:
                files = context_files(source)
                assert files, f"COPY {pattern}: {source.name} is left out of the build context by .dockerignore"
                for file in files:
                    if source.is_dir():  # a folder's contents go into the destination
                        inside = target / file.relative_to(source).as_posix()
                    elif destination.endswith("/"):  # files go into a destination folder
                        inside = target / file.name
                    else:  # one file, copied under the destination's name
                        inside = target
                    copied[inside.as_posix()] = file
    return copied


# --- Running it ---------------------------------------------------------------------------------


class ProductionService:
    """The production command (the Dockerfile's CMD), run here as a child process in a session of its own.

    Its master and workers write to one log file, read with `output()`. `environment` adds to (or replaces)
    the service's variables. Leaving the `with` block kills whatever is still running, so a failed test
    leaves no process behind.
    """

    def __init__(
        self,
        database_url: str,
        log_directory: Path,
        cwd: Path = REPO_ROOT,
        environment: dict[str, str] | None = None,
    ) -> None:
        self.command = production_command()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cwd = cwd
        self.environment = {"DATABASE_URL": database_url, "BETTER_AUTH_SECRET": SECRET, "LOG_LEVEL": "info"}
        self.environment |= environment or {}
        self.log_path = log_directory / f"service-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "ProductionService":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def output(self) -> str:
        """Everything the master and its workers wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, characters: int = 4000) -> str:
        """The end of `output()`, for a failure message."""
        return self.output()[-characters:]

    def start(self) -> None:
        """Run the command in the background; PYTHONPATH is dropped so only `cwd`'s modules are importable."""
        environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                runnable_here(self.command, "127.0.0.1", self.port),
                cwd=self.cwd,
                env=environment | self.environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own group: the cleanup can kill master and workers together
            )

    def wait_until_serving(self) -> None:
        """Every worker has finished its start-up, and /health answers 200."""
        assert self.process is not None
        workers = worker_count(self.command)
        deadline = time.monotonic() + START_UP_SECONDS
        with httpx.Client(base_url=self.url, timeout=PROMPT_SECONDS) as http:
            while True:
                assert self.process.poll() is None, f"exited ({self.process.returncode}):\n{self.tail()}"
                started = self.output().count("Application startup complete.")
                if started >= workers:
                    with contextlib.suppress(httpx.TransportError):
                        if http.get("/health").status_code == 200:
                            return
                assert time.monotonic() < deadline, f"{started} of {workers} workers up, or unhealthy:\n{self.tail()}"
                time.sleep(0.2)

    def terminate(self) -> None:
        """SIGTERM to the master process only, as `docker stop` and Kubernetes send it to PID 1."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, seconds: float) -> int:
        """The exit code, once the master has exited; fails after `seconds`."""
        assert self.process is not None
        try:
            return self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {seconds} s after SIGTERM:\n{self.tail()}", pytrace=False)


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, run here with this Python against 127.0.0.1:`port`."""
    command, _ = healthcheck_command()
    program, *arguments = command
    assert program in {"python", "python3"}
    address = f"127.0.0.1:{listening_port(production_command())}"
    assert sum(argument.count(address) for argument in arguments) == 1, f"the health check must ask {address}"
    arguments = [argument.replace(address, f"127.0.0.1:{port}") for argument in arguments]
    return subprocess.run([sys.executable, *arguments], capture_output=True, text=True, timeout=PROMPT_SECONDS)


class AnswersWith(http.server.BaseHTTPRequestHandler):
    """A real HTTP server's handler that answers every GET with `status` (a service whose database is down)."""

    status = 503

    def do_GET(self) -> None:
        """Answer with the configured status and a small JSON body."""
        body = b'{"status": "unhealthy", "database": "unreachable"}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        """Quiet: nothing to log in a test."""


@contextlib.contextmanager
def http_server_answering(status: int) -> Iterator[int]:
    """A real HTTP server in a thread answering `status` to everything; yields its port."""
    handler = type("Handler", (AnswersWith,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


# --- The image, read ----------------------------------------------------------------------------


def test_the_base_image_is_a_slim_python_311() -> None:
    stages = instructions_named("FROM")
    assert len(stages) == 1, "one stage: what is built is what runs"
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", stages[0].arguments)


def test_the_locked_dependencies_are_installed_with_hashes_before_the_apps_files_are_copied() -> None:
    instructions = dockerfile_instructions()
    lock_copied = next(i for i, ins in enumerate(instructions) if ins.keyword == "COPY" and LOCK_FILE in ins.arguments)
    installs = [
        i
        for i, ins in enumerate(instructions)
        if ins.keyword == "RUN" and re.search(rf"pip install .*-r {re.escape(LOCK_FILE)}\b", ins.arguments)
    ]
    assert len(installs) == 1, "one pip install of the lock"
    install = instructions[installs[0]].arguments
    assert "--require-hashes" in install.split() and "--no-cache-dir" in install.split(), install
    assert copy_sources(instructions[lock_copied])[0] == [LOCK_FILE], "the lock is copied alone, in its own layer"
    first_app_copy = min(
        i
        for i, ins in enumerate(instructions)
        if ins.keyword == "COPY" and any(p.endswith(".py") for p in copy_sources(ins)[0])
    )
    assert lock_copied < installs[0] < first_app_copy


def test_every_copied_path_exists_and_the_image_holds_every_module_and_runtime_file() -> None:
    copied = image_files()  # fails on a COPY source that matches nothing or that .dockerignore leaves out
    top_level_modules = sorted(path.name for path in REPO_ROOT.glob("*.py"))
    assert {"main.py", "settings.py", "database.py", "auth.py", "models.py", "schemas.py"} <= set(top_level_modules)
    missing = [name for name in [*top_level_modules, *RUNTIME_FILES] if name not in copied]
    assert not missing, f"not in the image: {missing}"
    revisions = sorted(path.name for path in (REPO_ROOT / "migrations" / "versions").glob("*.py"))
    assert revisions and all(f"migrations/versions/{name}" in copied for name in revisions)
    unwanted = [path for path in copied if "__pycache__" in path or path.startswith(("tests/", ".", "bench/"))]
    assert not unwanted, f"copied but not needed: {unwanted}"


def test_dockerignore_keeps_environments_caches_secrets_and_local_data_out_of_the_build_context() -> None:
    patterns = ignore_patterns()
    kept_out = [
        ".git/HEAD",
        ".venv/bin/python",
        ".ci-venv/bin/python",
        "tests/better_auth/node_modules/better-auth/package.json",
        "tests/browser/node_modules/playwright-core/package.json",
        "__pycache__/main.cpython-311.pyc",
        "routes/__pycache__/tasks.cpython-311.pyc",
        ".pytest_cache/README.md",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "todo.db",
        "todo.db-wal",
        ".env",
        "bench/results/run.json",
    ]
    assert [path for path in kept_out if not is_ignored(path, patterns)] == []
    needed = ["main.py", "routes/tasks.py", "migrations/env.py", "alembic.ini", LOCK_FILE, ".env.example"]
    assert [path for path in needed if is_ignored(path, patterns)] == []


def test_the_service_runs_as_a_numeric_non_root_user() -> None:
    instructions = dockerfile_instructions()
    command_at = next(i for i, ins in enumerate(instructions) if ins.keyword == "CMD")
    users = [(i, ins.arguments) for i, ins in enumerate(instructions) if ins.keyword == "USER"]
    assert users, "no USER: the service would run as root"
    at, user = users[-1]
    assert at < command_at
    uid, _, gid = user.partition(":")
    # A number, so Kubernetes' runAsNonRoot can check it; never 0.
    assert uid.isdigit() and int(uid) != 0 and (not gid or (gid.isdigit() and int(gid) != 0)), user
    assert not [ins for ins in instructions[at:] if ins.keyword == "RUN"], "RUN after USER runs as the service"


def test_the_production_command_is_gunicorn_with_uvicorn_workers_proxy_headers_and_a_bounded_graceful_stop() -> None:
    command = production_command()
    assert command[:2] == ["gunicorn", "main:app"]
    assert option_value(command, "--config") == GUNICORN_CONFIG and GUNICORN_CONFIG in image_files()
    settings = gunicorn_settings(command)
    assert settings["bind"] == ["0.0.0.0:8000"]
    assert listening_port(command) in {ins.arguments for ins in instructions_named("EXPOSE")}
    assert settings["worker_class"] == "uvicorn_worker.UvicornWorker"
    assert worker_count(command) > 1
    # uvicorn's workers believe X-Forwarded-* (proxy headers are on in uvicorn) from these addresses.
    assert settings["forwarded_allow_ips"] == ["*"]
    # Long enough for a statement in flight to end by itself, short enough to end before the platform's SIGKILL.
    assert LONGEST_STATEMENT_SECONDS < graceful_shutdown_seconds(command) < PLATFORM_KILL_SECONDS - 2
    # A worker's start-up, which sends no heartbeat, must not count as a hung worker.
    assert settings["timeout"] > LONGEST_START_UP_WAIT_SECONDS * 2
    assert settings["accesslog"] is None, "the service writes its own access line"
    assert settings["control_socket_disable"] is True
    assert [ins.arguments for ins in instructions_named("STOPSIGNAL")] in ([], ["SIGTERM"])


def test_the_healthcheck_asks_health_with_python_and_no_curl_or_wget() -> None:
    command, options = healthcheck_command()
    assert command[0] in {"python", "python3"} and command[1] == "-c"
    assert "/health" in command[2]
    text = " ".join([options, *command]).lower()
    assert "curl" not in text and "wget" not in text
    timeout = re.search(r"--timeout=(\d+)s", options)
    asked = re.search(r"timeout=(\d+)\)", command[2])
    assert timeout and asked and int(asked.group(1)) < int(timeout.group(1)), "the request must give up first"


def test_the_healthcheck_fails_on_any_answer_but_200_and_on_no_answer() -> None:
    with http_server_answering(503) as port:
        assert run_healthcheck(port).returncode != 0
    with http_server_answering(204) as port:
        assert run_healthcheck(port).returncode != 0
    assert run_healthcheck(free_port()).returncode != 0  # nothing listens there
    with http_server_answering(200) as port:
        result = run_healthcheck(port)
        assert result.returncode == 0, result.stderr


def test_the_readme_gives_the_dockerfiles_production_command() -> None:
    assert readme_production_command() == production_command()


# --- The image, run -----------------------------------------------------------------------------


def test_the_images_files_alone_serve_the_api_with_the_production_command(tmp_path: Path, auth: Auth) -> None:
    app_directory = tmp_path / "app"
    for inside, source in image_files().items():
        (app_directory / inside).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, app_directory / inside)
    # Only what was copied is importable there: this repository is not installed in the virtualenv.
    outside = subprocess.run([sys.executable, "-c", "import main"], cwd=tmp_path, capture_output=True, text=True)
    assert "No module named 'main'" in outside.stderr

    user_id = "image-user"
    with ProductionService(f"sqlite:///{tmp_path / 'todo.db'}", tmp_path, cwd=app_directory) as service:
        service.start()
        service.wait_until_serving()
        healthcheck = run_healthcheck(service.port)
        assert healthcheck.returncode == 0, healthcheck.stderr
        with httpx.Client(base_url=service.url, timeout=PROMPT_SECONDS) as http:
            # As a TLS-terminating load balancer forwards it: the URL it gets back is the public, https one.
            behind_proxy = auth(user_id) | {"X-Forwarded-Proto": "https"}
            created = http.post(f"/api/{user_id}/tasks", json={"title": "From the image"}, headers=behind_proxy)
            assert created.status_code == 201, created.text
            assert created.headers["location"].startswith("https://"), created.headers["location"]
            listed = http.get(f"/api/{user_id}/tasks", headers=auth(user_id))
            assert listed.status_code == 200 and listed.json() == [created.json()]
        service.terminate()
        assert service.wait(graceful_shutdown_seconds(service.command) + PROMPT_SECONDS) == 0, service.tail()
    assert_stopped_gracefully(service.output())


def health_checks_counted(url: str) -> float:
    """How many answered `GET /health` requests a scrape of `/metrics` counts (0 before the first)."""
    with httpx.Client(base_url=url, timeout=PROMPT_SECONDS) as http:
        scraped = http.get("/metrics").text
    counted = re.search(r'^todo_http_requests_total\{[^}]*route="/health"[^}]*\} (\S+)$', scraped, re.MULTILINE)
    return float(counted.group(1)) if counted else 0.0


def test_a_bad_setting_stops_the_production_command_with_its_one_line_before_any_worker_starts(
    tmp_path: Path,
) -> None:
    # Left to the workers, each would fail to import the app and gunicorn would restart it, forever.
    database_url = f"sqlite:///{tmp_path / 'todo.db'}"
    with ProductionService(database_url, tmp_path, environment={"LOG_FORMAT": "yaml"}) as service:
        service.start()
        exit_code = service.wait(PROMPT_SECONDS)
        output = service.output()
    assert exit_code != 0, output
    assert "Invalid configuration: LOG_FORMAT: Input should be 'text' or 'json'" in output, output
    assert "Booting worker" not in output and "Traceback" not in output, output


def test_with_log_format_json_every_line_of_the_master_and_its_workers_is_one_json_object(
    tmp_path: Path,
) -> None:
    database_url = f"sqlite:///{tmp_path / 'todo.db'}"
    with ProductionService(database_url, tmp_path, environment={"LOG_FORMAT": "json"}) as service:
        service.start()
        service.wait_until_serving()
        with httpx.Client(base_url=service.url, timeout=PROMPT_SECONDS) as http:
            assert http.get("/api/json-user/tasks").status_code == 401  # no token
        service.terminate()
        assert service.wait(graceful_shutdown_seconds(service.command) + PROMPT_SECONDS) == 0, service.tail()
        output = service.output()
    records = []
    for line in output.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}", pytrace=False)
    fields = {"time", "level", "logger", "message"}
    assert all(isinstance(record, dict) and fields <= record.keys() for record in records), records
    messages = [(record["logger"], record["message"]) for record in records]
    workers = worker_count(service.command)
    # The master's own records, each written once (one handler, however many loggers could pass it on).
    assert messages.count(("gunicorn.error", "Shutting down: Master")) == 1, messages
    assert len([m for m in messages if m[0] == "gunicorn.error" and m[1].startswith("Starting gunicorn")]) == 1
    assert len([m for m in messages if m[0] == "gunicorn.error" and m[1].startswith("Booting worker")]) == workers
    assert messages.count(("uvicorn.error", "Application startup complete.")) == workers, messages
    access = [record for record in records if record["logger"] == "todo.access" and record["path"] != "/health"]
    assert [(record["path"], record["status"]) for record in access] == [("/api/json-user/tasks", 401)], access
    assert_stopped_gracefully(output)


def test_with_metrics_on_the_workers_share_a_directory_of_the_masters_and_a_killed_workers_live_gauges_go(
    tmp_path: Path,
) -> None:
    temp_dir = tmp_path / "tmp"  # where the master makes the directory: its temp dir, here one of the test's
    temp_dir.mkdir()
    environment = {"METRICS_ENABLED": "true", "TMPDIR": str(temp_dir)}
    with ProductionService(f"sqlite:///{tmp_path / 'todo.db'}", tmp_path, environment=environment) as service:
        service.start()
        service.wait_until_serving()
        assert service.process is not None
        [directory] = temp_dir.glob("todo-metrics-*")
        # Named after this master (pid and start time): fresh for this start, unlike a fixed directory.
        assert directory.name.startswith(f"todo-metrics-{service.process.pid}-")
        worker_pids = {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", service.output())}
        assert len(worker_pids) == worker_count(service.command)
        live_gauge_files = {f"gauge_livesum_{pid}.db" for pid in worker_pids}
        # Every worker writes its values there, so a scrape, whichever worker answers it, sums them all.
        assert live_gauge_files <= {path.name for path in directory.iterdir()}
        counted_before = health_checks_counted(service.url)
        requests = 3 * len(worker_pids)
        for _ in range(requests):  # a connection each: any worker may take it
            with httpx.Client(base_url=service.url, timeout=PROMPT_SECONDS) as http:
                assert http.get("/health").status_code == 200
        assert health_checks_counted(service.url) == counted_before + requests

        # A killed worker cannot drop its own live gauges; the master's child_exit must. No scrape meanwhile:
        # a scrape would drop them too.
        killed = min(worker_pids)
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + PROMPT_SECONDS
        while (directory / f"gauge_livesum_{killed}.db").exists():
            assert time.monotonic() < deadline, f"the killed worker's live gauges are still there:\n{service.tail()}"
            time.sleep(0.1)
        service.terminate()
        assert service.wait(graceful_shutdown_seconds(service.command) + PROMPT_SECONDS) == 0, service.tail()
        assert "Traceback" not in service.output(), service.tail()
