"""Writing into archive resources: create a resource, store files, delete.

XNAT's answers here are not what they seem (``xnat-write-api.md`` sections
2-4, ``docs/xnat-verified.md``): a file that exists already is answered 200
with a ``{"duplicates": [...]}`` body (``text/html``) and not written; a
user who may read but not edit gets 200 and nothing is stored; a raw body
without a length is refused. So a file is stored only when the resource's
listing shows it afterwards with our size and digest: that check is the
caller's (:mod:`xnatfs.results`), these calls only say what XNAT answered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import Conflict
from .connection import XnatConnection, body_text
from .items import RemoteFile, Resource, malformed_rows, remote_files, resource_from_fields
from .services import file_chunks


class ResourceWriteCalls(XnatConnection):
    """Resource and file writes. ``resource_uri`` is always
    ``/data/.../resources/{label}``, at any level XNAT has resources."""

    async def create_resource(self, resource_uri: str) -> bool:
        """``PUT`` of a resource's own URL; False if its label is taken (XNAT's 409)."""
        try:
            await self._send("PUT", resource_uri, kind="resource.create", handle=body_text)
        except Conflict:
            return False
        return True

    async def put_file(self, resource_uri: str, path: str, data: Path, size: int, *,
                       overwrite: bool = False, extract: bool = False,
                       content_type: str = "application/octet-stream") -> list[str]:
        """Store the local file ``data`` at ``path`` in the resource (``extract``: it is
        an archive to unpack into the resource's root). Always with a known length
        (XNAT refuses chunked raw bodies). Returns the paths XNAT reported as
        duplicates (not written); an empty list says nothing of success."""
        params = {"inbody": "true"}
        if overwrite:
            params["overwrite"] = "true"
        if extract:
            params["extract"] = "true"
        chunk_size = self.settings.chunk_size
        text = await self._send(
            "PUT", f"{resource_uri}/files/{path}", kind="file.put", params=params,
            headers={"Content-Type": content_type, "Content-Length": str(size)},
            body=lambda: file_chunks(data, chunk_size), handle=body_text)
        return duplicates_in(text)

    async def delete_file(self, resource_uri: str, path: str) -> None:
        """``DELETE`` below ``files``. XNAT deletes every entry whose path *starts
        with* ``path``: the caller must have made sure that is only the one."""
        await self._send("DELETE", f"{resource_uri}/files/{path}", kind="file.delete",
                         handle=body_text)

    async def delete_resource(self, resource_uri: str) -> None:
        """``DELETE`` of a resource with its files (200 even if it did not exist)."""
        await self._send("DELETE", resource_uri, kind="resource.delete", handle=body_text)

    async def list_owned_resources(self, owner_uri: str) -> list[Resource]:
        """The resources of a project or subject (``owner_uri``)."""
        path = f"{owner_uri}/resources"
        rows = await self._get_rows(path, kind="resources.list")
        with malformed_rows(path):
            return [resource_from_fields(row) for row in rows]

    async def list_owned_files(self, owner_uri: str) -> list[RemoteFile]:
        """Every file of every resource of a project or subject, in one request."""
        path = f"{owner_uri}/files"
        return remote_files(await self._get_rows(path, kind="files.list"), path)


def duplicates_in(text: str) -> list[str]:
    """The paths of XNAT's ``{"duplicates": [...]}`` answer (none for any other)."""
    text = text.strip()
    if not text.startswith("{"):
        return []
    try:
        answer: Any = json.loads(text)
    except ValueError:
        return []
    found = answer.get("duplicates") if isinstance(answer, dict) else None
    return [str(p) for p in found] if isinstance(found, list) else []

