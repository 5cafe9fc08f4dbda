"""The site's own endpoints: the home page, ``/xapi`` site information, search elements.

None of these touch the archive; clients ask them to find out what they are
talking to: xnatpy reads the login marker on the home page, the build info
and the schemas, and insists on ``/data/search/elements``.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from .auth import Caller
from .xnatformat import XnatHTTPError, json_response, table_response, text_response

XNAT_VERSION = "1.8.10"
BUILD_INFO = {
    "version": XNAT_VERSION, "buildNumber": "1651", "buildDate": "Tue Aug 20 18:10:41 CDT 2024",
    "sha": "5696414138", "isDirty": "false", "commit": "2", "tag": XNAT_VERSION,
    "shaFull": "56964141386a5f1b4bbcd7e5a0e1f8c3d2b4a6e9", "branch": "master",
    "timestamp": "1566342641000",
}
SCHEMAS = ("xnat", "xdat")


def home_page(caller: Caller | None) -> web.Response:
    """XNAT's web UI is out of scope; this page carries the login marker xnatpy reads."""
    who = (f'<span id="user_info">Logged in as: &nbsp;<a id="username-link" '
           f'href="/app/template/XDATScreen_UpdateUser.vm">{caller.login}</a></span>'
           if caller else '<form name="form1" method="post" action="/xnat/login"></form>')
    return web.Response(text=f"<!DOCTYPE html>\n<html><head><title>XNAT</title></head><body>"
                             f"{who}</body></html>", content_type="text/html")


# Data types the site knows, for xnatpy's mandatory GET /data/search/elements.
SEARCH_ELEMENTS = {
    "xnat:projectData": ("Project", ["ID", "NAME", "SECONDARY_ID", "DESCRIPTION"]),
    "xnat:subjectData": ("Subject", ["SUBJECT_ID", "SUBJECT_LABEL", "PROJECT", "INSERT_DATE"]),
    "xnat:mrSessionData": ("MR Session", ["SESSION_ID", "SUBJECT_ID", "DATE", "PROJECT"]),
    "xnat:ctSessionData": ("CT Session", ["SESSION_ID", "SUBJECT_ID", "DATE", "PROJECT"]),
    "xnat:petSessionData": ("PET Session", ["SESSION_ID", "SUBJECT_ID", "DATE", "PROJECT"]),
    "xnat:mrScanData": ("MR Scan", ["ID", "TYPE", "SERIES_DESCRIPTION"]),
    "xnat:ctScanData": ("CT Scan", ["ID", "TYPE", "SERIES_DESCRIPTION"]),
    "xnat:petScanData": ("PET Scan", ["ID", "TYPE", "SERIES_DESCRIPTION"]),
}


def search_elements(request: web.Request, rest: list[str]) -> web.Response:
    request["route"] = "search.elements"
    if not rest:
        rows = [{"ELEMENT_NAME": name, "SINGULAR": singular, "PLURAL": singular + "s",
                 "COUNT": "0", "SECURED": "true"}
                for name, (singular, _fields) in SEARCH_ELEMENTS.items()]
        return table_response(request, rows,
                              ["ELEMENT_NAME", "SINGULAR", "PLURAL", "COUNT", "SECURED"],
                              envelope={"totalRecords": str(len(rows))})
    if len(rest) == 1 and rest[0] in SEARCH_ELEMENTS:
        fields = SEARCH_ELEMENTS[rest[0]][1]
        rows = [{"FIELD_ID": f, "HEADER": f.title(), "SUMMARY": "", "TYPE": "string",
                 "REQUIRES_VALUE": "false", "DESC": "", "ELEMENT_NAME": rest[0],
                 "SRC": "0"} for f in fields]
        return table_response(request, rows, list(rows[0]),
                              envelope={"totalRecords": str(len(rows))})
    raise XnatHTTPError(404, "The requested resource was not found.")


def xapi(request: web.Request, caller: Caller | None, rest: list[str]) -> web.Response:
    """``/xapi/users/username``, ``/xapi/siteConfig/buildInfo[/KEY]``, ``/xapi/schemas[/S]``."""
    request["route"] = "xapi"
    assert caller is not None
    if rest == ["users", "username"]:
        return text_response(caller.login)
    if rest[:2] == ["siteConfig", "buildInfo"]:
        if len(rest) == 2:
            return json_response(BUILD_INFO)
        if len(rest) == 3 and rest[2] in BUILD_INFO:
            return text_response(BUILD_INFO[rest[2]])
    if rest == ["schemas"]:
        return json_response(list(SCHEMAS))
    if len(rest) == 2 and rest[0] == "schemas" and rest[1] in SCHEMAS:
        xsd = resources.files("xnatfs.testing").joinpath(f"schemas/{rest[1]}.xsd").read_text()
        return text_response(xsd, content_type="application/xml")
    raise XnatHTTPError(404, "The requested resource was not found.")
