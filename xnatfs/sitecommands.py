"""``xnatfs uploads`` and ``xnatfs prearchive``: commands that talk to a site
without a mount (what the spool kept, and the prearchive); ``xnatfs status``,
which reads a mount's status file; ``xnatfs cache prune``, which bounds a
shared cache tier."""

from __future__ import annotations

import argparse
import sys

from .cli import UserError, run_with_client


def status_command(args: argparse.Namespace) -> int:
    """A mount's counters, read from its status file (the mount makes it at open)."""
    import json

    from .mount import mounted_type
    from .status import STATUS_FILE_NAME, human_text

    mountpoint = args.mountpoint.absolute()
    if mounted_type(mountpoint) != "fuse.xnatfs":
        raise UserError(f"xnatfs: {args.mountpoint} is not an xnatfs mount")
    try:
        raw = (mountpoint / STATUS_FILE_NAME).read_bytes()
    except OSError as exc:
        raise UserError(f"xnatfs: cannot read {STATUS_FILE_NAME} of {args.mountpoint}: "
                        f"{exc.strerror}") from None
    if args.json:
        sys.stdout.write(raw.decode())
    else:
        sys.stdout.write(human_text(json.loads(raw)))
    return 0


def cache_command(args: argparse.Namespace) -> int:
    """``xnatfs cache prune --shared DIR --max SIZE``: bound a shared cache tier
    (safe while mounts use it, and beside other pruners)."""
    from .blockcache.shared import LAYOUT, prune

    if not (args.shared / LAYOUT).is_dir():
        raise UserError(f"xnatfs: {args.shared} holds no xnatfs shared cache")
    report = prune(args.shared, args.max, max_age=args.age)
    print(f"kept {report.kept_bytes} bytes; removed {report.removed_bytes} bytes "
          f"({report.removed_files} blocks) and {report.removed_temporaries} left-over "
          f"temporaries or claims")
    return 0


def uploads_command(args: argparse.Namespace) -> int:
    """Uploads the mount kept because the server failed or refused them."""
    from .credentials import CredentialsError, named_site, normalise_site_url
    from .imports import HEAD_BYTES, import_local_copy
    from .results import send_kept
    from .spoolfiles import kept_uploads, record_retried, write_record

    spool_root = args.cache_dir / "uploads"
    everything = kept_uploads(spool_root)
    unknown = sorted(set(args.ids) - {rec.id for rec, _ in everything})
    if unknown:  # a typo must not look like success (nor act on the others)
        raise UserError(f"xnatfs: no kept upload {', '.join(unknown)} in {spool_root} "
                        "(see 'xnatfs uploads list')")
    kept = [(rec, path) for rec, path in everything if not args.ids or rec.id in args.ids]
    try:
        site = named_site(args.url, args.profile)
    except CredentialsError as exc:
        raise UserError(f"xnatfs: {exc}") from None
    if site is not None and args.action != "retry":  # a retry says what it skips, and why
        kept = [(rec, path) for rec, path in kept
                if not rec.site or normalise_site_url(rec.site) == site]
    if args.action == "list":
        for rec, path in kept:
            print(f"{rec.id}  {rec.state:7} {rec.project}/{rec.relpath}  {rec.size} bytes"
                  + (f"  on {rec.site}" if rec.site else "")
                  + (f"  ({rec.message})" if rec.message else ""))
        return 0
    if args.action == "discard":
        import shutil as _shutil

        for rec, path in kept:
            _shutil.rmtree(path)
            print(f"discarded {rec.project}/{rec.relpath}")
        return 0

    if not kept:
        return 0  # nothing to send
    sites = {normalise_site_url(rec.site) for rec, _ in kept if rec.site}
    if site is None and args.profile is None:
        # Where they were dropped (each record names its XNAT), unless the user
        # chose a site: then a profile's password never goes to another one.
        if len(sites) != 1 or any(not rec.site for rec, _ in kept):
            raise UserError("xnatfs: these uploads are for several sites, or for one that "
                            "older records do not name: give --url (or --profile)")
        args.url = sites.pop()

    async def retry(client):  # noqa: ANN001, ANN202
        from .errors import XnatError

        failures = 0
        here = normalise_site_url(client.credentials.url)
        for rec, path in kept:
            into_resource = "resource" in rec.destination  # written into an archive resource
            if rec.kind not in ("archive", "dicom", "sheet") and not into_resource:
                print(f"skipped {rec.project}/{rec.relpath}: {rec.kind} files are not uploaded")
                continue
            if rec.incomplete:  # XNAT would take the cut-off file as if whole
                print(f"skipped {rec.project}/{rec.relpath}: incomplete (the program writing "
                      f"it was killed); copy it again, and discard this one")
                continue
            if rec.site and normalise_site_url(rec.site) != here:
                # Patient data goes only to the XNAT it was dropped into.
                failures += 1
                print(f"skipped {rec.project}/{rec.relpath}: it was dropped into {rec.site}, "
                      f"not {here} (retry it with --url {rec.site})", file=sys.stderr)
                continue
            data = path / "data"
            with open(data, "rb") as f:
                head = f.read(HEAD_BYTES)
            try:
                if into_resource:
                    result = await send_kept(client, rec, data)
                else:
                    result = await import_local_copy(client, rec, data, head)
            except XnatError as exc:
                failures += 1
                print(f"failed  {rec.project}/{rec.relpath}: {exc}", file=sys.stderr)
                rec.message = str(exc)
                write_record(path, rec)
                continue
            print(f"uploaded {rec.project}/{rec.relpath} -> {', '.join(result)}")
            record_retried(path, rec, result)
        return failures

    return 1 if run_with_client(args, retry) else 0


def prearchive_command(args: argparse.Namespace) -> int:
    from .naming import label_problem

    if args.action == "archive":  # refused as the mount refuses them (XNAT would change them)
        for label, what in ((args.subject, "subject"), (args.label, "session")):
            problem = label_problem(label, what) if label is not None else None
            if problem is not None:
                raise UserError(f"xnatfs: {problem}")

    async def work(client):  # noqa: ANN001, ANN202
        if args.action == "list":
            for s in await client.list_prearchive(args.project):
                print(f"{s.uri}  {s.status}  subject={s.subject or ''}  uploaded={s.uploaded}")
            return 0
        if args.action == "archive":
            print(await client.archive_prearchive(args.session, project=args.project,
                                                  subject=args.subject, session=args.label))
        elif args.action == "move":
            print(await client.move_prearchive(args.session, args.project))
        else:
            await client.delete_prearchive(args.session)
            print(f"deleted {args.session}")
        return 0

    return run_with_client(args, work)
