"""Many clients at once: races between changes and deletes, concurrent writers, a heavily contended
toggle, and a burst of creates. Every answer is one the contract allows (never a 500, never a 503
"database is locked"), and the stored state is exactly what the answers said.

Every client is its own thread with its own connection, against the real server, on SQLite and on
PostgreSQL (when TEST_DATABASE_URL is set).
"""

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

if TYPE_CHECKING:
    from tests.conftest import LiveServer

Auth = Callable[[str], dict[str, str]]
MakeTask = Callable[..., dict[str, Any]]
Result = TypeVar("Result")

TASK_NOT_FOUND = {"detail": "Task not found", "code": "task_not_found"}
LIST_LIMIT = 500


def tasks_url(user_id: str, task_id: int | None = None, suffix: str = "") -> str:
    """The URL of a user's tasks, or of one of them."""
    return f"/api/{user_id}/tasks" + (f"/{task_id}" if task_id is not None else "") + suffix


def run_in_threads(server: "LiveServer", threads: int, work: Callable[[int, httpx.Client], Result]) -> list[Result]:
    """`work(index, client)` in `threads` threads started together, each with its own connection; results by index."""
    start_together = threading.Barrier(threads)

    def worker(index: int) -> Result:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            start_together.wait(timeout=60)
            return work(index, http)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(worker, range(threads)))


def share(index: int, total: int, threads: int) -> range:
    """Which of `total` numbered requests thread `index` of `threads` sends."""
    return range(index, total, threads)


def stored_tasks(client: httpx.Client, auth: Auth, user_id: str) -> dict[int, dict[str, Any]]:
    """The user's stored tasks, by id (fewer than LIST_LIMIT in these tests)."""
    response = client.get(tasks_url(user_id), params={"limit": LIST_LIMIT}, headers=auth(user_id))
    assert response.status_code == 200, response.text
    assert int(response.headers["x-total-count"]) < LIST_LIMIT
    return {task["id"]: task for task in response.json()}


def describe(response: httpx.Response) -> str:
    """A failed request and its answer, for assertion messages."""
    return f"{response.request.method} {response.request.url.path} -> {response.status_code} {response.text[:300]}"


# --- An update racing a delete ----------------------------------------------------------------------

RACE_ROUNDS = 50
# Three kinds of change and two deletes race for each task: exactly one delete can win.
RACERS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("PUT", "", {"title": "Renamed in the race"}),
    ("PATCH", "", {"description": "Described in the race"}),
    ("PATCH", "/complete", None),
    ("DELETE", "", None),
    ("DELETE", "", None),
]


