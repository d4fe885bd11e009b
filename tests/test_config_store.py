"""[store] url (issue 20): SQLite by default, a sqlite:/// file or a postgresql:// database;
a bad URL is a config error naming store.url, and the password never shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import config as config_mod
from relay.config import Config, mask_url
from relay.errors import ConfigError

from .conftest import free_port, run_relay

SECRET = "s3cr3t-pw"


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "relay.toml"
    path.write_text(text, "utf-8")
    return config_mod.load(path, environ=env or {})


def test_the_default_is_the_sqlite_file_in_the_data_dir(tmp_path: Path) -> None:
    c = load_text(tmp_path, f"[server]\ndata_dir = '{tmp_path}/d'\n")
    assert c.store.url == ""
    assert c.store_url == f"sqlite://{tmp_path}/d/relay.sqlite"
    assert config_mod.sqlite_path(c.store_url) == c.db_path


def test_relative_data_dir_gives_an_absolute_sqlite_url(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    c = load_text(tmp_path, "[server]\ndata_dir = 'rel'\n")
    assert c.store_url == f"sqlite://{tmp_path}/rel/relay.sqlite"


@pytest.mark.parametrize("url", [
    "sqlite:///var/lib/relay/relay.sqlite",
    f"postgresql://relay:{SECRET}@127.0.0.1:5432/relay",
    "postgres://relay@db.example/relay?sslmode=require",
    "postgresql:///relay?host=/run/postgresql",  # a Unix socket directory
    f"postgresql://relay:{SECRET}@[::1]:5433/relay",
])
def test_good_urls_load(tmp_path: Path, url: str) -> None:
    c = load_text(tmp_path, f"[store]\nurl = '{url}'\n")
    assert c.store.url == c.store_url == url


def test_relay_store_url_overrides_the_file(tmp_path: Path) -> None:
    url = f"postgresql://relay:{SECRET}@127.0.0.1:5432/relay"
    c = load_text(tmp_path, "[store]\nurl = 'sqlite:///x/relay.sqlite'\n",
                  env={"RELAY_STORE_URL": url})
    assert c.store.url == url
    assert config_mod.is_postgresql(c.store_url)


@pytest.mark.parametrize("url, reason", [
    ("mysql://relay:s3cr3t-pw@127.0.0.1/relay", "scheme 'mysql' is not one relay opens"),
    ("/var/lib/relay/relay.sqlite", "scheme none is not one relay opens"),
    ("postgresql://relay:s3cr3t-pw@/relay", "needs a host"),
    ("postgresql:///relay", "needs a host"),
    ("postgresql://relay:s3cr3t-pw@db:0/relay", "port must be 1..65535"),
    ("postgresql://relay:s3cr3t-pw@db:99999/relay", "port a number"),
    ("postgresql://relay:s3cr3t-pw/relay", "port a number"),  # no @: the password as a port
    ("postgresql://relay:s3cr3t-pw@db/relay#x", "no #fragment"),
    ("sqlite://host/relay.sqlite", "names a file and nothing else"),
    ("sqlite:///", "needs a file path"),
    ("sqlite:///var/lib/relay/", "needs a file path"),
    ("postgresql://relay:s3cr3t-pw@db /relay", "no spaces"),
    ("postgresql://db/" + "x" * 3000, "at most 2048 characters"),
])
def test_bad_urls_name_store_url_and_never_the_password(tmp_path: Path, url: str,
                                                        reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, f"[store]\nurl = '{url}'\n")
    assert (err.value.file, err.value.key) == (str(tmp_path / "relay.toml"), "store.url")
    assert reason in err.value.reason
    assert SECRET not in str(err.value)


def test_a_bad_environment_url_names_the_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, "", env={"RELAY_STORE_URL": "redis://127.0.0.1/0"})
    assert (err.value.file, err.value.key) == ("environment", "store.url")


def test_a_non_string_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be a string") as err:
        load_text(tmp_path, "[store]\nurl = 5432\n")
    assert err.value.key == "store.url"


@pytest.mark.parametrize("url, shown", [
    (f"postgresql://relay:{SECRET}@127.0.0.1:5432/relay",
     "postgresql://relay:***@127.0.0.1:5432/relay"),
    (f"postgresql://relay:{SECRET}@[::1]/relay?sslmode=require",
     "postgresql://relay:***@[::1]/relay?sslmode=require"),
    (f"postgresql://relay:{SECRET}:more@db/relay", "postgresql://relay:***@db/relay"),
    ("postgresql://relay@db/relay", "postgresql://relay@db/relay"),
    ("sqlite:///var/lib/relay/relay.sqlite", "sqlite:///var/lib/relay/relay.sqlite"),
    ("", ""),
])
def test_mask_url_hides_only_the_password(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_serve_refuses_postgresql_in_this_build_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(f"[server]\ndata_dir = '{tmp_path}/d'\n[[smtp.listeners]]\n"
                    f"port = {free_port()}\n[api]\nport = {free_port()}\n")
    url = f"postgresql://relay:{SECRET}@127.0.0.1:{free_port()}/relay"
    result = run_relay("--config", str(path), "serve", cwd=tmp_path,
                       env={"RELAY_STORE_URL": url})
    assert result.returncode == 2
    line = (f"{path}: store.url: PostgreSQL (postgresql://relay:***@{url.rpartition('@')[2]})"
            " is not available in this build; leave it empty for the SQLite file in"
            " server.data_dir")
    assert result.stderr.strip().splitlines() == [line]
    assert not (tmp_path / "d").exists()  # nothing made: no queue in a place nobody chose


def test_serve_refuses_another_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(f"[server]\ndata_dir = '{tmp_path}/d'\n[store]\n"
                    f"url = 'sqlite://{tmp_path}/elsewhere.sqlite'\n[[smtp.listeners]]\n"
                    f"port = {free_port()}\n[api]\nport = {free_port()}\n")
    result = run_relay("--config", str(path), "serve", cwd=tmp_path)
    assert result.returncode == 2
    assert "store.url: an SQLite file other than" in result.stderr
    assert not (tmp_path / "elsewhere.sqlite").exists()
