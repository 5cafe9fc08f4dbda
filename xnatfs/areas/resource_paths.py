"""What a resource's folders and files are called in XNAT, and how the mount
names them: URLs of resources and their owners, node keys, file names, and
what a record or log line shows of a file (IDs and paths, never labels)."""

from __future__ import annotations

import logging
from collections.abc import Hashable

from ..errors import InvalidArgument
from ..naming import label_from_name, safe_name
from ..spoolfiles import Upload
from ..tree import Node
from .archive import _inherited, holder, owner

log = logging.getLogger(__name__)


def owner_uri(node: Node) -> str:
    """The URL of what holds ``node``'s resources (project, subject, session, scan,
    assessor): the part before ``/resources``."""
    if not node.experiment_id:
        base = f"/data/projects/{node.project}"
        return base + (f"/subjects/{node.subject_id}" if node.subject_id else "")
    if node.assessor_id is not None:
        return f"/data/experiments/{node.experiment_id}/assessors/{node.assessor_id}/out"
    if node.scan_id is not None:
        return f"/data/experiments/{node.experiment_id}/scans/{node.scan_id}"
    return f"/data/experiments/{node.experiment_id}"


def resource_uri(node: Node) -> str:
    return f"{owner_uri(node)}/resources/{node.resource_label}"


def group_owner(uri: str) -> Hashable:
    """What holds a session's resource given by URI, as :func:`.archive.owner` says."""
    parts = uri.split("/resources/", 1)[0].split("/")
    if len(parts) >= 6 and parts[4] == "scans":
        return owner(parts[5], None)
    if len(parts) >= 6 and parts[4] == "assessors":
        return owner(None, parts[5])
    return owner(None, None)


def experiment_of(uri: str) -> str:
    """The experiment a resource URI is below ("" for a project's or subject's)."""
    parts = uri.split("/")
    return parts[3] if len(parts) > 3 and parts[2] == "experiments" else ""


def file_key(folder: Node, path: str) -> Hashable:
    """A file's node key, the same for a file being written and the one XNAT lists."""
    return ("file", folder.project, folder.experiment_id or folder.prearchive_uri,
            holder(folder), folder.resource_label, path)


def resource_fields(node: Node) -> dict[str, object]:
    return dict(**_inherited(node), scan_id=node.scan_id, assessor_id=node.assessor_id,
                resource_label=node.resource_label)


def name_in_xnat(name: str) -> str:
    """What a file or folder written as ``name`` is called in XNAT's paths: the
    inverse of the names the mount lists (``%25`` is a ``%``). A name that is
    not such a name is refused: XNAT's listing would show it under another one
    (``50%.txt`` as ``50%25.txt``), and the file would vanish once sent."""
    label = label_from_name(name)
    if "/" in name or not label or label in (".", "..") or "/" in label \
            or safe_name(label) != name:
        log.warning("refused the name %r in a resource: XNAT would list it as %r (a %% "
                    "is written %%25 here)", name, safe_name(label))
        raise InvalidArgument(f"{name!r} is no name the mount can give a file in XNAT")
    return label


def shown_path(node: Node) -> str:
    """Where a file of a resource is, for records and log lines (IDs, not names:
    labels may identify patients)."""
    files = f"{resource_uri(node).removeprefix('/data/')}/files"
    if node.file is not None:  # (a file XNAT lists has no folder of its own)
        return f"{files}/{node.file.path}"
    return f"{files}/{node.folder}" if node.folder else files


def write_xattrs(upload: Upload) -> dict[str, str]:
    rec = upload.record
    return {f"user.xnatfs.upload.{k}": v for k, v in (
        ("state", rec.state), ("message", rec.message),
        ("result", " ".join(rec.result))) if v}


def written_mtime_ns(upload: Upload) -> int:
    rec = upload.record
    return rec.mtime_ns if rec.mtime_ns is not None else int(rec.created * 1e9)