def test_changes_racing_a_delete_are_200_or_404_and_the_task_ends_deleted(
    client: httpx.Client, server: "LiveServer", auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    headers = auth(user_id)
    task_ids = [make_task(user_id, f"Round {number}")["id"] for number in range(RACE_ROUNDS)]
    round_start = threading.Barrier(len(RACERS))

    def race(racer: int, http: httpx.Client) -> list[httpx.Response]:
        method, suffix, body = RACERS[racer]
        answers = []
        for task_id in task_ids:
            round_start.wait(timeout=60)
            answers.append(http.request(method, tasks_url(user_id, task_id, suffix), json=body, headers=headers))
        return answers

    answers_by_racer = run_in_threads(server, len(RACERS), race)

    for round_number, task_id in enumerate(task_ids):
        *changes, first_delete, second_delete = (answers[round_number] for answers in answers_by_racer)
        for (_, _, sent), change in zip(RACERS[: len(changes)], changes, strict=True):
            assert change.status_code in (200, 404), describe(change)
            if change.status_code == 404:
                assert change.json() == TASK_NOT_FOUND
            else:
                assert change.json()["id"] == task_id
                assert change.json().items() >= (sent or {}).items()
        assert sorted([first_delete.status_code, second_delete.status_code]) == [204, 404], [
            describe(first_delete),
            describe(second_delete),
        ]
        gone = client.get(tasks_url(user_id, task_id), headers=headers)
        assert gone.status_code == 404 and gone.json() == TASK_NOT_FOUND
    assert stored_tasks(client, auth, user_id) == {}


# --- Concurrent writers -----------------------------------------------------------------------------

WRITERS = 8
WRITES_PER_WRITER = 25


def test_concurrent_writers_all_succeed_and_the_final_state_is_what_they_were_told(
    client: httpx.Client, server: "LiveServer", auth: Auth, user_id: str
) -> None:
    headers = auth(user_id)

    def write(writer: int, http: httpx.Client) -> tuple[dict[int, dict[str, Any]], list[httpx.Response]]:
        """Create, toggle, rename, describe and complete this writer's own tasks, in turn."""
        own: dict[int, dict[str, Any]] = {}
        answers = []
        for step in range(WRITES_PER_WRITER):
            target = list(own)[step % len(own)] if own else None
            if target is None or step % 5 == 0:
                answer = http.post(tasks_url(user_id), json={"title": f"Writer {writer} step {step}"}, headers=headers)
            elif step % 5 == 1:
                answer = http.patch(tasks_url(user_id, target, "/complete"), headers=headers)
            elif step % 5 == 2:
                answer = http.put(tasks_url(user_id, target), json={"title": f"Renamed {step}"}, headers=headers)
            elif step % 5 == 3:
                changes = {"description": f"Step {step}", "due_date": "2027-01-01T12:00:00Z"}
                answer = http.patch(tasks_url(user_id, target), json=changes, headers=headers)
            else:
                answer = http.patch(tasks_url(user_id, target, "/complete"), json={"completed": True}, headers=headers)
            answers.append(answer)
            if answer.is_success:
                own[answer.json()["id"]] = answer.json()
        return own, answers

    results = run_in_threads(server, WRITERS, write)

    for _, answers in results:
        for answer in answers:
            assert answer.status_code == (201 if answer.request.method == "POST" else 200), describe(answer)
    told = {task_id: task for own, _ in results for task_id, task in own.items()}
    assert stored_tasks(client, auth, user_id) == told


# --- A contended toggle, a burst of creates ---------------------------------------------------------

TOGGLES = 100
TOGGLERS = 16


def test_a_hundred_concurrent_toggles_flip_the_task_exactly_a_hundred_times(
    client: httpx.Client, server: "LiveServer", auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id, "Contended")
    assert task["completed"] is False
    headers = auth(user_id)

    def toggle(toggler: int, http: httpx.Client) -> list[httpx.Response]:
        url = tasks_url(user_id, task["id"], "/complete")
        return [http.patch(url, headers=headers) for _ in share(toggler, TOGGLES, TOGGLERS)]

    answers = [answer for answers in run_in_threads(server, TOGGLERS, toggle) for answer in answers]

    assert len(answers) == TOGGLES
    assert all(answer.status_code == 200 for answer in answers), [describe(a) for a in answers if a.status_code != 200]
    # Each answer is the state its own flip produced, and flips alternate: half of them say true.
    assert sum(answer.json()["completed"] for answer in answers) == TOGGLES // 2
    stored = client.get(tasks_url(user_id, task["id"]), headers=headers).json()
    assert stored["completed"] is False  # an even number of flips
    assert stored in [answer.json() for answer in answers]  # exactly as the last flip to commit answered


CREATES = 200
CREATORS = 16


def test_two_hundred_concurrent_creates_get_distinct_ids(
    client: httpx.Client, server: "LiveServer", auth: Auth, user_id: str
) -> None:
    headers = auth(user_id)

    def create(creator: int, http: httpx.Client) -> list[httpx.Response]:
        return [
            http.post(tasks_url(user_id), json={"title": f"Create {number}"}, headers=headers)
            for number in share(creator, CREATES, CREATORS)
        ]

    answers = [answer for answers in run_in_threads(server, CREATORS, create) for answer in answers]

    assert all(answer.status_code == 201 for answer in answers), [describe(a) for a in answers if a.status_code != 201]
    created = {answer.json()["id"]: answer.json() for answer in answers}
    assert len(created) == CREATES
    assert sorted(task["title"] for task in created.values()) == sorted(f"Create {n}" for n in range(CREATES))
    for answer in answers:
        assert answer.headers["location"].endswith(tasks_url(user_id, answer.json()["id"]))
    assert stored_tasks(client, auth, user_id) == created
