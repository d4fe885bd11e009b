"""The MailChannels dialect (seed 000) at /tx/v1. So far: the public key its webhook
signatures verify with, GET /tx/v1/webhook/public-key?id=<keyid> (no API key, as there)."""

from __future__ import annotations

import json

from aiohttp import web

from ...webhooks_mailchannels import Signer


class MailChannelsApi:
    def __init__(self, signer: Signer) -> None:
        self._signer = signer

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/tx/v1/webhook/public-key", self.public_key)]

    async def public_key(self, request: web.Request) -> web.Response:
        key_id = request.query.get("id", "")
        if key_id != self._signer.key_id:
            return _error(404, f"no webhook signing key {key_id!r}", "id")
        return web.json_response(self._signer.public_key_json())


def _error(status: int, message: str, param: str) -> web.Response:
    """MailChannels' error shape ({"errors": [...]}), with the message and field named."""
    return web.Response(status=status, content_type="application/json", body=json.dumps(
        {"errors": [message], "message": message, "param": param}).encode())
