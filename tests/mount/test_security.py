"""The claims of docs/security.md that one mount can prove: no secret in the
mount process's argv or environment, none in its log at DEBUG, and no label
there the user did not name; every file it makes private; nothing of a
project its user cannot read. One server and one mount for the module: a
member of NEURO_PUB only, with a password found nowhere else, mounted in the
background at DEBUG, walked once by the fixture."""

from __future__ import annotations

import base64
import errno
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from xnatfs.testing.harness import TestServer
from xnatfs.testing.store import Store

from .conftest import Mount, daemon_pid, make_env, mount_xnatfs, unmount_and_wait

USER, PASSWORD = "carol", "Pw-7q2xK9-unique"
OWN = "NEURO_PUB"                                # carol is a member here
CLOSED = ("ALICE_LAB", "SECRET", "ONC-PROT")     # private, private, protected: not hers
NAMED = "ZZ_NAMED_BY_THE_USER"                   # a name the test asks for and fails on


@dataclass
class Site:
    """Labels and IDs of the demo projects, as the site admin sees them."""

    labels: dict[str, set[str]]  # project → its subjects' and sessions' labels
    ids: dict[str, set[str]]     # project → its subjects' and sessions' accession IDs


@pytest.fixture(scope="module")
def server(demo_copy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:  # noqa: ANN001
    data = demo_copy(tmp_path_factory.mktemp("security") / "data")
    store = Store(data)
    store.add_user(USER, PASSWORD)
    store.set_role(OWN, USER, "member")
    with TestServer(data, dataset="demo") as server:
        yield server


@pytest.fixture(scope="module")
def site(server: TestServer) -> Site:
    labels: dict[str, set[str]] = {}
    ids: dict[str, set[str]] = {}
    with httpx.Client(base_url=server.url, auth=("admin", "admin"), timeout=60) as c:
        for project in (OWN, *CLOSED):
            rows = [row for kind in ("subjects", "experiments") for row in
                    c.get(f"/data/projects/{project}/{kind}?format=json"
                          ).json()["ResultSet"]["Result"]]
            labels[project] = {row["label"] for row in rows}
            ids[project] = {row["ID"] for row in rows}
    assert all(labels.values()) and all(ids.values())
    return Site(labels, ids)


@dataclass
class Walked:
    mount: Mount
    seen: str  # every name, link, attribute and table the walk met
    session_id: str
    status: str  # .xnatfs-status.json at the end of the walk


@pytest.fixture(scope="module")
def walked(server: TestServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walked]:
    """Mount as carol at DEBUG; walk her project (names, links, attributes,
    tables, documents, some files); write a result and drop a refused upload
    (the spool keeps it); fail on a name of our own; try the closed projects."""
    home = tmp_path_factory.mktemp("security-home")
    env = dict(make_env(home, USER), XNAT_PASS=PASSWORD)
    mount = Mount(home / "mnt", server, home / "blocks", env, ["--log-level", "DEBUG"])
    mount_xnatfs(server, mount.path, mount.cache_dir, mount.env, mount.options)
    try:
        seen = [" ".join(os.listdir(mount.path))]
        for root, dirs, files in os.walk(mount.path / OWN):
            here = Path(root)
            seen += dirs + files
            for name in dirs + files:
                path = here / name
                if path.is_symlink():
                    seen.append(os.readlink(path))
                for attribute in os.listxattr(path, follow_symlinks=False):
                    if attribute.startswith("user.xnat."):
                        seen.append(os.getxattr(path, attribute, follow_symlinks=False).decode())
                if name.endswith((".csv", ".xml")):
                    seen.append(path.read_text())
            dirs[:] = [d for d in dirs if not (here / d).is_symlink()]
        for dicom in sorted((mount.path / OWN).glob("*/*/scans/*/resources/DICOM/files/*"))[:3]:
            dicom.read_bytes()
        (mount.path / OWN / "NP001/NP001_MR1/resources/QC/files/security.txt").write_text("ok\n")
        refused = home / "bad.dcm"
        refused.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 50)
        assert subprocess.run(["cp", str(refused), str(mount.path / "uploads" / OWN)],
                              capture_output=True).returncode != 0  # kept in the spool
        assert not (mount.path / OWN / NAMED).exists()
        sessions = json.loads((home / "cache/xnatfs/sessions.json").read_text())
        status = (mount.path / ".xnatfs-status.json").read_text()
        yield Walked(mount, "\n".join(seen), json.dumps(sessions), status)
    finally:
        unmount_and_wait(mount.path)


