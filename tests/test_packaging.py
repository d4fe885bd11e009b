"""The README's two commands, CI and the systemd unit agree with what the project ships."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def quickstart_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL)][:2]


def test_readme_has_two_quickstart_commands() -> None:
    start, test = quickstart_commands()
    assert start.count("\n") == 0 and start.endswith("relay serve")
    assert test.count("\n") == 0 and "'.[test]'" in test and "pytest" in test


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == quickstart_commands()[1]


def test_systemd_unit() -> None:
    unit = (REPO / "systemd" / "relay.service").read_text()
    for line in ("User=relay", "AmbientCapabilities=CAP_NET_BIND_SERVICE", "NoNewPrivileges=true",
                 "ProtectSystem=strict", "ReadWritePaths=/var/lib/relay", "PrivateTmp=true"):
        assert line in unit.splitlines(), line
    assert re.search(r"^ExecStart=\S*relay serve --config /etc/relay/relay.toml$", unit, re.MULTILINE)
