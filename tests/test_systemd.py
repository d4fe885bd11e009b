"""systemd/relay.service: `systemd-analyze verify` finds nothing wrong in it (against a
root with the binary where the README installs it), `systemd-analyze security` rates its
exposure 2.5 or better, and the README's install commands make what the unit expects."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "relay.service"
README = ROOT / "README.md"
MAX_EXPOSURE = 2.5

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(analyze is None, reason="systemd-analyze is not installed")


def directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def exec_start() -> list[str]:
    return directives()["ExecStart"][0].split()


def readme_systemd() -> str:
    text = README.read_text()
    return text[text.index("## Running under systemd"):text.index("## The code")]


def fake_root(tmp_path: Path, *, with_binary: bool = True) -> Path:
    """A root with the unit installed, systemd's own units, and the programs the unit runs
    (stubs): verify then checks the unit, not this machine."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/relay.service")
    units = Path("/usr/lib/systemd/system")
    if units.is_dir():
        shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    programs = [exec_start()[0], directives()["ExecReload"][0].split()[0]]
    for program in programs if with_binary else programs[1:]:
        stub = root / program.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    return root


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    assert analyze is not None
    return subprocess.run([analyze, "verify", f"--root={root}", "--man=no",
                           str(root / "etc/systemd/system/relay.service")],
                          capture_output=True, text=True, timeout=60, check=False)


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    done = verify(fake_root(tmp_path))
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stderr


@needs_analyze
def test_verify_would_see_a_missing_binary(tmp_path: Path) -> None:
    """The check above means something: without the binary, verify fails."""
    done = verify(fake_root(tmp_path, with_binary=False))
    assert done.returncode != 0
    assert f"Command {exec_start()[0]} is not executable" in done.stderr


@needs_analyze
def test_the_exposure_is_at_most_2_5() -> None:
    assert analyze is not None
    done = subprocess.run([analyze, "security", "--offline=true", str(UNIT)],
                          capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r"Overall exposure level for relay\.service: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, done.stdout


def test_the_unit_reloads_and_watches() -> None:
    d = directives()
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["KillMode"] == ["mixed"]  # SIGTERM to the master, which drains its children
    assert "WatchdogSec" in d
    assert d["SystemCallFilter"][0] == "@system-service"


def test_systemd_waits_for_the_longest_drain() -> None:
    """TimeoutStopSec covers relay's own bounds on a stop (each stage's timeout, in
    order), so systemd's SIGKILL never cuts a drain that is keeping to them."""
    from relay.frontworkers import STOP_TIMEOUT
    from relay.service import STOP_BUDGET
    (value,) = directives()["TimeoutStopSec"]
    assert value.endswith("s") and float(value[:-1]) >= STOP_BUDGET
    assert STOP_TIMEOUT < STOP_BUDGET and STOP_BUDGET <= 150  # and no stop takes forever


def test_the_readme_installs_what_the_unit_runs() -> None:
    d, text = directives(), readme_systemd()
    binary, _, *args = exec_start()
    venv = binary.removesuffix("/bin/relay")
    assert f"sudo python3 -m venv {venv}\n" in text
    assert f"sudo {venv}/bin/pip install .\n" in text
    assert f"sudo ln -sf {binary} /usr/local/bin/relay\n" in text  # `relay` for the CLI
    user, group = d["User"][0], d["Group"][0]
    assert re.search(rf"useradd --system .* {user}\n", text)
    state = f"/var/lib/{d['StateDirectory'][0]}"
    assert f"install -d -o {user} -g {group} -m 0750 {state}\n" in text
    config = args[args.index("--config") + 1]
    assert f"install -d -o root -g {group} -m 0750 {Path(config).parent}\n" in text
    assert f"install -o root -g {group} -m 0640 conf/relay.toml {config}\n" in text
    example = tomllib.loads((ROOT / "conf/relay.toml").read_text())
    assert example["server"]["data_dir"] == state  # the example config's data dir is it
    assert "sudo install -m 0644 systemd/relay.service /etc/systemd/system/relay.service\n" \
        in text
    assert f"sudo -u {user} relay --config {config} queue list" in text
