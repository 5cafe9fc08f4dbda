"""A snapshot mount's tree (``xnatfs mount --snapshot FILE``): the folders and
files a snapshot recorded (:mod:`xnatfs.snapshot`), and nothing else.

Listings come from the snapshot, never from XNAT: no listing request is
sent, and a file added on the server since does not appear. Files are read
as any listed file is (:mod:`.remote_files`, the block cache), under the
identity the snapshot recorded (URI, size, MD5): bytes that do not match it
are refused with ESTALE, not served as other data:

* a file whose size changed fails its first download (the server's size
  is checked against the recorded one);
* a file whose content changed under the same size fails its digest check.
  Files up to ``check_first`` bytes (``--snapshot-check-first``, 64 MiB) are
  fetched whole and checked before any byte of them is served, so even a
  read of part of one cannot return other bytes. A bigger file is checked
  when it has been read whole; a read of part of it cannot be checked (XNAT
  has no digest per block) unless the mount already read a first version and
  the server's ``Last-Modified`` changed since;
* a file deleted on the server fails with ESTALE too (its download answers
  404): the snapshot names it, so it is the pinned data that is gone, not a
  name that never was.

Read-only; the entries never change, so the kernel may keep them.
"""

from __future__ import annotations

from ..client import RemoteFile
from ..snapshot import Snapshot
from ..tree import Kind, Node, Tree, xnat_xattrs
from .base import Area, Handle, Kernel, Writer
from .remote_files import RemoteFiles

SNAPSHOT_FOLDER = Kind("snapshot_folder")
SNAPSHOT_FILE = Kind("snapshot_file", is_dir=False)
ENTRY_TTL = 3600.0  # s the kernel may keep entries and attributes: they never change
CHECK_FIRST = 64 * 1024 * 1024  # files up to this size are checked whole before any byte is served


class SnapshotArea(Area):
    """Folders and files of a snapshot, at the root and below."""

    kinds = (SNAPSHOT_FOLDER, SNAPSHOT_FILE)

    def __init__(self, tree: Tree, kernel: Kernel, snapshot: Snapshot,
                 files: RemoteFiles, *, check_first: int = CHECK_FIRST) -> None:
        super().__init__(tree, kernel)
        self.snapshot = snapshot
        self.files = files
        self.check_first = check_first

    async def top_entries(self, root: Node) -> list[Node]:
        return self._entries(root, "")

    async def children(self, node: Node) -> list[Node]:
        return self._entries(node, _path(node))

    def _entries(self, parent: Node, folder: str) -> list[Node]:
        snap = self.snapshot
        out = []
        for name in snap.children.get(folder, []):
            path = f"{folder}/{name}" if folder else name
            recorded = snap.files.get(path)
            if recorded is None:
                out.append(self.tree.child(
                    parent, SNAPSHOT_FOLDER, name, ("snapshot", path),
                    mtime_ns=snap.taken_at_ns,
                    xattrs={f"user.xnat.{k}": v
                            for k, v in snap.folder_xattrs.get(path, {}).items()}))
                continue
            in_resource = recorded.uri.split("/files/", 1)[-1]
            resource = recorded.xnat.get("resource", "")
            remote = RemoteFile(path=in_resource, size=recorded.size, digest=recorded.md5,
                                uri=recorded.uri, resource_label=resource,
                                resource_id=recorded.xnat.get("resource_id", ""),
                                scan_id=None)
            out.append(self.tree.child(
                parent, SNAPSHOT_FILE, name, ("snapshot", path), mtime_ns=snap.taken_at_ns,
                file=remote,
                xattrs=xnat_xattrs(label=in_resource.rsplit("/", 1)[-1], uri=recorded.uri,
                                   digest=recorded.md5, size=str(recorded.size),
                                   resource=resource, resource_id=remote.resource_id,
                                   xsi_type="xnat:fileData")))
        return out

    def timeouts(self, node: Node) -> tuple[float, float]:
        return ENTRY_TTL, ENTRY_TTL

    async def open(self, node: Node, *, writing: bool, truncate: bool, writer: Writer) -> Handle:
        if node.kind is not SNAPSHOT_FILE or writing:
            return await super().open(node, writing=writing, truncate=truncate, writer=writer)
        return self.files.open(node, checked_first=node.size <= self.check_first)


def _path(node: Node) -> str:
    """A node's path in the snapshot (its key: ``("snapshot", path)``)."""
    assert isinstance(node.key, tuple)
    return str(node.key[1])
