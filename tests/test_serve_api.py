"""The serving app's HTTP API without Ray: the FastAPI app itself (``app.serve.api.api``, the
routes the Serve deployment declares on it) driven over ASGI in this process. Every refusal
has the one documented shape ``{"error": "<one line>"}`` with a meaningful status; ``HEAD`` is
answered wherever ``GET`` is; the loopback rewrite of Serve's replica bind is exact."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from app.serve import http as _routes  # noqa: F401  (declares the routes on the API)
from app.serve.api import RecommendRequest, ScoreRequest, api, new_api
from app.serve.loopback import is_loopback, on_loopback

# The deployment's routes take their instance from the Serve replica they run in, before the
# body is read; the request models, the handlers and the middleware are checked here on an
# app with the same models whose routes need no replica.
probe = new_api()


@probe.post("/recommend")
async def _recommend(request: RecommendRequest) -> dict[str, Any]:
    return {"user_id": request.user_id}


@probe.post("/score")
async def _score(request: ScoreRequest) -> dict[str, Any]:
    return {"pairs": len(request.pairs)}


def call(method: str, path: str, body: bytes | str = b"",
         content_type: str = "application/json", app: Any = api
         ) -> tuple[int, dict[str, str], bytes]:
    """One request to ``app`` over ASGI: (status, headers, body)."""
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    messages: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.sleep(3600)  # (never: the app reads the body once)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 50000),
             "headers": [(b"content-type", content_type.encode()),
                         (b"content-length", str(len(raw)).encode())]}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    body_out = b"".join(m.get("body", b"") for m in messages
                        if m["type"] == "http.response.body")
    return start["status"], headers, body_out


def error_of(status: int, body: bytes) -> str:
    """The one error shape: a JSON object with exactly ``error``, one line."""
    parsed = json.loads(body)
    assert set(parsed) == {"error"}, (status, parsed)
    assert isinstance(parsed["error"], str) and "\n" not in parsed["error"], parsed
    return parsed["error"]


@pytest.mark.parametrize("body, reason", [
    ({"user_id": "", "k": 5}, "user_id: must not be empty or blank"),
    ({"user_id": "   ", "k": 5}, "user_id: must not be empty or blank"),
    ('{"user_id": "\\ud800", "k": 5}', "user_id: contains a lone surrogate (U+D800)"),
    ('{"user_id": "a\\udfff", "k": 5}', "user_id: contains a lone surrogate (U+DFFF)"),
    ('{"user_id": "1", "history": ["1", "\\ud800"]}',
     "history.1: contains a lone surrogate (U+D800)"),
    ('{"user_id": "1", "\\ud800": 1}', "unicode"),  # a field name that is not text
    ("[" * 100_000 + "]" * 100_000, "malformed JSON: nested too deeply"),
    ('{"user_id": "1", "k": 5', "malformed JSON"),
    ({"user_id": ["1"], "k": 5}, "user_id"),
])
def test_refused_requests_get_422_and_one_line_naming_the_input(body, reason):
    text = body if isinstance(body, str) else json.dumps(body)
    status, headers, out = call("POST", "/recommend", text, app=probe)
    assert status == 422, (status, out[:300])
    assert headers["content-type"] == "application/json"
    assert reason in error_of(status, out)


@pytest.mark.parametrize("body, reason", [
    ({"pairs": [{"user_id": "", "item_id": "1"}]}, "pairs.0.user_id: must not be empty"),
    ('{"pairs": [{"user_id": "1", "item_id": "\\ud800"}]}',
     "pairs.0.item_id: contains a lone surrogate"),
])
def test_pairs_with_empty_or_invalid_ids_are_refused(body, reason):
    text = body if isinstance(body, str) else json.dumps(body)
    status, _, out = call("POST", "/score", text, app=probe)
    assert status == 422 and reason in error_of(status, out), out


def test_valid_ids_pass():
    for user in ("1", "007", 42, "naïve", "\u00e9t\u00e9"):
        status, _, out = call("POST", "/recommend", json.dumps({"user_id": user}), app=probe)
        assert status == 200 and json.loads(out) == {"user_id": user}, out


def test_unknown_paths_and_wrong_methods_answer_in_the_error_shape():
    status, _, out = call("GET", "/no-such-path")
    assert status == 404 and "/no-such-path" in error_of(status, out)
    status, headers, out = call("GET", "/recommend")
    assert status == 405 and "GET /recommend" in error_of(status, out)
    assert headers.get("allow") == "POST"
    status, _, out = call("DELETE", "/healthz")
    assert status == 405 and "DELETE /healthz" in error_of(status, out)


@pytest.mark.parametrize("path", ["/openapi.json", "/docs"])
def test_head_is_answered_wherever_get_is(path):
    get_status, get_headers, get_body = call("GET", path)
    status, headers, body = call("HEAD", path)
    assert get_status == status == 200 and get_body and body == b""
    assert headers["content-type"] == get_headers["content-type"]
    assert headers.get("content-length") == get_headers.get("content-length")
    status, headers, out = call("HEAD", "/recommend")  # POST only: refused as GET would be
    assert status == 405 and out == b"" and headers.get("allow") == "POST"
    assert call("HEAD", "/no-such-path")[0] == 404


def test_the_api_page_documents_the_new_fields():
    _, _, body = call("GET", "/openapi.json")
    schemas = json.loads(body)["components"]["schemas"]
    assert "unknown_history_items" in schemas["RecommendResponse"]["properties"]
    assert "pending" in schemas["VersionInfo"]["properties"]


def test_an_app_failure_is_a_500_in_the_error_shape():
    """A valid request reaches the route, which outside a Serve replica cannot run: the
    failure is answered as the app's own 500, never Serve's plain text."""
    status, headers, out = call("POST", "/recommend", json.dumps({"user_id": "1", "k": 5}))
    assert status == 500 and headers["content-type"] == "application/json"
    assert error_of(status, out).startswith("internal error: ")


@pytest.mark.parametrize("address, want", [
    ("[::]:0", "127.0.0.1:0"), ("0.0.0.0:0", "127.0.0.1:0"), ("[::]:7000", "127.0.0.1:7000"),
    ("10.0.0.5:0", "10.0.0.5:0"), ("127.0.0.1:0", "127.0.0.1:0"), ("[::1]:0", "[::1]:0"),
])
def test_only_every_interface_binds_are_moved_to_loopback(address, want):
    assert on_loopback(address) == want


def test_loopback_addresses():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.5") and not is_loopback("::") and not is_loopback("x")
