"""The dashboard (api/dashboard/, api/stats.py, store/stats.py): `GET /v1/stats` for admin keys
only, with the numbers of a relay that has really delivered, deferred and bounced mail to a
loopback sink; and the page itself, driven in Debian's headless chromium through Playwright,
checked for what a person sees. RELAY_DASHBOARD_SCREENSHOT=<path> also saves a screenshot
(docs/dashboard.png is made that way; see the README's Dashboard section)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay import keys
from relay.config import Config, DeliveryConfig, DnsConfig, WebhooksConfig
from relay.service import Service
from relay.types import SCOPES

from .apiutil import Api
from .conftest import free_port, make_config
from .dnsserver import DNSServer
from .sink import Sink

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
XSS = "<img src=x onerror=window.__xss=1>"
GONE_REPLY = f"550 5.1.1 {XSS} no such user"
REPLIES = {"gone@a.test": [GONE_REPLY],
           "gone@b.test": ["550 5.7.1 rejected by policy"],
           "gone@c.test": ["550 5.2.1 mailbox unavailable"],
           "slow@a.test": ["451 4.7.1 greylisted, try again later"]}
DELIVERED = ["ok@a.test", "ok@b.test", "ok2@b.test", "ok@c.test"]
SCREENSHOT = os.environ.get("RELAY_DASHBOARD_SCREENSHOT")


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with Sink(replies=REPLIES) as s:
        yield s


@pytest.fixture
def config(tmp_path: Path, dns: DNSServer, sink: Sink) -> Config:
    for domain in ("a.test", "b.test", "c.test"):
        dns.add(domain, "MX", f"10 mx.{domain}.")
        dns.add(f"mx.{domain}", "A", "127.0.0.1")
    # a deferred recipient stays deferred: its next try is minutes away
    delivery = DeliveryConfig(mx_port=sink.port, retry_min=600.0, retry_max=900.0,
                              connect_timeout=2.0, command_timeout=5.0, session_idle=0.5,
                              process=False)
    return make_config(tmp_path, delivery=delivery,
                       dns=DnsConfig(nameservers=(dns.nameserver,), timeout=1.0),
                       webhooks=WebhooksConfig(allow_private_targets=True))


@dataclass
class Mail:
    admin: str  # every scope, no domains
    ids: dict[str, str]  # recipient -> message id


async def settled(service: Service, ids: dict[str, str], timeout: float = 30.0) -> None:
    want = {r: ("deferred" if r.startswith("slow") else "bounced" if r.startswith("gone")
                else "delivered") for r in ids}

    async def poll() -> None:
        while True:
            seen = {}
            for rcpt, mid in ids.items():
                detail = await service.store.get_message(mid)
                assert detail is not None
                seen[rcpt] = detail.recipients[0].status.value
            if seen == want:
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


@pytest.fixture
async def mail(service: Service, api: Api) -> Mail:
    """One message per recipient: four delivered, two bounced (one with an HTML payload in
    its remote reply), one deferred; and a webhook endpoint nobody answers (a backlog)."""
    _, admin = await keys.create_key(service.store, name="admin", scopes=SCOPES)
    status, _, _ = await api.call("POST", "/v1/webhooks",
                                  {"url": f"http://127.0.0.1:{free_port()}/hook"}, key=admin)
    assert status == 201
    ids = {}
    for rcpt in [*DELIVERED, "gone@a.test", "gone@b.test", "slow@a.test"]:
        subject = f"Hello {XSS}" if rcpt == "gone@a.test" else f"Your receipt for {rcpt}"
        status, body, _ = await api.call("POST", "/v1/emails", {
            "from": "Shop <shop@sender.test>", "to": [rcpt], "subject": subject,
            "text": "Thanks."})
        assert status == 202, body
        ids[rcpt] = body["id"]
    await settled(service, ids)
    return Mail(admin=admin, ids=ids)


# -- GET /v1/stats --------------------------------------------------------------------------


async def test_stats_count_the_queue_the_day_failures_reasons_and_webhook_backlog(
        api: Api, mail: Mail) -> None:
    status, stats, resp = await api.call("GET", "/v1/stats", key=mail.admin)
    assert status == 200, stats
    assert resp.headers["Cache-Control"] == "no-store"
    assert stats["queue"] == {"scheduled": 0, "queued": 0, "deferred": 1, "held": 0,
                              "failed": 0}
    assert stats["destinations"] == [{"domain": "a.test", "total": 1,
                                      "counts": {"deferred": 1}}]
    assert len(stats["outcomes"]) == 24
    totals = {k: sum(h[k] for h in stats["outcomes"])
              for k in ("delivered", "deferred", "bounced", "expired")}
    assert totals == {"delivered": 4, "deferred": 1, "bounced": 2, "expired": 0}
    assert stats["outcomes"][-1]["delivered"] == 4  # the current hour is the last bar
    failures = {f["recipient"]: f for f in stats["failures"]}
    assert set(failures) == {"gone@a.test", "gone@b.test", "slow@a.test"}
    assert XSS in failures["gone@a.test"]["reply"]
    assert (failures["gone@a.test"]["outcome"], failures["gone@a.test"]["code"],
            failures["gone@a.test"]["messageId"]) == ("bounced", 550, mail.ids["gone@a.test"])
    assert failures["slow@a.test"]["outcome"] == "deferred"
    assert "greylisted" in failures["slow@a.test"]["reply"]
    assert failures["slow@a.test"]["mxHost"].startswith("mx.")
    reasons = {r["reason"]: r["count"] for r in stats["bounceReasons"]}
    assert sum(reasons.values()) == 2 and reasons.get("userunknown") == 1
    hooks = stats["webhooks"]
    assert hooks["pending"] > 0 and hooks["oldestPendingAt"]


async def test_stats_need_the_admin_scope_and_a_key_without_domains(
        service: Service, api: Api) -> None:
    status, body, resp = await api.call("GET", "/v1/stats", key=None)
    assert status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    status, body, _ = await api.call("GET", "/v1/stats", key="not-a-key")
    assert status == 401 and "not valid" in body["error"]["message"]
    status, body, _ = await api.call("GET", "/v1/stats")  # emails:send + emails:read
    assert status == 403 and "admin" in body["error"]["message"]
    _, limited = await keys.create_key(service.store, name="shop", scopes=["admin"],
                                       domains=["sender.test"])
    status, body, _ = await api.call("GET", "/v1/stats", key=limited)
    assert status == 403 and "sender.test" in body["error"]["message"]
    _, admin = await keys.create_key(service.store, name="admin", scopes=["admin"])
    status, body, _ = await api.call("GET", "/v1/stats", key=admin)
    assert status == 200 and body["queue"]["queued"] == 0 and body["failures"] == []


async def test_dashboard_files_are_served_with_a_strict_policy(api: Api) -> None:
    async with api.session.get(api.base + "/dashboard", allow_redirects=False) as resp:
        assert resp.status == 308 and resp.headers["Location"] == "/dashboard/"
    for path, kind in (("/dashboard/", "text/html"), ("/dashboard/app.js", "text/javascript"),
                       ("/dashboard/style.css", "text/css")):
        async with api.session.get(api.base + path) as resp:
            assert resp.status == 200 and resp.content_type == kind
            csp = resp.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "script-src 'self'" in csp
            assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
            assert resp.headers["X-Frame-Options"] == "DENY"
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            if kind == "text/javascript":
                assert "innerHTML" not in await resp.text()
    for path in ("/dashboard/relay.toml", "/dashboard/__init__.py", "/dashboard/..%2Fapp.py"):
        async with api.session.get(api.base + path) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["type"] == "not_found"


# -- in the browser -------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("CI"),
    reason=f"{CHROMIUM} is missing (.ci/run installs it; CI never skips this)")


HISTORY = {  # kind -> (code, enhanced, reply, bounce reason) to pick from
    "email.delivered": [(250, "2.0.0", "Ok: queued", None)],
    "email.deferred": [(451, "4.7.1", "greylisted, try again later", None),
                       (421, "4.7.0", "too many connections from your IP", None),
                       (452, "4.2.2", "mailbox full, try later", None)],
    "email.bounced": [(550, "5.1.1", "no such user here", "userunknown"),
                      (554, "5.7.1", "message rejected by policy", "policyviolation"),
                      (552, "5.2.2", "mailbox quota exceeded", "mailboxfull")],
}


async def history(service: Service, mail: Mail) -> None:
    """For the screenshot only: a day of earlier outcomes, so the chart shows a day's shape
    rather than one bar. Recorded through the store, against the test's real recipients."""
    rng = random.Random(19)
    now = time.time()
    recipients = {}
    for rcpt, mid in mail.ids.items():
        detail = await service.store.get_message(mid)
        assert detail is not None
        recipients[rcpt] = detail.recipients[0].id
    for hours_ago in range(1, 24):
        busy = 0.5 + 0.5 * abs(12 - hours_ago) / 12
        for kind, rcpt, n in (("email.delivered", "ok@b.test", int(rng.randint(20, 40) * busy)),
                              ("email.deferred", "slow@a.test", rng.randint(0, 6)),
                              ("email.bounced", "gone@b.test", rng.randint(0, 3))):
            for _ in range(n):
                at = now - hours_ago * 3600 + rng.uniform(-1500, 1500)
                code, enhanced, reply, reason = rng.choice(HISTORY[kind])
                data: dict[str, Any] = {"email": rcpt, "code": code, "enhanced": enhanced,
                                        "reply": f"{enhanced} {reply}", "reason": reason,
                                        "mxHost": "mx.b.test"}
                await service.store.add_recipient_event(recipients[rcpt], kind, at, data)


