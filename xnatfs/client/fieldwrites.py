"""Writing the fields of subjects and sessions: demographics, visit, custom variables.

One ``PUT`` of the object's own URL with the values as query parameters, as
XNAT's REST API takes them (``xnat-write-api.md`` 6.2, 6.3): shortcut keys
(``gender``, ``dob``, ``visit``...) and custom variables by their xpath
``{xsiType}/fields/field[name=NAME]/field``. XNAT merges them onto what it
holds (``SubjectResource.handlePut`` loads the current item as the
template), validates the result against its schema (400 with the
validation text), and answers the accession ID: 201 for a new subject, 200
for one that exists. ``label`` is never sent: on an existing object a
``label`` parameter is a rename.
"""

from __future__ import annotations

from .connection import XnatConnection, created

SUBJECT_TYPE = "xnat:subjectData"


def custom_field_key(xsi_type: str, name: str) -> str:
    """The query key that sets custom variable ``name`` of an object of ``xsi_type``."""
    return f"{xsi_type}/fields/field[name={name}]/field"


def field_params(xsi_type: str, fields: dict[str, str],
                 custom: dict[str, str]) -> dict[str, str]:
    """The query of a field update: the type, the shortcut keys, the custom variables."""
    params = {"xsiType": xsi_type, **fields}
    params.update({custom_field_key(xsi_type, name): value for name, value in custom.items()})
    return params


class FieldWriteCalls(XnatConnection):
    """Field updates of subjects and sessions (and subjects created with their fields)."""

    async def put_subject(self, project: str, subject: str, fields: dict[str, str],
                          custom: dict[str, str]) -> bool:
        """Create subject ``subject`` (a label) in ``project`` with these fields, or
        update the fields of the one it names (label or accession ID, as XNAT
        resolves it: the label in the project, then the ID). True: created."""
        return await self._send("PUT", f"/data/projects/{project}/subjects/{subject}",
                                kind="subject.put", handle=created,
                                params=field_params(SUBJECT_TYPE, fields, custom))

    async def put_session_fields(self, project: str, subject: str, session: str,
                                 xsi_type: str, fields: dict[str, str],
                                 custom: dict[str, str]) -> None:
        """Update fields of an existing session (``subject`` and ``session``: labels
        or accession IDs). XNAT would create a session it cannot find: the caller
        names only sessions it has seen listed."""
        await self._send("PUT", f"/data/projects/{project}/subjects/{subject}/experiments/"
                         f"{session}", kind="session.put", handle=created,
                         params=field_params(xsi_type, fields, custom))
