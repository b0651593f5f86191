"""Browser access: allowed origins, preflight, credentials and the exposed headers."""

from collections.abc import Callable

import httpx
import pytest

from main import create_app
from tests.conftest import FRONTEND_ORIGIN, make_settings
from tests.keys import JwksServer

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


def test_preflight_from_allowed_origin_allows_methods_headers_and_credentials(client: httpx.Client) -> None:
    response = client.options("/api/u/tasks/1", headers={"Origin": FRONTEND_ORIGIN} | PREFLIGHT)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == FRONTEND_ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"
    methods = {m.strip() for m in response.headers["access-control-allow-methods"].split(",")}
    assert {"GET", "POST", "PUT", "PATCH", "DELETE"} <= methods
    headers = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= headers


def test_responses_expose_the_headers_a_page_needs(client: httpx.Client, auth: Callable, user_id: str) -> None:
    response = client.get(f"/api/{user_id}/tasks", headers=auth(user_id) | {"Origin": FRONTEND_ORIGIN})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == FRONTEND_ORIGIN
    exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
    assert exposed == {
        "x-total-count",
        "link",
        "location",
        "etag",
        "retry-after",
        "idempotent-replayed",
        "x-request-id",
    }


def test_error_responses_carry_cors_headers_so_the_browser_can_read_them(client: httpx.Client, user_id: str) -> None:
    response = client.get(f"/api/{user_id}/tasks", headers={"Origin": FRONTEND_ORIGIN})
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == FRONTEND_ORIGIN


def test_preflight_from_other_origin_is_refused_as_json(client: httpx.Client) -> None:
    response = client.options("/api/u/tasks", headers={"Origin": "http://evil.example"} | PREFLIGHT)
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    assert response.json()["code"] == "cors_rejected"


def test_simple_request_from_other_origin_gets_no_cors_headers(client: httpx.Client) -> None:
    response = client.get("/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in response.headers


def test_preflight_for_a_header_not_allowed_is_refused(client: httpx.Client) -> None:
    headers = {
        "Origin": FRONTEND_ORIGIN,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "x-secret",
    }
    assert client.options("/api/u/tasks", headers=headers).status_code == 400


@pytest.fixture
def cors_app(database_url: str, jwks_server: JwksServer, serve: Callable) -> Callable:
    """Serve an app with the given CORS settings and return a client for it."""

    def start(**cors: str):
        return serve(create_app(make_settings(database_url, jwks_server, **cors)))

    return start


def test_cors_origins_and_frontend_url_are_both_allowed(cors_app: Callable) -> None:
    with cors_app(cors_origins="https://a.example, https://b.example/", frontend_url="https://app.example") as live:
        for origin in ("https://a.example", "https://b.example", "https://app.example"):
            response = httpx.options(f"{live.url}/api/u/tasks", headers={"Origin": origin} | PREFLIGHT)
            assert response.headers.get("access-control-allow-origin") == origin, origin
        refused = httpx.options(f"{live.url}/api/u/tasks", headers={"Origin": FRONTEND_ORIGIN} | PREFLIGHT)
        assert refused.status_code == 400


def test_wildcard_origin_never_comes_with_credentials(cors_app: Callable) -> None:
    with cors_app(cors_origins="*") as live:
        response = httpx.get(f"{live.url}/health", headers={"Origin": "https://anywhere.example"})
        assert response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers
        preflight = httpx.options(f"{live.url}/api/u/tasks", headers={"Origin": "https://anywhere.example"} | PREFLIGHT)
        assert preflight.status_code == 200
        assert "access-control-allow-credentials" not in preflight.headers
