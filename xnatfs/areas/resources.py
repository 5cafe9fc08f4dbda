"""Resources at every level XNAT has them, read and written: where results go back.

    <PROJECT>/resources/<LABEL>/files/...
    <PROJECT>/<SUBJECT>/resources/<LABEL>/files/...
    <PROJECT>/<SUBJECT>/<SESSION>/resources/<LABEL>/files/...
    .../scans/<ID>-<type>/resources/<LABEL>/files/...
    .../assessors/<LABEL>/resources/<LABEL>/files/...

What a user meets here (README, "Writing results"):

* ``mkdir resources/LABEL`` creates the resource in XNAT at once; ``mkdir``
  below ``files/`` makes folders, local until a file is written there (a
  file's path in the resource is its path below ``files/``);
* a new file is written to local disk and sent when closed
  (:mod:`xnatfs.results`: confirmed by XNAT's listing, one writer per
  resource, small files batched); ``close()`` returns once XNAT lists it,
  unless ``--write-behind``; until then it is read from its local copy;
* a temporary renamed into place (rsync, tempfile + ``os.replace``, editors)
  is sent under its final name only;
* what XNAT has is protected: replacing a file needs ``--allow-overwrite``,
  removing files or resources ``--allow-delete`` (EPERM otherwise, with a
  log line naming the option); moving a file XNAT has is a copy and a
  delete (EXDEV: ``mv`` does both);
* the resources of a session, its scans and assessors come from the
  session's item and one ``files?all=true`` listing (see :mod:`.archive`);
  a project's or subject's from its resource listing and, if it has any,
  one listing of their files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from cachetools import TTLCache

from .. import client as xc
from ..errors import (Busy, CrossDevice, Exists, Forbidden, InvalidArgument, NotEmpty, NotFound,
                      NotPermitted, XnatError)
from ..naming import label_from_name, require_label, safe_name
from ..results import ResultWrites
from ..spoolfiles import State, Upload
from ..tree import Node, Tree, xnat_xattrs
from .archive import (FILE, FOLDER, RESOURCE, RESOURCES, ArchiveArea, _inherited,
                      file_entries, files_folder, holder)
from .base import Area, Handle, Kernel, Writer
from .remote_files import RemoteFiles
from .resource_handles import ReplaceHandle, WriteHandle
from .resource_paths import (experiment_of, file_key, group_owner, name_in_xnat, owner_uri,
                             resource_fields, resource_uri, shown_path, write_xattrs,
                             written_mtime_ns)

log = logging.getLogger(__name__)

WRITING_TTL = 1.0  # s the kernel may keep entries of a resource with local writes
CACHED_XATTR = "user.xnatfs.cached"
WALK_AHEAD = 4     # subjects' resource listings fetched at once in a walk


class ResourceArea(Area):
    """Resource folders: listed from the archive's listings, written through
    :class:`~xnatfs.results.ResultWrites`."""

    kinds = (RESOURCES, RESOURCE, FOLDER, FILE)

    def __init__(self, tree: Tree, kernel: Kernel, archive: ArchiveArea,
                 files: RemoteFiles | None, writes: ResultWrites | None, *,
                 allow_overwrite: bool = False, allow_delete: bool = False,
                 nursery: trio.Nursery | None = None) -> None:
        super().__init__(tree, kernel)
        self.archive = archive
        self.client = tree.client
        self.files = files
        self.writes = writes  # None: a read-only mount
        self.allow_overwrite = allow_overwrite
        self.allow_delete = allow_delete
        self.folders: set[tuple[str, str]] = set()  # (resource URI, path) made by mkdir
        self.mixed: set[int] = set()  # folders last listed with local files or folders
        # Times set on files XNAT has (it keeps none), by (resource URI, path), for
        # as long as the mount runs: rsync -a and cp -a set them, and compare them
        # when run again.
        self.mtimes: dict[tuple[str, str], int] = {}
        # The handle whose close (flush) sent the version of a file XNAT has
        # now, while it stays open, by upload: what is written through that
        # open file later replaces that version (a shell's ``cmd > file``
        # closes a duplicate of the file before cmd writes to it).
        self.flushed_by: dict[str, WriteHandle] = {}
        # Open handles of files XNAT has, opened to write without O_TRUNC, by inode.
        self.replacing: dict[int, int] = {}
        if writes is not None:
            writes.on_finished = self._sent
            writes.on_rewritten = self._rewritten
        self.nursery = nursery  # for fetching ahead in a walk
        # The subject whose resources were last listed, by project; a second
        # one means a walk (find, ls -R), which then gets the others' ahead.
        self._last_subject_listed: TTLCache[str, str] = TTLCache(
            maxsize=1000, ttl=tree.metadata_ttl, timer=trio.current_time)
        self._walked: TTLCache[str, bool] = TTLCache(
            maxsize=1000, ttl=tree.metadata_ttl, timer=trio.current_time)

    # ------------------------------------------------------------- listings
    async def _owned_resources(self, owner_uri: str) -> list[xc.Resource]:
        return await self.tree.cached(("owned-resources", owner_uri),
                                      lambda: self.client.list_owned_resources(owner_uri))

    def _note_walk(self, project: str, subject_id: str) -> None:
        """A second subject's resources listed in a row: someone walks the
        project, so every subject's are fetched ahead, a few at a time (the
        same requests the walk makes, but not one round trip after another)."""
        walking = self._last_subject_listed.get(project, subject_id) != subject_id
        self._last_subject_listed[project] = subject_id
        if walking and self.nursery is not None and project not in self._walked:
            self._walked[project] = True
            self.nursery.start_soon(self._fetch_subject_resources_ahead, project)

    async def _fetch_subject_resources_ahead(self, project: str) -> None:
        limiter = trio.CapacityLimiter(WALK_AHEAD)

        async def fetch(uri: str) -> None:
            async with limiter:
                try:
                    await self._owned_listing(uri)
                except XnatError as exc:
                    log.debug("fetching the resources of %s ahead failed: %s", uri, exc)

        try:
            subjects = await self.archive.subjects(project)
        except XnatError:
            return
        async with trio.open_nursery() as nursery:
            for subject in subjects:
                nursery.start_soon(fetch, f"/data/projects/{project}/subjects/{subject.id}")

    async def _owned_listing(self, owner_uri: str) -> list[xc.RemoteFile]:
        """The files of a project's or subject's resources: their listing, then one
        listing of all their files, unless none holds a file."""
        resources = await self._owned_resources(owner_uri)
        if all(r.file_count == 0 for r in resources):
            return []
        return await self.tree.cached(("owned-files", owner_uri),
                                      lambda: self.client.list_owned_files(owner_uri))

    async def _remote_files(self, node: Node) -> list[xc.RemoteFile]:
        """The listed files of ``node``'s resource."""
        if node.experiment_id:
            groups = await self.archive.session_files(node.experiment_id)
            return groups.get((holder(node), node.resource_label), [])
        return [f for f in await self._owned_listing(owner_uri(node))
                if f.resource_label == node.resource_label]

    def _invalidate(self, owner: str, experiment_id: str) -> None:
        """A resource changed: its listings are asked again."""
        if experiment_id:
            self.tree.invalidate_where(lambda key: key in (("session", experiment_id),
                                                           ("session-files", experiment_id)))
        else:
            self.tree.invalidate_where(lambda key: key in (
                ("owned-resources", owner), ("owned-files", owner)))

    # --------------------------------------------------------------- folders
    async def children(self, node: Node) -> list[Node]:
        if node.kind is RESOURCES:
            return await self._resources(node)
        if node.kind is RESOURCE:
            return [files_folder(self.tree, node, FOLDER)]
        return await self._folder(node)

    async def _resources(self, node: Node) -> list[Node]:
        base = owner_uri(node)
        if not node.experiment_id:
            if node.subject_id:
                self._note_walk(node.project, node.subject_id)
            resources = await self._owned_resources(base)
        else:
            detail = await self.archive.session_detail(node.experiment_id)
            if node.assessor_id is not None:
                assessor = next((a for a in detail.assessors if a.id == node.assessor_id), None)
                resources = list(assessor.resources) if assessor is not None else []
            elif node.scan_id is None:
                resources = list(detail.resources)
            else:
                scan = next((s for s in detail.scans if s.id == node.scan_id), None)
                resources = list(scan.resources) if scan is not None else []
        held_by = holder(node)
        return [self.tree.child(
            node, RESOURCE, safe_name(r.label),
            ("resource", node.project, node.experiment_id, held_by, r.label),
            **_inherited(node), scan_id=node.scan_id, assessor_id=node.assessor_id,
            resource_label=r.label,
            xattrs=xnat_xattrs(id=r.id, label=r.label, format=r.format,
                               uri=f"{base}/resources/{r.id}", xsi_type="xnat:resourceCatalog"))
            for r in resources]

    async def _folder(self, node: Node) -> list[Node]:
        await self._notice_outside_changes()
        files = await self._remote_files(node)
        if node.inode in self.mixed:
            # file_entries reuses the folder's last entries while XNAT's listing
            # stays the same, and these had local files in them: a file discarded
            # or removed before XNAT had it stayed listed, empty. Made anew.
            self.tree.entries_made_from(node, ())
        remote = file_entries(self.tree, node, files, folder_kind=FOLDER, file_kind=FILE)
        if self.mtimes:
            uri = resource_uri(node)
            for entry in remote:
                if entry.file is not None:
                    entry.mtime_ns = self.mtimes.get((uri, entry.file.path), entry.mtime_ns)
        local = self._local(node)
        if not local and not self._local_folders(node):
            self.mixed.discard(node.inode)
            self._settled(remote)
            return remote
        self.mixed.add(node.inode)
        by_name = {entry.name: entry for entry in remote}
        self._settled(remote)
        prefix = f"{node.folder}/" if node.folder else ""
        for upload in local:
            rest = upload.record.destination["path"][len(prefix):]
            head, sep, _ = rest.partition("/")
            if sep:
                if safe_name(head) not in by_name:
                    by_name[safe_name(head)] = self._folder_node(node, head)
            else:
                by_name[safe_name(rest)] = self._file_node(node, upload)
        for label in self._local_folders(node):
            by_name.setdefault(safe_name(label), self._folder_node(node, label))
        return sorted(by_name.values(), key=lambda n: n.name)

    @staticmethod
    def _settled(entries: list[Node]) -> None:
        """Entries XNAT lists are read from XNAT."""
        for entry in entries:
            entry.upload = None

    def _local(self, folder: Node) -> list[Upload]:
        """Files written into ``folder`` or below it that XNAT does not list yet."""
        if self.writes is None:
            return []
        prefix = f"{folder.folder}/" if folder.folder else ""
        return [u for u in self.writes.in_resource(resource_uri(folder))
                if u.record.destination["path"].startswith(prefix)]

    def _local_folders(self, folder: Node) -> set[str]:
        uri, prefix = resource_uri(folder), f"{folder.folder}/" if folder.folder else ""
        return {path[len(prefix):].split("/", 1)[0] for made_in, path in self.folders
                if made_in == uri and path.startswith(prefix)}

    def _folder_node(self, parent: Node, label: str) -> Node:
        """A folder ``label`` (its name in XNAT's paths) in ``parent``."""
        path = f"{parent.folder}/{label}" if parent.folder else label
        return self.tree.child(
            parent, FOLDER, safe_name(label),
            ("folder", parent.project, parent.experiment_id or parent.prearchive_uri,
             holder(parent), parent.resource_label, path),
            folder=path, **resource_fields(parent))

    def _file_node(self, parent: Node, upload: Upload) -> Node:
        path = upload.record.destination["path"]
        return self.tree.child(
            parent, FILE, safe_name(path.rsplit("/", 1)[-1]), file_key(parent, path),
            upload=upload, file=None, folder=parent.folder,
            **{**resource_fields(parent), "mtime_ns": written_mtime_ns(upload)},
            xattrs=write_xattrs(upload))

    # ------------------------------------------------------------ attributes
    def writable(self, node: Node) -> bool:
        """Folders take new files; a file XNAT has shows as writable only where
        it may be replaced (--allow-overwrite)."""
        if self.writes is None:
            return False
        return node.kind is not FILE or node.upload is not None or self.allow_overwrite

    def timeouts(self, node: Node) -> tuple[float, float]:
        if node.upload is not None or (node.kind is FOLDER and self.writes is not None
                                       and self.writes.uploads):
            return WRITING_TTL, WRITING_TTL
        return super().timeouts(node)

    async def refresh(self, node: Node) -> None:
        if node.upload is not None and node.upload.state is State.FAILED \
                and self.writes is not None:
            await self._notice_outside_changes()
            if self.writes.uploads.get(node.upload.record.id) is not node.upload \
                    and node.upload.state is State.FAILED:
                raise NotFound(f"{node.name} was discarded")
        await self._settle(node)

    async def _notice_outside_changes(self) -> None:
        """Kept files that ``xnatfs uploads retry|discard`` sent or dropped since:
        shown as they are now (a discarded one is gone, a sent one XNAT's)."""
        if self.writes is None:
            return
        await self.writes.notice_outside_changes()
        for upload in list(self.writes.uploads.values()):
            if upload.state is State.DONE and upload.background is None \
                    and not upload.open_handles and not upload.dirty:
                self._confirmed(upload)

    async def getxattr(self, node: Node, key: str) -> bytes:
        """``user.xnatfs.cached`` (not listed: it costs a look at the disk cache):
        how many bytes of a file XNAT lists the local cache holds, so that
        ``xnatfs prefetch`` skips what is there without reading it."""
        if key == CACHED_XATTR and node.kind is FILE and node.upload is None \
                and node.file is not None and self.files is not None:
            return str(await self.files.cached_bytes(node)).encode()
        return await super().getxattr(node, key)

    async def refresh_xattrs(self, node: Node) -> None:
        await self._settle(node)
        if node.upload is not None:
            node.xattrs = write_xattrs(node.upload)

    async def _settle(self, node: Node) -> None:
        """A file XNAT confirmed is XNAT's from now on: listed again, it is read
        from XNAT (its local copy goes once its handles are closed)."""
        if node.upload is not None and node.upload.state is State.DONE:
            await self.tree.children(node.parent)

    async def setattr(self, node: Node, *, size: int | None, mtime_ns: int | None) -> None:
        """Times are kept on files being written (``cp -a``, rsync) and, for as
        long as the mount runs, on files XNAT has; a size only on a file being
        written, or one replaced under ``--allow-overwrite``."""
        writes = self._writes()
        if node.kind is not FILE:
            return  # folders: times accepted, not kept (XNAT has none to set)
        await self._settle(node)  # sent meanwhile (unzip sets times after close): XNAT's
        replaced = False
        if node.upload is None and size is not None:
            if size != 0:
                log.warning("refused to change the size of %s, which XNAT has: it can be "
                            "replaced whole, not changed in place", shown_path(node))
                raise NotPermitted(f"{node.name} is in XNAT: it can be replaced whole, not "
                                   "changed in place")
            await self._replace(node)
            replaced = True
        if node.upload is None:
            if mtime_ns is not None and node.file is not None:  # kept by the mount
                self.mtimes[(resource_uri(node), node.file.path)] = node.mtime_ns = mtime_ns
            return
        if size is not None:
            await writes.truncate(node.upload, size)
        if mtime_ns is not None:
            await writes.set_mtime(node.upload, mtime_ns)
            node.mtime_ns = mtime_ns
        if replaced and not self.replacing.get(node.inode):
            # truncate(2) of the path, no file open to send it at close: sent now.
            await self.finish(node, node.upload, closing=True)

    # ------------------------------------------------------------ open files
    async def open(self, node: Node, *, writing: bool, truncate: bool, writer: Writer) -> Handle:
        if node.kind is not FILE:
            return await super().open(node, writing=writing, truncate=truncate, writer=writer)
        await self._settle(node)
        if node.upload is None and not writing:
            if node.file is None or self.files is None:
                raise NotFound(node.name)
            return self.files.open(node)
        writes = self._writes()
        if node.upload is None:
            if not truncate:
                if self.allow_overwrite and writing:
                    return ReplaceHandle(node, self, writer.pid)
                raise NotPermitted(f"{node.name} is in XNAT: it can be replaced whole "
                                   "(O_TRUNC), not changed in place")
            await self._replace(node)
        assert node.upload is not None
        if truncate:
            await writes.truncate(node.upload, 0)
        return WriteHandle(node, self, node.upload, writer.pid if writing else None)

    async def _replace(self, node: Node) -> None:
        """``node``, a file XNAT has, is written anew (with --allow-overwrite)."""
        if not self.allow_overwrite:
            log.warning("refused to replace %s, which XNAT has: mount with "
                        "--allow-overwrite to allow it", shown_path(node))
            raise NotPermitted(f"{node.name} is in XNAT; --allow-overwrite allows replacing it")
        assert node.file is not None
        node.upload = await self._writes().new_file(
            node.project, shown_path(node), resource_uri(node), node.file.path, overwrite=True)
        node.file = None

    async def finish(self, node: Node, upload: Upload, *, closing: bool,
                     caller_stopped: Callable[[], bool] | None = None) -> None:
        try:
            await self._writes().finish(upload, closing=closing, caller_stopped=caller_stopped)
        finally:
            if node.upload is upload:
                node.xattrs = write_xattrs(upload)
        if upload.state is State.DONE:  # (a write-behind send is seen by _sent)
            self._confirmed(upload)

    def _sent(self, upload: Upload) -> None:
        """A file XNAT confirmed (or refused), in the background or not."""
        if upload.state is not State.DONE:
            return
        if upload.dirty:
            # Written again while this version was being sent (an editor saving
            # twice): it stays the mount's, so that its next sending is waited for
            # and shown (dropped, a folder's fsync ignored it).
            self._rewritten(upload)
            return
        self._confirmed(upload)

    def _rewritten(self, upload: Upload) -> None:
        """A file written again after XNAT confirmed a version of it that the
        mount had not seen confirmed when it was opened: the new version
        replaces XNAT's under --allow-overwrite, and is refused when sent
        (EEXIST) otherwise, unless XNAT's version is one that a close of the
        same open file sent (it is written on: the file is not finished)."""
        ours = upload.record.id in self.flushed_by  # sent by a close of a file still open
        upload.record.destination["overwrite"] = self.allow_overwrite or ours
        self._writes().uploads[upload.record.id] = upload

    def _confirmed(self, upload: Upload) -> None:
        """XNAT lists the file now: the mount's listings show it from XNAT."""
        uri = upload.record.destination["resource"]
        if upload.record.mtime_ns is not None:  # shown from now on as the file's time
            self.mtimes[(uri, upload.record.destination["path"])] = upload.record.mtime_ns
        else:
            self.mtimes.pop((uri, upload.record.destination["path"]), None)
        if not self._patch_session_files(uri):
            self._invalidate(uri.rsplit("/resources/", 1)[0], experiment_of(uri))
        self._writes().drop(upload)

    def _patch_session_files(self, uri: str) -> bool:
        """Put the resource's files as the send just checked them into the cached
        listing of its session, instead of listing the whole session again
        (item and ``files?all=true``) for every file a pipeline writes. False
        if that cannot be done (a project's or subject's resource, a resource
        the cached listing does not know)."""
        experiment = experiment_of(uri)
        listing = self._writes().sender_of_resources.listings.get(uri)
        if not experiment or listing is None:
            return False
        groups = self.tree.peek(("session-files", experiment))
        if groups is None:
            return True  # nothing cached: the next listing is fresh anyway
        key = (group_owner(uri), uri.rsplit("/resources/", 1)[1])
        if key not in groups:
            return False
        groups[key] = list(listing)
        return True

    # ----------------------------------------------- names in our folders
    def _writes(self) -> ResultWrites:
        if self.writes is None:
            raise NotPermitted("the mount is read-only")
        return self.writes

    async def mkdir(self, parent: Node, name: str) -> Node:
        self._writes()
        if parent.kind is RESOURCES:
            return await self._new_resource(parent, name)
        if parent.kind is not FOLDER:
            return await super().mkdir(parent, name)
        label = name_in_xnat(name)
        path = f"{parent.folder}/{label}" if parent.folder else label
        self.folders.add((resource_uri(parent), path))
        return self._folder_node(parent, label)

    async def _new_resource(self, parent: Node, name: str) -> Node:
        """A resource made in XNAT at once (others see it)."""
        label = require_label(label_from_name(name), "resource")
        uri = f"{owner_uri(parent)}/resources/{label}"
        if not await self.client.create_resource(uri):
            # Made a moment ago elsewhere: listed from now on (mkdir -p goes on).
            self._invalidate(owner_uri(parent), parent.experiment_id)
            self.tree.forget_negative(parent.inode)
            raise Exists(name)
        log.info("created resource %s", uri)
        self._invalidate(owner_uri(parent), parent.experiment_id)
        for entry in await self.tree.children(parent.inode):
            if entry.resource_label == label:
                return entry
        raise Forbidden(f"XNAT answered but does not list {uri}: your account may not "
                        "write here")

    async def create(self, parent: Node, name: str, writer: Writer) -> tuple[Node, Handle]:
        if parent.kind is not FOLDER:
            return await super().create(parent, name, writer)
        label = name_in_xnat(name)
        path = f"{parent.folder}/{label}" if parent.folder else label
        upload = await self._writes().new_file(
            parent.project, f"{shown_path(parent)}/{name}", resource_uri(parent), path)
        node = self._file_node(parent, upload)
        return node, WriteHandle(node, self, upload, writer.pid)

    async def unlink(self, parent: Node, node: Node) -> None:
        if node.kind is not FILE:
            return await super().unlink(parent, node)
        writes = self._writes()
        await self._settle(node)  # sent meanwhile: XNAT's to delete, if allowed
        if node.upload is not None:
            if node.upload.busy:
                raise Busy(f"{node.name} is being written or sent")
            await writes.forget(node.upload)
            node.upload = None
            if node.file is None:
                return
        await self._delete_remote(parent, node)

    async def _delete_remote(self, parent: Node, node: Node) -> None:
        """Delete exactly one file XNAT has (with --allow-delete). XNAT deletes
        every file whose path *starts with* the one named, so a name that is the
        beginning of another's (``a`` beside ``a.txt``) is refused."""
        if not self.allow_delete:
            log.warning("refused to delete %s, which XNAT has: mount with --allow-delete "
                        "to allow it", shown_path(node))
            raise NotPermitted(f"{node.name} is in XNAT; --allow-delete allows deleting it")
        assert node.file is not None
        uri, path = resource_uri(node), node.file.path
        listed = await self.client.list_resource_files(uri)
        caught = sorted(f.path for f in listed if f.path != path and f.path.startswith(path))
        if caught:
            log.warning("refused to delete %s: XNAT would delete %s too (its file DELETE "
                        "takes every path that starts with the one named); delete those first",
                        shown_path(node), ", ".join(caught[:3]))
            raise Busy(f"deleting {path} in XNAT would delete {caught[0]} too")
        await self.client.delete_file(uri, path)
        log.info("deleted %s/files/%s", uri, path)
        self.mtimes.pop((uri, path), None)
        # XNAT has no folders, only paths: the folders the file was in would
        # vanish with their last file, and rm -r's rmdir of them fail (ENOENT).
        # They stay until removed, as on any disk.
        folders = path.split("/")[:-1]
        self.folders.update((uri, "/".join(folders[:n])) for n in range(1, len(folders) + 1))
        self._invalidate(owner_uri(node), node.experiment_id)

    async def rmdir(self, parent: Node, node: Node) -> None:
        self._writes()
        if node.kind is FOLDER:
            if await self.tree.children(node.inode):
                raise NotEmpty(node.name)
            self.folders.discard((resource_uri(node), node.folder))
            return  # files/ itself comes back: it is the resource's
        if node.kind is RESOURCE:
            await self._delete_resource(node)
            return
        await super().rmdir(parent, node)

    async def _delete_resource(self, node: Node) -> None:
        """``rm -r`` of a resource: its files first (one by one), then this."""
        if not self.allow_delete:
            log.warning("refused to delete resource %s: mount with --allow-delete to "
                        "allow it", shown_path(node))
            raise NotPermitted(f"{node.name} is in XNAT; --allow-delete allows deleting it")
        files = files_folder(self.tree, node, FOLDER)
        if await self.tree.children(files.inode):
            raise NotEmpty(node.name)
        uri = resource_uri(node)
        await self.client.delete_resource(uri)
        log.info("deleted resource %s", uri)
        self.folders = {(made_in, path) for made_in, path in self.folders if made_in != uri}
        self.mtimes = {key: t for key, t in self.mtimes.items() if key[0] != uri}
        self._invalidate(owner_uri(node), node.experiment_id)

    async def rename(self, node: Node, new_parent: Node, new_name: str) -> None:
        """A file not yet confirmed moves within its resource (a temporary renamed
        into place is sent under its new name); anything else is a copy and a
        delete (EXDEV: ``mv`` does both, the delete only with --allow-delete)."""
        await self._settle(node)
        upload = node.upload
        if node.kind is not FILE or upload is None or new_parent.kind is not FOLDER \
                or resource_uri(new_parent) != resource_uri(node):
            if node.kind is FILE and upload is None and not self.allow_delete:
                raise NotPermitted(f"{node.name} is in XNAT: moving it deletes it there, "
                                   "which needs --allow-delete")
            raise CrossDevice("mv copies it, then deletes the original")
        label = name_in_xnat(new_name)
        path = f"{new_parent.folder}/{label}" if new_parent.folder else label
        if upload.busy and upload.state is not State.WRITING:
            raise Busy(f"{node.name} is being sent")
        replaced = await self.tree.existing_child(new_parent.inode, new_name)
        overwrite = bool(upload.record.destination.get("overwrite"))
        if replaced is not None and replaced is not node:
            if replaced.is_dir:
                raise InvalidArgument(f"{new_name} is a folder")
            if replaced.upload is None:
                if not self.allow_overwrite:
                    log.warning("refused to replace %s, which XNAT has: mount with "
                                "--allow-overwrite to allow it", shown_path(replaced))
                    raise NotPermitted(f"{new_name} is in XNAT; --allow-overwrite allows "
                                       "replacing it")
                overwrite = True
            elif replaced.upload.busy:
                raise Busy(f"{new_name} is being written or sent")
        writes = self._writes()
        old = (upload.record.relpath, upload.record.destination["path"],
               upload.record.destination.get("overwrite", False))
        await writes.move(upload, f"{shown_path(new_parent)}/{new_name}", path, overwrite=overwrite)
        old_parent, old_name = node.parent, node.name
        self.tree.rekey(node, file_key(new_parent, path))
        node.parent, node.name, node.folder = new_parent.inode, new_name, new_parent.folder
        if upload.dirty and upload.writers == 0:
            try:  # renamed after close: sent as a close would send it
                await self.finish(node, upload, closing=True)
            except XnatError:
                await writes.move(upload, old[0], old[1], overwrite=bool(old[2]))
                self.tree.rekey(node, file_key(new_parent, old[1]))
                node.parent, node.name = old_parent, old_name
                raise
        if replaced is not None and replaced is not node and replaced.upload is not None:
            await writes.forget(replaced.upload)
        self.tree.forget_negative(new_parent.inode)

    def refuse_special(self, parent: Node) -> None:
        if parent.kind is FOLDER and self.writes is not None:
            raise NotPermitted("links and device files cannot be stored in XNAT")
        super().refuse_special(parent)

    async def sync(self) -> None:
        """Wait for every file sent behind a close (fsync of a folder, unmount)."""
        if self.writes is None:
            return
        waited = [u for u in self.writes.uploads.values()
                  if u.background is not None or u.lock.locked()]
        await self.writes.sync()
        failed = [u for u in waited if u.state is State.FAILED]
        if failed:
            raise failed[0].failure(f"{len(failed)} files were not stored in XNAT, first "
                                    f"{failed[0].record.relpath}: {failed[0].record.message}")
