"""One JSESSION for many nodes: a session file on the cluster's shared storage.

A job array that starts 200 mounts at once would send XNAT 200 logins (each
one a password check and a new Tomcat session; XNAT's documentation warns
that a login per request can freeze it, and ``sessions.concurrent_max``
caps a user's sessions, 1000 by default). With ``--session-file PATH`` the
mounts share one: each reads the JSESSIONID in PATH and uses it without
logging in. When it is missing or XNAT rejects it, one node takes the claim
(``PATH.claim``, created with ``O_CREAT|O_EXCL``, which NFS v3+ and the
cluster file systems make atomic), logs in and publishes the new session by
an atomic rename; the others wait for it (:data:`CLAIM_WAIT` at most) and
fall back to a login of their own after a random delay. A claim older than
:data:`CLAIM_STALE` is from a node that died and is broken.

XNAT does not tie a session to the client's address (Spring Security's
session management only; checked in its ``SecurityConfig``), so a session
logged in on one node serves all. The file holds a secret: it is written
with mode 0600 and not used if others can read it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import stat
import time
from pathlib import Path

import trio

log = logging.getLogger("xnatfs.client")

CLAIM_STALE = 60.0  # seconds after which a claim is from a dead node
CLAIM_WAIT = 20.0   # longest wait for another node's login to be published
POLL = 0.25         # between reads of the file while waiting (jittered)
FALLBACK_JITTER = 5.0  # spread of the fallback logins when the wait ran out

_LIMITER = trio.CapacityLimiter(2)  # file I/O on shared storage, off the trio thread


class SessionFile:
    """The shared session of one site and user, in one file (see the module)."""

    def __init__(self, path: Path, site: str, user: str) -> None:
        self.path = path
        self._claim = path.with_name(path.name + ".claim")
        self._site = site
        self._user = user

    async def read(self) -> str | None:
        """The published session, or None (missing, another site's, unreadable)."""
        return await trio.to_thread.run_sync(self._read, limiter=_LIMITER)

    async def claim(self) -> bool:
        """Whether this node is now the one to log in (it must :meth:`publish`
        or :meth:`release`)."""
        return await trio.to_thread.run_sync(self._take_claim, limiter=_LIMITER)

    async def publish(self, session_id: str) -> None:
        await trio.to_thread.run_sync(self._write, session_id, limiter=_LIMITER)

    async def release(self) -> None:
        await trio.to_thread.run_sync(self._drop_claim, limiter=_LIMITER)

    async def wait_for_new(self, rejected: str | None) -> str | None:
        """A session other than ``rejected`` published within :data:`CLAIM_WAIT`,
        or None once the wait ran out (then after a random delay, so that
        the fallback logins of many nodes do not come at once)."""
        give_up = trio.current_time() + CLAIM_WAIT
        while trio.current_time() < give_up:
            await trio.sleep(POLL * random.uniform(0.5, 1.5))
            session_id = await self.read()
            if session_id is not None and session_id != rejected:
                return session_id
            if not await trio.to_thread.run_sync(self._claim.exists, limiter=_LIMITER):
                session_id = await self.read()  # published just before the claim went
                if session_id is not None and session_id != rejected:
                    return session_id
                break  # the claimant gave up without publishing
        await trio.sleep(random.uniform(0, FALLBACK_JITTER))
        return None

    # ------------------------------------------------------ in a worker thread
    def _read(self) -> str | None:
        try:
            info = os.stat(self.path)
            if info.st_mode & 0o077:
                log.warning("not using %s: others can read it (chmod 600 %s)", self.path,
                            self.path)
                return None
            entry = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("cannot read the session file %s: %s", self.path, exc)
            return None
        if (not isinstance(entry, dict) or entry.get("site") != self._site
                or entry.get("user") != self._user or not isinstance(entry.get("session"), str)):
            return None
        return entry["session"]

    def _take_claim(self) -> bool:
        for _ in range(2):
            try:
                fd = os.open(self._claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                if not self._break_stale_claim():
                    return False
                continue
            except OSError as exc:
                log.warning("cannot claim %s: %s", self._claim, exc)
                return False
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.uname().nodename} {os.getpid()} {time.time():.0f}\n")
            return True
        return False

    def _break_stale_claim(self) -> bool:
        try:
            age = time.time() - os.stat(self._claim).st_mtime
            if age < CLAIM_STALE:
                return False
            log.warning("breaking a claim on %s left %.0f s ago", self.path, age)
            os.unlink(self._claim)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True

    def _drop_claim(self) -> None:
        try:
            os.unlink(self._claim)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", self._claim, exc)

    def _write(self, session_id: str) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.tmp")
        entry = {"site": self._site, "user": self._user, "session": session_id,
                 "written": round(time.time(), 3)}
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         stat.S_IRUSR | stat.S_IWUSR)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:
            log.warning("cannot publish the session in %s: %s", self.path, exc)
            try:
                os.unlink(temporary)
            except OSError:
                pass
        finally:
            self._drop_claim()
