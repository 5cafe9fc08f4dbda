"""What XNAT knows about an object besides its files: its own XML document, and
the projects it is in.

* ``GET {object}?format=xml`` is the document XNAT's ``SAXWriter`` writes for
  the object (``ItemXMLRepresentation``); it is returned as sent, byte for
  byte. Real XNAT 1.8 serves it at ``/data/projects/P`` (``ProjectResource``),
  ``/data/projects/P/subjects/S`` (``SubjectResource``, ID first),
  ``/data/experiments/E`` (``ExperimentResource``: sessions and assessors, any
  ``xnat:experimentData``) and ``/data/experiments/E/scans/N``
  (``ScanResource``).
* ``GET /data/subjects/S/projects`` is ``representProjectsForArchivableItem``:
  the primary project with the subject's label there, then each project it is
  shared into with its label there. 404 for a subject the user cannot read
  (the secured lookup ``getXnatSubjectdatasById`` finds nothing).
"""

from __future__ import annotations

from .connection import XnatConnection, document_bytes
from .items import as_text, malformed_rows


class MetadataCalls(XnatConnection):
    """Documents and memberships of archive objects, one request each."""

    async def get_document(self, item_uri: str) -> bytes:
        """The ``format=xml`` document of the object at ``item_uri`` (``/data/...``)."""
        return await self._send("GET", item_uri, kind="document.get",
                                params={"format": "xml"}, handle=document_bytes)

    async def subject_projects(self, subject_id: str) -> list[tuple[str, str]]:
        """``(project, label there)`` of each project the subject is in, its primary
        project first (``subject_id``: its accession ID)."""
        path = f"/data/subjects/{subject_id}/projects"
        rows = await self._get_rows(path, kind="subject.projects")
        with malformed_rows(path):
            return [(str(row["ID"]), as_text(row.get("label")) or subject_id) for row in rows]
