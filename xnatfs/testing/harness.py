"""Run ``xnatfs testserver`` as a subprocess and steer it, for tests and benchmarks.

Tests talk to the server over a real socket, as every client does; this
module only starts it, waits until it listens, turns its knobs through the
loopback control endpoint and reads its request log.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from .knobs import log_offset, read_request_log
from .store import Store


def free_port() -> int:
    """A loopback port nothing listens on (for "server is down" tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestServer:
    """One ``xnatfs testserver`` process on a free loopback port."""

    __test__ = False  # not a pytest test class

    def __init__(self, data_dir: Path, *, dataset: str = "demo", args: list[str] | None = None,
                 port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.dataset = dataset
        self.extra_args = list(args or [])
        self.requested_port = port or 0  # 0: the server binds a free port and reports it
        self.port = 0
        self.url = ""
        self.log_path = self.data_dir / "requests.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.stderr_path = self.data_dir.parent / f"{self.data_dir.name}-server.log"

    def start(self, timeout: float = 600.0) -> TestServer:
        """Start and wait for the server's "listening" line (building data may take a while)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "xnatfs.cli", "testserver", "--data", str(self.data_dir),
               "--port", str(self.requested_port), "--dataset", self.dataset,
               "--log-level", "WARNING", *self.extra_args]
        with open(self.stderr_path, "ab") as err:
            self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,
                                            env=env_without_proxies())
        assert self.process.stdout is not None
        ready = [b""]

        def read_first_line() -> None:
            ready[0] = self.process.stdout.readline()  # type: ignore[union-attr]

        reader = threading.Thread(target=read_first_line, daemon=True)
        reader.start()
        reader.join(timeout)
        line = ready[0]
        if not line:
            self.stop()
            raise RuntimeError(f"test server did not start: "
                               f"{self.stderr_path.read_text()[-2000:]}")
        self.url = json.loads(line)["listening"]
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> TestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ control
    def _control(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else b""
        req = urllib.request.Request(f"{self.url}/_testserver/{path}", data=data,
                                     method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10, context=self._tls()) as response:
            return json.loads(response.read())

    def _tls(self) -> ssl.SSLContext | None:
        """Its own loopback server (``--tls-cert``): a test's self-signed
        certificate is not checked by the control calls."""
        if not self.url.startswith("https:"):
            return None
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context

    def set_knobs(self, **changes: Any) -> dict[str, Any]:
        """Change shaping/fault knobs while the server runs (see :class:`Knobs`)."""
        return self._control("knobs", changes)

    def expire_sessions(self) -> int:
        return int(self._control("expire-sessions")["expired"])

    # -------------------------------------------------------- request log
    def log_mark(self) -> int:
        """A position in the request log; pass it to :meth:`requests_since`."""
        return log_offset(self.log_path)

    def requests_since(self, mark: int) -> list[dict[str, Any]]:
        if self.process is not None and self.process.poll() is None:
            self._control("sync", {})
        return read_request_log(self.log_path, mark) if self.log_path.exists() else []


def env_without_proxies() -> dict[str, str]:
    """Subprocess environment that keeps loopback traffic away from any proxy."""
    env = dict(os.environ)
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        env.pop(key, None)
    env["NO_PROXY"] = "127.0.0.1,localhost"
    return env


def pids_with_cmdline(*needles: str) -> list[int]:
    """Processes whose argv contains every one of ``needles`` as a whole argument
    (how tests and the benchmark find the daemon serving a mount point)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args]
        if all(needle in text for needle in needles):
            found.append(int(entry.name))
    return found


def share_session(server: TestServer, project: str, subject: str, session: str, *,
                  into: str, subject_label: str, session_label: str) -> tuple[str, str]:
    """Share ``subject`` and its ``session`` (labels in ``project``) into project
    ``into`` under other labels, through the server's store (the share endpoints
    are not served); returns their accession IDs."""
    store = Store(server.data_dir)
    try:
        subject_row = store.subject(project, subject)
        session_row = store.experiment(project, session)
        assert subject_row is not None and session_row is not None
        store.share("subject", subject_row["id"], into, subject_label)
        store.share("experiment", session_row["id"], into, session_label)
        return str(subject_row["id"]), str(session_row["id"])
    finally:
        store.close()
