"""XnatClient against a real test-server subprocess, plus the errno table.

The server is this module's own (not the shared demo server), because these
tests turn its fault knobs. Every knob a test turns is put back by
:func:`knobs` before the test ends. Random faults cannot be seeded, so those
tests allow enough attempts that a spurious failure is vanishingly unlikely,
and check the request log to see that faults did happen and were retried.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import time
from base64 import b64encode
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from xnatfs import errors
from xnatfs.client import ClientSettings, RemoteFile, XnatClient
from xnatfs.client.settings import operation_until
from xnatfs.credentials import Credentials, SessionCache
from xnatfs.errors import (
    AuthenticationFailed,
    Forbidden,
    NotFound,
    ServerError,
    Unreachable,
    XnatError,
    errno_for,
)
from xnatfs.testing.imaging import synthetic_study, write_dicom_archive
from xnatfs.testing.harness import TestServer, free_port
from xnatfs.testing.knobs import Knobs
from xnatfs.testing.store import Store

CAROL_PASSWORD = "Carol-s3cret-pa55phrase"  # distinctive, so a leak is unmistakable

# Short bounds keep failing tests fast; backoff stays small but real.
FAST = ClientSettings(connect_timeout=2.0, read_timeout=2.0, deadline=5.0, max_attempts=4,
                      backoff_initial=0.02, backoff_max=0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_copy) -> Iterator[TestServer]:  # noqa: ANN001
    data = demo_copy(tmp_path_factory.mktemp("client") / "data")
    with TestServer(data, dataset="demo", args=["--user", f"carol:{CAROL_PASSWORD}"]) as srv:
        yield srv


@contextmanager
def knobs(server: TestServer, **changes: Any) -> Iterator[None]:
    """Turn some knobs for the duration of a block, then put their defaults back."""
    defaults = dataclasses.asdict(Knobs())
    server.set_knobs(**changes)
    try:
        yield
    finally:
        server.set_knobs(**{name: defaults[name] for name in changes})


def new_client(server: TestServer, tmp_path: Path, user: str = "admin",
               password: str | None = None, *, settings: ClientSettings = FAST,
               http: httpx.AsyncClient | None = None) -> XnatClient:
    return XnatClient(Credentials(server.url, user, user if password is None else password),
                      settings=settings, session_cache=SessionCache(tmp_path / "sessions.json"),
                      http=http)


@pytest.fixture
async def client(server: TestServer, tmp_path: Path) -> AsyncIterator[XnatClient]:
    async with new_client(server, tmp_path) as connected:
        yield connected


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + b64encode(f"{user}:{password}".encode()).decode()}


def requests_since(server: TestServer, mark: int) -> list[dict[str, Any]]:
    """The server's log since ``mark``, without the tests' own knob turning."""
    return [e for e in server.requests_since(mark) if not e["path"].startswith("/_testserver/")]


def logins(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["method"] == "POST" and e["path"] == "/data/JSESSION"]


async def session_files(client: XnatClient, project: str = "NEURO_PUB",
                        subject: str = "NP001") -> tuple[str, list[RemoteFile]]:
    (experiment, *_) = await client.list_experiments(project, subject)
    return experiment.id, await client.list_scan_files(experiment.id)


async def full_download(client: XnatClient, uri: str) -> bytes:
    async with client.open_stream(uri) as stream:
        return b"".join([chunk async for chunk in stream])


async def read_bytes(client: XnatClient, uri: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` through a download, as the block cache reads them."""
    async with client.open_stream(uri, start, end) as stream:
        return b"".join([chunk async for chunk in stream])


# ------------------------------------------------------------------ errors
def test_every_error_class_has_an_errno() -> None:
    def subclasses(cls: type[XnatError]) -> set[type[XnatError]]:
        found = set(cls.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    assert subclasses(XnatError) | {XnatError} == set(errors.ERRNO_BY_ERROR)
    assert errno_for(NotFound("x")) == errno.ENOENT
    assert errno_for(Unreachable("x")) == errno.EIO
    assert errno_for(errors.Stale("x")) == errno.ESTALE
    assert errno_for(errors.ReadOnly("x")) == errno.EROFS


# ------------------------------------------------------------------- login
async def test_password_login_then_only_the_cookie(server: TestServer, tmp_path: Path) -> None:
    sent: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request)

    async with httpx.AsyncClient(event_hooks={"request": [record]}) as http, \
            new_client(server, tmp_path, http=http) as client:
        await client.list_projects()
        await client.list_subjects("NEURO_PUB")
    with_basic = [(r.method, r.url.path) for r in sent if "authorization" in r.headers]
    assert with_basic == [("POST", "/data/JSESSION")]
    data_requests = [r for r in sent if r.url.path.startswith("/data/projects")]
    assert len(data_requests) == 2
    assert all(r.headers["cookie"].startswith("JSESSIONID=") for r in data_requests)
    assert sent[-1].method == "DELETE" and sent[-1].url.path == "/data/JSESSION"


async def test_alias_token_login(server: TestServer, tmp_path: Path) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        issued = (await http.get("/data/services/tokens/issue",
                                 headers=basic("admin", "admin"))).json()
    mark = server.log_mark()
    async with new_client(server, tmp_path, issued["alias"], issued["secret"]) as client:
        projects = {p.id for p in await client.list_projects()}
    assert "SECRET" in projects  # admin's view: the token stands for admin
    assert [e["status"] for e in logins(requests_since(server, mark))] == [200]


