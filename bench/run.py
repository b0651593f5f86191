"""Benchmark the Todo service against the minimal reference app, on the same PostgreSQL.

    python bench/run.py [--workers N] [--duration S] [--connections 32] [--runs 1]
                        [--only service|reference] [--json FILE]

For each target and run: create a fresh database, start uvicorn on a free port, wait for
/health, seed users x tasks through the API (httpx, concurrently), smoke-test each request type
once, warm up, run wrk with bench/workload.lua, and measure throughput, latency, non-2xx
responses, server and database CPU per request and peak RSS per worker. Servers are killed and
databases dropped on exit, error or Ctrl-C. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import jwt
import psycopg

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORKLOAD = BENCH_DIR / "workload.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGETS = {"service": "main:app", "reference": "bench.reference_app:app", "floor": "bench.stack_floor_app:app"}
# The tag vocabulary: every task carries two of these (the same list as in workload.lua).
TAGS = ("work", "home", "errands", "health", "finance", "family", "study", "travel")
MIX = "30 list / 10 tag list / 20 get / 15 create / 15 toggle / 5 update / 5 delete (to the trash)"


# --------------------------------------------------------------------------- data types


@dataclass
class User:
    """A benchmark user: id, HS256 token and the ids of its seeded tasks."""

    id: str
    token: str
    tasks: list[int] = field(default_factory=list)


@dataclass
class Result:
    """Measurements of one load run against one target."""

    target: str
    run: int | str  # "med" for the median row
    workers: int
    connections: int
    duration_s: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    server_cpu_ms_per_req: float
    db_cpu_ms_per_req: float
    peak_rss_mib: float
    wrk_cpu_s: float
    wrk_cpu_pct: float
    host_busy_pct: float
    other_cpu_pct: float
    db_connections_opened: int
    sent: dict[str, int]
    statuses: dict[str, int]
    failure_samples: list[str]
    smoke_failures: list[str]


class BenchError(RuntimeError):
    """A failure that stops the benchmark with a clear message."""


# --------------------------------------------------------------------------- /proc helpers


def proc_children() -> dict[int, list[int]]:
    """Map each pid to its direct children, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    """Return ``root`` and all its live descendants."""
    children = proc_children()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_ticks(pid: int) -> int:
    """CPU of a process and of its reaped children, in clock ticks (0 if it is gone).

    utime + stime + cutime + cstime: summed over a process tree and differenced over an interval,
    this also counts processes that started and exited meanwhile (a backend for a short-lived
    database connection, say), whose time has moved into their parent's cutime/cstime.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(v) for v in fields[11:15])  # proc(5) fields 14-17, after pid and comm


def cpu_snapshot(pids: list[int]) -> dict[int, int]:
    """CPU ticks of each pid."""
    return {pid: cpu_ticks(pid) for pid in pids}


def cpu_delta_s(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds used between two snapshots of one tree (new pids count from zero)."""
    return sum(ticks - before.get(pid, 0) for pid, ticks in after.items()) / CLK_TCK


def rss_kib(pid: int) -> int:
    """Current VmRSS of a process in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user/nice
    return total - idle, total


def worker_pids(root: int) -> list[int]:
    """The processes that serve requests: uvicorn's workers, or the root itself if alone."""
    workers = []
    for pid in process_tree(root)[1:]:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            workers.append(pid)
    return workers or [root]


class RssSampler:
    """Samples VmRSS of the given pids in a background thread and keeps the maximum."""

    def __init__(self, pids: list[int], interval: float = 0.25) -> None:
        self.pids, self.interval, self.peak_kib = pids, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max([self.peak_kib, *(rss_kib(p) for p in self.pids)])
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max([self.peak_kib, *(rss_kib(p) for p in self.pids)])


# --------------------------------------------------------------------------- resources


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def database_url(admin_url: str, name: str) -> str:
    """``admin_url`` with its database replaced by ``name``."""
    return admin_url.rsplit("/", 1)[0] + "/" + name


@contextmanager
def temp_database(admin_url: str, label: str) -> Iterator[str]:
    """Create a uniquely named database and drop it (forcibly) on exit."""
    name = f"bench_{label}_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def kill_group(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """Stop a process started in its own session: SIGTERM its group, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


