"""Every error comes out as `{detail, code}`: unknown routes, wrong methods, big bodies, crashes."""

from collections.abc import Callable, Iterator

import httpx
import pytest

from main import MAX_BODY_BYTES, create_app
from settings import Settings


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    """The response is a JSON error with this status and code, and a string detail."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["code"] == code
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def test_unknown_route_is_404(client: httpx.Client) -> None:
    assert_error(client.get("/no/such/route"), 404, "not_found")


def test_unknown_route_under_api_is_404(client: httpx.Client, auth: Callable, user_id: str) -> None:
    assert_error(client.get(f"/api/{user_id}/projects", headers=auth(user_id)), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/api/u/tasks", {"GET", "HEAD", "POST"}),
        ("POST", "/api/u/tasks/1", {"GET", "HEAD", "PUT", "PATCH", "DELETE"}),
        ("GET", "/api/u/tasks/1/complete", {"PATCH"}),
        ("POST", "/health", {"GET", "HEAD"}),
    ],
)
def test_wrong_method_is_405_with_allow(client: httpx.Client, method: str, path: str, allowed: set[str]) -> None:
    response = client.request(method, path)
    assert_error(response, 405, "method_not_allowed")
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed


def test_body_over_limit_with_content_length_is_413(client: httpx.Client, auth: Callable, user_id: str) -> None:
    body = b'{"title": "' + b"x" * MAX_BODY_BYTES + b'"}'
    response = client.post(
        f"/api/{user_id}/tasks", content=body, headers=auth(user_id) | {"content-type": "application/json"}
    )
    assert_error(response, 413, "payload_too_large")
    assert client.get(f"/api/{user_id}/tasks", headers=auth(user_id)).headers["x-total-count"] == "0"


def test_body_over_limit_without_content_length_is_413(client: httpx.Client, auth: Callable, user_id: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"title": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    headers = auth(user_id) | {"content-type": "application/json"}
    response = client.post(f"/api/{user_id}/tasks", content=chunks(), headers=headers)
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")


def test_body_of_exactly_the_limit_is_read(client: httpx.Client, auth: Callable, user_id: str) -> None:
    padding = MAX_BODY_BYTES - len(b'{"title": "t", "description": null, "pad": ""}')
    body = b'{"title": "t", "description": null, "pad": "' + b"p" * padding + b'"}'
    assert len(body) == MAX_BODY_BYTES
    response = client.post(
        f"/api/{user_id}/tasks", content=body, headers=auth(user_id) | {"content-type": "application/json"}
    )
    assert response.status_code == 201, response.text


def test_413_is_refused_before_the_token_is_checked(client: httpx.Client, user_id: str) -> None:
    response = client.post(f"/api/{user_id}/tasks", content=b"x" * (MAX_BODY_BYTES + 1))
    assert_error(response, 413, "payload_too_large")


def test_validation_error_has_the_fastapi_list_and_a_code(client: httpx.Client, auth: Callable, user_id: str) -> None:
    response = client.post(f"/api/{user_id}/tasks", json={"title": ""}, headers=auth(user_id))
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "validation_error"
    assert body["detail"] and all({"loc", "msg", "type"} <= issue.keys() for issue in body["detail"])
    assert body["detail"][0]["loc"] == ["body", "title"]


def test_body_that_is_not_utf8_is_422(client: httpx.Client, auth: Callable, user_id: str) -> None:
    headers = auth(user_id) | {"content-type": "application/json"}
    response = client.post(f"/api/{user_id}/tasks", content=b'{"title": "\xff\xfe"}', headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"


def test_unexpected_error_is_a_bare_500(settings: Settings, serve: Callable) -> None:
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internal detail at /srv/app.py line 12")

    with serve(app) as live, httpx.Client(base_url=live.url) as http:
        response = http.get("/boom")
        body = assert_error(response, 500, "internal_error")
        assert body == {"detail": "Internal server error", "code": "internal_error"}
        assert "secret" not in response.text and "Traceback" not in response.text
        assert response.headers["x-request-id"]
        assert http.get("/health").status_code == 200  # and it keeps serving


def test_front_door_names_the_service_and_its_docs(client: httpx.Client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.json() == {"message": "Todo API", "version": "1.0.0", "docs": "/docs"}
    assert client.get(response.json()["docs"]).status_code == 200


def test_health_needs_no_token_and_reports_the_database(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "healthy", "database": "ok"}
