"""Stored templates: /v1/templates, `relay templates`, and render_stored (the one function
every API calls to send a template by id)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay import keys, templates
from relay.service import Service

from .apiutil import Api
from .conftest import run_relay

WELCOME = {"name": "welcome", "type": "marketing", "subject": "Hi {{name ?? 'there'}}",
           "html": "<p>Hello {{name}}, code {{code ?? 'none'}}</p>",
           "text": "Hello {{name}}", "from": {"email": "News@Example.com", "name": "News"}}


@pytest.fixture
async def admin(service: Service) -> str:
    _, secret = await keys.create_key(service.store, name="t", scopes=["templates:manage"])
    return secret


async def test_create_get_list_update_delete(api: Api, admin: str) -> None:
    status, t, _ = await api.call("POST", "/v1/templates", WELCOME, key=admin)
    assert status == 201 and t["id"].startswith("tpl_")
    assert (t["type"], t["subject"], t["from"]) == (
        "marketing", "Hi {{name ?? 'there'}}", {"email": "News@example.com", "name": "News"})
    status, got, _ = await api.call("GET", f"/v1/templates/{t['id']}", key=admin)
    assert status == 200 and got == t
    status, second, _ = await api.call("POST", "/v1/templates", {
        "name": "reset", "subject": "Reset", "html": "<p>{{link}}</p>"}, key=admin)
    assert status == 201 and second["type"] == "transactional" and second["from"] is None
    status, page, _ = await api.call("GET", "/v1/templates?limit=1", key=admin)
    assert [x["id"] for x in page["data"]] == [t["id"]] and page["nextCursor"] == t["id"]
    status, page, _ = await api.call("GET", f"/v1/templates?cursor={t['id']}", key=admin)
    assert [x["id"] for x in page["data"]] == [second["id"]] and page["nextCursor"] is None

    status, changed, _ = await api.call("PATCH", f"/v1/templates/{t['id']}", {
        "subject": "New {{name}}", "type": "transactional", "from": None}, key=admin)
    assert status == 200
    assert (changed["subject"], changed["type"], changed["from"], changed["html"]) == (
        "New {{name}}", "transactional", None, WELCOME["html"])
    assert changed["updatedAt"] >= t["updatedAt"] and changed["createdAt"] == t["createdAt"]

    status, _, _ = await api.call("DELETE", f"/v1/templates/{t['id']}", key=admin)
    assert status == 200
    for method in ("GET", "DELETE"):
        status, body, _ = await api.call(method, f"/v1/templates/{t['id']}", key=admin)
        assert status == 404 and body["error"] == {"type": "not_found", "param": "id",
                                                   "message": f"no template {t['id']}"}


@pytest.mark.parametrize(("body", "param"), [
    ({**WELCOME, "type": "newsletter"}, "type"),
    ({**WELCOME, "colour": "red"}, "colour"),
    ({k: v for k, v in WELCOME.items() if k != "subject"}, "subject"),
    ({**WELCOME, "subject": "a\r\nBcc: x@example.org"}, "subject"),
    ({**WELCOME, "html": "<p>{{ broken</p>"}, "html"),
    ({**WELCOME, "from": "not an address"}, "from"),
])
async def test_bad_templates_are_refused_naming_the_field(api: Api, admin: str, body: dict,
                                                          param: str) -> None:
    status, answer, _ = await api.call("POST", "/v1/templates", body, key=admin)
    assert status == 422 and answer["error"]["param"] == param, answer


async def test_templates_need_their_scope(api: Api, admin: str) -> None:
    status, body, _ = await api.call("GET", "/v1/templates")  # emails:send, emails:read only
    assert status == 403 and "templates:manage" in body["error"]["message"]
    status, t, _ = await api.call("POST", "/v1/templates", WELCOME, key=admin)
    status, body, _ = await api.call("PATCH", f"/v1/templates/{t['id']}", {"html": None},
                                     key=admin)
    assert status == 422 and body["error"]["param"] == "html"


async def test_render_stored_fills_and_lets_a_request_override(api: Api, admin: str,
                                                               service: Service) -> None:
    _, t, _ = await api.call("POST", "/v1/templates", WELCOME, key=admin)
    filled = await templates.render_stored(service.store, t["id"], {"name": "<Ann>"})
    assert filled.subject == "Hi <Ann>"  # subjects are not HTML
    assert filled.html == "<p>Hello &lt;Ann&gt;, code none</p>"
    assert filled.text == "Hello <Ann>" and filled.template.type == "marketing"
    filled = await templates.render_stored(service.store, t["id"], {"name": "B"},
                                           subject="Mine {{name}}")
    assert filled.subject == "Mine B" and filled.html.startswith("<p>Hello B")
    with pytest.raises(templates.UnknownTemplate) as err:
        await templates.render_stored(service.store, "tpl_nope", {}, param="template")
    assert err.value.param == "template"
    with pytest.raises(templates.ValidationError) as missing:
        await templates.render_stored(service.store, t["id"], {})  # {{name}} has no fallback
    assert missing.value.param == "data.name"


def test_cli_adds_lists_shows_and_removes(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"[server]\nhostname = 'relay.test'\ndata_dir = '{tmp_path / 'data'}'\n")
    (tmp_path / "body.html").write_text("<p>Hi {{name}}</p>")

    def relay(*args: str, code: int = 0) -> str:
        result = run_relay("--config", str(path), "templates", *args)
        assert result.returncode == code, result.stderr
        return result.stdout + result.stderr

    made = json.loads(relay("add", "welcome", "--subject", "Hi", "--html-file",
                            str(tmp_path / "body.html"), "--type", "marketing",
                            "--from", "News <news@example.com>", "--json"))
    assert made["from"] == {"email": "news@example.com", "name": "News"}
    listed = json.loads(relay("list", "--json"))
    assert [(t["id"], t["type"], t["html"]) for t in listed] == [
        (made["id"], "marketing", "<p>Hi {{name}}</p>")]
    assert "<p>Hi {{name}}</p>" in relay("show", made["id"])
    assert "type" in relay("add", "x", "--subject", "s", "--html", "h", "--type", "bulk",
                           code=2)
    assert "html" in relay("add", "x", "--subject", "s", "--html", "{{ oops", code=1)
    assert "removed" in relay("remove", made["id"])
    assert "no template" in relay("show", made["id"], code=1)
    assert "no template" in relay("remove", made["id"], code=1)
