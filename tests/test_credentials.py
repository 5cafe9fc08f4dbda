"""Where credentials come from, in which order, and how the session cache is kept."""

from __future__ import annotations

import json
import os
import shlex
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from xnatfs.credentials import (
    Credentials,
    CredentialsError,
    SessionCache,
    default_session_cache_path,
    mount_switches,
    mount_values,
    named_site,
    normalise_site_url,
    resolve_credentials,
)

SITE = "https://xnat.example.org"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HOME with none of the variables that would leak the developer's setup."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("XNAT_USER", "XNAT_PASS", "XNAT_URL", "NETRC", "XDG_CONFIG_HOME",
                 "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return home


def write_netrc(home: Path, text: str) -> Path:
    path = home / ".netrc"
    path.write_text(text)
    path.chmod(0o600)
    return path


def write_config(home: Path, text: str) -> Path:
    path = home / ".config" / "xnatfs" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


class Prompt:
    """Stands in for getpass; remembers whom it was asked about."""

    def __init__(self, answer: str = "typed") -> None:
        self.answer = answer
        self.asked: list[tuple[str, str]] = []

    def __call__(self, url: str, user: str) -> str:
        self.asked.append((url, user))
        return self.answer


@pytest.fixture
def every_source(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The same site known to the environment, netrc and a profile, with different users."""
    monkeypatch.setenv("XNAT_USER", "env-user")
    monkeypatch.setenv("XNAT_PASS", "env-pass")
    write_netrc(home, "machine xnat.example.org login netrc-user password netrc-pass\n")
    write_config(home, f'[profiles.work]\nurl = "{SITE}/"\nuser = "profile-user"\n'
                       'password = "profile-pass"\n')
    yield home


# ------------------------------------------------------------------- order
def test_explicit_user_comes_first_and_is_prompted(every_source: Path) -> None:
    prompt = Prompt()
    found = resolve_credentials(SITE, user="me", ask_password=prompt)
    assert (found.user, found.password) == ("me", "typed")
    assert prompt.asked == [(SITE, "me")]


def test_environment_beats_netrc_and_profiles(every_source: Path) -> None:
    found = resolve_credentials(SITE)
    assert (found.user, found.password, found.source) == ("env-user", "env-pass", "environment")


def test_netrc_beats_profiles(every_source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XNAT_USER")
    found = resolve_credentials(SITE)
    assert (found.user, found.password) == ("netrc-user", "netrc-pass")


def test_profile_matching_the_site_comes_last(every_source: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XNAT_USER")
    (every_source / ".netrc").unlink()
    found = resolve_credentials(SITE)
    assert (found.user, found.password, found.source) == (
        "profile-user", "profile-pass", "profile work")


def test_a_named_profile_is_explicit_and_beats_the_environment(every_source: Path) -> None:
    found = resolve_credentials(profile="work")
    assert (found.url, found.user) == (SITE, "profile-user")


def test_nothing_found_is_an_error(home: Path) -> None:
    with pytest.raises(CredentialsError, match="no credentials"):
        resolve_credentials(SITE)
    with pytest.raises(CredentialsError, match="password is needed"):
        resolve_credentials(SITE, user="me")  # and no way to ask
    with pytest.raises(CredentialsError, match="no XNAT URL"):
        resolve_credentials()


# --------------------------------------------------------------- environment
def test_xnat_url_names_the_site(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XNAT_URL", "https://XNAT.example.org/")
    monkeypatch.setenv("XNAT_USER", "env-user")
    monkeypatch.setenv("XNAT_PASS", "env-pass")
    assert resolve_credentials() == Credentials(SITE, "env-user", "env-pass")


def test_environment_credentials_stay_with_their_site(home: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XNAT_URL", "https://other.example.org")
    monkeypatch.setenv("XNAT_USER", "env-user")
    monkeypatch.setenv("XNAT_PASS", "env-pass")
    write_netrc(home, "machine xnat.example.org login netrc-user password netrc-pass\n")
    assert resolve_credentials(SITE).user == "netrc-user"


def test_xnat_user_without_password_is_prompted(home: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XNAT_USER", "env-user")
    prompt = Prompt("secret")
    assert resolve_credentials(SITE, ask_password=prompt).password == "secret"
    assert prompt.asked == [(SITE, "env-user")]


# --------------------------------------------------------------------- netrc
def test_netrc_prefers_host_and_port_then_host(home: Path) -> None:
    write_netrc(home, "machine xnat.example.org:8443 login with-port password p1\n"
                      "machine xnat.example.org login host-only password p2\n")
    assert resolve_credentials("https://xnat.example.org:8443").user == "with-port"
    assert resolve_credentials("https://xnat.example.org:9999").user == "host-only"


def test_netrc_location_from_the_environment(home: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "other-netrc"
    elsewhere.write_text("machine xnat.example.org login elsewhere password p\n")
    monkeypatch.setenv("NETRC", str(elsewhere))
    found = resolve_credentials(SITE)
    assert (found.user, found.source) == ("elsewhere", f"netrc {elsewhere}")


def test_broken_netrc_is_reported(home: Path) -> None:
    write_netrc(home, "machine xnat.example.org login\n")
    with pytest.raises(CredentialsError, match=r"\.netrc"):
        resolve_credentials(SITE)


# ------------------------------------------------------------------ profiles
def test_password_command(home: Path) -> None:
    command = shlex.join([sys.executable, "-c", "print('from-command'); print('ignored')"])
    write_config(home, f'[profiles.work]\nurl = "{SITE}"\nuser = "u"\n'
                       f"password_command = '''{command}'''\n")
    assert resolve_credentials(SITE).password == "from-command"


def test_failing_password_command_does_not_show_its_output(home: Path) -> None:
    command = shlex.join([sys.executable, "-c",
                          "import sys; print('half-a-secret'); sys.exit(3)"])
    write_config(home, f'[profiles.work]\nurl = "{SITE}"\nuser = "u"\n'
                       f"password_command = '''{command}'''\n")
    with pytest.raises(CredentialsError) as caught:
        resolve_credentials(SITE)
    assert "exited with 3" in str(caught.value)
    assert "half-a-secret" not in str(caught.value)


def test_default_profile_gives_the_site(home: Path) -> None:
    write_config(home, 'default_profile = "work"\n'
                       f'[profiles.work]\nurl = "{SITE}"\nuser = "u"\npassword = "p"\n')
    assert resolve_credentials() == Credentials(SITE, "u", "p")


def test_unknown_profile_is_an_error(home: Path) -> None:
    with pytest.raises(CredentialsError, match="no profile 'nope'"):
        resolve_credentials(SITE, profile="nope")


def test_mount_switches_from_the_mount_table_and_the_sites_profile(home: Path) -> None:
    write_config(home, "[mount]\nwrite_behind = true\ndirect_archive = true\n"
                       f'[profiles.work]\nurl = "{SITE}"\ndirect_archive = false\n'
                       '[profiles.other]\nurl = "https://other.example.org"\n'
                       "write_behind = false\n")
    assert mount_switches(SITE) == {"write_behind": True, "direct_archive": False}
    assert mount_switches("https://elsewhere.example.org") == {
        "write_behind": True, "direct_archive": True}
    assert mount_switches(SITE, "other") == {"write_behind": False, "direct_archive": True}


def test_mount_switches_must_be_booleans(home: Path) -> None:
    write_config(home, '[mount]\nwrite_behind = "yes"\n')
    with pytest.raises(CredentialsError, match="write_behind must be true or false"):
        mount_switches(SITE)


def test_the_shared_cache_from_the_mount_table_and_the_sites_profile(home: Path) -> None:
    write_config(home, '[mount]\nshared_cache = "/shared/xnatfs"\nshared_cache_max = "500G"\n'
                       f'[profiles.work]\nurl = "{SITE}"\nshared_cache_max = 1073741824\n')
    assert mount_values(SITE) == {"shared_cache": "/shared/xnatfs",
                                  "shared_cache_max": "1073741824"}
    assert mount_values("https://elsewhere.example.org")["shared_cache_max"] == "500G"
    assert mount_switches(SITE) == {}  # values are not switches


def test_and_the_cli_takes_them_unless_given(home: Path) -> None:
    from xnatfs.cli import _apply_config_switches, build_parser

    write_config(home, '[mount]\nshared_cache = "~/shared"\nshared_cache_max = "2G"\n')
    args = build_parser().parse_args(["mount", SITE, "/mnt"])
    _apply_config_switches(args, SITE)
    assert args.shared_cache == home / "shared" and args.shared_cache_max == 2 << 30
    args = build_parser().parse_args(["mount", SITE, "/mnt", "--shared-cache", "/s",
                                      "--shared-cache-max", "1M"])
    _apply_config_switches(args, SITE)
    assert args.shared_cache == Path("/s") and args.shared_cache_max == 1 << 20


@pytest.mark.parametrize("line", ["shared_cache = true", 'shared_cache = ""',
                                  "shared_cache_max = [1]"])
def test_mount_values_must_be_text_or_numbers(home: Path, line: str) -> None:
    write_config(home, f"[mount]\n{line}\n")
    with pytest.raises(CredentialsError, match="must be a path or a size"):
        mount_values(SITE)


# ------------------------------------------------------------ the dataclass
def test_repr_never_shows_the_password() -> None:
    found = Credentials(SITE, "alice", "hunter2-very-secret")
    assert "hunter2-very-secret" not in repr(found)
    assert "hunter2-very-secret" not in str(found)


@pytest.mark.parametrize(("given", "expected"), [
    ("https://XNAT.example.org/", SITE),
    ("http://xnat.example.org:8080/xnat/", "http://xnat.example.org:8080/xnat"),
    ("http://[::1]:8080", "http://[::1]:8080"),
])
def test_site_urls_are_normalised(given: str, expected: str) -> None:
    assert normalise_site_url(given) == expected


@pytest.mark.parametrize("bad", ["xnat.example.org", "ftp://xnat.example.org",
                                 "https://alice:pw@xnat.example.org", "https://x.org/?a=1"])
def test_bad_site_urls_are_refused(bad: str) -> None:
    with pytest.raises(CredentialsError):
        normalise_site_url(bad)


# ------------------------------------------------------------ session cache
def test_session_cache_is_private_even_with_a_permissive_umask(home: Path) -> None:
    path = default_session_cache_path()
    assert path == home / ".cache" / "xnatfs" / "sessions.json"
    old_umask = os.umask(0)
    try:
        SessionCache().put(SITE, "alice", "ABC123")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {SITE: {"user": "alice", "jsessionid": "ABC123"}}
    assert [p.name for p in path.parent.iterdir()] == ["sessions.json"]  # no temporaries


def test_session_cache_tightens_a_loose_directory(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    SessionCache(directory / "sessions.json").put(SITE, "alice", "ABC123")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_session_cache_entries(tmp_path: Path) -> None:
    cache = SessionCache(tmp_path / "sessions.json")
    assert cache.get(SITE, "alice") is None
    cache.put(SITE, "alice", "FIRST")
    cache.put("https://other.example.org", "bob", "OTHER")
    assert cache.get(SITE, "alice") == "FIRST"
    assert cache.get(SITE, "bob") is None  # a session belongs to its user
    cache.put(SITE, "alice", "SECOND")  # another mount logged in since
    cache.discard(SITE, "FIRST")
    assert cache.get(SITE, "alice") == "SECOND"
    cache.discard(SITE, "SECOND")
    assert cache.get(SITE, "alice") is None
    assert cache.get("https://other.example.org", "bob") == "OTHER"


def test_damaged_session_cache_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "sessions.json"
    path.write_text("{not json")
    cache = SessionCache(path)
    assert cache.get(SITE, "alice") is None
    cache.put(SITE, "alice", "NEW")
    assert cache.get(SITE, "alice") == "NEW"


def test_the_site_the_user_named(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``xnatfs uploads`` holds kept uploads against: a URL, a profile's URL,
    XNAT_URL, in that order; nothing named is None (not a default profile)."""
    write_config(home, 'default_profile = "work"\n'
                       '[profiles.work]\nurl = "https://work.example.org/"\nuser = "w"\n'
                       '[profiles.nourl]\nuser = "n"\n')
    assert named_site(None, None) is None
    monkeypatch.setenv("XNAT_URL", "https://XNAT.example.org/")
    assert named_site(None, None) == SITE
    assert named_site(None, "nourl") == SITE
    assert named_site(None, "work") == "https://work.example.org"
    assert named_site("https://given.example.org/", "work") == "https://given.example.org"
    with pytest.raises(CredentialsError):
        named_site(None, "missing")
