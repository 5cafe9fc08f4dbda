"""Credentials for batch jobs, read from a file only its owner can read.

A job on a compute node has nobody to type a password and should not carry
one in its environment or argv. The file (``--credentials-file``, config
``credentials_file``, or ``XNATFS_CREDENTIALS_FILE``) is TOML::

    url = "https://xnat.example.org"     # optional
    user = "alice"                       # a user and password...
    password = "..."
    alias = "..."                        # ...or an alias token (preferred)
    secret = "..."
    expires = 1767225600000              # the token's estimated expiry, epoch ms

``xnatfs token issue --to FILE`` writes one with an alias token, so that no
password is ever stored on shared storage: XNAT accepts a token's alias and
secret wherever it accepts a user and password (Basic auth included), and
the token expires (``aliasTokenTimeout``, 2 days by default).
"""

from __future__ import annotations

import os
import stat
import time
import tomllib
from pathlib import Path
from typing import Any

from .credentials import Credentials, CredentialsError, normalise_site_url

CREDENTIALS_FILE_ENV = "XNATFS_CREDENTIALS_FILE"


def check_private(path: Path) -> os.stat_result:
    """The file's status, if neither its group nor others may read or write it.

    Raises:
        CredentialsError: it cannot be read, is not a regular file, or is open to others.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise CredentialsError(f"{path} is not a regular file")
    if info.st_mode & 0o077:
        raise CredentialsError(
            f"{path} can be read by others (mode {stat.S_IMODE(info.st_mode):04o}); it holds "
            f"secrets: chmod 600 {path}")
    return info


def read_credentials_file(path: Path, site: str | None) -> Credentials:
    """The credentials in ``path`` for ``site`` (the file's ``url`` when None).

    Raises:
        CredentialsError: see :func:`check_private`; a malformed file, one for
            another site, or an expired token.
    """
    check_private(path)
    try:
        with open(path, "rb") as f:
            entry: dict[str, Any] = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CredentialsError(f"cannot read {path}: {exc}") from exc
    url = entry.get("url")
    if url is not None and not isinstance(url, str):
        raise CredentialsError(f"{path}: url must be a string")
    if site is None:
        if not url:
            raise CredentialsError(f"{path} names no url, and no site was given")
        site = normalise_site_url(url)
    elif url and normalise_site_url(url) != site:
        # One site's secret is never sent to another.
        raise CredentialsError(f"{path} holds credentials for {normalise_site_url(url)}, "
                               f"not {site}")
    if entry.get("alias") or entry.get("secret"):
        user, password, what = entry.get("alias"), entry.get("secret"), "alias token"
        expires = entry.get("expires")
        if isinstance(expires, int) and expires / 1000 < time.time():
            raise CredentialsError(f"the alias token in {path} expired; issue another "
                                   f"(xnatfs token issue --to {path})")
    else:
        user, password, what = entry.get("user"), entry.get("password"), "password"
    if not isinstance(user, str) or not isinstance(password, str) or not user or not password:
        raise CredentialsError(f"{path} holds neither user and password nor alias and secret")
    return Credentials(site, user, password, f"credentials file {path} ({what})")


def write_token_file(path: Path, site: str, token: dict[str, Any]) -> None:
    """Write an alias token (XNAT's ``/data/services/tokens/issue`` answer) to a
    new file of mode 0600; an existing file is not overwritten.

    Raises:
        CredentialsError: the answer holds no alias and secret.
        FileExistsError: ``path`` exists.
    """
    alias, secret = token.get("alias"), token.get("secret")
    if not isinstance(alias, str) or not isinstance(secret, str) or not alias or not secret:
        raise CredentialsError("XNAT's answer holds no alias token")
    lines = [f"url = {_toml_string(site)}", f"alias = {_toml_string(alias)}",
             f"secret = {_toml_string(secret)}"]
    expires = token.get("estimatedExpirationTime")
    if isinstance(expires, int) and not isinstance(expires, bool):
        lines.append(f"expires = {expires}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in escaped):
        raise CredentialsError("a control character in a token or URL")
    return f'"{escaped}"'
