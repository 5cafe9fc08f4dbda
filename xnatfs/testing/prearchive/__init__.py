"""The prearchive: where uploaded DICOM waits to be archived, as in XNAT 1.8.

This package holds the HTTP-free logic behind ``/data/services/import``,
``/data/prearchive/...`` and ``/data/services/archive``. Every method either
returns what the server needs for its response or raises
``StoreError(status, message)`` with XNAT's status and text. Permission checks
stay in the server, except that an upload only lands in a project the user
may add data to (owner, member or admin), exactly as XNAT silently routes
anything else to ``Unassigned``.

How the store's tables model XNAT's prearchive folders:

* A ``prearc_sessions`` row is one ``/prearchive/projects/P/TS/FOLDER`` entry.
* ``prearc_files.scan_id`` is the scan *directory* XNAT files an object under
  (``SCANS/{dir}/DICOM/{name}``): the series number, or the cleaned
  SeriesInstanceUID. Two series that share a number share a directory, so file
  names are unique per directory (``GradualDicomImporter.getSafeFile``), and the
  scan IDs clients see are worked out when listing or archiving, where clashes
  become ``{n}-{MOD}{k}`` (``DICOMSessionBuilder``).
* Two tables of our own, created here so ``store.py`` stays untouched:
  ``prearc_series`` (each series' modality, needed for ``{MOD}``) and
  ``prearc_session_details`` (fields that become experiment fields on archive,
  and the uploader, who is the user an automatic archive runs as).

Blobs are shared, never copied, when a session is archived: the archive's
``files`` rows point at the prearchive's blobs, and ``Store._drop_blob`` only
deletes a blob once neither table refers to it.

The package follows those families: :mod:`.sessions` (the table, listings,
actions), :mod:`.archiving` (archiving and settling), :mod:`.imports`
(uploads); :class:`Prearchive` is all three.
"""

from .archiving import MODALITY_MOD, PRE_EXISTS, SUBJECT_MOD, UID_MOD, MergePolicy
from .imports import Prearchive
from .sessions import (
    BUSY_MESSAGE,
    DEFAULT_RECEIVING_IDLE_SECONDS,
    DICOM_RESOURCE,
    STATUSES,
    UNASSIGNED,
    PrearchiveFile,
    PrearchiveScan,
    prearchive_url,
)

__all__ = ["BUSY_MESSAGE", "DEFAULT_RECEIVING_IDLE_SECONDS", "DICOM_RESOURCE", "MODALITY_MOD",
           "PRE_EXISTS", "STATUSES", "SUBJECT_MOD", "UID_MOD", "UNASSIGNED", "MergePolicy",
           "Prearchive", "PrearchiveFile", "PrearchiveScan", "prearchive_url"]
