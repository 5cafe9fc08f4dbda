"""Who we are on which XNAT: finding credentials, and remembering JSESSIONs.

Credentials for a site are looked up in this order, and the first source that
has them wins:

1. an explicit user (``--user``); the caller asks for the password through a
   callback, so a password never appears on a command line;
2. a profile named explicitly (``--profile``), which is as explicit as a user;
3. ``XNAT_USER``/``XNAT_PASS`` (``XNAT_USER`` alone: prompt for its password),
   used only when ``XNAT_URL`` is unset or names the same site, so that one
   site's password is never sent to another;
4. ``~/.netrc`` (or ``$NETRC``), machine ``host:port`` then ``host``, as xnatpy
   looks it up;
5. a profile of ``~/.config/xnatfs/config.toml`` whose ``url`` is the site::

       default_profile = "work"          # used when no URL is given at all

       [profiles.work]
       url = "https://xnat.example.org"
       user = "alice"                    # or an alias token's UUID
       password_command = "pass show xnat/work"   # or: password = "..."

The site URL itself comes from the argument, else the named profile, else
``XNAT_URL``, else the default profile.

:class:`SessionCache` keeps the JSESSIONID of each site in a file only the
user can read, so that a second mount (or one restarted after a crash) can
reuse a live session instead of logging in again. It never holds passwords.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import secrets
import shlex
import subprocess
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "Credentials",
    "CredentialsError",
    "PasswordPrompt",
    "SessionCache",
    "default_config_path",
    "default_session_cache_path",
    "normalise_site_url",
    "resolve_credentials",
]

log = logging.getLogger(__name__)

PASSWORD_COMMAND_TIMEOUT_S = 120.0  # a password manager may be waiting for a PIN

PasswordPrompt = Callable[[str, str], str]
"""``ask_password(url, user) -> password``; the CLI implements it with getpass."""


class CredentialsError(Exception):
    """No usable credentials or site URL: a configuration problem for the CLI to report.

    Not an :class:`~xnatfs.errors.XnatError`: it happens before any request and
    never reaches a filesystem call.
    """


@dataclass(frozen=True)
class Credentials:
    """A site and the user and password (or alias token and secret) for it.

    ``source`` says where they came from, for error messages. The password is
    left out of ``repr`` so that it cannot end up in a log or a traceback.
    """

    url: str
    user: str
    password: str = field(repr=False)
    source: str = field(default="explicit", compare=False)


def normalise_site_url(url: str) -> str:
    """``https://host[:port][/path]`` without a trailing slash; one key per site.

    Credentials in the URL are refused: they would end up in logs and in
    ``ps`` output.
    """
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise CredentialsError(f"not an http(s) site URL: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise CredentialsError("put credentials in ~/.netrc or a profile, not in the URL")
    if parts.query or parts.fragment:
        raise CredentialsError(f"a site URL has no query or fragment: {url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # IPv6
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return f"{parts.scheme.lower()}://{netloc}{parts.path.rstrip('/')}"


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "xnatfs" / "config.toml"


def default_session_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xnatfs" / "sessions.json"


def resolve_credentials(url: str | None = None, *, user: str | None = None,
                        profile: str | None = None, ask_password: PasswordPrompt | None = None,
                        config_path: Path | None = None) -> Credentials:
    """Find the site and credentials to use, in the order of the module docstring.

    Raises:
        CredentialsError: no site URL, no credentials, an unknown profile, an
            unreadable netrc or config file, or a failing ``password_command``.
    """
    config_file = config_path or default_config_path()
    config = _load_config(config_file)
    profiles = config.get("profiles", {})
    if not isinstance(profiles, Mapping):
        raise CredentialsError(f"{config_file}: 'profiles' must be a table")
    named = _profile(profiles, profile, config_file) if profile else {}
    site = _site_url(url, named, config.get("default_profile"), profiles, config_file)

    if user:
        return _prompted(site, user, ask_password, "explicit user")
    if profile and named.get("user"):
        return _from_profile(site, profile, named, ask_password)
    env_user = os.environ.get("XNAT_USER")
    env_url = os.environ.get("XNAT_URL")
    if env_user and (not env_url or normalise_site_url(env_url) == site):
        env_password = os.environ.get("XNAT_PASS")
        if env_password:
            return Credentials(site, env_user, env_password, "environment")
        return _prompted(site, env_user, ask_password, "XNAT_USER")
    from_netrc = _from_netrc(site)
    if from_netrc is not None:
        return from_netrc
    for name, entry in profiles.items():
        if (isinstance(entry, Mapping) and entry.get("url") and entry.get("user")
                and normalise_site_url(entry["url"]) == site):
            return _from_profile(site, name, entry, ask_password)
    raise CredentialsError(
        f"no credentials for {site}: give a user, set XNAT_USER/XNAT_PASS, add it to "
        f"~/.netrc or define a profile in {config_file}")


def named_site(url: str | None, profile: str | None,
               config_path: Path | None = None) -> str | None:
    """The site the user named, if any: ``url``, the profile's ``url``, or
    ``XNAT_URL`` (normalised); None when they named none."""
    if url:
        return normalise_site_url(url)
    if profile:
        config_file = config_path or default_config_path()
        profiles = _load_config(config_file).get("profiles", {})
        entry = _profile(profiles if isinstance(profiles, Mapping) else {}, profile,
                         config_file)
        if entry.get("url"):
            return normalise_site_url(entry["url"])
    if os.environ.get("XNAT_URL"):
        return normalise_site_url(os.environ["XNAT_URL"])
    return None


def _site_url(url: str | None, named: Mapping[str, Any], default_profile: str | None,
              profiles: Mapping[str, Any], config_file: Path) -> str:
    if url:
        return normalise_site_url(url)
    if named.get("url"):
        return normalise_site_url(named["url"])
    if os.environ.get("XNAT_URL"):
        return normalise_site_url(os.environ["XNAT_URL"])
    if default_profile:
        entry = _profile(profiles, default_profile, config_file)
        if entry.get("url"):
            return normalise_site_url(entry["url"])
    raise CredentialsError("no XNAT URL: give one, set XNAT_URL or set default_profile")


def _prompted(site: str, user: str, ask_password: PasswordPrompt | None,
              source: str) -> Credentials:
    if ask_password is None:
        raise CredentialsError(f"a password is needed for {user} on {site}")
    return Credentials(site, user, ask_password(site, user), source)


MOUNT_SWITCHES = ("direct_archive", "write_behind", "allow_other", "allow_root",
                  "allow_overwrite", "allow_delete")


# Mount options with a value: the shared cache tier of a cluster (a path, a size).
MOUNT_VALUES = ("shared_cache", "shared_cache_max")


def mount_switches(site: str, profile: str | None = None,
                   config_path: Path | None = None) -> dict[str, bool]:
    """On/off mount options (``MOUNT_SWITCHES``) from the config file: the
    ``[mount]`` table, overridden by the profile in use (``--profile``, or the
    one whose ``url`` is the site)::

        [mount]
        write_behind = true
        [profiles.work]
        url = "https://xnat.example.org"
        direct_archive = true

    Raises:
        CredentialsError: the file is unreadable or a switch is not true/false.
    """
    config_file = config_path or default_config_path()
    switches: dict[str, bool] = {}
    for table in _mount_tables(site, profile, config_file):
        for name in MOUNT_SWITCHES:
            if name in table:
                if not isinstance(table[name], bool):
                    raise CredentialsError(f"{config_file}: {name} must be true or false")
                switches[name] = table[name]
    return switches


def mount_values(site: str, profile: str | None = None,
                 config_path: Path | None = None) -> dict[str, str]:
    """Mount options with a value (``MOUNT_VALUES``) from the same tables as
    :func:`mount_switches`, as text (``shared_cache = "/shared/xnatfs"``,
    ``shared_cache_max = "500G"``; a size may also be a number of bytes).

    Raises:
        CredentialsError: the file is unreadable or a value is not text or a number.
    """
    config_file = config_path or default_config_path()
    values: dict[str, str] = {}
    for table in _mount_tables(site, profile, config_file):
        for name in MOUNT_VALUES:
            if name in table:
                value = table[name]
                if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
                    raise CredentialsError(f"{config_file}: {name} must be a path or a size")
                values[name] = str(value)
    return values


def _mount_tables(site: str, profile: str | None, config_file: Path) -> list[Mapping[str, Any]]:
    """The ``[mount]`` table, then the profile's: later ones override."""
    config = _load_config(config_file)
    tables: list[Mapping[str, Any]] = []
    if isinstance(config.get("mount"), Mapping):
        tables.append(config["mount"])
    profiles = config.get("profiles", {})
    if isinstance(profiles, Mapping):
        if profile:
            tables.append(_profile(profiles, profile, config_file))
        else:
            tables.extend(entry for entry in profiles.values()
                          if isinstance(entry, Mapping) and entry.get("url")
                          and normalise_site_url(entry["url"]) == site)
    return tables


