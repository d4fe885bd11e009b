"""schemathesis, from PyPI, generates requests from /v1/openapi.json against a running relay:
no answer may be a 5xx or break the documented schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .conftest import free_port, run_relay


def test_schemathesis_finds_no_server_error_and_no_schema_break(tmp_path: Path,
                                                                 relay_process: Any) -> None:
    api, smtp = free_port(), free_port()
    toml = (f"[server]\nhostname = 'relay.test'\ndata_dir = '{tmp_path / 'data'}'\n"
            f"[[smtp.listeners]]\nport = {smtp}\n[api]\nport = {api}\n"
            "[delivery]\npaused = true\n")
    (tmp_path / "relay.toml").write_text(toml)
    made = run_relay("--config", str(tmp_path / "relay.toml"), "keys", "create", "--name",
                     "fuzz", "--scope", "emails:send", "--scope", "emails:read", "--scope",
                     "keys:manage", "--json")
    key = json.loads(made.stdout)["key"]
    relay_process(toml, api)
    tool = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run(
        [str(tool), "run", f"http://127.0.0.1:{api}/v1/openapi.json",
         "-H", f"Authorization: Bearer {key}",
         "--checks", "not_a_server_error,response_schema_conformance",
         "--max-examples", "15", "--seed", "20261122", "--no-color"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
