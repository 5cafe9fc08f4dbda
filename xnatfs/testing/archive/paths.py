"""Archive URLs parsed into the levels they name (reference sections 2-5 and 8).

``projects/P/subjects/S/experiments/E/scans/1/resources/DICOM/files/a.dcm``
becomes an :class:`ArchivePath`: the identifier given at each level, and
what the path asks for after the last one. Which keys may follow which level
is XNAT's; anything else is a 404 before any row is looked up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..xnatformat import XnatHTTPError

LEVEL_KEYS = {
    "root": {"projects", "subjects", "experiments"},
    "project": {"subjects", "experiments", "resources", "files", "prearchive_code"},
    "subject": {"experiments", "resources", "files", "projects"},
    "experiment": {"scans", "resources", "files", "assessors", "reconstructions", "projects"},
    "scan": {"resources", "files"},
    # An assessor's resources may be named with their kind: out (the default) or in.
    "assessor": {"resources", "files", "out", "in"},
    "resource": {"files"},
}
CHILD_LEVEL = {"projects": "project", "subjects": "subject", "experiments": "experiment",
               "scans": "scan", "assessors": "assessor", "resources": "resource"}


@dataclass
class ArchivePath:
    """A parsed archive URL: which objects it names and what it asks for.

    ``collection`` is the trailing listing name (``scans``, ``files``...) or
    ``None`` when the path names a single object; ``ids`` holds the raw
    identifier given at each level; ``file_path`` is what follows ``files/``.
    """

    ids: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    collection: str | None = None
    file_path: str | None = None
    via_project: bool = False
    assessor_kind: str = "out"  # .../assessors/A/{out|in}/resources (out when not said)

    @property
    def level(self) -> str:
        return self.order[-1] if self.order else "root"


def parse_archive_path(segments: list[str]) -> ArchivePath:
    """Split ``projects/P/subjects/S/...`` into levels; raise 404 on nonsense."""
    path = ArchivePath()
    i = 0
    while i < len(segments):
        key = segments[i]
        if key not in LEVEL_KEYS[path.level]:
            raise XnatHTTPError(404, "The requested resource was not found.")
        if key == "files":
            path.collection = "files"
            rest = segments[i + 1:]
            path.file_path = "/".join(rest) if rest else None
            return path
        if key == "projects" and path.level in ("subject", "experiment"):
            # The projects the object is in (its own first, then its shares), a
            # "remaining part" of SubjectResource and ExperimentResource; a
            # project after it names a share (PUT/DELETE).
            path.collection = "projects"
            path.file_path = "/".join(segments[i + 1:]) or None
            return path
        if key == "prearchive_code":
            path.collection = "prearchive_code"
            path.file_path = "/".join(segments[i + 1:]) or None
            return path
        if key == "reconstructions":
            path.collection = key
            if i + 1 < len(segments):
                raise XnatHTTPError(404, "The requested resource was not found.")
            return path
        if key in ("out", "in"):
            if path.order[-1] != "assessor" or i + 1 == len(segments) or segments[i + 1] in (
                    "out", "in"):
                raise XnatHTTPError(404, "The requested resource was not found.")
            path.assessor_kind = key
            i += 1
            continue
        if i + 1 == len(segments):
            path.collection = key
            return path
        level = CHILD_LEVEL[key]
        if level in path.ids:
            raise XnatHTTPError(404, "The requested resource was not found.")
        path.ids[level] = segments[i + 1]
        path.order.append(level)
        if level == "project":
            path.via_project = True
        i += 2
    return path
