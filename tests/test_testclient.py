"""The service under FastAPI's `TestClient` (the `test_client` fixture): what adopters use for their own tests."""

from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient


def test_a_task_round_trip_through_the_test_client(test_client: TestClient, auth: Callable, user_id: str) -> None:
    headers = auth(user_id)
    created = test_client.post(f"/api/{user_id}/tasks", json={"title": "Buy milk"}, headers=headers)
    assert created.status_code == 201, created.text
    assert created.headers["location"].endswith(f"/api/{user_id}/tasks/{created.json()['id']}")

    listed = test_client.get(f"/api/{user_id}/tasks", headers=headers)
    assert listed.status_code == 200
    assert [task["title"] for task in listed.json()] == ["Buy milk"]
    assert listed.headers["x-total-count"] == "1"

    toggled = test_client.patch(f"/api/{user_id}/tasks/{created.json()['id']}/complete", headers=headers)
    assert toggled.json()["completed"] is True


def test_the_test_client_sees_the_same_errors_as_a_real_client(test_client: TestClient, auth: Callable) -> None:
    missing_token = test_client.get("/api/alice/tasks")
    assert missing_token.status_code == 401
    assert missing_token.headers["www-authenticate"] == "Bearer"
    assert missing_token.json()["code"] == "not_authenticated"

    someone_else = test_client.get("/api/alice/tasks", headers=auth("bob"))
    assert (someone_else.status_code, someone_else.json()["code"]) == (403, "forbidden")


def test_the_test_client_runs_the_start_up_and_health_check(test_client: TestClient) -> None:
    health = test_client.get("/health")
    assert health.json() == {"status": "healthy", "database": "ok"}
    assert test_client.head("/health").status_code == 200


def test_the_readme_example_runs(tmp_path: Path) -> None:
    """The README's TestClient example is code a newcomer copies: it must work as written."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Testing your own code with `TestClient`", 1)[1]
    example = section.split("```python", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102  (our own README's example)
    tests = [value for name, value in namespace.items() if name.startswith("test_") and callable(value)]
    assert len(tests) == 1
    tests[0](tmp_path)
