"""What {{var}} can make of a small request: a filled part is held to [limits]
max_message_size while it is filled, and a batch's built messages to max_request_expansion."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay import templates
from relay.config import Config, LimitsConfig
from relay.errors import ValidationError
from relay.service import Service

from .apiutil import SIMPLE, Api, api_client
from .conftest import make_config


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, limits=LimitsConfig(max_message_size=1_000_000,
                                                     max_request_expansion=300_000))


@pytest.fixture
async def client(service: Service) -> AsyncIterator[Api]:
    api = await api_client(service)
    try:
        yield api
    finally:
        await api.close()


def test_a_value_used_many_times_is_refused_while_it_is_filled() -> None:
    with pytest.raises(ValidationError) as caught:
        # 100,000 uses of 1 MB would be 100 GB; refused after about 2 of them
        templates.render("{{x}}" * 100_000, {"x": "a" * 1_000_000}, escape=False,
                         param="html", limit=2_000_000)
    assert caught.value.param == "html" and caught.value.smtp.startswith("552")
    assert templates.render("{{x}}" * 3, {"x": "ab"}, escape=False, param="html",
                            limit=6) == "ababab"


async def test_the_native_api_answers_413_for_a_template_that_grows_too_large(
        client: Api) -> None:
    status, body, _ = await client.call("POST", "/v1/emails", {
        **SIMPLE, "html": "{{x}}" * 50_000, "data": {"x": "y" * 1000}})
    assert status == 413 and body["error"]["param"] == "html", body


async def test_a_batch_stops_building_at_the_expansion_limit(client: Api) -> None:
    item = {**SIMPLE, "html": "{{x}}" * 100, "text": None, "data": {"x": "z" * 1000}}
    status, body, _ = await client.call("POST", "/v1/emails/batch", {"emails": [item] * 10})
    assert status == 207
    results = body["results"]
    assert [r["index"] for r in results if "id" in r] == [0, 1]  # ~100 KB each
    refused = [r["error"] for r in results if "error" in r]
    assert [e["param"] for e in refused] == [f"emails[{i}]" for i in range(2, 10)], refused
    assert all(e["type"] == "payload_too_large" for e in refused)
