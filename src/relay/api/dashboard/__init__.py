"""The web dashboard's static files (index.html, app.js, style.css beside this module), served
under /dashboard/ with headers that keep mail's words from running as code: a strict
Content-Security-Policy (no inline script, nothing from elsewhere), no framing, no sniffing.
The page holds no data; its script asks `GET /v1/stats` and `GET /v1/emails/{id}` with the
admin key the user typed (kept in sessionStorage, sent as a Bearer header: no cookie, so no
CSRF)."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

FILES = {  # name -> content type; nothing else under /dashboard/ is served
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
       " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Dashboard:
    """Reads its files once, from the installed package (package-data in pyproject.toml)."""

    def __init__(self) -> None:
        here = resources.files(__name__)
        self._files = {name: here.joinpath(name).read_bytes() for name in FILES}

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/dashboard", self.redirect),
                web.get("/dashboard/", self.index),
                web.get("/dashboard/{name}", self.file)]

    async def redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect("/dashboard/")

    async def index(self, request: web.Request) -> web.Response:
        return self._answer("index.html")

    async def file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in FILES:
            raise web.HTTPNotFound()
        return self._answer(name)

    def _answer(self, name: str) -> web.Response:
        return web.Response(body=self._files[name], headers={
            **HEADERS, "Content-Type": FILES[name]})
