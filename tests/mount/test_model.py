"""A reference-model test on a real mount, under faults (issue 24).

Hypothesis runs random sequences of operations on a kernel mount of the test
server, over every area: the archive (listings, stat, whole and partial
reads, extended attributes), results written back into resources (mkdir,
create/write/close, a temporary renamed into place, refused overwrites and
moves, unlink, rmdir), uploads/ (a DICOM zip) and the prearchive it lands in,
and metadata files (a session's XML document, a project's subjects.csv).
Between them it turns the server's fault knobs (503s, dropped and truncated
bodies, a hang, expired sessions, a restart) and changes data behind the
mount's back through the REST API. After every operation the mount's answer
is compared with the model (:mod:`.model_world`; the places and bounds in
:mod:`.model_setup`, the writing rules in :mod:`.model_writes`):

* no wrong byte: a read returns the bytes of a version the model accepts at
  that moment, or fails with an errno, and fails only when faults (or a
  change within the metadata lifetime) allow it;
* every operation ends within its bound (``--timeout 1``: 4 s, the
  documented 4 timeouts, plus ``SLACK``; 4 s more while listings fail too,
  since the call's lookups wait as well; closes that wait for XNAT within
  ``UPLOAD_BOUND``);
* no write reported done that XNAT does not list with its MD5, and none lost:
  a failed one is in XNAT or kept by the spool (``xnatfs uploads list``),
  its bytes intact;
* no stale value once ``--metadata-ttl`` (1 s) has passed since a change.

One server and one mount serve every example; each example starts from what
the server holds then. A failure prints Hypothesis's shrunk sequence, its
``@reproduce_failure`` blob and the seed; ``XNATFS_MODEL_SEED=N`` repeats a
sequence of rules (the server's fault rolls stay random), and
``XNATFS_MODEL_EXAMPLES`` / ``XNATFS_MODEL_STEPS`` run longer (README,
"Proof under faults", the reference-model test).
"""

from __future__ import annotations

import csv
import errno
import io
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import HealthCheck, note, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                 run_state_machine_as_test)

from .model_setup import (DOWNLOADS, INDEX, LIVE, LIVE_URI, LOOKUP_BOUND, META_SESSION,
                          META_SESSION_URI, META_SUBJECT, META_SUBJECT_URI, PROJECT,
                          READ_SESSION, STALE_GRACE, TTL, WRITE_SESSION, WRITE_URI, World,
                          content, opened_world)
from .model_world import FAULT_ERRNOS, SEEN, Versions, Violation, md5
from .model_writes import WriteRules

EXAMPLES = int(os.environ.get("XNATFS_MODEL_EXAMPLES", "6"))  # the first is the simplest: no steps
STEPS = int(os.environ.get("XNATFS_MODEL_STEPS", "20"))
SEED = int(os.environ.get("XNATFS_MODEL_SEED", "3"))  # covers faults, writes, uploads

def run_examples(world: World, examples: int, steps: int, seed_value: int) -> None:
    """Hypothesis's run of ``examples`` sequences of up to ``steps`` rules; a
    failure carries the seed and the figures so far."""
    budget = settings(max_examples=examples + 1, stateful_step_count=steps, deadline=None,
                      database=None, print_blob=True, suppress_health_check=list(HealthCheck))
    factory = seed(seed_value)(lambda: MountModel(world))
    try:
        run_state_machine_as_test(factory, settings=budget)
    except BaseException as exc:
        first = list(dict.fromkeys(SEEN))[:3]
        exc.add_note("violations seen first (before shrinking):\n  " + "\n  ".join(first))
        exc.add_note(f"model test seed {seed_value}: XNATFS_MODEL_SEED={seed_value} repeats "
                     f"this sequence of rules\n{world.judge.figures.summary()}")
        raise
    finally:
        world.server.set_knobs(fail_rate=0, drop_rate=0, truncate_rate=0, hang=False)


