"""Open and click tracking, asked for per message: each recipient's html gets signed redirect
links and a pixel at delivery; following them records events, machines flagged by rule."""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path

import aiohttp
import pytest

from relay.feedback import tracking

from .apiutil import SIMPLE, api_client
from .dnsserver import DNSServer
from .sink import Sink
from .test_delivery import wait_final
from .test_unsubscribe import delivering

HTML = ('<html><body><p>Hi</p><a href="https://shop.example/item?id=1&amp;ref=mail">Buy</a>'
        ' <A HREF=\'http://example.net/x\'>x</A> <a href="mailto:help@example.com">help</a>'
        '</body></html>')


async def test_links_and_pixel_are_tracked_per_recipient(tmp_path: Path, dns: DNSServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    async with Sink() as sink:
        svc = await delivering(tmp_path, dns, sink)
        api = await api_client(svc)
        try:
            status, sent, _ = await api.call("POST", "/v1/emails", {
                **SIMPLE, "to": ["bob@example.org", "carol@example.org"], "html": HTML,
                "trackOpens": True, "trackClicks": True})
            assert status == 202, sent
            detail = await wait_final(svc, sent["id"])
            ids = {r.address: r.id for r in detail.recipients}
            bodies = {}
            for m in sink.messages:
                parsed = email.message_from_bytes(m.data, policy=email.policy.default)
                html = parsed.get_body(preferencelist=("html",))
                text = parsed.get_body(preferencelist=("plain",))
                assert html is not None and text is not None
                assert text.get_content().strip() == "Hello Bob."  # the text part as written
                bodies[m.rcpt_tos[0]] = html.get_content()
            assert set(bodies) == {"bob@example.org", "carol@example.org"}
            bob = bodies["bob@example.org"]
            assert "shop.example" not in bob and "example.net/x" not in bob
            assert 'href="mailto:help@example.com"' in bob  # only http(s) links
            clicks = re.findall(r"""href=["'](http://127\.0\.0\.1:\d+/c/[^"']+)""", bob,
                                re.IGNORECASE)
            (pixel,) = re.findall(r'src="(http://127\.0\.0\.1:\d+/o/[^"]+)"', bob)
            assert len(clicks) == 2 and bob.index(pixel) < bob.lower().index("</body>")
            assert clicks[0] not in bodies["carol@example.org"]  # tokens are per recipient

            monkeypatch.setattr(tracking, "CLICK_TOO_SOON", 0.0)
            async with aiohttp.ClientSession() as web:
                async with web.get(clicks[0], allow_redirects=False,
                                   headers={"User-Agent": "Mozilla/5.0 (X11) Firefox/140"}) as r:
                    assert r.status == 302
                    assert r.headers["Location"] == "https://shop.example/item?id=1&ref=mail"
                async with web.get(pixel, headers={"User-Agent": "Thunderbird/140"}) as r:
                    assert r.status == 200 and r.headers["Content-Type"] == "image/gif"
                async with web.get(pixel, headers={"User-Agent": "Mozilla/5.0 (via "
                                                   "ggpht.com GoogleImageProxy)"}) as r:
                    assert r.status == 200
                async with web.head(pixel) as r:
                    assert r.status == 200
                bad = clicks[0][:-3] + ("AAA" if not clicks[0].endswith("AAA") else "BBB")
                async with web.get(bad, allow_redirects=False) as r:
                    assert r.status == 404 and "Location" not in r.headers
                async with web.get(pixel[:-2] + "aa") as r:
                    assert r.status == 404
            detail = await svc.store.get_message(sent["id"])
            assert detail is not None
            seen = [(e.type, e.recipient_id, e.data.get("machineRule"), e.data.get("url"))
                    for e in detail.events if e.type in ("email.opened", "email.clicked")]
            bob_id = ids["bob@example.org"]
            assert seen == [
                ("email.clicked", bob_id, None, "https://shop.example/item?id=1&ref=mail"),
                ("email.opened", bob_id, None, None),
                ("email.opened", bob_id, "google-image-proxy", None),
                ("email.opened", bob_id, "head-request", None)]
            clicked = next(e for e in detail.events if e.type == "email.clicked")
            assert clicked.data["userAgent"].startswith("Mozilla/5.0 (X11)")
            assert clicked.data["ip"] == "127.0.0.1" and clicked.data["machine"] is False
        finally:
            await api.close()
            await svc.stop()


def test_machine_rules() -> None:
    rule = tracking.machine_rule
    assert rule("HEAD", "Firefox", "open", None) == "head-request"
    assert rule("GET", "Mozilla/5.0", "open", None) == "apple-mail-privacy-proxy"
    assert rule("GET", "YahooMailProxy; https://help.yahoo.com", "open", None) == \
        "yahoo-mail-proxy"
    assert rule("GET", "Mozilla/5.0 (Windows) Chrome/140", "click", 0.5) == \
        "click-within-2s-of-delivery"
    assert rule("GET", "Mozilla/5.0 (Windows) Chrome/140", "click", 30.0) is None
    assert rule("GET", "Mozilla/5.0 (Windows) Chrome/140", "open", 0.5) is None


def test_link_tokens_cannot_be_forged_or_altered() -> None:
    tokens = tracking.Tokens(b"k" * 32)
    token = tokens.make_link(7, "https://a.example/x")
    assert tokens.read_link(token) == (7, "https://a.example/x")
    assert tracking.Tokens(b"j" * 32).read_link(token) is None
    other = tokens.make_link(8, "https://evil.example/")
    assert tokens.read_link(token[:12] + other[12:]) is None
    assert tokens.read_link("!!") is None and tokens.read_link("") is None


def test_tokens_keep_their_form() -> None:
    """b32 is base64's base32, lower-cased and unpadded, for every length; a token made now
    reads as one made before the faster encoder (the same key, id and kind: the same text)."""
    import base64
    import os

    for n in range(64):
        raw = os.urandom(n)
        assert tracking.b32(raw) == base64.b32encode(raw).decode().rstrip("=").lower()
    tokens = tracking.Tokens(b"k" * 32)
    assert tokens.make("bounce", 7) == "aaaaaaaaaaaaprzn64ki6flfgjqbo"
    assert tokens.read("bounce", "aaaaaaaaaaaaprzn64ki6flfgjqbo") == 7