async def test_bad_password_fails_once_without_retrying(server: TestServer,
                                                        tmp_path: Path) -> None:
    mark = server.log_mark()
    with pytest.raises(AuthenticationFailed) as caught:
        async with new_client(server, tmp_path, "admin", "wrong"):
            pass
    assert caught.value.status == 401
    assert "Login attempt failed" in caught.value.message
    # One attempt only: retrying bad credentials would lock the account.
    assert [e["status"] for e in logins(requests_since(server, mark))] == [401]


def set_password(server: TestServer, user: str, password: str) -> None:
    store = Store(server.data_dir)
    try:
        store.add_user(user, password)
    finally:
        store.close()


async def test_a_refused_login_holds_off_the_next_ones(server: TestServer,
                                                       tmp_path: Path) -> None:
    """The password changed under a running mount: each call would send a failed
    login, and XNAT locks an account after a number of them. One refusal holds
    off the next logins for a while; the calls fail at once meanwhile."""
    set_password(server, "dave", "old-password")
    async with new_client(server, tmp_path, "dave", "old-password") as client:
        await client.list_projects()
        set_password(server, "dave", "new-password")
        server.expire_sessions()
        mark = server.log_mark()
        for _ in range(5):
            with pytest.raises(AuthenticationFailed):
                await client.list_projects()
        assert [e["status"] for e in logins(requests_since(server, mark))] == [401]


async def test_credentials_never_reach_the_log(server: TestServer, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        token = (await http.get("/data/services/tokens/issue",
                                headers=basic("carol", CAROL_PASSWORD))).json()
    caplog.set_level(logging.DEBUG)
    for user, password in (("carol", CAROL_PASSWORD), (token["alias"], token["secret"])):
        async with new_client(server, tmp_path, user, password) as client:
            await client.list_projects()
            server.expire_sessions()  # force a second login through the 401 path
            await client.list_projects()
            assert client.statistics()["relogins"] == 1
        text = "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}"
                         for r in caplog.records)
        assert password not in text
        assert b64encode(f"{user}:{password}".encode()).decode() not in text
        assert "authorization" not in text.lower()
    assert any(r.name.startswith("httpcore") for r in caplog.records)  # DEBUG was captured


# ---------------------------------------------------------------- sessions
async def test_second_client_reuses_the_cached_session(server: TestServer,
                                                       tmp_path: Path) -> None:
    first = new_client(server, tmp_path)
    await first.connect()
    try:
        mark = server.log_mark()
        async with new_client(server, tmp_path) as second:
            await second.list_projects()
            assert second.statistics()["sessions_reused"] == 1
            assert logins(requests_since(server, mark)) == []
        # The second client borrowed the session: it left it alive for the first.
        await first.list_projects()
        assert first.statistics().get("relogins", 0) == 0
        assert not [e for e in requests_since(server, mark) if e["method"] == "DELETE"]
        cached = SessionCache(tmp_path / "sessions.json").get(server.url, "admin")
        assert cached is not None
    finally:
        await first.aclose()  # the owner logs it out
    assert SessionCache(tmp_path / "sessions.json").get(server.url, "admin") is None


async def test_expired_session_is_renewed_mid_walk(server: TestServer,
                                                   client: XnatClient) -> None:
    subjects = await client.list_subjects("NEURO_PUB")
    server.expire_sessions()
    mark = server.log_mark()
    experiments = await client.list_experiments("NEURO_PUB", subjects[0].id)
    await client.get_experiment(experiments[0].id)
    statuses = [(e["method"], e["path"], e["status"]) for e in requests_since(server, mark)]
    assert [s for _, _, s in statuses].count(401) == 1
    assert len(logins(requests_since(server, mark))) == 1
    assert statuses[-1][2] == 200
    assert client.statistics()["relogins"] == 1


async def test_concurrent_401s_lead_to_one_login(server: TestServer,
                                                 client: XnatClient) -> None:
    server.expire_sessions()
    mark = server.log_mark()
    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(client.list_projects)
    assert len(logins(requests_since(server, mark))) == 1


async def test_idle_session_is_renewed_before_use(server: TestServer, tmp_path: Path) -> None:
    with knobs(server, session_timeout_s=1.0):
        async with new_client(server, tmp_path) as client:
            await client.list_projects()
            await trio.sleep(1.0)  # let XNAT's (shortened) idle timeout pass
            mark = server.log_mark()
            await client.list_projects()
    entries = requests_since(server, mark)
    assert [e["status"] for e in entries if e["status"] == 401] == []
    assert (entries[0]["method"], entries[0]["path"]) == ("POST", "/data/JSESSION")


