"""An MTA-STS policy host for tests: https://mta-sts.<domain>:<port>/.well-known/mta-sts.txt
on loopback, answering as told (RFC 8461 §3.3)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class PolicyHost:
    body: str = ""
    content_type: str = "text/plain"
    status: int = 200
    location: str = ""  # set: a redirect there, which a fetch must not follow
    port: int = 0
    hits: int = 0
    runner: web.AppRunner | None = field(default=None, repr=False)

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.location:
            raise web.HTTPFound(self.location)
        return web.Response(status=self.status, body=self.body.encode(),
                            content_type=self.content_type)

    async def start(self, tls: ssl.SSLContext) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=tls).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
