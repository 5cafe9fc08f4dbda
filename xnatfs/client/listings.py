"""Browsing the archive: projects, subjects, experiments with their scans,
resources and assessors, and the file listings of a session or resource.

:class:`ListingCalls` gives :class:`~xnatfs.client.XnatClient` these calls;
the shapes they return and the parsing live in :mod:`.items`.
"""

from __future__ import annotations

import logging

from ..errors import ServerError
from .connection import XnatConnection
from .items import (
    Experiment,
    ExperimentDetail,
    Project,
    RemoteFile,
    Subject,
    as_text,
    experiment_detail,
    malformed_rows,
    remote_file,
    remote_files,
)

log = logging.getLogger("xnatfs.client")  # one logger for the package, as before the split


class ListingCalls(XnatConnection):
    """The ``list_*`` and ``get_*`` calls of the archive (the prearchive's are in
    :mod:`.services`), each one request."""

    async def list_projects(self) -> list[Project]:
        """The projects this user can read."""
        path = "/data/projects"
        rows = await self._get_rows(path, kind="projects.list")
        with malformed_rows(path):
            return [Project(id=row["ID"], name=as_text(row.get("name")),
                            secondary_id=as_text(row.get("secondary_ID")),
                            description=as_text(row.get("description")))
                    for row in rows]

    async def list_subjects(self, project: str) -> list[Subject]:
        """Subjects of ``project``.

        Raises:
            NotFound: no such project, or one the user may not see.
            Forbidden: a protected project the user may not read.
        """
        path = f"/data/projects/{project}/subjects"
        rows = await self._get_rows(path, kind="subjects.list",
                                    params={"columns": "ID,label,project,insert_date"})
        with malformed_rows(path):
            return [Subject(id=row["ID"], label=row["label"],
                            project=row.get("project") or project,
                            insert_date=as_text(row.get("insert_date")))
                    for row in rows]

    async def list_experiments(self, project: str, subject: str | None = None
                               ) -> list[Experiment]:
        """Experiments of one subject (given by ID or label) in ``project``, or of
        every subject at once when ``subject`` is None (rows carry ``subject_ID``)."""
        path = f"/data/projects/{project}" + (f"/subjects/{subject}" if subject else "")
        path += "/experiments"
        rows = await self._get_rows(path, kind="experiments.list", params={
            "columns": "ID,label,xsiType,date,insert_date,project,subject_ID"})
        with malformed_rows(path):
            return [Experiment(id=row["ID"], label=row["label"],
                               project=row.get("project") or project,
                               subject_id=as_text(row.get("subject_ID")), xsi_type=row["xsiType"],
                               date=as_text(row.get("date")),
                               insert_date=as_text(row.get("insert_date")))
                    for row in rows]

    async def get_experiment(self, experiment_id: str) -> ExperimentDetail:
        """One experiment (accession ID only) with its scans and all resource labels."""
        path = f"/data/experiments/{experiment_id}"
        return experiment_detail(await self._get_json(path, kind="experiment.get"), path)

    async def list_scan_files(self, experiment_id: str) -> list[RemoteFile]:
        """Every file of every scan resource of an experiment, in one request."""
        path = f"/data/experiments/{experiment_id}/scans/ALL/files"
        return remote_files(await self._get_rows(path, kind="files.list"), path)

    async def list_session_files(self, experiment_id: str) -> list[RemoteFile]:
        """Every file of the experiment's own (session-level) resources."""
        path = f"/data/experiments/{experiment_id}/files"
        return remote_files(await self._get_rows(path, kind="files.list"), path)

    async def list_experiment_files(self, experiment_id: str) -> list[RemoteFile]:
        """Every file of the session's own resources and of its scans' resources,
        in one request: XNAT's ``files?all=true`` (``XNATTemplate.loadCatalogs``),
        which also covers reconstructions and assessors. Reconstructions and the
        assessors' own resources are left out; assessors' output resources stay."""
        path = f"/data/experiments/{experiment_id}/files"
        rows = await self._get_rows(path, kind="files.list", params={"all": "true"})
        files = []
        for row in rows:
            try:
                f = remote_file(row, path)
            except ServerError as exc:  # an assessor's file in a shape we do not show
                log.debug("skipping a row of %s: %s", path, exc)
                continue
            if f.owner_kind in ("scan", "session", "assessor"):
                files.append(f)
        return files

    async def list_resource_files(self, resource_uri: str) -> list[RemoteFile]:
        """Files of one resource, given as ``/data/.../resources/{id or label}``."""
        path = f"{resource_uri.rstrip('/')}/files"
        return remote_files(await self._get_rows(path, kind="files.list"), path)