# ---------------------------------------------------------------- listings
async def test_listings(server: TestServer, client: XnatClient, tmp_path: Path) -> None:
    projects = {p.id: p for p in await client.list_projects()}
    assert {"NEURO_PUB", "ONC-PROT", "ALICE_LAB", "SECRET"} <= set(projects)
    assert projects["NEURO_PUB"].name == "Neuroimaging Demo (public)"

    subjects = {s.label: s for s in await client.list_subjects("NEURO_PUB")}
    assert set(subjects) == {"NP001", "NP002", "NP 003"}
    assert all(s.project == "NEURO_PUB" and s.insert_date for s in subjects.values())

    experiments = await client.list_experiments("NEURO_PUB", subjects["NP001"].id)
    assert [e.label for e in experiments] == ["NP001_MR1", "NP001_MR2"]
    first = experiments[0]
    assert (first.xsi_type, first.date, first.subject_id) == (
        "xnat:mrSessionData", "2023-03-14", subjects["NP001"].id)

    detail = await client.get_experiment(first.id)
    assert (detail.id, detail.label, detail.project) == (first.id, "NP001_MR1", "NEURO_PUB")
    scans = {scan.id: scan for scan in detail.scans}
    assert scans["2"].type == "T1 MPRAGE/2"
    assert scans["2"].xsi_type == "xnat:mrScanData"
    assert "DICOM" in {r.label for r in scans["2"].resources}
    assert {r.label for r in detail.resources} == {"QC", "NOTES"}
    assert all(r.id.isdigit() and r.file_count for r in detail.resources)

    async with new_client(server, tmp_path, "alice") as alice:
        assert "SECRET" not in {p.id for p in await alice.list_projects()}


async def test_scan_files_come_from_one_request_and_parse_fully(server: TestServer,
                                                                client: XnatClient) -> None:
    experiment_id, _ = await session_files(client)
    detail = await client.get_experiment(experiment_id)
    mark = server.log_mark()
    files = await client.list_scan_files(experiment_id)
    assert len(requests_since(server, mark)) == 1

    async with httpx.AsyncClient(base_url=server.url) as http:
        raw = (await http.get(f"/data/experiments/{experiment_id}/scans/ALL/files",
                              params={"format": "json"},
                              headers=basic("admin", "admin"))).json()["ResultSet"]["Result"]
    assert len(files) == len(raw) > 0
    for f, row in zip(files, raw, strict=True):
        assert f.uri == "/data" + row["URI"]  # multi-resource URIs lack /data
        assert f.uri.endswith(f"/scans/{f.scan_id}/resources/{f.resource_id}/files/{f.path}")
        assert f.path.rsplit("/", 1)[-1] == row["Name"]
        assert (f.size, f.digest, f.resource_label) == (
            int(row["Size"]), row["digest"], row["collection"])
    expected = {(scan.id, r.label): r.file_size for scan in detail.scans for r in scan.resources}
    totals: Counter[tuple[str | None, str]] = Counter()
    for f in files:
        totals[(f.scan_id, f.resource_label)] += f.size
    assert totals == expected


async def test_session_and_resource_files(client: XnatClient) -> None:
    experiment_id, scan_files = await session_files(client)
    session_level = {f.path: f for f in await client.list_session_files(experiment_id)}
    assert {"qc.json", "reports/2023/qc.json", "notes.txt", "scan notes.txt"} <= set(session_level)
    assert all(f.scan_id is None for f in session_level.values())
    notes = session_level["scan notes.txt"]
    expected = b"NP001_MR1 (2023-03-14 09:12:33): scan notes.txt\n"
    assert await full_download(client, notes.uri) == expected

    dicom = next(f for f in scan_files if f.resource_label == "DICOM")
    resource_uri = dicom.uri.split("/files/", 1)[0]
    in_resource = await client.list_resource_files(resource_uri)
    assert dicom in in_resource
    assert all(f.resource_id == dicom.resource_id for f in in_resource)


async def test_experiment_files_cover_scans_and_session_in_one_request(
        server: TestServer, client: XnatClient) -> None:
    """``files?all=true`` is the union of ``scans/ALL/files`` and ``/files``."""
    experiment_id, scan_files = await session_files(client)
    session_level = await client.list_session_files(experiment_id)
    mark = server.log_mark()
    everything = await client.list_experiment_files(experiment_id)
    assert len(requests_since(server, mark)) == 1
    assert sorted(everything, key=lambda f: f.uri) == sorted(scan_files + session_level,
                                                             key=lambda f: f.uri)
    assert {f.owner_kind for f in everything} == {"scan", "session"}


async def test_assessors_come_with_their_session(server: TestServer,
                                                 client: XnatClient) -> None:
    """A session's item names its assessors and their output resources, and
    ``files?all=true`` lists their files: no request of their own."""
    [experiment] = [e for e in await client.list_experiments("NEURO_PUB")
                    if e.label == "NP001_MR2"]
    detail = await client.get_experiment(experiment.id)
    [assessor] = detail.assessors
    assert (assessor.label, assessor.xsi_type) == ("NP001_MR2_QC", "xnat:qcAssessmentData")
    assert [r.label for r in assessor.resources] == ["QC"]  # as a resource of the session too
    files = [f for f in await client.list_experiment_files(experiment.id)
             if f.owner_kind == "assessor"]
    assert {(f.assessor_id, f.resource_label, f.path) for f in files} == {
        (assessor.id, "QC", "report.json"), (assessor.id, "QC", "ratings/motion.txt")}
    assert all(f.scan_id is None and f.uri.startswith("/data/experiments/") for f in files)
    report = next(f for f in files if f.path == "report.json")
    assert len(await full_download(client, report.uri)) == report.size


async def test_project_experiments_carry_their_subject(client: XnatClient) -> None:
    subjects = await client.list_subjects("NEURO_PUB")
    whole = await client.list_experiments("NEURO_PUB")
    for subject in subjects:
        own = await client.list_experiments("NEURO_PUB", subject.id)
        assert own and own == [e for e in whole if e.subject_id == subject.id]
    assert {e.subject_id for e in whole} == {s.id for s in subjects}


