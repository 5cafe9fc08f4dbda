"""The client's ceilings (requests at once, per second), its pause for a 429 or
503 with ``Retry-After``, and its single-flight login, against a mock XNAT
whose answers record when each request came (trio's autojump clock: the
waits are real in the client's logic, instant in the test)."""

from __future__ import annotations

import email.utils
import time
from collections import Counter

import httpx
import pytest
import trio
import trio.testing

from xnatfs.client import ClientSettings, XnatClient
from xnatfs.client.ceilings import RequestGate, retry_after_seconds
from xnatfs.credentials import Credentials
from xnatfs.errors import XnatError

ROWS = {"ResultSet": {"Result": []}}
SITE = Credentials("http://xnat.test", "u", "p")


def settings(**changes: object) -> ClientSettings:
    base = dict(connect_timeout=2.0, read_timeout=2.0, deadline=20.0, max_attempts=4,
                backoff_initial=0.02, backoff_max=0.2)
    base.update(changes)
    return ClientSettings(**base)  # type: ignore[arg-type]


class MockXnat:
    """Answers listings (with a pause of ``work`` seconds), logs in, and
    records each request as (start, end, method, path)."""

    def __init__(self, work: float = 0.0) -> None:
        self.work = work
        self.log: list[tuple[float, float, str, str]] = []
        self.sessions = 0
        self.live: set[str] = set()
        self.throttle: list[tuple[int, str]] = []  # (status, Retry-After) for the next answers

    def expire(self) -> None:
        self.live.clear()

    async def answer(self, request: httpx.Request) -> httpx.Response:
        start = trio.current_time()
        method, path = request.method, request.url.path
        try:
            if (method, path) == ("POST", "/data/JSESSION"):
                await trio.sleep(0.05)
                self.sessions += 1
                sid = f"SESSION{self.sessions:04d}ABCDEF"
                self.live.add(sid)
                return httpx.Response(200, text=sid)
            if (method, path) == ("DELETE", "/data/JSESSION"):
                return httpx.Response(200)
            if self.throttle:
                status, retry_after = self.throttle.pop(0)
                return httpx.Response(status, headers={"Retry-After": retry_after})
            sid = request.headers.get("cookie", "").removeprefix("JSESSIONID=")
            if sid not in self.live:
                return httpx.Response(401)
            await trio.sleep(self.work)
            return httpx.Response(200, json=ROWS)
        finally:
            self.log.append((start, trio.current_time(), method, path))

    def client(self, **changes: object) -> XnatClient:
        http = httpx.AsyncClient(transport=httpx.MockTransport(self.answer))
        return XnatClient(SITE, settings=settings(**changes), http=http)

    def listings(self) -> list[tuple[float, float, str, str]]:
        return [entry for entry in self.log if entry[3] != "/data/JSESSION"]


def peak(entries: list[tuple[float, float, str, str]]) -> int:
    events = sorted([(s, 1) for s, _, _, _ in entries] + [(e, -1) for _, e, _, _ in entries])
    now = most = 0
    for _, delta in events:
        now += delta
        most = max(most, now)
    return most


def test_retry_after_forms() -> None:
    now = time.time()
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(" 0 ") == 0.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28.0 <= retry_after_seconds(date, now=now) <= 30.0  # type: ignore[operator]
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    for unreadable in (None, "", "soon", "-3", "1.5", "Mon, 99 Foo 2026 00:00:00 GMT"):
        assert retry_after_seconds(unreadable) is None


async def test_concurrency_ceiling_holds_and_is_used(autojump_clock: trio.testing.MockClock) -> None:
    xnat = MockXnat(work=0.5)
    async with xnat.client(max_requests=3, max_request_rate=0) as client:
        async with trio.open_nursery() as nursery:
            for n in range(12):
                nursery.start_soon(client.list_projects)
    assert len(xnat.listings()) == 12
    assert peak(xnat.listings()) == 3


async def test_rate_ceiling_is_a_token_bucket(autojump_clock: trio.testing.MockClock) -> None:
    xnat = MockXnat()
    async with xnat.client(max_requests=0, max_request_rate=10, request_burst=5) as client:
        begun = trio.current_time()
        async with trio.open_nursery() as nursery:
            for n in range(25):
                nursery.start_soon(client.list_projects)
    starts = sorted(s for s, _, _, _ in xnat.listings())
    # At most burst + rate * window in any window: the first 5 at once, then one per 0.1 s
    # (the login took a token too).
    for i, first in enumerate(starts):
        for j in range(i, len(starts)):
            assert j - i + 1 <= 5 + 10 * (starts[j] - first) + 1e-6
    assert starts[-1] - begun == pytest.approx((25 + 1 - 5) / 10, abs=0.1)  # + the login