@contextmanager
def server(app: str, workers: int, env: dict[str, str], log: Path) -> Iterator[tuple[int, int]]:
    """Run ``uvicorn app`` from the repository root; yield (pid, port); kill it on exit."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "uvicorn", app,
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(workers), "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO_DIR, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:
        wait_healthy(proc, port, log)
        yield proc.pid, port
    finally:
        kill_group(proc)


def wait_healthy(proc: subprocess.Popen[Any], port: int, log: Path, timeout: float = 60) -> None:
    """Poll GET /health until it answers 200 (or the server dies / the timeout passes)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server exited with {proc.returncode}:\n{tail(log)}")
        try:
            resp = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            if resp.status_code == 200:
                return
            last = f"{resp.status_code} {resp.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise BenchError(f"/health did not answer 200 within {timeout:.0f}s ({last}):\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- seeding and smoke


def make_users(count: int, secret: str) -> list[User]:
    """Users with random ids and 3-hour HS256 tokens."""
    now = int(time.time())
    users = []
    for i in range(count):
        uid = f"bench-{i:02d}-{secrets.token_hex(4)}"
        claims = {"sub": uid, "iat": now, "exp": now + 3 * 3600}
        users.append(User(uid, jwt.encode(claims, secret, algorithm="HS256")))
    return users


