"""`GET /metrics`: off by default; when on, Prometheus text with every family, labelled by route template,
and one scrape sees every worker's counts. The service runs in a process of its own (metrics are per
process): `python -m uvicorn main:app` alone, or the production command (gunicorn with uvicorn workers) when
a test needs several workers; on a real database, with real tokens and a real key set."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self

import httpx
import psycopg
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from database import create_db_engine
from metrics import (
    DIRECTORY_PREFIX,
    METRICS_PATH,
    UNMATCHED_ROUTE,
    MetricsMiddleware,
    process_start_time,
    remove_directories_of_dead_supervisors,
)
from tests.conftest import SECRET, LiveServer, free_port
from tests.keys import JwksServer, SigningKeyPair, better_auth_claims, new_key_pair

REPO_DIR = Path(__file__).resolve().parent.parent
TASK_ROUTE = "/api/{user_id}/tasks/{task_id}"
FAMILIES = {
    "todo_http_requests": "counter",
    "todo_http_request_duration_seconds": "histogram",
    "todo_http_requests_in_flight": "gauge",
    "todo_db_pool_checked_out": "gauge",
    "todo_db_pool_size": "gauge",
    "todo_key_set_fetches": "counter",
    "todo_rate_limit_refusals": "counter",
}
START_TIMEOUT_SECONDS = 60
WAIT_SECONDS = 30
# Variables of the test run that must not reach the service: it gets only what a test gives it.
WITHHELD_VARIABLES = {"NEON_DATABASE_URL", "JWKS_URL", "JWT_ISSUER", "JWT_AUDIENCE", "PROMETHEUS_MULTIPROC_DIR"}


class Scrape:
    """One answer of `GET /metrics`, parsed."""

    def __init__(self, response: httpx.Response) -> None:
        assert response.status_code == 200, response.text
        self.response = response
        self.text = response.text
        self.families = {family.name: family for family in text_string_to_metric_families(self.text)}
        self.samples = [sample for family in self.families.values() for sample in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sample `name` with exactly `labels`; 0 when there is none (a series not made yet)."""
        found = [sample.value for sample in self.samples if sample.name == name and sample.labels == labels]
        assert len(found) <= 1, found
        return found[0] if found else 0.0

    def increase_since(self, earlier: "Scrape", name: str, **labels: str) -> float:
        """How much the sample `name` with `labels` grew since the `earlier` scrape."""
        return self.value(name, **labels) - earlier.value(name, **labels)

    def label_sets(self, name: str) -> set[frozenset[tuple[str, str]]]:
        """The label sets of the samples called `name`: one per series."""
        return {frozenset(sample.labels.items()) for sample in self.samples if sample.name == name}


class MetricsService:
    """The service with METRICS_ENABLED=true in a process of its own: plain uvicorn, or with `workers` the
    production command (gunicorn.conf.py), whose master gives the workers their shared directory."""

    def __init__(self, database_url: str, key_set_base_url: str, temp_dir: Path, workers: int | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.temp_dir = temp_dir
        self.log = temp_dir / f"service-{self.port}.log"
        self.command = [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(self.port)]
        if workers is not None:
            self.command = [
                *[sys.executable, "-m", "gunicorn", "main:app", "--config", "gunicorn.conf.py"],
                *["--bind", f"127.0.0.1:{self.port}", "--workers", str(workers)],
            ]
        self.env = {name: value for name, value in os.environ.items() if name not in WITHHELD_VARIABLES} | {
            "METRICS_ENABLED": "true",
            "DATABASE_URL": database_url,
            "BETTER_AUTH_SECRET": SECRET,
            "BETTER_AUTH_URL": key_set_base_url,
            "LOG_LEVEL": "warning",
            "TMPDIR": str(temp_dir),  # where the workers' shared directory is made
        }
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, cwd=REPO_DIR, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the service did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM, as in production: the workers shut down (lifespan end) and the supervisor exits."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise

    def scrape(self) -> Scrape:
        """`GET /metrics` on a connection of its own."""
        return Scrape(httpx.get(f"{self.url}{METRICS_PATH}", timeout=WAIT_SECONDS))

    def scrape_until(self, condition: Callable[[Scrape], bool]) -> Scrape:
        """Scrape until `condition` holds (the service has reached a state the test set up); fail after a while."""
        deadline = time.monotonic() + WAIT_SECONDS
        while not condition(scrape := self.scrape()):
            assert time.monotonic() < deadline, f"the metrics never got there:\n{scrape.text}"
            time.sleep(0.05)
        return scrape


def pool_size_of(database_url: str) -> int:
    """How many connections one worker's pool keeps: what the service's own engine is built with."""
    engine = create_db_engine(make_url(database_url))
    try:
        return engine.pool.size()  # type: ignore[attr-defined]
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def service(
    database_url: str,
    jwks_server: JwksServer,
    better_auth_keys: dict[str, SigningKeyPair],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MetricsService]:
    """One service process (no workers: a plain `uvicorn main:app`) shared by the tests of this module."""
    with MetricsService(database_url, jwks_server.base_url, tmp_path_factory.mktemp("metrics")) as running:
        yield running


@pytest.fixture
def service_client(service: MetricsService) -> Iterator[httpx.Client]:
    """An HTTP client for the metrics-enabled service."""
    with httpx.Client(base_url=service.url, timeout=WAIT_SECONDS) as http:
        yield http


def test_metrics_are_off_by_default(server: LiveServer, client: httpx.Client) -> None:
    response = client.get(METRICS_PATH)

    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found", "code": "not_found"}
    assert not any(middleware.cls is MetricsMiddleware for middleware in server.app.user_middleware)


def test_disabled_metrics_do_not_even_load_the_library(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if name not in WITHHELD_VARIABLES} | {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'todo.db'}",
        "METRICS_ENABLED": "false",
    }
    check = "import sys, main; print(sorted(name for name in sys.modules if name.startswith('prometheus')))"

    loaded = subprocess.run(
        [sys.executable, "-c", check], cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=60, check=True
    )

    assert loaded.stdout.strip() == "[]"


