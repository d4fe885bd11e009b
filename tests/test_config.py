"""Config: the TOML file, RELAY_* overrides, and one-line errors before anything listens."""

from __future__ import annotations

import dataclasses
import os
import pwd
import select
import shutil
import signal
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest

from relay import config as config_mod
from relay.config import Config
from relay.errors import ConfigError

from .conftest import free_port, relay_cmd, run_relay, wait_port

REPO = Path(__file__).resolve().parent.parent


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "relay.toml"
    path.write_text(text, "utf-8")
    return config_mod.load(path, environ=env or {})


def test_defaults_serve_a_developer_on_one_machine() -> None:
    c = config_mod.load(None, environ={})
    assert c.server.data_dir == Path("./relay-data")
    assert [(lst.address, lst.port, lst.mode) for lst in c.smtp.listeners] == [
        ("127.0.0.1", 2525, "submission")]
    assert (c.api.address, c.api.port) == ("127.0.0.1", 8025)
    assert c.delivery.mx_port == 25 and c.delivery.smarthost == ""
    assert c.limits.max_message_size == 37748736 and c.limits.max_recipients == 1000


def test_the_issue_keys_load(tmp_path: Path) -> None:
    c = load_text(tmp_path, """
[server]
hostname = "relay.example.com"
data_dir = "/var/lib/relay"
[[smtp.listeners]]
address = "127.0.0.1"
port = 2525
mode = "submission"
tls = "starttls"
tls_cert = ""
tls_key = ""
allowed_networks = []
[[smtp.listeners]]
address = "0.0.0.0"
port = 25
mode = "relay"
tls = "none"
allowed_networks = ["10.0.0.0/8", "192.168.1.7"]
[api]
address = "127.0.0.1"
port = 8025
public_url = "http://127.0.0.1:8025"
[delivery]
smarthost = ""
mx_port = 25
[dns]
nameservers = ["127.0.0.1:5353", "9.9.9.9"]
[limits]
max_message_size = 26214400
max_recipients = 1000
""")
    assert c.server.hostname == "relay.example.com"
    assert len(c.smtp.listeners) == 2
    assert [str(n) for n in c.smtp.listeners[1].allowed_networks] == ["10.0.0.0/8",
                                                                       "192.168.1.7/32"]
    assert c.dns.nameservers == ("127.0.0.1:5353", "9.9.9.9")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.api.port = 1  # type: ignore[misc]