def _load_config(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CredentialsError(f"cannot read {path}: {exc}") from exc


def _profile(profiles: Mapping[str, Any], name: str, config_file: Path) -> Mapping[str, Any]:
    entry = profiles.get(name)
    if not isinstance(entry, Mapping):
        raise CredentialsError(f"no profile {name!r} in {config_file}")
    return entry


def _from_profile(site: str, name: str, entry: Mapping[str, Any],
                  ask_password: PasswordPrompt | None) -> Credentials:
    source = f"profile {name}"
    if entry.get("password"):
        return Credentials(site, entry["user"], entry["password"], source)
    if entry.get("password_command"):
        return Credentials(site, entry["user"], _run_password_command(entry["password_command"]),
                           source)
    return _prompted(site, entry["user"], ask_password, source)


def _run_password_command(command: str) -> str:
    """The first line the command prints. It runs without a shell (use ``sh -c``
    for pipelines); its stdout is never put into an error message."""
    try:
        done = subprocess.run(shlex.split(command), capture_output=True, text=True,
                              timeout=PASSWORD_COMMAND_TIMEOUT_S, check=False)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise CredentialsError(f"password_command failed: {exc}") from exc
    lines = done.stdout.splitlines()
    if done.returncode != 0 or not lines or not lines[0]:
        raise CredentialsError(f"password_command exited with {done.returncode} and no "
                               f"password: {done.stderr.strip()[-500:]}")
    return lines[0]


def _from_netrc(site: str) -> Credentials | None:
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        parsed = netrc.netrc(str(path))
    except FileNotFoundError:
        return None
    except (OSError, netrc.NetrcParseError) as exc:
        raise CredentialsError(f"cannot read {path}: {exc}") from exc
    parts = urlsplit(site)
    host = parts.hostname or ""
    entry = parsed.hosts.get(parts.netloc) or parsed.authenticators(host)
    if entry is None:
        return None
    login, _account, password = entry
    if not login or not password:
        return None
    return Credentials(site, login, password, f"netrc {path}")


class SessionCache:
    """JSESSIONIDs by site URL, in a JSON file only the user can read.

    The file holds ``{url: {"user": ..., "jsessionid": ...}}``; it is created
    with mode 0600 in a directory with mode 0700 and replaced atomically on
    every change. Two mounts updating it at the same instant can lose one
    entry, which costs one extra login and nothing else. Its methods do file
    I/O: call them from a worker thread.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_session_cache_path()

    def get(self, url: str, user: str) -> str | None:
        entry = self._load().get(url)
        if isinstance(entry, dict) and entry.get("user") == user:
            session_id = entry.get("jsessionid")
            return session_id if isinstance(session_id, str) and session_id else None
        return None

    def put(self, url: str, user: str, session_id: str) -> None:
        entries = self._load()
        entries[url] = {"user": user, "jsessionid": session_id}
        self._save(entries)

    def discard(self, url: str, session_id: str) -> None:
        """Forget ``session_id``, but not a newer session another mount stored since."""
        entries = self._load()
        entry = entries.get(url)
        if isinstance(entry, dict) and entry.get("jsessionid") == session_id:
            del entries[url]
            self._save(entries)

    def _load(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                entries = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # A damaged cache only costs a login; it must never stop a mount.
            log.warning("ignoring unreadable session cache %s: %s", self.path, exc)
            return {}
        return entries if isinstance(entries, dict) else {}

    def _save(self, entries: Mapping[str, Any]) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        temporary = directory / f".{self.path.name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entries, f, indent=1)
            os.replace(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