def test_scrape_is_prometheus_text_with_every_family(service: MetricsService, service_client: httpx.Client) -> None:
    assert service_client.get("/").status_code == 200

    scrape = service.scrape()  # no token

    assert scrape.response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert {name: family.type for name, family in scrape.families.items() if name in FAMILIES} == FAMILIES
    assert all(scrape.families[name].documentation for name in FAMILIES)
    assert scrape.value("todo_http_requests_total", route="/", method="GET", status="200") >= 1
    assert scrape.value("todo_key_set_fetches_total", result="failure") == 0
    assert scrape.value("todo_rate_limit_refusals_total", scope="address") == 0
    assert METRICS_PATH not in service_client.get("/openapi.json").json()["paths"]


def test_a_thousand_task_ids_add_no_series(
    service: MetricsService,
    service_client: httpx.Client,
    server: LiveServer,
    auth: Callable[[str], dict[str, str]],
    user_id: str,
) -> None:
    headers = auth(user_id)
    created = service_client.post(f"/api/{user_id}/tasks", json={"title": "counted"}, headers=headers)
    assert created.status_code == 201
    task_id = created.json()["id"]
    missing_ids = [7_300_000 + offset for offset in range(1000)]
    assert service_client.get(f"/api/{user_id}/tasks/{task_id}", headers=headers).status_code == 200
    assert service_client.get(f"/api/{user_id}/tasks/{missing_ids[0]}", headers=headers).status_code == 404
    hidden_path = f"/nothing-here-{uuid.uuid4().hex}"
    assert service_client.get(hidden_path).status_code == 404
    service.scrape()  # so that the scrapes' own series exist before the count
    before = service.scrape()

    statuses = {service_client.get(f"/api/{user_id}/tasks/{id_}", headers=headers).status_code for id_ in missing_ids}
    after = service.scrape()

    assert statuses == {404}
    assert after.label_sets("todo_http_requests_total") == before.label_sets("todo_http_requests_total")
    not_found = {"route": TASK_ROUTE, "method": "GET", "status": "404"}
    assert after.increase_since(before, "todo_http_requests_total", **not_found) == len(missing_ids)
    assert after.value("todo_http_requests_total", route=UNMATCHED_ROUTE, method="GET", status="404") >= 1
    routes = {sample.labels["route"] for sample in after.samples if "route" in sample.labels}
    templates = {*server.app.openapi()["paths"], *(getattr(route, "path", "") for route in server.app.routes)}
    assert routes <= templates | {METRICS_PATH, UNMATCHED_ROUTE}
    assert user_id not in after.text
    assert hidden_path not in after.text
    label_values = {value for sample in after.samples for value in sample.labels.values()}
    assert not any(str(id_) in value for value in label_values for id_ in missing_ids)


def test_head_and_preflight_requests_get_no_raw_path(
    service: MetricsService, service_client: httpx.Client, auth: Callable[[str], dict[str, str]], user_id: str
) -> None:
    task_path = f"/api/{user_id}/tasks/7300001"
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "GET"}
    before = service.scrape()

    assert service_client.head(task_path, headers=auth(user_id)).status_code == 404
    assert service_client.options(task_path, headers=preflight).status_code == 200  # answered by CORS, not a route
    after = service.scrape()

    head = {"route": TASK_ROUTE, "method": "HEAD", "status": "404"}
    assert after.increase_since(before, "todo_http_requests_total", **head) == 1
    preflight_labels = {"route": UNMATCHED_ROUTE, "method": "OPTIONS", "status": "200"}
    assert after.increase_since(before, "todo_http_requests_total", **preflight_labels) == 1
    assert user_id not in after.text