def seed_tags(n: int) -> list[str]:
    """The two distinct tags of seed task ``n``: every pair of TAGS in turn."""
    return [TAGS[n % len(TAGS)], TAGS[(n + 1 + (n // len(TAGS)) % (len(TAGS) - 1)) % len(TAGS)]]


def seed_payload(user: User, n: int) -> dict[str, Any]:
    """A varied task body with two tags: some with description, due date or completed."""
    body: dict[str, Any] = {"title": f"Seed task {n} of {user.id}", "tags": seed_tags(n)}
    if n % 2 == 0:
        body["description"] = f"Description of seed task {n}; " * 3
    if n % 3 == 0:
        body["due_date"] = f"2027-{n % 12 + 1:02d}-{n % 28 + 1:02d}T12:00:00Z"
    if n % 5 == 0:
        body["completed"] = True
    return body


async def seed(base: str, users: list[User], per_user: int) -> None:
    """Create ``per_user`` tasks for every user through the API, users concurrently."""
    limits = httpx.Limits(max_connections=len(users), max_keepalive_connections=len(users))
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

        async def seed_user(user: User) -> None:
            headers = {"Authorization": f"Bearer {user.token}"}
            for n in range(per_user):
                body = seed_payload(user, n)
                resp = await client.post(f"/api/{user.id}/tasks", json=body, headers=headers)
                if resp.status_code != 201:
                    raise BenchError(
                        f"seeding failed: POST /api/{user.id}/tasks {json.dumps(body)} -> "
                        f"{resp.status_code} {resp.text[:500]}"
                    )
                user.tasks.append(int(resp.json()["id"]))

        await asyncio.gather(*(seed_user(u) for u in users))


def smoke(base: str, user: User, per_user: int) -> list[str]:
    """Send each request type of the mix once and return what looked wrong (empty = fine)."""
    problems: list[str] = []
    headers = {"Authorization": f"Bearer {user.token}"}
    path = f"/api/{user.id}/tasks"
    task = f"{path}/{user.tasks[0]}"

    def call(method: str, url: str, expect: int, body: Any = None) -> httpx.Response:
        resp = client.request(method, url, json=body, headers=headers)
        if resp.status_code != expect:
            sent = f" {json.dumps(body)}" if body is not None else ""
            problems.append(f"{method} {url}{sent} -> {resp.status_code} (expected {expect}) {resp.text[:300]}")
        return resp

    with httpx.Client(base_url=base, timeout=30) as client:
        resp = call("GET", f"{path}?limit=50", 200)
        if resp.status_code == 200:
            if not isinstance(resp.json(), list) or len(resp.json()) != min(50, per_user):
                problems.append(f"GET {path}?limit=50 -> body is not a list of 50 tasks")
            if resp.headers.get("x-total-count") != str(per_user):
                problems.append(
                    f"GET {path}?limit=50 -> X-Total-Count {resp.headers.get('x-total-count')!r}, expected {per_user}"
                )
        tag = TAGS[0]
        tagged = sum(tag in seed_tags(n) for n in range(per_user))
        resp = call("GET", f"{path}?limit=50&tag={tag}", 200)
        if resp.status_code == 200:
            items = resp.json()
            if not isinstance(items, list) or len(items) != min(50, tagged):
                problems.append(f"GET {path}?limit=50&tag={tag} -> body is not a list of {min(50, tagged)} tasks")
            elif any(tag not in item.get("tags", []) for item in items):
                problems.append(f"GET {path}?limit=50&tag={tag} -> a task without the tag: {resp.text[:300]}")
            if resp.headers.get("x-total-count") != str(tagged):
                problems.append(
                    f"GET {path}?limit=50&tag={tag} -> X-Total-Count {resp.headers.get('x-total-count')!r},"
                    f" expected {tagged}"
                )
        resp = call("GET", task, 200)
        before = resp.json().get("completed") if resp.status_code == 200 else None
        resp = call("PATCH", f"{task}/complete", 200)
        if resp.status_code == 200 and before is not None and resp.json()["completed"] == before:
            problems.append(f"PATCH {task}/complete -> completed did not flip")
        resp = call("PUT", task, 200, {"title": "smoke rename"})
        if resp.status_code == 200 and resp.json().get("title") != "smoke rename":
            problems.append(f"PUT {task} -> title not changed: {resp.text[:300]}")
        resp = call("POST", path, 201, {"title": "smoke create", "description": "x", "tags": list(TAGS[:2])})
        if resp.status_code == 201:
            if "location" not in resp.headers:
                problems.append(f"POST {path} -> 201 without a Location header")
            if resp.json().get("tags") != list(TAGS[:2]):
                problems.append(f"POST {path} -> tags not kept: {resp.text[:300]}")
            created = f"{path}/{resp.json()['id']}"
            call("DELETE", created, 204)
            call("GET", created, 404)
    return problems


# --------------------------------------------------------------------------- wrk


def write_lua_data(path: Path, users: list[User]) -> None:
    """Write the users, tokens and seeded task ids as a Lua chunk for workload.lua."""
    lines = ["return {"]
    for u in users:
        ids = ",".join(str(t) for t in u.tasks)
        lines.append(f"  {{id = {json.dumps(u.id)}, token = {json.dumps(u.token)}, tasks = {{{ids}}}}},")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


def run_wrk(port: int, data: Path, duration: float, connections: int, threads: int) -> tuple[dict[str, Any], float]:
    """Run wrk with the workload; return its BENCH_RESULT data and its own CPU seconds."""
    cmd = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
        "--timeout", "10s", "-s", str(WORKLOAD), f"http://127.0.0.1:{port}", "--", str(data),
    ]  # fmt: skip
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            kill_group(proc, grace=2)
        out.seek(0)
        text = out.read().decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT ")), usage.ru_utime + usage.ru_stime
    raise BenchError(f"wrk exited with {proc.returncode} and no result:\n{text[-2000:]}")


# --------------------------------------------------------------------------- one target


def postgres_root(admin_url: str) -> int:
    """Pid of the PostgreSQL postmaster (the parent of our own backend)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        stat = Path(f"/proc/{row[0]}/stat").read_text()  # while the backend lives
    return int(stat.rsplit(")", 1)[1].split()[1])


def db_sessions(admin_url: str, db: str) -> int:
    """Connections ever opened to ``db`` (pg_stat_database.sessions; flushed about every 1 s)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", (db,)).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def as_dict(value: Any) -> dict[str, int]:
    """workload.lua encodes an empty table as []; normalize to a dict."""
    return {str(k): int(v) for k, v in value.items()} if isinstance(value, dict) else {}


def bench_target(target: str, run: int, args: argparse.Namespace, secret: str) -> Result:
    """Fresh database, server, seed, smoke, warm-up and measured load for one target."""
    with ExitStack() as stack:
        db = stack.enter_context(temp_database(args.pg_url, target))
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        env = {k: v for k, v in os.environ.items() if k != "NEON_DATABASE_URL"}
        env |= {
            "DATABASE_URL": database_url(args.pg_url, db),
            "BETTER_AUTH_SECRET": secret,
            "LOG_LEVEL": "warning",
            "PYTHONUNBUFFERED": "1",
        }
        log = work / "server.log"
        root, port = stack.enter_context(server(TARGETS[target], args.workers, env, log))
        base = f"http://127.0.0.1:{port}"

        users = make_users(args.users, secret)
        started = time.monotonic()
        asyncio.run(seed(base, users, args.tasks_per_user))
        took = time.monotonic() - started
        note(f"{target}: seeded {args.users}x{args.tasks_per_user} tasks in {took:.1f}s")
        smoke_failures = smoke(base, users[0], args.tasks_per_user)
        for problem in smoke_failures:
            note(f"{target}: SMOKE FAILURE: {problem}")

        data = work / "users.lua"
        write_lua_data(data, users)
        if args.warmup > 0:
            run_wrk(port, data, args.warmup, args.connections, args.threads)

        workers = worker_pids(root)
        tree = process_tree(root)
        postmaster = postgres_root(args.pg_url)
        sessions0 = db_sessions(args.pg_url, db)
        db0 = cpu_snapshot(process_tree(postmaster))
        cpu0, host0 = cpu_snapshot(tree), host_cpu()
        with RssSampler(workers) as rss:
            wrk, wrk_cpu = run_wrk(port, data, args.duration, args.connections, args.threads)
        cpu1 = cpu_snapshot(process_tree(root))
        db1 = cpu_snapshot(process_tree(postmaster))
        time.sleep(1.1)  # let the backends' session counts reach pg_stat_database
        sessions1 = db_sessions(args.pg_url, db)
        host1 = host_cpu()
        if server_log := tail(log):
            note(f"{target}: server output:\n{server_log}")

    lat = wrk["latency_us"]
    requests = int(wrk["requests"])
    seconds = wrk["duration_us"] / 1e6
    per_req = 1000 / max(requests, 1)
    busy = (host1[0] - host0[0]) / max(host1[1] - host0[1], 1)
    server_cpu, db_cpu = cpu_delta_s(cpu0, cpu1), cpu_delta_s(db0, db1)
    # Everything else that ran meanwhile (other users of a shared machine): a noise gauge.
    other_cpu = (host1[0] - host0[0]) / CLK_TCK - server_cpu - db_cpu - wrk_cpu
    return Result(
        target=target,
        run=run,
        workers=args.workers,
        connections=args.connections,
        duration_s=round(seconds, 2),
        requests=requests,
        rps=requests / seconds,
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        max_ms=lat["max"] / 1000,
        non_2xx=int(wrk["failures"]),
        socket_errors=sum(int(v) for k, v in wrk["errors"].items() if k != "status"),
        server_cpu_ms_per_req=server_cpu * per_req,
        db_cpu_ms_per_req=db_cpu * per_req,
        peak_rss_mib=rss.peak_kib / 1024,
        wrk_cpu_s=wrk_cpu,
        wrk_cpu_pct=100 * wrk_cpu / seconds,
        host_busy_pct=100 * busy,
        other_cpu_pct=max(0.0, 100 * other_cpu / seconds),
        db_connections_opened=sessions1 - sessions0,
        sent=as_dict(wrk["sent"]),
        statuses=as_dict(wrk["statuses"]),
        failure_samples=list(wrk["samples"] or []),
        smoke_failures=smoke_failures,
    )


# --------------------------------------------------------------------------- report


COLUMNS: list[tuple[str, str, str]] = [
    # (header, Result attribute, format)
    ("target", "target", "{}"),
    ("run", "run", "{}"),
    ("req/s", "rps", "{:.0f}"),
    ("p50 ms", "p50_ms", "{:.1f}"),
    ("p99 ms", "p99_ms", "{:.1f}"),
    ("max ms", "max_ms", "{:.0f}"),
    ("non-2xx", "non_2xx", "{}"),
    ("sock err", "socket_errors", "{}"),
    ("srv CPU ms/req", "server_cpu_ms_per_req", "{:.2f}"),
    ("db CPU ms/req", "db_cpu_ms_per_req", "{:.2f}"),
    ("new DB conns", "db_connections_opened", "{}"),
    ("peak RSS/worker MiB", "peak_rss_mib", "{:.0f}"),
    ("wrk CPU %", "wrk_cpu_pct", "{:.0f}"),
    ("host busy %", "host_busy_pct", "{:.0f}"),
    ("other CPU %", "other_cpu_pct", "{:.0f}"),
]


def median_result(results: list[Result]) -> Result:
    """Median of each measured number over several runs (run = "med"); error counts are summed."""
    values = asdict(results[0])
    for key, value in values.items():
        if key in ("run", "workers", "connections") or not isinstance(value, int | float):
            continue
        if key in ("non_2xx", "socket_errors"):
            values[key] = sum(getattr(r, key) for r in results)
        else:
            median = statistics.median(getattr(r, key) for r in results)
            values[key] = round(median) if isinstance(value, int) else median
    values["run"] = "med"
    return Result(**values)


def table(rows: list[Result]) -> str:
    """Render results as a fixed-width text table."""
    cells = [[h for h, _, _ in COLUMNS]]
    cells += [[fmt.format(getattr(r, attr)) for _, attr, fmt in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def note(message: str) -> None:
    """Progress and diagnostics go to stderr, so stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


def report(results: list[Result], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table, failures and ratios; return the JSON summary."""
    summary: dict[str, Result] = {}
    rows = list(results)
    for target in TARGETS:
        mine = [r for r in results if r.target == target]
        if mine:
            summary[target] = mine[0] if len(mine) == 1 else median_result(mine)
            if len(mine) > 1:
                rows.append(summary[target])
    print(
        f"\nTodo API benchmark: {args.workers} worker(s), {args.connections} connections, "
        f"{args.duration:g}s x {args.runs} run(s), {args.users} users x {args.tasks_per_user} "
        f"seeded tasks, mix {MIX}\n"
    )
    print(table(rows))
    for r in results:
        if r.non_2xx or r.smoke_failures:
            print(f"\n{r.target} run {r.run}: statuses {r.statuses}")
            for sample in r.failure_samples:
                print(f"  failing response: {sample}")
            for problem in r.smoke_failures:
                print(f"  smoke failure: {problem}")
    ratios: dict[str, float] = {}
    if "service" in summary and "reference" in summary:
        ours, ref = summary["service"], summary["reference"]
        ratios = {
            "throughput": ours.rps / ref.rps,
            "p99": ours.p99_ms / ref.p99_ms,
            "server_cpu_per_req": ours.server_cpu_ms_per_req / ref.server_cpu_ms_per_req,
            "peak_rss": ours.peak_rss_mib / ref.peak_rss_mib,
        }
        print(
            f"\nours/reference: throughput {ratios['throughput']:.2f}x, "
            f"p99 latency {ratios['p99']:.2f}x, "
            f"server CPU/request {ratios['server_cpu_per_req']:.2f}x, "
            f"peak RSS/worker {ratios['peak_rss']:.2f}x"
        )
    if "floor" in summary and "reference" in summary:
        floor, ref = summary["floor"], summary["reference"]
        ratios["floor_throughput"] = floor.rps / ref.rps
        ratios["floor_p99"] = floor.p99_ms / ref.p99_ms
        print(
            f"floor/reference (the fixed stack alone): throughput {ratios['floor_throughput']:.2f}x, "
            f"p99 latency {ratios['floor_p99']:.2f}x"
        )
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "results": [asdict(r) for r in results],
        "summary": {k: asdict(v) for k, v in summary.items()},
        "ratios": ratios,
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="uvicorn workers per server (2)")
    p.add_argument("--duration", type=float, default=30, help="measured seconds per run (30)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    p.add_argument("--runs", type=int, default=1, help="runs per target; medians reported (1)")
    p.add_argument("--only", choices=sorted(TARGETS), help="benchmark one target only")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also run the reference's routes on the service's fixed stack (bench/stack_floor_app.py)",
    )
    p.add_argument("--json", type=Path, help="also write all results to this JSON file")
    p.add_argument("--warmup", type=float, default=5, help="warm-up seconds before each run (5)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    p.add_argument("--users", type=int, default=32, help="users (32)")
    p.add_argument("--tasks-per-user", type=int, default=200, help="seeded tasks per user (200)")
    p.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="admin URL of the PostgreSQL server (env BENCH_PG_URL)",
    )
    return p.parse_args(argv)


def preflight(targets: list[str], pg_url: str) -> None:
    """Check the tools and files a run needs, before creating anything."""
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not installed: apt-get install -y wrk")
    if "service" in targets and not (REPO_DIR / "main.py").exists():
        raise BenchError(f"{REPO_DIR / 'main.py'} does not exist (use --only reference)")
    if "reference" in targets or "floor" in targets:
        try:
            import psycopg_pool  # noqa: F401
        except ImportError:
            raise BenchError("psycopg_pool missing: pip install -r bench/requirements.txt") from None
    try:
        psycopg.connect(pg_url, connect_timeout=5).close()
    except psycopg.Error as exc:
        raise BenchError(f"cannot connect to PostgreSQL at {pg_url}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    """Run every target ``--runs`` times (alternating the order) and print the report."""
    args = parse_args(argv)
    targets = [args.only] if args.only else ["service", "reference", *(["floor"] if args.floor else [])]
    # SIGTERM/SIGHUP are turned into Ctrl-C (which asyncio.run also handles cleanly), so
    # every server and database is cleaned up the same way.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda _sig, _frame: os.kill(os.getpid(), signal.SIGINT))
    try:
        preflight(targets, args.pg_url)
        secret = secrets.token_urlsafe(48)
        results: list[Result] = []
        for run in range(1, args.runs + 1):
            for target in targets if run % 2 else targets[::-1]:
                note(f"{target}: run {run}/{args.runs} ...")
                results.append(bench_target(target, run, args, secret))
        summary = report(results, args)
    except BenchError as exc:
        note(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        note("interrupted; servers stopped and databases dropped")
        return 130
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if any(r.non_2xx or r.smoke_failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
