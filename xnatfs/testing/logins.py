"""XNAT's login endpoints: ``/data/JSESSION``, ``/data/services/auth`` and alias tokens.

How a caller is recognised on every request is :mod:`.auth`; these are the
routes that open and close sessions and issue, check and revoke alias
tokens (reference section 1).
"""

from __future__ import annotations

from urllib.parse import parse_qs

from aiohttp import web

from .auth import Caller, SessionRegistry, login_with_password, unauthorized
from .store import Store
from .xnatformat import XnatHTTPError, json_response, text_response


def jsession(request: web.Request, sessions: SessionRegistry,
             caller: Caller | None) -> web.Response:
    """The caller's session ID (a Basic-auth request opens one); DELETE logs out."""
    request["route"] = "jsession"
    if request.method == "DELETE":
        if caller is not None and caller.session is not None:
            sessions.invalidate(caller.session.id)
        response = web.Response(status=200, body=b"")
        response.del_cookie("JSESSIONID", path="/")
        request["caller"] = None
        return response
    if request.method not in ("GET", "POST"):
        raise XnatHTTPError(405, "Method Not Allowed")
    if caller is None or caller.session is None:
        raise unauthorized(request)
    return text_response(caller.session.id)


async def services_auth(request: web.Request, store: Store,
                        sessions: SessionRegistry) -> web.Response:
    """xnatpy's password login: a form body, answered with a bare session id."""
    request["route"] = "services.auth"
    if request.method not in ("PUT", "POST"):
        raise XnatHTTPError(405, "Method Not Allowed")
    body = await request.text()
    form = {k: v[0] for k, v in parse_qs(body).items()}
    for key, values in parse_qs(request.query_string).items():
        form.setdefault(key, values[0])
    user = form.get("username") or form.get("j_username") or ""
    password = form.get("password") or form.get("j_password") or ""
    login_name = login_with_password(store, user, password) if user else None
    if login_name is None:
        raise XnatHTTPError(401, "Authentication failed.")
    session = sessions.create(login_name)
    user_row = store.user(login_name)
    request["caller"] = Caller(login_name, bool(user_row and user_row["is_admin"]), session, True)
    return text_response(session.id)


def tokens(request: web.Request, store: Store, caller: Caller,
           rest: list[str]) -> web.Response:
    """``/data/services/tokens/{issue[/user/U], validate/A/S, invalidate/A}``."""
    request["route"] = "tokens"
    if rest and rest[0] == "issue":
        target = caller.login
        if len(rest) >= 3 and rest[1] == "user":
            target = rest[2]
            if target != caller.login and not caller.is_admin:
                raise XnatHTTPError(403, "Only administrators can issue tokens for other users.")
            if store.user(target) is None:
                raise XnatHTTPError(404, f"User {target} not found.")
        row = store.issue_token(target)
        return json_response({
            "id": row["id"], "enabled": bool(row["enabled"]), "created": row["created"],
            "timestamp": row["created"], "disabled": 0, "alias": row["alias"],
            "secret": row["secret"], "estimatedExpirationTime": row["expires"],
            "singleUse": False, "xdatUserId": row["login"], "validIPAddresses": [],
            "expired": False,
        })
    if len(rest) == 3 and rest[0] == "validate":
        login = store.check_token(rest[1], rest[2])
        return json_response({"valid": login} if login else {})
    if len(rest) == 2 and rest[0] == "invalidate":
        token = store.token(rest[1])
        if token is None:
            raise XnatHTTPError(404, "Token not found.")
        if token["login"] != caller.login and not caller.is_admin:
            raise XnatHTTPError(403, "Forbidden")
        store.invalidate_token(rest[1])
        return json_response({"result": "OK"})
    raise XnatHTTPError(404, "The requested resource was not found.")