def test_a_request_in_flight_is_counted_until_it_ends(
    service: MetricsService, auth: Callable[[str], dict[str, str]], user_id: str
) -> None:
    body = b'{"title": "sent slowly"}'
    head = (
        f"POST /api/{user_id}/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: {auth(user_id)['Authorization']}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    assert service.scrape().value("todo_http_requests_in_flight") == 1  # the scrape itself

    with socket.create_connection(("127.0.0.1", service.port), timeout=WAIT_SECONDS) as held:
        held.sendall(head + body[:5])  # the app has the request, and waits for the rest of its body
        service.scrape_until(lambda scrape: scrape.value("todo_http_requests_in_flight") == 2)
        held.sendall(body[5:])
        answer = b""
        while chunk := held.recv(65536):
            answer += chunk

    assert answer.startswith(b"HTTP/1.1 201 ")
    assert service.scrape().value("todo_http_requests_in_flight") == 1


def test_pool_gauges_show_the_pool(service: MetricsService, database_url: str) -> None:
    scrape = service.scrape()

    assert scrape.value("todo_db_pool_size") == pool_size_of(database_url) > 0
    assert scrape.value("todo_db_pool_checked_out") == 0  # no request holds a connection while it scrapes


@pytest.mark.postgresql_only
def test_a_request_waiting_on_the_database_holds_a_pool_connection(
    service: MetricsService,
    service_client: httpx.Client,
    auth: Callable[[str], dict[str, str]],
    user_id: str,
    database_url: str,
) -> None:
    headers = auth(user_id)
    task_id = service_client.post(f"/api/{user_id}/tasks", json={"title": "locked"}, headers=headers).json()["id"]
    patched: list[httpx.Response] = []
    patch = threading.Thread(
        target=lambda: patched.append(
            service_client.patch(f"/api/{user_id}/tasks/{task_id}", json={"title": "changed"}, headers=headers)
        )
    )
    libpq_url = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)

    with psycopg.connect(libpq_url) as locker:
        locker.execute("SELECT 1 FROM tasks WHERE id = %s FOR UPDATE", [task_id])  # the PATCH's UPDATE waits
        patch.start()
        waiting = service.scrape_until(lambda scrape: scrape.value("todo_db_pool_checked_out") == 1)
        assert patch.is_alive()
        assert waiting.value("todo_http_requests_in_flight") == 2
        locker.rollback()
    patch.join(timeout=WAIT_SECONDS)

    assert patched[0].status_code == 200
    after = service.scrape()
    assert after.value("todo_db_pool_checked_out") == 0
    assert after.value("todo_http_requests_in_flight") == 1


def test_key_set_fetches_are_counted(
    service: MetricsService, service_client: httpx.Client, jwks_server: JwksServer, user_id: str
) -> None:
    before = service.scrape()
    fetches_before = jwks_server.requests
    unpublished = new_key_pair("EdDSA").sign(better_auth_claims(user_id, jwks_server.base_url))

    refused = service_client.get(f"/api/{user_id}/tasks", headers={"Authorization": f"Bearer {unpublished}"})

    assert refused.status_code == 401
    assert jwks_server.requests == fetches_before + 1
    after = service.scrape()
    assert after.increase_since(before, "todo_key_set_fetches_total", result="success") == 1
    assert after.increase_since(before, "todo_key_set_fetches_total", result="failure") == 0


def test_key_set_failures_are_counted(database_url: str, tmp_path: Path, user_id: str) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the fetch fails
    token = new_key_pair("EdDSA").sign(better_auth_claims(user_id, nowhere))

    with MetricsService(database_url, nowhere, tmp_path) as unreachable_keys:
        answer = httpx.get(f"{unreachable_keys.url}/api/{user_id}/tasks", headers={"Authorization": f"Bearer {token}"})
        scrape = unreachable_keys.scrape()

    assert answer.status_code == 503
    assert scrape.value("todo_key_set_fetches_total", result="failure") == 1
    assert scrape.value("todo_key_set_fetches_total", result="success") == 0


