"""A real PgBouncer in transaction mode in front of the test PostgreSQL, as Neon's `-pooler` host runs it."""

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

PGBOUNCER_BINARY = Path("/usr/sbin/pgbouncer")
# Few server connections for many clients: session state that leaks between them shows at once.
DEFAULT_POOL_SIZE = 3
MAX_CLIENT_CONNECTIONS = 500
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
# PgBouncer refuses to run as root; it drops to this user, which must be able to read its files.
RUN_AS_USER = "postgres"


def in_ci() -> bool:
    """True when the CI environment variable is set (to anything but "", "0" or "false")."""
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false"}


def pgbouncer_missing() -> str | None:
    """Why PgBouncer cannot run here, or None when it can."""
    if not os.access(PGBOUNCER_BINARY, os.X_OK):
        return f"{PGBOUNCER_BINARY} is not installed (apt-get install pgbouncer)"
    return None


class PgBouncer:
    """PgBouncer as a child process on `port` of 127.0.0.1 (free), pooling in transaction mode.

    It serves every database of the PostgreSQL at `server_url` (host and port taken from it), trusts the
    user named there, and refuses the `options` startup parameter as Neon's pooler does. Its log is
    `log_path`. Use as a context manager: it accepts connections inside the block and is gone after it.
    """

    def __init__(self, server_url: str, port: int, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self.server = make_url(server_url)
        self.pool_size = pool_size
        self.port = port
        self.directory = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        self.log_path = self.directory / "pgbouncer.log"
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        """The URL of `database` through this PgBouncer (same user and password as the server's URL)."""
        through = self.server.set(host="127.0.0.1", port=self.port, database=database)
        return through.render_as_string(hide_password=False)

    def log(self) -> str:
        """Everything PgBouncer has logged so far."""
        return self.log_path.read_text(errors="replace")

    def show(self, what: str) -> list[dict[str, Any]]:
        """The rows of `SHOW <what>` (CLIENTS, SERVERS, POOLS...) from PgBouncer's admin console."""
        admin = self.server.set(host="127.0.0.1", port=self.port, database="pgbouncer", drivername="postgresql")
        # The admin console speaks only the simple query protocol, which ClientCursor uses.
        with (
            psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as console,
            psycopg.ClientCursor(console) as cursor,
        ):
            cursor.execute(f"SHOW {what}")
            columns = [column.name for column in cursor.description or []]
            return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    def __enter__(self) -> "PgBouncer":
        self._write_config()
        command = [str(PGBOUNCER_BINARY)]
        if os.geteuid() == 0:
            command += ["-u", RUN_AS_USER]
        command.append(str(self.directory / "pgbouncer.ini"))
        # No -d: it stays our child, and what it logs to stderr (start-up errors included) lands in the log.
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            self._wait_until_accepting()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def _write_config(self) -> None:
        user = self.server.username or "postgres"
        config = f"""\
[databases]
* = host={self.server.host or "127.0.0.1"} port={self.server.port or 5432}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
pool_mode = transaction
default_pool_size = {self.pool_size}
max_client_conn = {MAX_CLIENT_CONNECTIONS}
auth_type = trust
auth_file = {self.directory / "userlist.txt"}
admin_users = {user}
ignore_startup_parameters = extra_float_digits
"""
        (self.directory / "pgbouncer.ini").write_text(config)
        (self.directory / "userlist.txt").write_text(f'"{user}" ""\n')
        # Readable by the user PgBouncer drops to, whoever created them.
        self.directory.chmod(0o755)
        for path in self.directory.iterdir():
            path.chmod(0o644)

    def _wait_until_accepting(self) -> None:
        assert self._process is not None
        probe = self.url(self.server.database or "postgres")
        probe = make_url(probe).set(drivername="postgresql").render_as_string(hide_password=False)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self._process.returncode}:\n{self.log()}")
            with contextlib.suppress(psycopg.OperationalError):
                with psycopg.connect(probe, connect_timeout=2, autocommit=True) as connection:
                    connection.execute("SELECT 1")
                return
            if time.monotonic() > deadline:
                seconds = START_TIMEOUT_SECONDS
                raise RuntimeError(f"pgbouncer did not accept connections within {seconds} s:\n{self.log()}")
            time.sleep(0.1)
