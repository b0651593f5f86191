"""Conditional requests, as the contract's "Conditional requests (v2)" promises them.

Every response carrying one task has the strong ETag `"<version>"`; every list response has a strong
ETag of its whole content. `If-Match` on the writes is a compare-and-set (strong comparison: a 412
with the current ETag, and nothing changed, when it fails; of many writers with the same tag exactly
one wins); `If-None-Match` on reads gives a 304 without a body (weak comparison).

Every test runs against the real app over real HTTP, on SQLite and, when TEST_DATABASE_URL is set,
on PostgreSQL; the races use one thread and one connection per client.
"""

import itertools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.conftest import FRONTEND_ORIGIN
from tests.test_concurrency import describe, run_in_threads

if TYPE_CHECKING:
    from tests.conftest import LiveServer

Auth = Callable[[str], dict[str, str]]
MakeTask = Callable[..., dict[str, Any]]

TASK_NOT_FOUND = {"detail": "Task not found", "code": "task_not_found"}
# The writes that take If-Match: (method, path suffix, body).
CONDITIONAL_WRITES = [
    pytest.param("PUT", "", {"title": "Changed"}, id="PUT"),
    pytest.param("PATCH", "", {"title": "Changed"}, id="PATCH"),
    pytest.param("PATCH", "/complete", None, id="toggle"),
    pytest.param("PATCH", "/complete", {"completed": True}, id="set-completed"),
    pytest.param("DELETE", "", None, id="DELETE"),
]
# Each names version 1 among others, or is `*`.
MATCHING_IF_MATCH = ['"1"', '"7", "1"', '"7","1" , "9"', "*", '"x", *']
# Version 2 is current: a weak `W/"2"` never matches under strong comparison, nor do other spellings of 2
# (`"02"`, or a superscript two, which Python's isdigit() takes for a digit).
STALE_IF_MATCH: list[str | bytes] = [
    '"1"',
    'W/"2"',
    'W/"2", "3"',
    '"0", "3"',
    '"02"',
    "2",
    '""',
    "garbage",
    '"99999999999999999999"',
    b'"\xb2"',
]
RACERS = 20
RACE_ROUNDS = 6


def tasks_url(user_id: str, task_id: int | None = None, suffix: str = "") -> str:
    """The URL of a user's tasks, or of one of them."""
    return f"/api/{user_id}/tasks" + (f"/{task_id}" if task_id is not None else "") + suffix


def etag_of(version: int) -> str:
    """A task's strong ETag for `version`."""
    return f'"{version}"'


def read_back(client: httpx.Client, auth: Auth, user_id: str, task_id: int) -> dict[str, Any]:
    """The task as stored now (it must be live)."""
    response = client.get(tasks_url(user_id, task_id), headers=auth(user_id))
    assert response.status_code == 200, response.text
    return response.json()


def assert_strong_list_etag(response: httpx.Response) -> str:
    """The response's ETag, after checking it is a strong, quoted entity tag."""
    assert response.status_code == 200, response.text
    etag = response.headers["etag"]
    assert not etag.startswith("W/")
    assert len(etag) > 2 and etag.startswith('"') and etag.endswith('"') and '"' not in etag[1:-1]
    return etag


# --- ETags on responses -----------------------------------------------------------------------------


def test_every_response_carrying_one_task_has_its_version_as_a_strong_etag(
    client: httpx.Client, auth: Auth, user_id: str
) -> None:
    headers = auth(user_id)
    url = tasks_url(user_id)
    created = client.post(url, json={"title": "Tagged"}, headers=headers)
    task_id = created.json()["id"]
    answers = [
        created,
        client.get(tasks_url(user_id, task_id), headers=headers),
        client.put(tasks_url(user_id, task_id), json={"title": "Put"}, headers=headers),
        client.patch(tasks_url(user_id, task_id), json={"description": "Patched"}, headers=headers),
        client.patch(tasks_url(user_id, task_id, "/complete"), headers=headers),
        client.patch(tasks_url(user_id, task_id, "/complete"), json={"completed": False}, headers=headers),
        client.patch(tasks_url(user_id, task_id), json={}, headers=headers),
    ]
    assert client.delete(tasks_url(user_id, task_id), headers=headers).status_code == 204
    answers.append(client.post(f"/api/{user_id}/trash/{task_id}/restore", headers=headers))

    assert [answer.status_code for answer in answers] == [201, 200, 200, 200, 200, 200, 200, 200]
    assert [answer.json()["version"] for answer in answers] == [1, 1, 2, 3, 4, 5, 5, 7]
    for answer in answers:
        assert answer.headers["etag"] == etag_of(answer.json()["version"]), describe(answer)


