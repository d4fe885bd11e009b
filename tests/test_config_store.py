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


def test_serve_names_an_unreachable_postgresql_in_one_line_without_its_password(
        tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(f"[server]\ndata_dir = '{tmp_path}/d'\n[[smtp.listeners]]\n"
                    f"port = {free_port()}\n[api]\nport = {free_port()}\n")
    url = f"postgresql://relay:{SECRET}@127.0.0.1:{free_port()}/relay"
    result = run_relay("--config", str(path), "serve", cwd=tmp_path,
                       env={"RELAY_STORE_URL": url})
    assert result.returncode == 1
    assert SECRET not in result.stderr + result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"relay: postgresql://relay:***@{url.rpartition('@')[2]}: cannot "
                           "open the database: cannot connect to PostgreSQL")


def test_init_makes_another_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(f"[server]\ndata_dir = '{tmp_path}/d'\n")
    elsewhere = tmp_path / "elsewhere.sqlite"
    result = run_relay("--config", str(path), "init", "--store", f"sqlite://{elsewhere}",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert elsewhere.exists() and not (tmp_path / "d" / "relay.sqlite").exists()
    listed = run_relay("--config", str(path), "keys", "list", cwd=tmp_path,
                       env={"RELAY_STORE_URL": f"sqlite://{elsewhere}"})
    assert "first key" in listed.stdout


def test_init_makes_the_schema_in_postgresql(tmp_path: Path, pg_url: str) -> None:
    path = tmp_path / "r.toml"
    result = run_relay("init", "--write-config", str(path), "--store", pg_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "RELAY_STORE_URL=" in result.stdout and 'url = ""' in path.read_text()
    listed = run_relay("--config", str(path), "keys", "list", cwd=tmp_path,
                       env={"RELAY_STORE_URL": pg_url})
    assert listed.returncode == 0 and "first key" in listed.stdout, listed.stderr
    bad = run_relay("--config", str(path), "init", "--store", "mysql://x/y", cwd=tmp_path)
    assert bad.returncode == 2 and "store.url" in bad.stderr
