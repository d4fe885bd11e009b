"""One relay on one data dir: a second `serve` on the same dir stops at once with a clear
message, and the first's leased work is left alone (it would otherwise be delivered twice)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay.config import Config
from relay.errors import StoreError
from relay.service import Service

from .conftest import free_port, make_config, run_relay
from .test_cli import setup


async def test_a_second_service_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    first = Service(make_config(tmp_path))
    await first.start()
    try:
        # the same data dir, other ports: only the lock stands in the way
        other: Config = make_config(tmp_path)
        second = Service(other)
        with pytest.raises(StoreError, match="in use by relay"):
            await second.start()
        assert second.servers == [] and second.api_runner is None
        assert first.store.writer is not None  # the first one goes on
    finally:
        await first.stop()
    again = Service(make_config(tmp_path))  # free again once the first has stopped
    await again.start()
    await again.stop()


def test_relay_serve_twice_exits_with_a_clear_message(tmp_path: Path,
                                                     relay_process: Any) -> None:
    path, port, toml = setup(tmp_path)
    relay_process(toml, port)
    other = toml.replace(f"port = {port}", f"port = {free_port()}")
    other_path = tmp_path / "second.toml"
    other_path.write_text(other + f"\n[api]\nport = {free_port()}\n", "utf-8")
    result = run_relay("--config", str(other_path), "serve", timeout=30)
    assert result.returncode == 1, result
    assert "in use by relay" in result.stderr and "data_dir" in result.stderr