# ------------------------------------------------------------------- data
async def test_range_reads_equal_a_full_download(server: TestServer, client: XnatClient) -> None:
    _, files = await session_files(client)
    nifti = next(f for f in files if f.path.endswith(".nii.gz"))
    with knobs(server, range=True):
        whole = await full_download(client, nifti.uri)
        assert len(whole) == nifti.size
        assert hashlib.md5(whole).hexdigest() == nifti.digest
        mark = server.log_mark()
        size = nifti.size
        for start, end in ((0, 348), (1000, 300_000), (size - 10, size), (size - 10, size + 99),
                           (size, size + 10), (5, 5)):
            async with client.open_stream(nifti.uri, start, end) as stream:
                assert b"".join([c async for c in stream]) == whole[start:end]
                assert stream.ranged is (True if start < min(end, size) else None)
        ranged = [e for e in requests_since(server, mark) if e["route"] == "files.download"]
        assert [e["status"] for e in ranged] == [206, 206, 206, 206, 416]


async def test_without_range_support_reads_still_return_the_right_bytes(
        server: TestServer, client: XnatClient) -> None:
    _, files = await session_files(client)
    nifti = next(f for f in files if f.path.endswith(".nii.gz"))
    whole = await full_download(client, nifti.uri)
    async with client.open_stream(nifti.uri, 1000, 5000) as stream:
        assert b"".join([c async for c in stream]) == whole[1000:5000]
        assert stream.ranged is False
    assert client.statistics()["range_ignored"] == 1
    for start, end in ((0, None), (777, None), (nifti.size - 1, None), (nifti.size, None),
                       (1000, 5000), (1000, nifti.size + 10)):
        async with client.open_stream(nifti.uri, start, end) as stream:
            assert b"".join([c async for c in stream]) == whole[start:end]
            assert stream.size == nifti.size


async def test_stream_from_an_offset_with_range_support(server: TestServer,
                                                        client: XnatClient) -> None:
    _, files = await session_files(client)
    nifti = next(f for f in files if f.path.endswith(".nii.gz"))
    whole = await full_download(client, nifti.uri)
    with knobs(server, range=True):
        mark = server.log_mark()
        async with client.open_stream(nifti.uri, 4096) as stream:
            assert b"".join([c async for c in stream]) == whole[4096:]
        async with client.open_stream(nifti.uri, 4096, 10_000) as stream:
            assert b"".join([c async for c in stream]) == whole[4096:10_000]
        async with client.open_stream(nifti.uri, 10_000, 10_000) as stream:
            assert [c async for c in stream] == []  # nothing wanted, nothing asked
        assert [(e["status"], e["range"]) for e in requests_since(server, mark)] == [
            (206, f"4096-{nifti.size - 1}"), (206, "4096-9999")]


# ------------------------------------------------------------------ errors
async def test_not_found_is_final_at_once(server: TestServer, client: XnatClient) -> None:
    mark = server.log_mark()
    with pytest.raises(NotFound) as caught:
        await client.get_experiment("XNAT_E99999")
    assert caught.value.status == 404
    assert caught.value.message == "Unable to find the specified experiment."
    assert len(requests_since(server, mark)) == 1
    _, files = await session_files(client)
    with pytest.raises(NotFound):
        await read_bytes(client, files[0].uri + ".missing", 0, 10)


async def test_protected_and_private_projects(server: TestServer, tmp_path: Path) -> None:
    async with new_client(server, tmp_path, "bob") as bob:
        with pytest.raises(Forbidden) as caught:
            await bob.list_subjects("ONC-PROT")
        assert "Unable to read subjects for Project: ONC-PROT" in caught.value.message
    async with new_client(server, tmp_path, "alice") as alice:
        with pytest.raises(NotFound):
            await alice.list_subjects("SECRET")


async def test_flaky_server_is_ridden_out_by_retries(server: TestServer, tmp_path: Path) -> None:
    patient = dataclasses.replace(FAST, max_attempts=10)
    async with new_client(server, tmp_path, settings=patient) as client:
        mark = server.log_mark()
        with knobs(server, fail_rate=0.3):
            for _ in range(30):
                assert len(await client.list_subjects("NEURO_PUB")) == 3
        failed = [e for e in requests_since(server, mark) if e["status"] == 503]
        assert failed, "30 requests at a 30% failure rate should have met a 503"
        assert client.statistics()["retries"] == len(failed)


async def test_persistent_5xx_gives_up_after_the_attempts(server: TestServer,
                                                          client: XnatClient) -> None:
    mark = server.log_mark()
    with knobs(server, fail_rate=1.0), pytest.raises(ServerError) as caught:
        await client.list_projects()
    assert caught.value.status == 503
    assert [e["status"] for e in requests_since(server, mark)] == [503] * FAST.max_attempts


async def test_silent_server_fails_within_the_deadline(server: TestServer,
                                                       tmp_path: Path) -> None:
    bounded = dataclasses.replace(FAST, read_timeout=1.0, deadline=3.0)
    async with new_client(server, tmp_path, settings=bounded) as client:
        with knobs(server, hang=True):
            started = time.monotonic()
            with pytest.raises(Unreachable):
                await client.list_projects()
            assert time.monotonic() - started < 10
            started = time.monotonic()
            with pytest.raises(Unreachable):
                await read_bytes(client, "/data/experiments/X/resources/1/files/a", 0, 10)
            assert time.monotonic() - started < 10


