"""Who is asking: Basic auth, JSESSIONID sessions and alias tokens, as XNAT does them.

Sessions live in memory (as Tomcat's do) and expire after ``session_timeout_s``
of inactivity; users and alias tokens live in the store and survive restarts.
See ``shared/reference/xnat-rest-api.md`` section 1.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
from dataclasses import dataclass

from aiohttp import web

from .knobs import Knobs
from .store import Store
from .xnatformat import REALM, XnatHTTPError

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
BROWSER_RE = re.compile(r".*Mozilla.*|.*MSIE.*|.*AppleWebKit.*|.*Opera.*")


@dataclass
class HttpSession:
    id: str
    login: str
    last_access: float


class SessionRegistry:
    """JSESSIONID → user, with an inactivity timeout read from the knobs."""

    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs
        self._sessions: dict[str, HttpSession] = {}

    def create(self, login: str) -> HttpSession:
        sid = secrets.token_hex(16).upper()
        session = HttpSession(sid, login, time.time())
        self._sessions[sid] = session
        return session

    def lookup(self, sid: str) -> HttpSession | None:
        """The live session for ``sid``, touched; expired ones are dropped."""
        session = self._sessions.get(sid)
        if session is None:
            return None
        now = time.time()
        if now - session.last_access > self.knobs.session_timeout_s:
            del self._sessions[sid]
            return None
        session.last_access = now
        return session

    def invalidate(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def expire_all(self) -> int:
        n = len(self._sessions)
        self._sessions.clear()
        return n


@dataclass
class Caller:
    """The authenticated user of a request, and the session it runs in."""

    login: str
    is_admin: bool
    session: HttpSession | None
    new_session: bool  # a Set-Cookie must go out with the response


def parse_basic(header: str) -> tuple[str, str] | None:
    if not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def login_with_password(store: Store, user: str, password: str) -> str | None:
    """The login that ``user:password`` authenticates, alias tokens included."""
    if UUID_RE.match(user):
        login = store.check_token(user, password)
        if login is not None:
            return login
    return user if store.check_password(user, password) else None


def authenticate(request: web.Request, store: Store, sessions: SessionRegistry) -> Caller | None:
    """Identify the caller from Basic credentials or the JSESSIONID cookie.

    Bad Basic credentials are refused outright (401, "Login attempt failed"),
    as XNAT's ``XnatBasicAuthenticationFilter`` does; a missing or expired
    session just means "anonymous", which data paths then refuse.
    """
    header = request.headers.get("Authorization", "")
    credentials = parse_basic(header) if header else None
    if header and credentials is None and header.lower().startswith("basic"):
        raise XnatHTTPError(401, "Login attempt failed. Please try again.",
                            {"WWW-Authenticate": REALM})
    if credentials:
        login = login_with_password(store, *credentials)
        if login is None:
            raise XnatHTTPError(401, "Login attempt failed. Please try again.",
                                {"WWW-Authenticate": REALM})
        # Reuse the cookie's session when it belongs to the same user.
        sid = request.cookies.get("JSESSIONID")
        existing = sessions.lookup(sid) if sid else None
        if existing and existing.login == login:
            return _caller(store, existing, new=False)
        return _caller(store, sessions.create(login), new=True)
    sid = request.cookies.get("JSESSIONID")
    if sid:
        session = sessions.lookup(sid)
        if session is not None:
            return _caller(store, session, new=False)
    return None


def _caller(store: Store, session: HttpSession, *, new: bool) -> Caller:
    row = store.user(session.login)
    return Caller(session.login, bool(row and row["is_admin"]), session, new)


def unauthorized(request: web.Request) -> XnatHTTPError:
    """What XNAT answers an anonymous request on a protected path."""
    if BROWSER_RE.match(request.headers.get("User-Agent", "")):
        raise web.HTTPFound("/app/template/Login.vm")
    return XnatHTTPError(401, "Unauthorized", {"WWW-Authenticate": REALM})


def session_cookies(response: web.StreamResponse, caller: Caller | None, knobs: Knobs) -> None:
    """Set JSESSIONID (for new sessions) and SESSION_EXPIRATION_TIME (always)."""
    if caller is None or caller.session is None:
        return
    if caller.new_session:
        # Added as a raw header: this runs after aiohttp has rendered its cookie jar.
        response.headers.add("Set-Cookie", f"JSESSIONID={caller.session.id}; Path=/; HttpOnly")
    timeout_ms = int(knobs.session_timeout_s * 1000)
    stamp = int(caller.session.last_access * 1000)
    # The quotes are part of the value: xnatpy parses it with ^"(\d+),(\d+)"$.
    response.headers.add(
        "Set-Cookie", f'SESSION_EXPIRATION_TIME="{stamp},{timeout_ms}"; Path=/')
