"""Which family of archive routes answers a request, from its method and parsed path.

XNAT matches ``/data/{projects,subjects,experiments}/...`` by prefix; here the
path is parsed once (:mod:`.paths`) and handed to the module for its family:
:mod:`.tables` for listings, :mod:`.items` for one object, :mod:`.files` for
everything below ``files`` and for resources, :mod:`.writes` for the rest of
PUT and DELETE. Each family resolves the path with the caller's permissions
(:mod:`.resolve`).
"""

from __future__ import annotations

from aiohttp import web

from ..auth import Caller
from ..knobs import Knobs
from ..store import Store
from ..xnatformat import XnatHTTPError
from . import filewrites, files, items, tables, writes
from .paths import ArchivePath, parse_archive_path
from .resolve import Access, resolve


class ArchiveRoutes:
    """Handlers for everything under ``/data/{projects,subjects,experiments}``."""

    def __init__(self, store: Store, knobs: Knobs) -> None:
        self.store = store
        self.knobs = knobs

    async def handle(self, request: web.Request, caller: Caller,
                     segments: list[str]) -> web.StreamResponse:
        path = parse_archive_path(segments)
        access = Access(self.store, caller)
        method = request.method
        if path.collection == "prearchive_code":
            return writes.prearchive_code(request, self.store, access, path)
        if method in ("GET", "HEAD"):
            return await self._get(request, access, path)
        if method in ("PUT", "POST"):
            return await self._put(request, access, path)
        if method == "DELETE":
            return writes.delete(request, self.store, access, path)
        raise XnatHTTPError(405, "Method Not Allowed")

    async def _get(self, request: web.Request, access: Access,
                   path: ArchivePath) -> web.StreamResponse:
        if path.collection == "projects" and path.level == "root":
            request["route"] = "projects.list"
            return tables.list_projects(request, self.store, access)
        res = resolve(self.store, access, path, flat_assessor=True, get=True)
        if path.collection is None:
            request["route"] = f"{path.level}.get"
            return items.get_item(request, self.store, path, res)
        if path.collection == "files":
            return await files.get_files(request, self.store, self.knobs, path, res)
        if path.collection == "projects":
            # Whatever follows (a project, for a share) is ignored: XNAT tests
            # the remaining part with startsWith("projects").
            request["route"] = f"{path.level}.projects"
            return tables.list_projects_of(request, self.store, path, res)
        request["route"] = f"{path.collection}.list"
        return tables.list_children(request, self.store, access, path, res)

    async def _put(self, request: web.Request, access: Access,
                   path: ArchivePath) -> web.StreamResponse:
        if path.collection == "files":
            return await filewrites.put_file(request, self.store, self.knobs, access, path)
        if path.collection is not None:
            raise XnatHTTPError(405, "Method Not Allowed")
        request["route"] = f"{path.level}.put"
        if path.level == "resource":
            return filewrites.put_resource(request, self.store, access, path)
        params = await writes.put_params(request)
        return writes.put_object(request, self.store, access, path, params)