async def test_no_request_outlasts_the_operation_it_is_made_for(server: TestServer,
                                                               tmp_path: Path) -> None:
    """A call made for an operation with little time left gives up when the
    operation must end, not a whole deadline later; with none left it sends
    nothing. Running out of the operation's time does not count the server as
    down, and a task started from the operation does not inherit its bound
    (an upload's retries, a read-ahead: they keep the client's own)."""
    bounded = dataclasses.replace(FAST, read_timeout=1.5, deadline=3.0)
    async with new_client(server, tmp_path, settings=bounded) as client:
        with knobs(server, hang=True):
            started = trio.current_time()
            with operation_until(started + 0.5), pytest.raises(Unreachable):
                await client.list_projects()
            assert trio.current_time() - started < 1.5
            assert not client._server_down
            mark = server.log_mark()
            with operation_until(trio.current_time() - 1), pytest.raises(Unreachable):
                await client.list_projects()
            assert requests_since(server, mark) == []

            async def background() -> None:
                with pytest.raises(Unreachable):
                    await client.list_projects()

            started = trio.current_time()
            with operation_until(started + 0.5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(background)
            assert trio.current_time() - started > 1.4  # at least one read timeout


async def test_a_server_found_down_is_watched_and_seen_back_when_slow(server: TestServer,
                                                                       tmp_path: Path) -> None:
    """While ``watch_server`` runs, an operation on a server found down waits
    ``down_attempt_timeout`` at most; one that then answers, but slower than
    that, is seen back by the probe (operations alone would keep giving up on
    it), and operations then wait a whole request timeout again."""
    watched = dataclasses.replace(FAST, down_attempt_timeout=0.3, probe_interval=0.1)
    async with new_client(server, tmp_path, settings=watched) as client, \
            trio.open_nursery() as nursery:
        nursery.start_soon(client.watch_server)
        with knobs(server, fail_rate=1.0), pytest.raises(ServerError):
            await client.list_projects()  # four 503s: the server counts as down
        with knobs(server, latency_ms=600):
            started = time.monotonic()
            with pytest.raises(Unreachable):
                await client.list_projects()
            assert time.monotonic() - started < 0.6
            with trio.fail_after(5):
                while client.statistics().get("server.probe", 0) == 0 or client._server_down:
                    await trio.sleep(0.05)
            assert len(await client.list_projects()) >= 1  # a 0.6 s answer: waited for
        nursery.cancel_scope.cancel()


async def test_an_upload_longer_than_the_deadline_is_bounded_by_progress_only(
        server: TestServer, tmp_path: Path) -> None:
    """A big archive on a slow link takes as long as it takes: the import
    finishes although it outlasts the deadline (it used to be cut off, while
    XNAT had already filed what it had received). The body comes at a slow
    writer's pace, as ``cp`` into ``uploads/`` streams it."""
    archive = tmp_path / "study.zip"
    write_dicom_archive(archive, synthetic_study("Slow^Link", "SLOW01", slices=8, rows=64,
                                                 cols=64, seed=5))
    data = archive.read_bytes()
    pieces = 30

    async def slow_writer() -> AsyncIterator[bytes]:
        step = -(-len(data) // pieces)
        for at in range(0, len(data), step):
            await trio.sleep(0.1)  # a writer producing the archive over 3 s
            yield data[at:at + step]

    bounded = dataclasses.replace(FAST, read_timeout=2.0, deadline=1.0)
    async with new_client(server, tmp_path, settings=bounded) as client:
        started = time.monotonic()
        uris = await client.import_archive(slow_writer(), name="study.zip", project="NEURO_PUB")
        elapsed = time.monotonic() - started
    assert elapsed > 3 * bounded.deadline
    assert len(uris) == 1 and uris[0].startswith("/data/prearchive/projects/NEURO_PUB/")


async def test_nothing_listening_is_unreachable(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = XnatClient(Credentials(url, "admin", "admin"), settings=FAST)
    started = time.monotonic()
    with pytest.raises(Unreachable):
        async with client:
            pass
    assert time.monotonic() - started < FAST.deadline + 1
    assert client.statistics()["session.login"] == FAST.max_attempts


async def test_broken_bodies_are_retried_and_never_short(server: TestServer,
                                                         tmp_path: Path) -> None:
    patient = dataclasses.replace(FAST, max_attempts=10)
    async with new_client(server, tmp_path, settings=patient) as client:
        _, files = await session_files(client)
        nifti = next(f for f in files if f.path.endswith(".nii.gz"))
        whole = await full_download(client, nifti.uri)
        faults = []
        with knobs(server, truncate_rate=0.2, drop_rate=0.2):
            for server_range in (False, True):
                with knobs(server, range=server_range):
                    mark = server.log_mark()
                    for _ in range(6):
                        assert await full_download(client, nifti.uri) == whole
                    # Every fault of a whole-file download has to be retried or resumed...
                    faults += [e for e in requests_since(server, mark) if e["fault"]]
                    for _ in range(6):
                        # ...while one of a partial read may come past the bytes asked
                        # for (without Range the whole file comes, cut at its middle).
                        assert await read_bytes(client, nifti.uri, 100, 200_000) == \
                            whole[100:200_000]
        assert faults, "12 whole downloads at a 36% fault rate should have met a fault"
        stats = client.statistics()
        assert stats.get("retries", 0) + stats.get("stream_resumes", 0) >= len(faults)


async def test_bodies_that_always_break_raise_unreachable(server: TestServer,
                                                          client: XnatClient) -> None:
    _, files = await session_files(client)
    nifti = next(f for f in files if f.path.endswith(".nii.gz"))
    with knobs(server, truncate_rate=1.0):
        with pytest.raises(Unreachable):
            await read_bytes(client, nifti.uri, 0, nifti.size)
        received = bytearray()
        with pytest.raises(Unreachable):
            async with client.open_stream(nifti.uri) as stream:
                async for chunk in stream:
                    received += chunk
        assert len(received) < nifti.size


# ------------------------------------------------- answers our server never gives
Answer = tuple[int, dict[str, Any]]  # status and httpx.Response keyword arguments


def mock_xnat(routes: dict[tuple[str, str], list[Answer]]) -> httpx.AsyncClient:
    """An httpx client whose transport gives canned answers per (method, path), in
    turn; the last answer of a route is repeated. Logging in and out always works."""
    session_id = "ABCDEF0123456789ABCDEF0123456789"

    async def answer(request: httpx.Request) -> httpx.Response:
        if (request.method, request.url.path) == ("POST", "/data/JSESSION"):
            return httpx.Response(200, text=session_id,
                                  headers={"Set-Cookie": f"JSESSIONID={session_id}; Path=/"})
        if (request.method, request.url.path) == ("DELETE", "/data/JSESSION"):
            return httpx.Response(200)
        queue = routes[(request.method, request.url.path)]
        status, kwargs = queue.pop(0) if len(queue) > 1 else queue[0]
        return httpx.Response(status, **kwargs)

    return httpx.AsyncClient(transport=httpx.MockTransport(answer))


async def test_an_upload_a_proxy_gave_up_on_is_not_sent_again(tmp_path: Path) -> None:
    """A 504 from a proxy (its read timeout) to a whole upload: XNAT had all of it
    and may be importing it still, so it is not sent again."""
    http = mock_xnat({("POST", "/data/services/import"): [
        (504, {"text": "<html><h1>504 Gateway Time-out</h1></html>"}),
        (200, {"text": "/data/prearchive/projects/P/20260101_000000000/S1"})]})
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    async with http, XnatClient(Credentials("http://xnat.test", "u", "p"), settings=FAST,
                                http=http) as client:
        with pytest.raises(errors.Unanswered):
            await client.import_archive(archive, name="upload.zip", project="P")
        assert client.statistics()["import.archive"] == 1


async def test_paths_are_sent_percent_encoded(tmp_path: Path) -> None:
    """What RFC 3986 does not allow raw in a path goes encoded: brackets (Tomcat
    answers 400 to them raw), spaces, '#', '?', '%'."""
    raw_paths: list[bytes] = []
    session_id = "ABCDEF0123456789ABCDEF0123456789"

    async def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/data/JSESSION":
            return httpx.Response(200, text=session_id,
                                  headers={"Set-Cookie": f"JSESSIONID={session_id}; Path=/"})
        raw_paths.append(request.url.raw_path)
        return httpx.Response(200, content=b"x")

    http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    async with XnatClient(Credentials("http://xnat.test", "u", "p"), settings=FAST,
                          http=http) as client:
        await full_download(client, "/data/experiments/E/resources/R/files/a[1] #2?%.dcm")
    assert raw_paths == [b"/data/experiments/E/resources/R/files/a%5B1%5D%20%232%3F%25.dcm"]


async def test_429_is_retried() -> None:
    rows = {"ResultSet": {"Result": [{"ID": "P", "name": "", "secondary_ID": "",
                                      "description": ""}]}}
    http = mock_xnat({("GET", "/data/projects"): [
        (429, {"headers": {"Retry-After": "0"}}), (200, {"json": rows})]})
    async with http, XnatClient(Credentials("http://xnat.test", "u", "p"), settings=FAST,
                                http=http) as client:
        (project,) = await client.list_projects()
    assert (project.id, project.name) == ("P", None)
    assert client.statistics()["retries"] == 1


async def test_prearchive_listing() -> None:
    row = {"project": "P", "timestamp": "20211229_101128996", "lastmod": "2022-01-18 16:41:25.0",
           "uploaded": "2021-12-29 10:11:28.996", "scan_date": "2001-09-24", "scan_time": "",
           "subject": "SUB1", "folderName": "NAME001", "name": "NAME001", "tag": "1.2.3",
           "status": "READY", "url": "/prearchive/projects/P/20211229_101128996/NAME001",
           "autoarchive": "Manual", "prevent_anon": "false", "prevent_auto_commit": "false",
           "SOURCE": "", "VISIT": "", "PROTOCOL": "", "TIMEZONE": ""}
    listing = (200, {"json": {"ResultSet": {"Result": [row]}}})
    http = mock_xnat({("GET", "/data/prearchive/projects"): [listing],
                      ("GET", "/data/prearchive/projects/P"): [listing]})
    async with http, XnatClient(Credentials("http://xnat.test", "u", "p"), settings=FAST,
                                http=http) as client:
        (entry,) = await client.list_prearchive()
        assert await client.list_prearchive("P") == [entry]
    assert entry.uri == "/data/prearchive/projects/P/20211229_101128996/NAME001"
    assert (entry.status, entry.subject, entry.tag) == ("READY", "SUB1", "1.2.3")


@pytest.mark.parametrize("rows", [
    [{"Name": "1.dcm", "Size": "many", "URI": "/prearchive/projects/P/T/S/scans/1/resources/"
                                              "DICOM/files/1.dcm"}],
    [{"Name": "1.dcm", "Size": "1", "URI": None}],
    [{"Name": "1.dcm", "Size": "1", "URI": 7}],
], ids=["size-not-a-number", "uri-null", "uri-a-number"])
async def test_malformed_listing_rows_are_the_servers_fault(rows: list[Any]) -> None:
    path = "/data/prearchive/projects/P/T/S/scans/1/resources/DICOM/files"
    http = mock_xnat({("GET", path): [(200, {"json": {"ResultSet": {"Result": rows}}})]})
    async with http, XnatClient(Credentials("http://xnat.test", "u", "p"), settings=FAST,
                                http=http) as client:
        with pytest.raises(errors.ServerError, match="malformed listing row"):
            await client.list_prearchive_files("/data/prearchive/projects/P/T/S", "1")


@pytest.mark.parametrize("row", [
    {"URI": 7},
    {"URI": "/data/experiments/E/resources/R/files/a", "Size": [1]},
    {"URI": "/data/experiments/E/resources/R/files/a", "Size": "-5"},
    # A size no file has: the block cache's bookkeeping would take hours.
    {"URI": "/data/experiments/E/resources/R/files/a", "Size": str(2**62)},
], ids=["uri-a-number", "size-a-list", "size-negative", "size-absurd"])
async def test_malformed_file_rows_are_the_servers_fault(row: dict[str, Any]) -> None:
    path = "/data/experiments/E/scans/ALL/files"
    http = mock_xnat({("GET", path): [(200, {"json": {"ResultSet": {"Result": [row]}}})]})
    async with http, XnatClient(Credentials("http://xnat.test", "u", "p"), settings=FAST,
                                http=http) as client:
        with pytest.raises(errors.ServerError, match="malformed listing row|unexpected size"):
            await client.list_scan_files("E")


async def test_a_wrong_content_range_is_refused() -> None:
    http = mock_xnat({("GET", "/data/f"): [
        (206, {"content": b"x" * 10, "headers": {"Content-Range": "bytes 10-19/100"}})]})
    async with http, XnatClient(Credentials("http://xnat.test", "u", "p"), settings=FAST,
                                http=http) as client:
        with pytest.raises(ServerError):
            await read_bytes(client, "/data/f", 0, 10)


class BreaksOff(httpx.AsyncByteStream):
    """A body that stops with a connection reset after ``data``."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data
        raise httpx.ReadError("connection reset by peer")


OLD = "Mon, 02 Mar 2026 10:00:00 GMT"


@pytest.mark.parametrize("resumed", [
    {"content": b"b" * 70, "headers": {"Content-Range": "bytes 50-119/120",
                                       "Last-Modified": OLD}},                 # bigger
    {"content": b"b" * 50, "headers": {"Content-Range": "bytes 50-99/100",
                                       "Last-Modified": "Mon, 02 Mar 2026 10:00:05 GMT"}},
], ids=["size", "last-modified"])
async def test_a_download_resumed_on_a_changed_file_is_stale(resumed: dict) -> None:
    http = mock_xnat({("GET", "/data/f"): [
        (200, {"headers": {"Content-Length": "100", "Last-Modified": OLD},
               "stream": BreaksOff(b"a" * 50)}),
        (206, resumed)]})
    received = bytearray()
    small_chunks = dataclasses.replace(FAST, chunk_size=10)  # no bytes wait in a buffer
    async with http, XnatClient(Credentials("http://xnat.test", "u", "p"),
                                settings=small_chunks, http=http) as client:
        with pytest.raises(errors.Stale):
            async with client.open_stream("/data/f") as stream:
                async for chunk in stream:
                    received += chunk
    assert received == b"a" * 50


async def test_ids_from_the_server_never_lead_outside_the_api() -> None:
    """IDs go into request paths: a ``..`` among them would send the session
    cookie to another application on the host; one with a lone surrogate (valid
    JSON) has no UTF-8 form, and once raised a bug's traceback, failing its
    whole folder."""
    ids = ["..", "\ud800hi", "ok"]
    sent: list[bytes] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/data/JSESSION":
            return httpx.Response(200, text="A" * 32,
                                  headers={"Set-Cookie": f"JSESSIONID={'A' * 32}"})
        sent.append(request.url.raw_path)
        if request.url.path == "/data/projects":
            rows = [{"ID": i, "name": i} for i in ids]
            return httpx.Response(200, content=json.dumps({"ResultSet": {"Result": rows}}),
                                  headers={"Content-Type": "application/json"})
        return httpx.Response(200, json={"ResultSet": {"Result": []}})

    http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    async with http, XnatClient(Credentials("http://xnat.test", "u", "p"), settings=FAST,
                                http=http) as client:
        projects = [p.id for p in await client.list_projects()]
        assert projects == ids
        with pytest.raises(ServerError, match="outside the API"):
            await client.list_subjects("..")
        assert await client.list_subjects("\ud800hi") == []
        assert await client.list_subjects("ok") == []
    assert [p.split(b"?")[0] for p in sent[1:]] == [b"/data/projects/%ED%A0%80hi/subjects",
                                                    b"/data/projects/ok/subjects"]


def test_lone_surrogates_in_labels_become_safe_names() -> None:
    from xnatfs.naming import safe_name

    assert safe_name("\ud800hi") == "%ED%A0%80hi"
    assert safe_name("\ud800hi").encode()  # a name the kernel can be given


async def test_empty_components_of_file_paths_are_dropped() -> None:
    """A path ``/abs/x.txt`` would make a folder named like ``files/`` itself,
    which then contained itself."""
    path = "/data/experiments/E/scans/ALL/files"
    rows = [{"URI": "/data/experiments/E/scans/1/resources/R/files//abs//x.txt", "Size": "1"},
            {"URI": "/data/experiments/E/scans/1/resources/R/files/", "Size": "1"}]
    http = mock_xnat({("GET", path): [(200, {"json": {"ResultSet": {"Result": rows[:1]}}})]})
    async with http, XnatClient(Credentials("http://xnat.test", "u", "p"), settings=FAST,
                                http=http) as client:
        assert [f.path for f in await client.list_scan_files("E")] == ["abs/x.txt"]
    http = mock_xnat({("GET", path): [(200, {"json": {"ResultSet": {"Result": rows[1:]}}})]})
    async with http, XnatClient(Credentials("http://xnat.test", "u", "p"), settings=FAST,
                                http=http) as client:
        with pytest.raises(ServerError):
            await client.list_scan_files("E")


@pytest.mark.parametrize("lost", [
    (302, {"headers": {"Location": "http://xnat.test/app/template/Login.vm"}}),
    (200, {"text": "<html><body>Please log in</body></html>",
           "headers": {"Content-Type": "text/html"}}),
], ids=["redirect", "login-page"])
async def test_a_session_lost_behind_a_proxy_is_renewed(lost: Answer) -> None:
    """Some proxies and single sign-on front ends answer a lost session with a
    redirect to a login page, or the page itself, never a 401: the session is
    renewed once, as for a 401 (the mount failed with EIO until remounted)."""
    projects = (200, {"json": {"ResultSet": {"Result": [{"ID": "P", "name": "P"}]}}})
    http = mock_xnat({("GET", "/data/projects"): [projects, lost, projects]})
    async with http, XnatClient(Credentials("http://xnat.test", "u", "p"), settings=FAST,
                                http=http) as client:
        assert [p.id for p in await client.list_projects()] == ["P"]
        assert [p.id for p in await client.list_projects()] == ["P"]
        assert client.statistics()["relogins"] == 1
    # Still a page after a new session: a real answer, given as an error.
    http = mock_xnat({("GET", "/data/projects"): [lost]})
    async with http, XnatClient(Credentials("http://xnat.test", "u", "p"), settings=FAST,
                                http=http) as client:
        with pytest.raises(ServerError):
            await client.list_projects()


@pytest.mark.parametrize("prefix", ["", "/data"], ids=["1.8-source-form", "data-prefixed"])
async def test_multi_resource_rows_in_either_real_form(prefix: str) -> None:
    """XNAT 1.8 builds a multi-resource listing's URIs from SQL, without ``/data``
    and with the resource's numeric ID (docs/xnat-verified.md); other servers
    were reported to answer with ``/data``. Both give the same files, the
    label from ``collection``, and a download URL under ``/data``; the keys
    come in a HashMap's order, as on every real server."""
    path = "/data/experiments/E/files"
    row = {"file_content": "", "Size": "12", "file_tags": "", "cat_ID": "1234",
           "digest": "0" * 32, "URI": f"{prefix}/experiments/E/scans/2/resources/1234/files/a/b.dcm",
           "collection": "DICOM", "file_format": "DICOM", "Name": "b.dcm"}
    body = '{"ResultSet":{"Result":[' + json.dumps(row, separators=(",", ":")) + \
        '], "title": "Files"}}'
    http = mock_xnat({("GET", path): [(200, {"content": body.encode(),
                                             "headers": {"Content-Type": "application/json"}})]})
    async with http, XnatClient(Credentials("http://xnat.test", "u", "p"), settings=FAST,
                                http=http) as client:
        [remote] = await client.list_experiment_files("E")
    assert (remote.path, remote.size, remote.scan_id) == ("a/b.dcm", 12, "2")
    assert (remote.resource_label, remote.resource_id) == ("DICOM", "1234")
    assert remote.uri == "/data/experiments/E/scans/2/resources/1234/files/a/b.dcm"


def test_a_resource_item_without_label_or_with_only_the_camel_case_key() -> None:
    """XNAT leaves null fields out (``FlattenedItemA.putValue``): a resource made
    by an upload without a label has no ``label``; its number may come only as
    abstractResource's own key. The session is still read."""
    from xnatfs.client.items import experiment_detail

    resource = {"meta": {"xsi:type": "xnat:resourceCatalog", "isHistory": False},
                "data_fields": {"xnat_abstractResource_id": 7, "file_count": 1},
                "children": []}
    payload = {"items": [{"meta": {"xsi:type": "xnat:mrSessionData", "isHistory": False},
                          "data_fields": {"ID": "E1", "label": "L", "project": "P"},
                          "children": [{"items": [resource], "field": "resources/resource"}]}]}
    detail = experiment_detail(payload, "/data/experiments/E1")
    assert [(r.id, r.label) for r in detail.resources] == [("7", "7")]