@pytest.mark.parametrize("text, key, reason", [
    ("[server]\nhostnme = 'x'\n", "server.hostnme", "unknown key"),
    ("[bogus]\nx = 1\n", "bogus", "unknown key"),
    ("[api]\nport = '80'\n", "api.port", "must be an integer"),
    ("[api]\nport = 70000\n", "api.port", "port number"),
    ("[api]\naddress = 'not-an-ip'\n", "api.address", "does not appear to be an IPv4 or IPv6"),
    ("[[smtp.listeners]]\nmode = 'open'\n", "smtp.listeners[0].mode", "must be one of"),
    ("[[smtp.listeners]]\nallowed_networks = ['10.0.0.0/33']\n",
     "smtp.listeners[0].allowed_networks", "item 0"),
    ("[[smtp.listeners]]\ntls_cert = '/nonexistent/cert.pem'\ntls_key = '/nonexistent/k.pem'\n",
     "smtp.listeners[0].tls_cert", "no such file"),
    ("[dns]\nnameservers = ['resolver.example']\n", "dns.nameservers", "item 0"),
    ("[delivery]\ntls = 'maybe'\n", "delivery.tls", "must be one of"),
    ("[limits]\nmax_recipients = true\n", "limits.max_recipients", "must be an integer"),
    ("[bounces]\ncomplaint_addresses = ['fbl']\n", "bounces.complaint_addresses", "item 0"),
    ("[bounces]\ndomain = 'not a host'\n", "bounces.domain", ""),
    ("[bounces]\ndomain = '☃.example'\n", "bounces.domain", "IDNA 2008"),
    ("[server\n", "-", "not valid TOML"),
])
def test_bad_values_name_file_key_and_reason(tmp_path: Path, text: str, key: str,
                                             reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    assert err.value.file == str(tmp_path / "relay.toml")
    assert err.value.key == key
    assert reason in err.value.reason
    assert str(err.value).startswith(f"{tmp_path / 'relay.toml'}: {key}: ")


def test_domains_are_kept_as_idna_2008_a_labels(tmp_path: Path) -> None:
    c = load_text(tmp_path, "[bounces]\ndomain = 'Faß.example'\n"
                            "[[smtp.listeners]]\nallowed_from_domains = ['Bücher.example']\n")
    assert c.bounces.domain == "xn--fa-hia.example"  # IDNA 2003: fass.example
    assert c.smtp.listeners[0].allowed_from_domains == ("xn--bcher-kva.example",)


def test_tls_file_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory") as err:
        load_text(tmp_path, f"[[smtp.listeners]]\ntls_cert = '{tmp_path}'\ntls_key = '{tmp_path}'\n")
    assert err.value.key == "smtp.listeners[0].tls_cert"


def test_unreadable_tls_file(tmp_path: Path) -> None:
    root = os.geteuid() == 0  # root reads every file: then the load runs as nobody
    if root:
        tmp_path = Path(tempfile.mkdtemp())  # not under pytest's 0700 directory
        tmp_path.chmod(0o711)
    try:
        cert = tmp_path / "cert.pem"
        cert.write_text("x")
        cert.chmod(0)
        path = tmp_path / "relay.toml"
        path.write_text(f"[[smtp.listeners]]\ntls_cert = '{cert}'\ntls_key = '{cert}'\n")
        path.chmod(0o644)
        key, _, message = (as_nobody if root else load_error)(path).partition(" ")
        assert key == "smtp.listeners[0].tls_cert" and "not readable" in message, message
    finally:
        if root:
            shutil.rmtree(tmp_path)


def load_error(path: Path) -> str:
    """The ConfigError loading `path` raises: its key and text."""
    try:
        config_mod.load(path, environ={})
    except ConfigError as exc:
        return f"{exc.key} {exc}"
    return "- loaded"


def as_nobody(path: Path) -> str:
    """load_error in a forked child that has become nobody."""
    nobody = pwd.getpwnam("nobody")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.write(w, load_error(path).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as answer:
        # a fork beside other threads could hang on a lock one of them held: not forever
        if not select.select([answer], [], [], 30)[0]:
            os.kill(pid, signal.SIGKILL)
        out = answer.read().decode()
    os.waitpid(pid, 0)
    return out


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    c = load_text(tmp_path, "[api]\nport = 9000\n",
                  env={"RELAY_API_PORT": "9100", "RELAY_SERVER_HOSTNAME": "mx.example.net",
                       "RELAY_DNS_NAMESERVERS": '["127.0.0.1:53"]'})
    assert c.api.port == 9100
    assert c.server.hostname == "mx.example.net"
    assert c.dns.nameservers == ("127.0.0.1:53",)


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, "", env={"RELAY_API_PORT": "eighty"})
    assert (err.value.file, err.value.key) == ("environment", "api.port")
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, "", env={"RELAY_NOPE_X": "1"})
    assert err.value.key == "RELAY_NOPE_X"


def test_relay_config_variable_finds_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("[api]\nport = 9200\n")
    assert config_mod.load(None, environ={"RELAY_CONFIG": str(path)}).api.port == 9200


def test_example_config_has_every_key_with_its_default() -> None:
    """conf/relay.toml documents every key; apart from the production paths it is the default."""
    raw = tomllib.loads((REPO / "conf" / "relay.toml").read_text())
    defaults = Config()
    for section in dataclasses.fields(Config):
        if section.metadata.get("internal"):
            continue
        value = getattr(defaults, section.name)
        if section.name == "smtp":
            table = raw["smtp"]["listeners"][0]
            value = value.listeners[0]
        else:
            table = raw[section.name]
        names = {f.name for f in dataclasses.fields(value)}
        assert set(table) == names, f"[{section.name}] keys differ"
    loaded = config_mod.load(REPO / "conf" / "relay.toml", environ={})
    for section in ("api", "delivery", "dns", "limits", "smtp"):
        assert getattr(loaded, section) == getattr(defaults, section), section


def test_serve_with_a_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "bad.toml"
    path.write_text(f"[[smtp.listeners]]\nport = {port}\nmode = 'open'\n")
    result = run_relay("--config", str(path), "serve", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"{path}: smtp.listeners[0].mode: must be one of submission, relay, "
                     "inbound; got 'open'"]
    assert not (tmp_path / "relay-data").exists()  # nothing was made, nothing listened


def test_serve_with_a_port_in_use_exits_2(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "r.toml"
        path.write_text(f"[server]\ndata_dir = '{tmp_path}/d'\n[[smtp.listeners]]\nport = {port}\n")
        result = run_relay("--config", str(path), "serve", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"{path}: smtp.listeners[0]: ")


def test_serve_without_config_starts_on_the_defaults(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    proc = subprocess.Popen(relay_cmd("serve"), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_port(2525, proc=proc)
        assert (tmp_path / "relay-data" / "relay.sqlite").exists()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert "API key rk_" in out  # the first key, printed once
    assert "SMTP submission on 127.0.0.1:2525" in out
