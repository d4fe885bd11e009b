"""Signed per-recipient tokens, and what is built on them: the one-click unsubscribe headers
of broadcast mail (RFC 8058) and the HTTP endpoint they point to.

A token is the recipient's id and 80 bits of HMAC-SHA256 over it, in lower-case base32: an
altered or made-up token maps to nothing (404), never to another recipient."""

from __future__ import annotations

import base64
import hmac
import html
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from ..store import SQLiteStore

TOKEN_KEY_FILE = "token.key"
_MAC_BYTES = 10


def load_key(data_dir: Path, name: str = TOKEN_KEY_FILE) -> bytes:
    """The key every process of this relay signs tokens with, made once (0600) in data_dir
    (32 random octets; under another `name`, e.g. an Ed25519 seed for webhook signatures)."""
    path = data_dir / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    key = os.urandom(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


class Tokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def make(self, kind: str, recipient_id: int) -> str:
        raw = recipient_id.to_bytes(8, "big")
        return b32(raw + self._mac(kind, raw))

    def read(self, kind: str, token: str) -> int | None:
        """The recipient id, or None for anything not made by `make` for this kind."""
        try:
            raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
        except (ValueError, TypeError):
            return None
        if len(raw) != 8 + _MAC_BYTES:
            return None
        if not hmac.compare_digest(raw[8:], self._mac(kind, raw[:8])):
            return None
        return int.from_bytes(raw[:8], "big")

    def make_link(self, recipient_id: int, url: str) -> str:
        """A click token: the recipient and the original URL, signed."""
        raw = recipient_id.to_bytes(8, "big") + url.encode("utf-8")
        return base64.urlsafe_b64encode(raw + self._mac("click", raw)).decode().rstrip("=")

    def read_link(self, token: str) -> tuple[int, str] | None:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            return None
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if len(body) < 9 or not hmac.compare_digest(mac, self._mac("click", body)):
            return None
        try:
            return int.from_bytes(body[:8], "big"), body[8:].decode("utf-8")
        except UnicodeDecodeError:
            return None

    def mac(self, kind: str, raw: bytes) -> bytes:
        """The MAC of anything else relay signs with this key (e.g. verp's Feedback-ID)."""
        return self._mac(kind, raw)

    def _mac(self, kind: str, raw: bytes) -> bytes:
        # hmac.digest: OpenSSL's one-shot HMAC, without hmac.new's Python object (~3x faster)
        return hmac.digest(self._key, kind.encode() + b"\0" + raw, "sha256")[:_MAC_BYTES]


_B32_PAIRS = [a + b for a in "abcdefghijklmnopqrstuvwxyz234567"
              for b in "abcdefghijklmnopqrstuvwxyz234567"]  # 10 bits -> two characters


def b32(raw: bytes) -> str:
    """base64.b32encode(raw), lower-cased, without its "=" padding: the form of relay's
    tokens. base64's encoder is Python, 5 octets at a time; this takes the whole value as
    one integer, two characters a step (~4x faster for a token, two of them a message)."""
    chars = -(-len(raw) * 8 // 5)  # the last one padded with zero bits
    steps = -(-chars // 2)
    value = int.from_bytes(raw, "big") << (steps * 10 - len(raw) * 8)
    text = "".join([_B32_PAIRS[(value >> shift) & 0x3FF]
                    for shift in range(steps * 10 - 10, -1, -10)])
    return text[:chars]


_HREF = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(["'])(https?://[^"']+)\2""", re.IGNORECASE)
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


def rewrite_html(html_text: str, tokens: Tokens, recipient_id: int, public_url: str, *,
                 opens: bool, clicks: bool) -> str:
    """Links through signed redirects, and an open pixel before </body>."""
    base = public_url.rstrip("/")
    if clicks:
        def link(m: re.Match[str]) -> str:
            url = html.unescape(m.group(3))
            return f"{m.group(1)}{m.group(2)}{base}/c/{tokens.make_link(recipient_id, url)}" \
                   f"{m.group(2)}"

        html_text = _HREF.sub(link, html_text)
    if opens:
        pixel = (f'<img src="{base}/o/{tokens.make("open", recipient_id)}" width="1" '
                 'height="1" alt="" style="display:block;border:0;width:1px;height:1px">')
        found = _BODY_END.search(html_text)
        html_text = (html_text[:found.start()] + pixel + html_text[found.start():]
                     if found else html_text + pixel)
    return html_text


# Named rules that mark an open or a click as a machine's, not a person's
PROXY_AGENTS = (("google-image-proxy", "GoogleImageProxy"), ("yahoo-mail-proxy", "YahooMailProxy"),
                ("outlook-link-scanner", "Microsoft Office/"), ("bot", "bot"))
CLICK_TOO_SOON = 2.0  # seconds after delivery: a scanner, not a reader


def machine_rule(method: str, user_agent: str, kind: str, seconds_since_delivery: float | None
                 ) -> str | None:
    if method == "HEAD":
        return "head-request"
    if user_agent.strip() == "Mozilla/5.0":  # Apple Mail Privacy Protection's prefetch
        return "apple-mail-privacy-proxy"
    for name, needle in PROXY_AGENTS:
        if needle.lower() in user_agent.lower():
            return name
    if kind == "click" and seconds_since_delivery is not None and \
            seconds_since_delivery < CLICK_TOO_SOON:
        return "click-within-2s-of-delivery"
    return None


def unsubscribe_headers(tokens: Tokens, recipient_id: int, public_url: str,
                        return_path_host: str) -> list[tuple[str, str]]:
    """RFC 8058: an HTTPS one-click URL and a mailto: address for the inbound listener."""
    token = tokens.make("unsubscribe", recipient_id)
    url = f"{public_url.rstrip('/')}/u/{token}"
    mailto = f"mailto:unsub+{token}@{return_path_host}" if return_path_host else ""
    value = f"<{url}>" + (f", <{mailto}>" if mailto else "")
    return [("List-Unsubscribe", value),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")]


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Unsubscribe</title>
<meta name="viewport" content="width=device-width"></head><body style="font-family:sans-serif">
<h1>{title}</h1><p>{text}</p>{form}</body></html>"""


class UnsubscribeRoutes:
    """POST /u/TOKEN with List-Unsubscribe=One-Click (what mail clients send, RFC 8058)
    unsubscribes and answers 200, no redirect. GET shows a page with a button and changes
    nothing (link scanners follow GETs). Cookies are neither set nor read."""

    def __init__(self, store: SQLiteStore, tokens: Tokens) -> None:
        self._store = store
        self._tokens = tokens

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/u/{token}", self.page), web.post("/u/{token}", self.one_click)]

    async def page(self, request: web.Request) -> web.Response:
        self._recipient(request)
        form = ('<form method="post"><input type="hidden" name="List-Unsubscribe" '
                'value="One-Click"><button type="submit">Unsubscribe</button></form>')
        return _html(200, "Unsubscribe?", "Press the button to stop this sender's mailings.",
                     form)

    async def one_click(self, request: web.Request) -> web.Response:
        recipient_id = self._recipient(request)
        form = await request.post()
        if form.get("List-Unsubscribe") != "One-Click":
            return _html(400, "Not unsubscribed",
                         "The request lacks List-Unsubscribe=One-Click.", "")
        done = await self._store.unsubscribe(recipient_id, time.time())
        if done is None:
            raise web.HTTPNotFound()
        address, scope = done
        return _html(200, "Unsubscribed", f"{html.escape(address)} gets no more mailings "
                     f"from {html.escape(scope or 'this sender')}.", "")

    def _recipient(self, request: web.Request) -> int:
        found = self._tokens.read("unsubscribe", request.match_info["token"])
        if found is None:
            raise web.HTTPNotFound()  # a made-up or altered token: nothing to say
        return found


def _html(status: int, title: str, text: str, form: str) -> web.Response:
    return web.Response(status=status, content_type="text/html",
                        text=_PAGE.format(title=title, text=text, form=form))


_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")


class TrackingRoutes:
    """GET/HEAD /o/TOKEN (the pixel) and /c/TOKEN (a link): an opened or clicked event with
    time, user agent and address, flagged when a named rule says a machine did it."""

    def __init__(self, store: SQLiteStore, tokens: Tokens) -> None:
        self._store = store
        self._tokens = tokens

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/o/{token}", self.open), web.get("/c/{token}", self.click)]
        # aiohttp answers HEAD for GET routes through the same handlers

    async def open(self, request: web.Request) -> web.Response:
        recipient_id = self._tokens.read("open", request.match_info["token"])
        if recipient_id is None:
            raise web.HTTPNotFound()
        await self._record(request, recipient_id, "email.opened", "open", {})
        return web.Response(body=_GIF, content_type="image/gif",
                            headers={"Cache-Control": "no-store, max-age=0"})

    async def click(self, request: web.Request) -> web.Response:
        found = self._tokens.read_link(request.match_info["token"])
        if found is None:
            raise web.HTTPNotFound()  # never a redirect for a token relay did not sign
        recipient_id, url = found
        await self._record(request, recipient_id, "email.clicked", "click", {"url": url})
        raise web.HTTPFound(url, headers={"Cache-Control": "no-store"})

    async def _record(self, request: web.Request, recipient_id: int, event: str, kind: str,
                      extra: dict[str, object]) -> None:
        now = time.time()
        user_agent = request.headers.get("User-Agent", "")
        delivered = await self._store.delivered_at(recipient_id)
        rule = machine_rule(request.method, user_agent, kind,
                            None if delivered is None else now - delivered)
        await self._store.add_recipient_event(recipient_id, event, now, {
            **extra, "userAgent": user_agent, "ip": request.remote,
            "machine": rule is not None, "machineRule": rule})
