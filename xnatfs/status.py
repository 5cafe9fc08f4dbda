"""What a mount is doing, as counters: the status file in the mount's root
(``.xnatfs-status.json``) and ``xnatfs status MOUNT``.

Times are given as the moments things happened (Unix time), not as ages,
so that the file's size stays what ``stat`` said while nothing happens; the
command shows ages. The counters themselves are plain integers and Counters kept where things
happen (the client's ``_send``, the block cache, the spools, ``fs.py``), so
that counting costs an increment on the hot paths. This module only reads
them, when the status file is opened, and formats them. Each part of the
mount is a section of the JSON document; a feature added later (a shared
cache tier) adds its own section without changing the others.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module: no httpx, trio or cache at its start
    from .blockcache import BlockCache
    from .client.connection import XnatConnection
    from .spool import Spool

STATUS_FILE_NAME = ".xnatfs-status.json"  # a dot: never an XNAT project ID ([A-Za-z0-9_-]+)
FORMAT_VERSION = 1
# The client's events, counted beside the requests (by kind) in its statistics.
CLIENT_EVENTS = frozenset({"retries", "relogins", "sessions_reused", "transport_failures",
                           "stream_resumes", "range_ignored", "server_down", "paused",
                           "pause_refusals"})


@dataclass
class StatusSources:
    """Where a mount's counters live."""

    client: XnatConnection
    blocks: BlockCache
    spools: Sequence[Spool]
    failures: Counter[str]           # failed file operations, by errno name
    started: float                   # wall-clock time of the mount


def gather(sources: StatusSources) -> dict[str, Any]:
    """The counters now, as a JSON-ready document (trio thread, no waiting)."""
    from .spoolfiles import State

    client = sources.client
    counts = client.statistics()
    answers = client.answers()
    kinds = {kind: n for kind, n in counts.items() if kind not in CLIENT_EVENTS}
    gate = client.gate_state()
    stats = sources.blocks.stats
    session_since = client.session_since
    states: Counter[str] = Counter()
    behind = waiting = sending = 0
    outcomes: Counter[str] = Counter()
    for spool in sources.spools:
        sending += spool.in_flight
        waiting += spool.limiter.statistics().tasks_waiting
        outcomes += spool.outcomes
        for upload in spool.uploads.values():
            states[upload.record.state] += 1
            behind += upload.background is not None and upload.state is State.UPLOADING
    return {
        "format": FORMAT_VERSION,
        "site": client.credentials.url,
        "mounted_at": round(sources.started, 3),
        "requests": {
            "total": sum(kinds.values()),
            "by_kind": dict(sorted(kinds.items())),
            "by_status": {str(status): n for status, n in sorted(answers.items())},
            "retries": counts.get("retries", 0),
            "rate_limited_429": answers.get(429, 0),
            "server_errors_5xx": sum(n for status, n in answers.items() if status >= 500),
            "no_answer": counts.get("transport_failures", 0),
            "times_server_seemed_down": counts.get("server_down", 0),
            "in_flight": gate["in_flight"],
            "queued": gate["queued"],
            "pauses_for_retry_after": counts.get("paused", 0),
        },
        "session": {
            "logged_in_at": None if session_since is None else round(session_since, 3),
            "relogins": counts.get("relogins", 0),
            "sessions_reused": counts.get("sessions_reused", 0),
        },
        "bytes": {
            "from_xnat": client.bytes_received,
            "from_shared_cache": stats.bytes_from_shared,
            "from_local_cache": stats.bytes_from_cache,
        },
        "shared_cache": {
            "enabled": sources.blocks.shared is not None,
            "entries_published": stats.shared_published,
            "entries_being_published": sources.blocks.publications_in_flight,
            "entries_found_bad": stats.shared_bad,
            "failed_or_hung_calls": stats.shared_outages,
        },
        "downloads": {
            "in_flight": stats.downloads_running,
            "queued": sources.blocks.fetch_limiter.statistics().tasks_waiting,
        },
        "uploads": {
            "in_flight": sending,
            "waiting_for_a_slot": waiting,
            "behind_a_close": behind,
            "being_written": states[State.WRITING.value],
            "failed_kept": states[State.FAILED.value],
            "sent": outcomes["sent"],
            "failed": outcomes["failed"],
        },
        "errors": {
            "total": sum(sources.failures.values()),
            "by_errno": dict(sorted(sources.failures.items())),
        },
    }


def to_json(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode()


def human_text(document: dict[str, Any], now: float | None = None) -> str:
    """The status document for people (``xnatfs status``)."""
    now = time.time() if now is None else now
    requests = document["requests"]
    session = document["session"]
    lines = [
        f"site              {document['site']}",
        f"mounted           {_duration(now - document['mounted_at'])} ago",
        f"requests          {requests['total']}  (retries {requests['retries']}, "
        f"429 {requests['rate_limited_429']}, 5xx {requests['server_errors_5xx']}, "
        f"no answer {requests['no_answer']})",
    ]
    lines.append(f"  now             {requests['in_flight']} in flight, {requests['queued']} "
                 f"queued (ceilings), {requests['pauses_for_retry_after']} pauses for "
                 f"Retry-After")
    lines += [f"  {kind:24} {n}" for kind, n in requests["by_kind"].items()]
    lines.append("answers by status " + ("  ".join(
        f"{status}: {n}" for status, n in requests["by_status"].items()) or "none"))
    since = session["logged_in_at"]
    lines.append(f"session           "
                 f"{'none' if since is None else _duration(now - since) + ' old'}"
                 f"  (relogins {session['relogins']})")
    lines.append(f"bytes from XNAT   {_size(document['bytes']['from_xnat'])}")
    lines.append(f"bytes from shared {_size(document['bytes']['from_shared_cache'])}")
    lines.append(f"bytes from cache  {_size(document['bytes']['from_local_cache'])}")
    shared = document["shared_cache"]
    if shared["enabled"]:
        lines.append(f"shared cache      {shared['entries_published']} blocks published "
                     f"({shared['entries_being_published']} under way), "
                     f"{shared['entries_found_bad']} found bad, "
                     f"{shared['failed_or_hung_calls']} calls failed or hung")
    downloads = document["downloads"]
    lines.append(f"downloads         {downloads['in_flight']} in flight, "
                 f"{downloads['queued']} queued")
    up = document["uploads"]
    lines.append(f"uploads           {up['in_flight']} in flight, {up['waiting_for_a_slot']} "
                 f"waiting for a slot, {up['behind_a_close']} behind a close, "
                 f"{up['being_written']} being written")
    lines.append(f"  since mounted    {up['sent']} sent, {up['failed']} failed "
                 f"({up['failed_kept']} kept to retry)")
    errors = document["errors"]
    lines.append(f"errors            {errors['total']}" + "".join(
        f"  {name}: {n}" for name, n in errors["by_errno"].items()))
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else \
        f"{rest // 60}m{rest % 60:02d}s"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    scaled, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        scaled /= 1024
        if scaled < 1024:
            break
    return f"{scaled:.1f} {unit} ({n} B)"
