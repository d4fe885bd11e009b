"""Errors the router makes (no such route, method not allowed, no key) answer in the shape
of the dialect whose paths the request is under, and a 401 names the header that dialect
takes its key in."""

from __future__ import annotations

from .apiutil import Api


async def test_mailerlogic_paths_answer_in_its_shape(api: Api) -> None:
    status, body, resp = await api.call("GET", "/api/v1/send")
    assert status == 405 and "POST" in resp.headers["Allow"]
    assert body == {"error": "Method Not Allowed",
                    "message": "GET is not allowed on /api/v1/send"}
    status, body, _ = await api.call("POST", "/api/v1/send", {}, key=None)
    assert status == 401 and body["error"] == "Unauthorized"
    assert "X-API-Key" in body["message"]


async def test_piisend_paths_answer_in_its_shape(api: Api) -> None:
    status, body, _ = await api.call("GET", "/api/v1/nope")
    assert status == 404 and set(body) == {"detail", "type", "field"}
    assert body["detail"] == "no route GET /api/v1/nope"
    status, body, resp = await api.call("DELETE", "/api/v1/emails")
    assert status == 405 and set(body) == {"detail", "type", "field"}
    status, body, _ = await api.call("GET", "/api/v1/emails", key=None)
    assert status == 401 and "Authorization: Bearer" in body["detail"]


async def test_plunk_paths_answer_in_its_shape(api: Api) -> None:
    status, body, _ = await api.call("GET", "/v1/send")
    assert status == 405 and body["success"] is False
    assert body["error"]["statusCode"] == 405 and body["error"]["requestId"]


async def test_native_paths_keep_relays_shape(api: Api) -> None:
    status, body, _ = await api.call("GET", "/v1/nope")
    assert status == 404 and body == {"error": {"type": "not_found",
                                                "message": "no route GET /v1/nope"}}