@needs_chromium
async def test_a_person_logs_in_reads_the_numbers_and_opens_a_message(
        service: Service, api: Api, mail: Mail) -> None:
    from playwright.async_api import async_playwright, expect

    _, reader = await keys.create_key(service.store, name="reader", scopes=["emails:read"])
    if SCREENSHOT:
        await history(service, mail)
    _, stats, _ = await api.call("GET", "/v1/stats", key=mail.admin)
    problems: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1200})
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda m: problems.append(f"console: {m.text}")
                    if m.type == "error" and "401" not in m.text and "403" not in m.text
                    else None)
            await page.clock.install()  # the 10 s refresh, run on demand below
            await page.goto(api.base + "/dashboard/")
            await expect(page.locator("#login")).to_be_visible()
            login_error = page.locator("#login-error")

            # a wrong key, then a key without the admin scope: each told why, no board
            await page.fill("#key", "relay_not_a_real_key")
            await page.click("#login-form button[type=submit]")
            await expect(login_error).to_contain_text("not valid")
            await expect(page.locator("#board")).to_be_hidden()
            await page.fill("#key", reader)
            await page.click("#login-form button[type=submit]")
            await expect(login_error).to_contain_text("lacks the admin scope")
            await expect(page.locator("#board")).to_be_hidden()

            # the admin key: the queue table shows what /v1/stats counts
            await page.fill("#key", mail.admin)
            await page.click("#login-form button[type=submit]")
            await expect(page.locator("#board")).to_be_visible()
            await expect(page.locator("#login")).to_be_hidden()
            deferred = page.locator("#queue tbody tr", has_text="deferred").locator("td.num")
            await expect(deferred).to_have_text(str(stats["queue"]["deferred"]))
            await expect(page.locator("#destinations tbody tr").first).to_contain_text("a.test")

            # the chart: stacked bars of each kind, hour labels
            bars = page.locator("#chart svg rect.bar[data-kind]")
            await expect(bars.first).to_be_visible()
            kinds = set(await bars.evaluate_all("rs => rs.map(r => r.dataset.kind)"))
            assert {"delivered", "deferred", "bounced"} <= kinds
            counted = await bars.evaluate_all(
                "rs => rs.reduce((s, r) => s + Number(r.dataset.count), 0)")
            assert counted == sum(h["delivered"] + h["deferred"] + h["bounced"] + h["expired"]
                                  for h in stats["outcomes"])
            assert await page.locator("#chart svg text.axis").count() >= 8

            # failures show the remote reply as text: the payload is not an element, never ran
            failures = page.locator("#failures tbody")
            await expect(failures).to_contain_text(XSS)
            await expect(failures).to_contain_text("greylisted, try again later")
            assert await page.locator("#failures img").count() == 0
            assert await page.evaluate("window.__xss") is None
            await expect(page.locator("#reasons tbody")).to_contain_text("userunknown")
            await expect(page.locator("#wh-pending")).not_to_have_text("0")
            await expect(page.locator("#endpoints tbody")).to_contain_text("127.0.0.1")
            if SCREENSHOT:
                await page.screenshot(path=SCREENSHOT)

            # a message: its recipients, attempts (MX, TLS, reply) and events
            gone = mail.ids["gone@a.test"]
            await page.click(f"#failures a.msg:text-is('{gone}')")
            await expect(page.locator("#message")).to_be_visible()
            await expect(page.locator("#board")).to_be_hidden()
            await expect(page.locator("#msg-id")).to_have_text(gone)
            await expect(page.locator("#msg-summary")).to_contain_text(f"Hello {XSS}")
            await expect(page.locator("#msg-recipients tbody")).to_contain_text("gone@a.test")
            attempt = page.locator("#msg-attempts tbody tr").first
            await expect(attempt).to_contain_text("127.0.0.1")  # the MX host and its address
            await expect(attempt).to_contain_text(f"550 5.1.1 {XSS} no such user")
            await expect(attempt).to_contain_text(XSS)
            await expect(page.locator("#msg-events tbody")).to_contain_text("email.bounced")
            assert await page.locator("#message img").count() == 0
            assert await page.evaluate("window.__xss") is None
            await page.click("#msg-close")
            await expect(page.locator("#board")).to_be_visible()

            # new mail shows without a reload: the board asks again every 10 seconds
            status, later, _ = await api.call("POST", "/v1/emails", {
                "from": "shop@sender.test", "to": ["gone@c.test"], "subject": "later",
                "text": "x"})
            assert status == 202
            await settled(service, {"gone@c.test": later["id"]})
            await expect(failures).not_to_contain_text("gone@c.test")
            await page.clock.run_for(11_000)
            await expect(failures).to_contain_text("gone@c.test")
            await expect(failures).to_contain_text("mailbox unavailable")

            # logging out forgets the key
            await page.click("#logout")
            await expect(page.locator("#login")).to_be_visible()
            await expect(page.locator("#board")).to_be_hidden()
            assert await page.evaluate("sessionStorage.length") == 0
            await page.reload()
            await expect(page.locator("#login")).to_be_visible()
        finally:
            await browser.close()
    assert problems == []


def test_ci_installs_chromium_before_the_tests() -> None:
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text().splitlines()
    install = [i for i, line in enumerate(ci) if "apt-get install -y chromium" in line]
    assert install and install[0] < len(ci) - 1 and "command -v chromium" in ci[install[0]]


def test_the_dashboard_files_are_package_data() -> None:
    """A non-editable install ships what /dashboard/ serves (pyproject's package-data)."""
    import tomllib

    from relay.api.dashboard import FILES

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["relay"]
    here = root / "src" / "relay"
    shipped = {p.relative_to(here).as_posix() for g in globs for p in here.glob(g)}
    assert {f"api/dashboard/{name}" for name in FILES} <= shipped