@pytest.fixture(scope="module")
def world(demo_copy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:  # noqa: ANN001
    root = tmp_path_factory.mktemp("model")
    with opened_world(demo_copy(root / "data"), root / "home") as opened:
        yield opened


class MountModel(WriteRules, RuleBasedStateMachine):
    """One example: a sequence of rules, each an operation on the mount or a
    fault or a change on the server, each checked against the model."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self.w = world
        self.mnt = world.mount.path
        self.judge = world.judge
        self.xnat = world.xnat
        world.examples += 1
        self.example = world.examples
        self.xnat.calm()
        self.judge.extra = 0.0
        self.judge.no_extra = {"write", "rename", "upload"}
        # Start from a quiet state: the last example's changes have outlived
        # every cached listing (a wait on a condition, bounded by TTL).
        wait = world.changed_at + TTL + STALE_GRACE - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.calm_since = time.monotonic()
        self.files: dict[str, Versions] = {p: Versions(d) for p, d in world.static.items()}
        for path, data in self.xnat.files(LIVE_URI).items():
            self.files[f"{LIVE}/{path}"] = Versions(data)
        self.resources: dict[str, Versions] = {
            label: Versions(True) for label in self.xnat.resource_labels(WRITE_URI)}
        self.document = Versions(self.xnat.document(world.document_id))
        self.group = Versions(self.xnat.subject_field(PROJECT, META_SUBJECT, "group"))
        self.written: dict[str, bytes] = {}        # mount path → bytes a close returned 0 for
        self.attempts: list[tuple[str, bytes]] = []  # every write tried: none may be lost
        self.uploaded: dict[str, dict[str, bytes]] = {}  # prearchive URI → its files
        self.counter = 0
        self.hangs = self.restarts = self.uploads = 0
        note(f"example {self.example}")

    # ------------------------------------------------------------ helpers
    def faulty(self) -> bool:
        knobs = self.xnat.knobs
        return bool(knobs["fail_rate"] or knobs["drop_rate"] or knobs["truncate_rate"]
                    or knobs["hang"])

    def strict(self, started: float) -> bool:
        """Whether an operation started then must succeed: no fault on, none since it began."""
        return not self.faulty() and started >= self.calm_since

    def changed(self) -> float:
        """A change behind the mount's back: until when the old value may show."""
        now = time.monotonic()
        self.w.changed_at = now
        return now + TTL + STALE_GRACE

    def new_name(self, suffix: str = ".txt") -> str:
        self.counter += 1
        return f"e{self.example}_{self.counter}{suffix}"

    def allowed_failure(self, what: str, started: float, exc: OSError,
                        also: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        """An operation failed: fine under faults with a fault's errno, never when calm."""
        if self.strict(started) and exc.errno not in also:
            raise Violation(f"{what} failed with {exc!r} while the server was healthy")
        if exc.errno not in FAULT_ERRNOS | also:
            raise Violation(f"{what} failed with {exc!r}, an errno no fault explains")

    def check_bytes(self, path: str, started: float, result: bytes | OSError,
                    offset: int | None = None, length: int = 0) -> None:
        accepted = self.files[path].acceptable(started)
        absent = {errno.ENOENT} if None in accepted else set()
        if isinstance(result, OSError):
            changing = len(accepted) > 1
            self.allowed_failure(f"read of {path}", started if not changing else -1, result,
                                 absent | ({errno.ENOENT} if changing else set()))
            return
        values = [d for d in accepted if d is not None]
        ok = any(result == (d if offset is None else d[offset:offset + length]) for d in values)
        if not ok:
            raise self.judge.wrong(
                f"wrong bytes from {path} (offset {offset}, {len(result)} bytes): none of the "
                f"{len(values)} versions the model accepts; md5 {md5(result)} vs "
                f"{[md5(d) for d in values]}")

    def read_whole(self, path: str) -> None:
        started, result = self.judge.run("read", lambda: (self.mnt / path).read_bytes())
        self.check_bytes(path, started, result)

    @staticmethod
    def pick(items: list[str], index: int) -> str | None:
        """``items[index]``, wrapping round; None when empty. Rules draw an index,
        never from a list that depends on what the mount answered: otherwise a
        replay under other fault rolls would draw differently, which Hypothesis
        cannot shrink."""
        return items[index % len(items)] if items else None

    # -------------------------------------------------------- archive reads
    @rule(index=INDEX)
    def read_file(self, index: int) -> None:
        self.read_whole(self.pick(sorted(self.files), index))

    @rule(index=INDEX, start=st.floats(0, 1), length=st.integers(1, 70000))
    def read_part(self, index: int, start: float, length: int) -> None:
        path = self.pick(sorted(self.files), index)
        size = max(len(self.files[path].current or b""), 1)
        offset = int(start * size)

        def pread() -> bytes:
            """pread until ``length`` bytes or end of file, as careful programs do: a
            read the kernel cut short (readahead of the next pages failed) is
            followed by one that reports the error, never by a false end of file."""
            fd = os.open(self.mnt / path, os.O_RDONLY)
            try:
                got = b""
                while len(got) < length:
                    more = os.pread(fd, length - len(got), offset + len(got))
                    if not more:
                        break
                    got += more
                return got
            finally:
                os.close(fd)

        started, result = self.judge.run("pread", pread)
        self.check_bytes(path, started, result, offset, length)

    @rule(index=INDEX)
    def stat_file(self, index: int) -> None:
        path = self.pick(sorted(self.files), index)
        started, result = self.judge.run("stat", lambda: os.stat(self.mnt / path))
        accepted = self.files[path].acceptable(started)
        if isinstance(result, OSError):
            absent = {errno.ENOENT} if None in accepted else set()
            self.allowed_failure(f"stat of {path}", started, result, absent)
            return
        sizes = {len(d) for d in accepted if d is not None}
        if result.st_size not in sizes:
            raise Violation(f"stat of {path}: size {result.st_size}, the model has {sizes}")

    @rule(index=INDEX)
    def digest_attribute(self, index: int) -> None:
        """user.xnat.digest of a file XNAT lists: the MD5 of a version it may show."""
        path = self.pick(sorted(
            p for p in self.files if p in self.w.static or p.startswith(LIVE + "/")), index)
        started, result = self.judge.run(
            "xattr", lambda: os.getxattr(self.mnt / path, "user.xnat.digest"))
        accepted = self.files[path].acceptable(started)
        if isinstance(result, OSError):
            absent = {errno.ENOENT} if None in accepted else set()
            self.allowed_failure(f"getxattr of {path}", started, result, absent)
            return
        if result.decode() not in {md5(d) for d in accepted if d is not None}:
            raise self.judge.wrong(f"user.xnat.digest of {path} is {result!r}, not the MD5 "
                                   "of a version the model has")

    @rule(which=st.sampled_from(["live", "resources", "notes", "written"]), index=INDEX)
    def list_folder(self, which: str, index: int) -> None:
        if which == "resources":
            folder, entries = f"{WRITE_SESSION}/resources", self.resources
        else:
            if which == "live":
                folder = LIVE
            elif which == "notes":
                folder = f"{READ_SESSION}/resources/NOTES/files"
            else:
                label = self.pick(self.own_resources(), index)
                if label is None:
                    return
                folder = f"{WRITE_SESSION}/resources/{label}/files"
            entries = {p.rsplit("/", 1)[1]: v for p, v in self.files.items()
                       if p.rsplit("/", 1)[0] == folder}
        started, result = self.judge.run("listdir", lambda: os.listdir(self.mnt / folder))
        if isinstance(result, OSError):
            self.allowed_failure(f"listing of {folder}", started, result)
            return
        shown = set(result)
        for name, versions in entries.items():
            accepted = versions.acceptable(started)
            if name in shown and all(v is None for v in accepted):
                raise Violation(f"{folder} lists {name}, which the model says is gone")
            if name not in shown and None not in accepted:
                raise Violation(f"{folder} does not list {name}, which XNAT holds")
        strangers = shown - set(entries)
        if strangers:
            raise Violation(f"{folder} lists {sorted(strangers)}, which XNAT does not hold")

    # ------------------------------------------------------- metadata files
    @rule()
    def read_document(self) -> None:
        path = f"{META_SESSION}/session.xml"
        started, result = self.judge.run("document", lambda: (self.mnt / path).read_bytes())
        accepted = self.document.acceptable(started)
        if isinstance(result, OSError):
            self.allowed_failure(f"read of {path}", started, result)
        elif result not in accepted:
            raise self.judge.wrong(f"{path}: {len(result)} bytes that are no version XNAT had")

    @rule(how=st.sampled_from(["table", "xattr"]))
    def read_group(self, how: str) -> None:
        """The subject's group, from subjects.csv or its folder's attribute."""
        def from_table() -> str:
            rows = csv.DictReader(io.StringIO((self.mnt / PROJECT / "subjects.csv").read_text()))
            [row] = [r for r in rows if r["label"] == META_SUBJECT]
            return row.get("group") or ""

        def from_xattr() -> str:
            try:
                return os.getxattr(self.mnt / PROJECT / META_SUBJECT, "user.xnat.group").decode()
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    return ""
                raise

        started, result = self.judge.run("table", from_table if how == "table" else from_xattr)
        if isinstance(result, OSError):
            self.allowed_failure(f"group of {META_SUBJECT} ({how})", started, result)
        elif result not in self.group.acceptable(started):
            raise self.judge.wrong(f"group of {META_SUBJECT} ({how}) is {result!r}; the model "
                                   f"accepts {self.group.acceptable(started)}")

    # --------------------------------------------- changes behind the mount
    @rule(action=st.sampled_from(["replace", "add", "delete"]), index=INDEX,
          size=st.integers(1, 3000))  # XNAT refuses an empty PUT body (400)
    def change_behind(self, action: str, index: int, size: int) -> None:
        """Another client replaces, adds or deletes a file of LIVE (one stays)."""
        names = sorted(p.rsplit("/", 1)[1] for p, v in self.files.items()
                       if p.startswith(LIVE + "/") and v.current is not None)
        if action == "delete" and len(names) < 2:
            action = "add"
        name = self.new_name() if action == "add" or not names else self.pick(names, index)
        assert name is not None
        if action == "delete":
            self.xnat.delete_file(LIVE_URI, name)
            value = None
        else:
            value = content(f"{name}/{self.counter}/{size}", size)
            self.xnat.put_file(LIVE_URI, name, value)
        self.w.judge.figures.faults["change_behind"] += 1
        self.files.setdefault(f"{LIVE}/{name}", Versions(None)).change(value, self.changed())

    @rule(what=st.sampled_from(["document", "group"]))
    def change_metadata_behind(self, what: str) -> None:
        self.counter += 1
        if what == "document":
            self.xnat.put_fields(META_SESSION_URI, {"xnat:mrSessionData/visit_id": f"V{self.counter}"})
            self.document.change(self.xnat.document(self.w.document_id), self.changed())
        else:
            self.xnat.put_fields(META_SUBJECT_URI, {"group": f"G{self.example}x{self.counter}"})
            self.group.change(self.xnat.subject_field(PROJECT, META_SUBJECT, "group"),
                              self.changed())
        self.w.judge.figures.faults["change_behind"] += 1

    # ---------------------------------------------------------------- faults
    @rule(kind=st.sampled_from(["fail_rate", "drop_rate", "truncate_rate"]),
          rate=st.sampled_from([0.2, 0.5, 1.0]), everywhere=st.booleans())
    def inject(self, kind: str, rate: float, everywhere: bool) -> None:
        """Faults on every request, or on file bodies only (drops and cuts only
        ever hit file bodies)."""
        if kind == "fail_rate" and rate == 1.0:
            rate = 0.5  # every write would wait out all the spool's attempts
        self.xnat.set_faults(**{kind: rate, "fault_path": "" if everywhere else DOWNLOADS})
        everywhere_failing = self.xnat.knobs["fail_rate"] and not self.xnat.knobs["fault_path"]
        self.judge.extra = LOOKUP_BOUND if everywhere_failing else 0.0
        self.w.judge.figures.faults[kind if not everywhere else f"{kind} (everywhere)"] += 1

    @rule()
    def heal(self) -> None:
        if self.faulty():
            self.xnat.calm()
            self.judge.extra = 0.0
            self.calm_since = time.monotonic()

    @rule()
    def expire_sessions(self) -> None:
        """XNAT forgets every session: not a fault the user may see."""
        self.w.server.expire_sessions()
        self.w.judge.figures.faults["session_expiry"] += 1

    @precondition(lambda self: self.restarts < 1)
    @rule()
    def restart_server(self) -> None:
        """The server restarts (sessions lost, knobs back to calm)."""
        self.restarts += 1
        self.w.server.restart()
        self.xnat.knobs = dict(self.xnat.knobs, fail_rate=0.0, drop_rate=0.0,
                               truncate_rate=0.0, hang=False, fault_path="")
        self.calm_since = time.monotonic()
        self.judge.extra = 0.0
        self.w.judge.figures.faults["restart"] += 1

    @precondition(lambda self: self.hangs < 1)
    @rule(index=INDEX, what=st.sampled_from(["read", "listdir", "stat", "download"]))
    def hang(self, index: int, what: str) -> None:
        """The server accepts requests and never answers: one operation ends within
        its bound, with an error unless the mount has what it needs cached. Every
        request hangs (its lookups too: one more request's bound), or only file
        bodies, for a read whose listing is cached (issue 24, defect 1)."""
        self.hangs += 1
        path = self.pick(sorted(self.files), index)
        assert path is not None
        self.xnat.calm()  # the hang alone (other faults end here)
        if what == "download":
            self.judge.run("stat", lambda: os.stat(self.mnt / path))  # the listing, cached
        self.xnat.set_faults(hang=True, fault_path=DOWNLOADS if what == "download" else "")
        self.judge.extra = 0.0 if what == "download" else LOOKUP_BOUND
        self.w.judge.figures.faults[f"hang ({what})"] += 1
        try:
            operation: Callable[[], Any] = {
                "read": lambda: (self.mnt / path).read_bytes(),
                "download": lambda: (self.mnt / path).read_bytes(),
                "listdir": lambda: os.listdir((self.mnt / path).parent),
                "stat": lambda: os.stat(self.mnt / path)}[what]
            started, result = self.judge.run("hang", operation)
        finally:
            self.xnat.calm()
            self.judge.extra = 0.0
            self.calm_since = time.monotonic()
        if what in ("read", "download"):
            self.check_bytes(path, started, result)
        elif isinstance(result, OSError):
            self.allowed_failure(f"{what} of {path} under a hang", started, result,
                                 {errno.ENOENT} if None in self.files[path].acceptable(started)
                                 else set())

    # ---------------------------------------------------------- concurrency
    @rule(indices=st.lists(INDEX, min_size=2, max_size=6))
    def read_in_parallel(self, indices: list[int]) -> None:
        everything = sorted(self.files)
        paths = sorted({self.pick(everything, i) for i in indices})  # type: ignore[type-var]
        with ThreadPoolExecutor(len(paths)) as pool:
            results = list(pool.map(
                lambda p: self.judge.run("read", lambda: (self.mnt / p).read_bytes()), paths))
        for path, (started, result) in zip(paths, results):
            self.check_bytes(path, started, result)

    # ------------------------------------------------------------ invariants
    @invariant()
    def still_mounted(self) -> None:
        assert os.path.ismount(self.mnt), "the mount went away"

@pytest.mark.slow
def test_the_mount_answers_as_the_model_says_under_faults(world: World) -> None:
    """Random sequences of operations and faults, each answer held to the model."""
    started = time.monotonic()
    run_examples(world, EXAMPLES, STEPS, SEED)
    print(f"\nmodel test: seed {SEED}, {EXAMPLES} examples of up to {STEPS} steps, "
          f"{time.monotonic() - started:.1f} s\n{world.judge.figures.summary()}")
    figures = world.judge.figures
    assert figures.wrong_bytes == 0 and figures.lost_writes == 0
    assert sum(figures.ops.values()) > EXAMPLES  # it did run operations
