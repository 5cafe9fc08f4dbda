"""The ``/data[/archive]/...`` archive routes: listings, items, files and writes.

XNAT matches these routes by prefix and resolves identifiers level by level
(``shared/reference/xnat-rest-api.md`` sections 2-5 and 8): a path is parsed
into an :class:`~.paths.ArchivePath`, each level is resolved with the caller's
permissions (invisible → 404, protected → 403), and :mod:`.dispatch` hands
the request to the module for its family of endpoints.
"""

from .dispatch import ArchiveRoutes

__all__ = ["ArchiveRoutes"]