def per_worker_counts(directory: Path, **labels: str) -> dict[int, float]:
    """Each worker's own count of `todo_http_requests_total` with `labels`, read from its file alone."""
    counts = {}
    for path in directory.glob("counter_*.db"):
        pid = int(re.fullmatch(r"counter_(\d+)\.db", path.name)[1])  # type: ignore[index]
        samples = [sample for metric in MultiProcessCollector.merge([str(path)]) for sample in metric.samples]
        counts[pid] = sum(s.value for s in samples if s.name == "todo_http_requests_total" and s.labels == labels)
    return counts


def parent_of(pid: int) -> int:
    """The parent process of `pid`, from /proc."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_one_scrape_sums_every_worker(database_url: str, tmp_path: Path) -> None:
    front_door = {"route": "/", "method": "GET", "status": "200"}
    size = pool_size_of(database_url)

    with MetricsService(database_url, "http://127.0.0.1:3000", tmp_path, workers=2) as service:
        service.scrape_until(lambda scrape: scrape.value("todo_db_pool_size") == 2 * size)  # both workers are up
        [directory] = tmp_path.glob(f"{DIRECTORY_PREFIX}*")
        assert directory.name == f"{DIRECTORY_PREFIX}{service.process.pid}-{process_start_time(service.process.pid)}"
        sent = 0
        with ThreadPoolExecutor(max_workers=8) as pool:
            # Each request on a connection of its own, several at once: the kernel hands them to both workers.
            while sum(count > 0 for count in per_worker_counts(directory, **front_door).values()) < 2:
                assert sent < 2000, per_worker_counts(directory, **front_door)
                statuses = list(pool.map(lambda _: httpx.get(f"{service.url}/").status_code, range(50)))
                assert statuses == [200] * 50
                sent += len(statuses)
        by_worker = per_worker_counts(directory, **front_door)
        scrape = service.scrape()
        workers = {pid for pid, count in by_worker.items() if count > 0}
        assert {parent_of(pid) for pid in workers} == {service.process.pid}

    assert len(workers) == 2
    assert sum(by_worker.values()) == sent
    assert scrape.value("todo_http_requests_total", **front_door) == sent
    assert scrape.value("todo_db_pool_size") == 2 * size
    assert scrape.value("todo_http_requests_in_flight") == 1
    assert service.process.returncode == 0
    assert not list(directory.glob("gauge_live*.db"))  # each worker removed its live gauges at shutdown
    assert len(list(directory.glob("counter_*.db"))) == 2  # counts stay: a counter never goes down

    with MetricsService(database_url, "http://127.0.0.1:3000", tmp_path, workers=2) as next_run:
        fresh = next_run.scrape()
        assert not directory.exists()  # the finished supervisor's directory is gone
        assert len(list(tmp_path.glob(f"{DIRECTORY_PREFIX}*"))) == 1
    assert fresh.value("todo_http_requests_total", **front_door) == 0


def test_a_killed_workers_live_gauges_are_dropped_and_its_counts_kept(database_url: str, tmp_path: Path) -> None:
    front_door = {"route": "/", "method": "GET", "status": "200"}
    size = pool_size_of(database_url)

    with MetricsService(database_url, "http://127.0.0.1:3000", tmp_path, workers=2) as service:
        service.scrape_until(lambda scrape: scrape.value("todo_db_pool_size") == 2 * size)
        [directory] = tmp_path.glob(f"{DIRECTORY_PREFIX}*")
        sent = sum(httpx.get(f"{service.url}/").status_code == 200 for _ in range(20))
        [victim, *_] = [int(path.stem.rpartition("_")[2]) for path in directory.glob("gauge_livesum_*.db")]
        assert parent_of(victim) == service.process.pid
        os.kill(victim, signal.SIGKILL)  # no shutdown, so no clean-up of its own

        # The master starts a worker in its place: two live workers' pools again, not the dead one's as well.
        recovered = service.scrape_until(
            lambda scrape: scrape.value("todo_db_pool_size") == 2 * size
            and not (directory / f"gauge_livesum_{victim}.db").exists()
        )

    assert recovered.value("todo_http_requests_in_flight") == 1
    assert recovered.value("todo_http_requests_total", **front_door) == sent == 20  # the dead worker's count too


def test_only_directories_of_finished_supervisors_are_removed(tmp_path: Path) -> None:
    alive = tmp_path / f"{DIRECTORY_PREFIX}{os.getpid()}-{process_start_time(os.getpid())}"
    reused_pid = tmp_path / f"{DIRECTORY_PREFIX}{os.getpid()}-1"  # same pid, another start: an earlier process
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    gone = tmp_path / f"{DIRECTORY_PREFIX}{int(finished.stdout)}-1"
    not_ours = tmp_path / "todo-metrics-by-hand"
    for directory in (alive, reused_pid, gone, not_ours):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"")

    remove_directories_of_dead_supervisors(tmp_path)

    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([alive.name, not_ours.name])