async def test_retry_after_pauses_every_request(autojump_clock: trio.testing.MockClock) -> None:
    """One 429 with Retry-After: 3 holds back the requests that come after it,
    instead of each of them learning the same from the server."""
    xnat = MockXnat()
    async with xnat.client(max_request_rate=0) as client:
        await client.connect()
        xnat.throttle = [(429, "3")]
        told = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.list_projects)
            await trio.sleep(0.5)
            for n in range(5):
                nursery.start_soon(client.list_projects)
        stats = client.statistics()
    after = [s for s, _, _, _ in xnat.listings()][1:]
    assert len(after) == 6 and min(after) >= told + 3.0
    assert max(after) <= told + 3.0 * 1.1 + 0.01  # jittered by up to 10%
    assert stats["paused"] == 1 and client.answers()[429] == 1


async def test_requests_waiting_for_a_slot_wait_for_a_pause_that_began_meanwhile(
        autojump_clock: trio.testing.MockClock) -> None:
    """With every slot taken, requests queue for one; the 429 that asks for a
    pause frees its slot, and the next request must not take it and go: it
    waits for the pause as well (seen on a loaded machine: twice as many
    throttled answers as slots)."""
    xnat = MockXnat()
    async with xnat.client(max_requests=1, max_request_rate=0) as client:
        await client.connect()
        xnat.throttle = [(429, "3")]
        told = trio.current_time()
        async with trio.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(client.list_projects)
    after = [s for s, _, _, _ in xnat.listings()][1:]
    assert len(after) == 4 and min(after) >= told + 3.0
    assert client.answers()[429] == 1


async def test_503_with_an_http_date(autojump_clock: trio.testing.MockClock) -> None:
    xnat = MockXnat()
    async with xnat.client() as client:
        await client.connect()
        # The mock clock does not move the wall clock: the date is 4 s ahead of it.
        xnat.throttle = [(503, email.utils.formatdate(time.time() + 4, usegmt=True))]
        told = trio.current_time()
        await client.list_projects()
    retried = xnat.listings()[-1][0]
    assert retried - told >= 2.9  # the date has whole seconds


async def test_a_pause_past_the_deadline_fails_at_once(
        autojump_clock: trio.testing.MockClock) -> None:
    xnat = MockXnat()
    async with xnat.client(deadline=20.0) as client:
        await client.connect()
        xnat.throttle = [(429, "3600")]
        told = trio.current_time()
        with pytest.raises(XnatError) as caught:
            await client.list_projects()
        assert caught.value.status == 429
        # Later operations, within the pause, fail without asking the server.
        with pytest.raises(XnatError):
            await client.list_projects()
        assert trio.current_time() - told < 0.5
        assert len(xnat.listings()) == 1
        assert client.statistics()["pause_refusals"] == 1


async def test_one_login_for_many_first_requests_and_one_after_expiry(
        autojump_clock: trio.testing.MockClock) -> None:
    xnat = MockXnat(work=0.2)
    client = xnat.client(max_requests=4)
    async with client:  # connect() logs in; aexit logs out
        pass
    xnat.log.clear()
    xnat.sessions = 0
    client = xnat.client(max_requests=4)
    try:
        async with trio.open_nursery() as nursery:  # no connect(): 20 first requests at once
            for n in range(20):
                nursery.start_soon(client.list_projects)
        xnat.expire()
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(client.list_projects)
    finally:
        await client.aclose()
    logins = Counter(method for _, _, method, path in xnat.log if path == "/data/JSESSION")
    assert logins["POST"] == 2  # the first, and one after the expiry
    assert client.statistics()["relogins"] == 1


async def test_a_kept_answer_holds_its_slot_until_closed() -> None:
    gate = RequestGate(max_requests=1, rate=0, burst=1)
    async with gate.slot(give_up_at=trio.current_time() + 5) as release:
        release.keep()
    assert gate.in_flight == 1
    with trio.move_on_after(0.1) as waited:
        async with gate.slot(give_up_at=trio.current_time() + 5):
            pass
    assert waited.cancelled_caught
    release()
    release()  # a second close gives nothing back twice
    assert gate.in_flight == 0
    async with gate.slot(give_up_at=trio.current_time() + 5):
        assert gate.in_flight == 1
