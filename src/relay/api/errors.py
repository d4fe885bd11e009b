"""Typed JSON errors: every 4xx and 5xx is {"error": {"type", "message", "param"?}}."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

STATUS_TYPES = {
    400: "validation_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found", 405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
    415: "unsupported_media_type", 422: "validation_error", 429: "rate_limited",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type or STATUS_TYPES.get(status, "internal_error")
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=json.dumps(self.body()).encode(),
                            content_type="application/json", headers=self.headers)