def test_head_of_a_task_has_the_same_etag_as_its_get(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id)
    head = client.head(tasks_url(user_id, task["id"]), headers=auth(user_id))
    assert head.status_code == 200
    assert head.headers["etag"] == etag_of(1)
    assert head.content == b""


def test_the_task_list_etag_is_strong_and_stays_while_nothing_changes(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    make_task(user_id, "One")
    make_task(user_id, "Two")
    first = assert_strong_list_etag(client.get(tasks_url(user_id), headers=auth(user_id)))
    again = assert_strong_list_etag(client.get(tasks_url(user_id), headers=auth(user_id)))
    assert again == first
    # A list's ETag is no task's ETag, and another query (other content) has another one.
    assert first not in (etag_of(1), etag_of(2))
    filtered = client.get(tasks_url(user_id), params={"q": "One"}, headers=auth(user_id))
    assert assert_strong_list_etag(filtered) != first


def test_the_task_list_etag_changes_when_an_item_changes(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id, "Before")
    before = assert_strong_list_etag(client.get(tasks_url(user_id), headers=auth(user_id)))
    client.patch(tasks_url(user_id, task["id"]), json={"title": "After"}, headers=auth(user_id))
    after = assert_strong_list_etag(client.get(tasks_url(user_id), headers=auth(user_id)))
    assert after != before
    # A change that sends the values the task already has still moves its version, and the list's ETag.
    client.patch(tasks_url(user_id, task["id"]), json={"title": "After"}, headers=auth(user_id))
    assert assert_strong_list_etag(client.get(tasks_url(user_id), headers=auth(user_id))) != after


def test_the_task_list_etag_changes_when_only_the_total_changes(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    make_task(user_id, "First")
    make_task(user_id, "Second")
    page = {"sort": "created", "order": "asc", "limit": 1}
    before = client.get(tasks_url(user_id), params=page, headers=auth(user_id))
    make_task(user_id, "Third")
    after = client.get(tasks_url(user_id), params=page, headers=auth(user_id))

    # Same items, same Link (the next page is at the same offset): only X-Total-Count differs.
    assert after.content == before.content
    assert after.headers["link"] == before.headers["link"]
    assert (before.headers["x-total-count"], after.headers["x-total-count"]) == ("2", "3")
    assert assert_strong_list_etag(after) != assert_strong_list_etag(before)


def test_the_task_list_etag_changes_when_only_the_link_changes(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    for number in range(3):
        make_task(user_id, f"Task {number}")
    # The same page, once with an empty search (which filters nothing): its links keep the request's own query.
    one_way = client.get(tasks_url(user_id), params={"limit": 1, "offset": 1}, headers=auth(user_id))
    other_way = client.get(tasks_url(user_id), params={"limit": 1, "offset": 1, "q": ""}, headers=auth(user_id))

    assert other_way.content == one_way.content
    assert other_way.headers["x-total-count"] == one_way.headers["x-total-count"] == "3"
    assert other_way.headers["link"] != one_way.headers["link"]
    assert assert_strong_list_etag(other_way) != assert_strong_list_etag(one_way)


def test_the_trash_list_etag_changes_when_its_content_changes(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    trash = f"/api/{user_id}/trash"
    first, second = make_task(user_id, "First"), make_task(user_id, "Second")
    empty = assert_strong_list_etag(client.get(trash, headers=auth(user_id)))
    client.delete(tasks_url(user_id, first["id"]), headers=auth(user_id))
    one = assert_strong_list_etag(client.get(trash, headers=auth(user_id)))
    assert assert_strong_list_etag(client.get(trash, headers=auth(user_id))) == one
    client.delete(tasks_url(user_id, second["id"]), headers=auth(user_id))
    two = assert_strong_list_etag(client.get(trash, headers=auth(user_id)))
    client.delete(f"{trash}/{first['id']}", headers=auth(user_id))
    back_to_one = assert_strong_list_etag(client.get(trash, headers=auth(user_id)))
    assert len({empty, one, two, back_to_one}) == 4


def test_the_tags_list_etag_changes_when_a_count_or_a_tag_changes(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    tags = f"/api/{user_id}/tags"
    task = make_task(user_id, tags=["home"])
    one = assert_strong_list_etag(client.get(tags, headers=auth(user_id)))
    assert assert_strong_list_etag(client.get(tags, headers=auth(user_id))) == one
    make_task(user_id, tags=["home"])
    two = assert_strong_list_etag(client.get(tags, headers=auth(user_id)))
    client.patch(tasks_url(user_id, task["id"]), json={"tags": ["work"]}, headers=auth(user_id))
    renamed = assert_strong_list_etag(client.get(tags, headers=auth(user_id)))
    assert len({one, two, renamed}) == 3


# --- If-Match -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "suffix", "body"), CONDITIONAL_WRITES)
def test_a_write_whose_if_match_names_the_current_etag_succeeds(
    client: httpx.Client,
    auth: Auth,
    user_id: str,
    make_task: MakeTask,
    method: str,
    suffix: str,
    body: dict[str, Any] | None,
) -> None:
    for if_match in MATCHING_IF_MATCH:
        task = make_task(user_id)
        response = client.request(
            method, tasks_url(user_id, task["id"], suffix), json=body, headers=auth(user_id) | {"If-Match": if_match}
        )
        if method == "DELETE":
            assert response.status_code == 204, (if_match, describe(response))
            assert client.get(tasks_url(user_id, task["id"]), headers=auth(user_id)).status_code == 404
            continue
        assert response.status_code == 200, (if_match, describe(response))
        assert response.json()["version"] == 2
        assert response.headers["etag"] == etag_of(2)
        assert read_back(client, auth, user_id, task["id"]) == response.json()


@pytest.mark.parametrize(("method", "suffix", "body"), CONDITIONAL_WRITES)
def test_a_write_whose_if_match_does_not_name_the_current_etag_is_412_and_changes_nothing(
    client: httpx.Client,
    auth: Auth,
    user_id: str,
    make_task: MakeTask,
    method: str,
    suffix: str,
    body: dict[str, Any] | None,
) -> None:
    task = make_task(user_id, "Untouched")
    client.patch(tasks_url(user_id, task["id"]), json={"description": "now at version 2"}, headers=auth(user_id))
    before = read_back(client, auth, user_id, task["id"])
    for if_match in STALE_IF_MATCH:
        response = client.request(
            method, tasks_url(user_id, task["id"], suffix), json=body, headers=auth(user_id) | {"If-Match": if_match}
        )
        assert response.status_code == 412, (if_match, describe(response))
        assert response.json()["code"] == "precondition_failed"
        assert isinstance(response.json()["detail"], str)
        assert response.headers["etag"] == etag_of(2)
        assert read_back(client, auth, user_id, task["id"]) == before


def test_a_weak_etag_never_satisfies_if_match_even_when_it_names_the_current_version(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id, "Untouched")
    response = client.patch(
        tasks_url(user_id, task["id"]), json={"title": "Changed"}, headers=auth(user_id) | {"If-Match": 'W/"1"'}
    )
    assert response.status_code == 412
    assert response.json()["code"] == "precondition_failed"
    assert response.headers["etag"] == etag_of(1)
    assert read_back(client, auth, user_id, task["id"]) == task


@pytest.mark.parametrize(("method", "suffix", "body"), CONDITIONAL_WRITES)
def test_if_match_on_a_missing_another_users_or_trashed_task_is_404(
    client: httpx.Client,
    auth: Auth,
    user_id: str,
    other_user_id: str,
    make_task: MakeTask,
    method: str,
    suffix: str,
    body: dict[str, Any] | None,
) -> None:
    others = make_task(other_user_id, "Not yours")
    trashed = make_task(user_id, "In the trash")
    client.delete(tasks_url(user_id, trashed["id"]), headers=auth(user_id))
    for task_id, if_match in itertools.product((others["id"], trashed["id"], 2_000_000_000), ('"1"', '"2"', "*")):
        response = client.request(
            method, tasks_url(user_id, task_id, suffix), json=body, headers=auth(user_id) | {"If-Match": if_match}
        )
        assert response.status_code == 404, (if_match, describe(response))
        assert response.json() == TASK_NOT_FOUND
        assert "etag" not in response.headers
    assert read_back(client, auth, other_user_id, others["id"]) == others


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_an_empty_update_is_still_held_to_its_if_match(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str
) -> None:
    task = make_task(user_id)
    url = tasks_url(user_id, task["id"])
    stale = client.request(method, url, json={}, headers=auth(user_id) | {"If-Match": '"9"'})
    assert stale.status_code == 412, describe(stale)
    assert stale.json()["code"] == "precondition_failed"
    assert stale.headers["etag"] == etag_of(1)

    current = client.request(method, url, json={}, headers=auth(user_id) | {"If-Match": '"1"'})
    assert current.status_code == 200, describe(current)
    assert current.json() == task  # nothing sent, nothing moved: not even the version
    assert current.headers["etag"] == etag_of(1)


def test_an_invalid_body_is_422_before_a_stale_if_match(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id)
    response = client.patch(
        tasks_url(user_id, task["id"]), json={"title": "   "}, headers=auth(user_id) | {"If-Match": '"9"'}
    )
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"
    assert read_back(client, auth, user_id, task["id"]) == task


def test_a_write_after_a_412_succeeds_with_the_etag_the_412_gave(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id)
    url = tasks_url(user_id, task["id"])
    client.patch(url, json={"title": "Other tab"}, headers=auth(user_id))
    refused = client.patch(url, json={"title": "This tab"}, headers=auth(user_id) | {"If-Match": '"1"'})
    assert refused.status_code == 412
    retried = client.patch(
        url, json={"title": "This tab"}, headers=auth(user_id) | {"If-Match": refused.headers["etag"]}
    )
    assert retried.status_code == 200
    assert retried.json()["title"] == "This tab"
    assert retried.json()["version"] == 3


# --- Racing writers with the same If-Match ---------------------------------------------------------------


def race_with_one_etag(
    server: "LiveServer",
    auth: Auth,
    user_id: str,
    task_ids: list[int],
    method: str,
    suffix: str,
    body: Callable[[int], dict[str, Any] | None],
) -> list[list[httpx.Response]]:
    """RACERS clients send the same conditional write (If-Match `"1"`) to each task in turn; answers by round."""
    headers = auth(user_id) | {"If-Match": etag_of(1)}
    round_start = threading.Barrier(RACERS)

    def racer(index: int, http: httpx.Client) -> list[httpx.Response]:
        answers = []
        for task_id in task_ids:
            round_start.wait(timeout=60)
            answers.append(http.request(method, tasks_url(user_id, task_id, suffix), json=body(index), headers=headers))
        return answers

    by_racer = run_in_threads(server, RACERS, racer)
    return [[answers[number] for answers in by_racer] for number in range(len(task_ids))]


def test_of_many_patches_with_the_same_if_match_exactly_one_succeeds(
    client: httpx.Client, server: "LiveServer", auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task_ids = [make_task(user_id, f"Round {number}")["id"] for number in range(RACE_ROUNDS)]
    rounds = race_with_one_etag(server, auth, user_id, task_ids, "PATCH", "", lambda index: {"title": f"By {index}"})

    for task_id, answers in zip(task_ids, rounds, strict=True):
        winners = [answer for answer in answers if answer.status_code == 200]
        losers = [answer for answer in answers if answer.status_code != 200]
        assert len(winners) == 1, [describe(answer) for answer in answers]
        for loser in losers:
            assert loser.status_code == 412, describe(loser)
            assert loser.json()["code"] == "precondition_failed"
            assert loser.headers["etag"] == etag_of(2)
        stored = read_back(client, auth, user_id, task_id)
        assert stored == winners[0].json()
        assert stored["version"] == 2


def test_of_many_toggles_with_the_same_if_match_exactly_one_flips_the_task(
    client: httpx.Client, server: "LiveServer", auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task_ids = [make_task(user_id, f"Round {number}")["id"] for number in range(RACE_ROUNDS)]
    rounds = race_with_one_etag(server, auth, user_id, task_ids, "PATCH", "/complete", lambda index: None)

    for task_id, answers in zip(task_ids, rounds, strict=True):
        assert sorted(answer.status_code for answer in answers) == [200] + [412] * (RACERS - 1), [
            describe(answer) for answer in answers
        ]
        assert all(answer.headers["etag"] == etag_of(2) for answer in answers)
        stored = read_back(client, auth, user_id, task_id)
        assert stored["completed"] is True
        assert stored["version"] == 2


def test_of_many_deletes_with_the_same_if_match_exactly_one_moves_the_task_to_the_trash(
    client: httpx.Client, server: "LiveServer", auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task_ids = [make_task(user_id, f"Round {number}")["id"] for number in range(RACE_ROUNDS)]
    rounds = race_with_one_etag(server, auth, user_id, task_ids, "DELETE", "", lambda index: None)

    for answers in rounds:
        assert [answer.status_code for answer in answers].count(204) == 1, [describe(answer) for answer in answers]
        # A loser finds the task changed (412) or, once the winner committed, gone from /tasks (404).
        assert all(answer.status_code in (204, 404, 412) for answer in answers), [describe(a) for a in answers]
    trash = client.get(f"/api/{user_id}/trash", params={"limit": 500}, headers=auth(user_id)).json()
    assert sorted(task["id"] for task in trash) == sorted(task_ids)
    assert all(task["version"] == 2 for task in trash)


# --- If-None-Match ------------------------------------------------------------------------------------------


def test_a_task_read_whose_if_none_match_matches_is_304_without_a_body(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id)
    for method in ("GET", "HEAD"):
        for if_none_match in ('"1"', 'W/"1"', "*", '"7", "1"', 'W/"7", W/"1"', '"x", *'):
            headers = auth(user_id) | {"If-None-Match": if_none_match}
            response = client.request(method, tasks_url(user_id, task["id"]), headers=headers)
            assert response.status_code == 304, (method, if_none_match)
            assert response.headers["etag"] == etag_of(1)
            assert response.content == b""


def test_a_task_read_whose_if_none_match_does_not_match_is_200(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id)
    for if_none_match in ('"2"', 'W/"2"', '"1 "', "1", '"01"', "garbage", b'"\xb9"'):
        response = client.get(tasks_url(user_id, task["id"]), headers=auth(user_id) | {"If-None-Match": if_none_match})
        assert response.status_code == 200, if_none_match
        assert response.json() == task
        assert response.headers["etag"] == etag_of(1)


def test_a_task_read_with_an_old_etag_is_200_once_the_task_changed(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id)
    url = tasks_url(user_id, task["id"])
    client.patch(url, json={"title": "Changed"}, headers=auth(user_id))
    response = client.get(url, headers=auth(user_id) | {"If-None-Match": etag_of(1)})
    assert response.status_code == 200
    assert response.json()["title"] == "Changed"
    assert response.headers["etag"] == etag_of(2)
    assert client.get(url, headers=auth(user_id) | {"If-None-Match": etag_of(2)}).status_code == 304


def test_if_none_match_star_on_a_missing_or_another_users_task_is_404(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask
) -> None:
    others = make_task(other_user_id)
    for task_id in (others["id"], 2_000_000_000):
        response = client.get(tasks_url(user_id, task_id), headers=auth(user_id) | {"If-None-Match": "*"})
        assert response.status_code == 404
        assert response.json() == TASK_NOT_FOUND


@pytest.mark.parametrize("path", ["/tasks", "/trash", "/tags"])
def test_a_list_read_whose_if_none_match_matches_is_304_until_the_list_changes(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, path: str
) -> None:
    url = f"/api/{user_id}{path}"
    task = make_task(user_id, tags=["home"])
    client.delete(tasks_url(user_id, make_task(user_id)["id"]), headers=auth(user_id))
    etag = assert_strong_list_etag(client.get(url, headers=auth(user_id)))
    for sent in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        unchanged = client.get(url, headers=auth(user_id) | {"If-None-Match": sent})
        assert unchanged.status_code == 304, sent
        assert unchanged.headers["etag"] == etag
        assert unchanged.content == b""
    assert client.get(url, headers=auth(user_id) | {"If-None-Match": '"other"'}).status_code == 200

    client.patch(tasks_url(user_id, task["id"]), json={"tags": ["work"]}, headers=auth(user_id))
    client.delete(tasks_url(user_id, task["id"]), headers=auth(user_id))  # changes all three lists
    changed = client.get(url, headers=auth(user_id) | {"If-None-Match": etag})
    assert changed.status_code == 200
    assert assert_strong_list_etag(changed) != etag


def test_without_conditional_headers_writes_behave_as_in_v1(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id)
    url = tasks_url(user_id, task["id"])
    for _ in range(3):  # no precondition: each write applies, whatever version the client last saw
        assert client.patch(url, json={"title": "Again"}, headers=auth(user_id)).status_code == 200
    assert read_back(client, auth, user_id, task["id"])["version"] == 4


# --- Browser access -----------------------------------------------------------------------------------------


def test_a_preflight_may_ask_for_the_conditional_and_idempotency_headers(client: httpx.Client, user_id: str) -> None:
    preflight = {
        "Origin": FRONTEND_ORIGIN,
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "authorization, content-type, if-match, if-none-match, idempotency-key",
    }
    response = client.options(tasks_url(user_id, 1), headers=preflight)
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == FRONTEND_ORIGIN
    allowed = {name.strip().lower() for name in response.headers["access-control-allow-headers"].split(",")}
    assert {"if-match", "if-none-match", "idempotency-key"} <= allowed


def test_a_browser_may_read_the_etag_of_a_response(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id)
    for url in (tasks_url(user_id, task["id"]), tasks_url(user_id)):
        response = client.get(url, headers=auth(user_id) | {"Origin": FRONTEND_ORIGIN})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == FRONTEND_ORIGIN
        exposed = {name.strip().lower() for name in response.headers["access-control-expose-headers"].split(",")}
        assert {"etag", "idempotent-replayed"} <= exposed