def log_of(walked: Walked) -> str:
    return (walked.mount.cache_dir.parent / "mount.log").read_text()


def secrets_of(walked: Walked) -> list[str]:
    """The password, its Basic form, and the JSESSIONID the mount used."""
    session_ids = [entry["jsessionid"] for entry in json.loads(walked.session_id).values()]
    assert session_ids, walked.session_id  # the cache file still holds it: the test can look
    return [PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(), *session_ids]


def test_the_background_mount_has_no_secret_in_argv_or_environment(walked: Walked) -> None:
    pid = daemon_pid(walked.mount.path)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    environ = Path(f"/proc/{pid}/environ").read_bytes().decode()
    assert "--foreground" in argv and f"XNAT_USER={USER}" in environ  # the right process
    for secret in secrets_of(walked):
        assert secret not in argv and secret not in environ
    assert "XNAT_PASS=" not in environ
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert PASSWORD not in ps.stdout


def test_the_debug_log_and_status_file_have_no_secret_and_no_label_not_named(
        walked: Walked, site: Site) -> None:
    log = log_of(walked)
    # The log is at DEBUG, and a name the user asked for is in it: so the test
    # would see labels, were they logged.
    assert " DEBUG " in log and NAMED in log
    assert "/files/security.txt" in log  # the file the user wrote, named as such
    for secret in secrets_of(walked):
        assert secret not in log
    assert "Authorization" not in log and "Cookie" not in log
    assert '"uploads"' in walked.status
    for secret in secrets_of(walked):
        assert secret not in walked.status
    walked_labels = {label for label in site.labels[OWN] if label in walked.seen}
    assert walked_labels == site.labels[OWN]  # every label of the project went past
    for project, labels in site.labels.items():
        for label in labels:
            assert label not in log, f"{project} label {label!r} in the log"
            assert label not in walked.status, f"{project} label {label!r} in the status file"


def test_everything_the_mount_wrote_is_private(walked: Walked) -> None:
    """The cache (blocks, diskcache's index and its -wal/-shm), the spools and
    their records, the log, the session cache: files 0600, folders 0700."""
    home = walked.mount.cache_dir.parent
    made = [walked.mount.cache_dir, home / "mount.log", home / "cache" / "xnatfs"]
    found: dict[str, int] = {}
    for top in made:
        paths = [top] + (list(top.rglob("*")) if top.is_dir() else [])
        for path in paths:
            found[str(path.relative_to(home))] = stat.S_IMODE(path.lstat().st_mode)
    names = {Path(p).name for p in found}
    assert {"cache.db", "cache.db-wal", "cache.db-shm", "sessions.json", "meta.json",
            "mount.log"} <= names, sorted(found)
    assert any(p.endswith(".val") for p in found)  # block files
    loose = {path: oct(mode) for path, mode in found.items() if mode & 0o077}
    assert not loose


def test_a_project_the_user_cannot_read_gives_nothing(walked: Walked, site: Site) -> None:
    """Not its name in listings, labels or IDs in tables, links or attributes;
    not its folder, nor its subjects and sessions by accession ID."""
    root = walked.mount.path
    closed_labels = set().union(*(site.labels[p] for p in CLOSED))
    closed_ids = set().union(*(site.ids[p] for p in CLOSED))
    for name in closed_labels | closed_ids | {"ALICE_LAB", "SECRET"}:
        assert name not in walked.seen
    for project in CLOSED:
        with pytest.raises(OSError) as refused:
            os.listdir(root / project)
        assert refused.value.errno in (errno.ENOENT, errno.EACCES)
    for accession_id in sorted(closed_ids):
        for where in (root, root / OWN):
            assert not os.path.lexists(where / accession_id), where / accession_id
