"""The prearchive area through the mount: sessions as folders, archived with mv,
moved, and deleted with rm -r (XNAT removes whole sessions only)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from xnatfs.testing.imaging import synthetic_study, write_dicom_archive
from xnatfs.testing.store import Store

from .conftest import (
    ADMIN,
    Mount,
    drop_archive,
    member_digests,
    mounted_prearchive,
    upload_result,
)


def test_archive_move_and_delete_by_file_operations(mount: Mount, tmp_path: Path) -> None:
    uris = [drop_archive(mount, tmp_path, f"ops{n}.zip", ("O^Ps", f"OPS{n}"), slices=2,
                         seed=20 + n)[1] for n in (1, 2, 3)]
    dirs = [mounted_prearchive(mount, u) for u in uris]
    # Archive into a new subject: mkdir makes it, mv archives with the given labels.
    subject = mount.path / "NEURO_PUB" / "OPSSUBJ"
    with pytest.raises(OSError) as refused:  # XNAT would archive it as OPS_SUBJ
        (mount.path / "NEURO_PUB" / "OPS SUBJ").mkdir()
    assert refused.value.errno == errno.EINVAL
    subject.mkdir()
    refused_mv = subprocess.run(["mv", str(dirs[0]), str(subject / "OPS1 MR")],
                                capture_output=True, text=True)
    # EPERM: mv reads rename(2)'s EINVAL as "a subdirectory of itself" and says that.
    assert refused_mv.returncode != 0 and "Operation not permitted" in refused_mv.stderr
    assert dirs[0].exists()
    os.rename(dirs[0], subject / "OPS1_MR")
    assert not dirs[0].exists()
    assert (subject / "OPS1_MR" / "scans").is_dir()
    assert os.listdir(subject / "OPS1_MR" / "scans")
    # Move to another project's prearchive.
    subprocess.run(["mv", str(dirs[1]), str(mount.path / "prearchive" / "ONC-PROT")],
                   check=True)
    with httpx.Client(base_url=mount.server.url, auth=ADMIN) as c:
        rows = c.get("/data/prearchive/projects/ONC-PROT?format=json").json()
        assert any(r["name"] == "OPS2" for r in rows["ResultSet"]["Result"])
    # Delete with rm -r.
    subprocess.run(["rm", "-r", str(dirs[2])], check=True)
    with httpx.Client(base_url=mount.server.url, auth=ADMIN) as c:
        assert c.get(uris[2] + "?format=json").status_code == 404
    assert not dirs[2].exists()
    # Telling the kernel about names it no longer held is no error worth a traceback.
    assert "Failed to submit" not in (mount.cache_dir.parent / "mount.log").read_text()


def test_part_of_a_prearchive_session_removed_with_rm_is_not_archived(mount: Mount,
                                                                     tmp_path: Path) -> None:
    """XNAT removes whole prearchive sessions only. ``rm`` of a file in one is
    what ``rm -r SESSION`` does before its last rmdir (which deletes the session),
    so it cannot fail; but the session is then not archived as if the file were
    gone: the mv fails (EPERM) and shows the file again, and the next one
    archives all of it."""
    _, uri = drop_archive(mount, tmp_path, "part.zip", ("Pa^Rt", "PART1"), slices=2, seed=35)
    session = mounted_prearchive(mount, uri)
    scans = sorted(os.listdir(session / "scans"))
    scan = scans[0]
    files = session / "scans" / scan / "resources" / "DICOM" / "files"
    names = sorted(os.listdir(files))
    subprocess.run(["rm", str(files / names[0])], check=True)
    assert sorted(os.listdir(files)) == names[1:]
    subprocess.run(["rm", "-r", str(session / "scans" / scans[1])], check=True)
    assert sorted(os.listdir(session / "scans")) == [scan, *scans[2:]]
    subject = mount.path / "NEURO_PUB" / "PARTSUBJ"
    subject.mkdir()
    with pytest.raises(OSError) as refused:
        os.rename(session, subject / "PART1")
    assert refused.value.errno == errno.EPERM
    # Still there, and shown again.
    assert sorted(os.listdir(files)) == names
    assert (files / names[0]).stat().st_size > 0
    assert sorted(os.listdir(session / "scans")) == scans
    subprocess.run(["rm", "-r", str(session / "scans")], check=True)
    assert "scans" not in os.listdir(session)
    with pytest.raises(OSError) as refused:  # refused again, and shown again
        os.rename(session, subject / "PART1")
    assert refused.value.errno == errno.EPERM
    assert sorted(os.listdir(files)) == names
    with pytest.raises(OSError) as refused:  # not a subject: no file-by-file copy either
        os.rename(session, mount.path / "NEURO_PUB" / "PART1")
    assert refused.value.errno == errno.EPERM
    held = os.open(session, os.O_RDONLY | os.O_DIRECTORY)  # as the kernel holds it after mv
    try:
        os.rename(session, subject / "PART1")
        # Until the kernel renews the new name's entry, it points at the folder
        # that was moved: that folder shows the archived session meanwhile.
        assert sorted(os.listdir(f"/proc/self/fd/{held}/scans")) == \
            sorted(os.listdir(subject / "PART1/scans"))
    finally:
        os.close(held)
    with httpx.Client(base_url=mount.server.url, auth=ADMIN) as c:  # all of it was archived
        base = "/data/projects/NEURO_PUB/subjects/PARTSUBJ/experiments/PART1"
        [scan_id] = [row["ID"] for row in c.get(f"{base}/scans").json()["ResultSet"]["Result"]
                     if scan.startswith(f"{row['ID']}-") or scan == row["ID"]]
        rows = c.get(f"{base}/scans/{scan_id}/resources/DICOM/files").json()
    assert sorted(r["Name"] for r in rows["ResultSet"]["Result"]) == names


def test_rm_r_of_a_prearchive_timestamp_folder(mount: Mount, tmp_path: Path) -> None:
    """XNAT drops a timestamp folder with its last session; ``rm -r`` of the folder
    still ends well (it failed on the folder after deleting what was in it)."""
    _, uri = drop_archive(mount, tmp_path, "stamp.zip", ("St^Amp", "STAMP1"), slices=2,
                          seed=33)
    stamp = mounted_prearchive(mount, uri).parent
    assert os.listdir(stamp) == ["STAMP1"]
    result = subprocess.run(["rm", "-r", str(stamp)], capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    assert not stamp.exists() and stamp.name not in os.listdir(stamp.parent)
    with httpx.Client(base_url=mount.server.url, auth=ADMIN) as c:
        assert c.get(uri + "?format=json").status_code == 404


def test_rmdir_of_a_full_prearchive_session_deletes_nothing(mount: Mount,
                                                           tmp_path: Path) -> None:
    """Only ``rm -r`` deletes a session: a bare rmdir (an ``rmdir */*/*`` sweep of
    empty folders, ``gio remove``) of one that still shows files is ENOTEMPTY,
    at any depth, and leaves it whole on the server."""
    _, uri = drop_archive(mount, tmp_path, "full.zip", ("Fu^Ll", "FULL1"), slices=2, seed=36)
    session = mounted_prearchive(mount, uri)
    scans = session / "scans"
    [scan, *_] = sorted(os.listdir(scans))
    for folder in (session, scans, scans / scan):
        with pytest.raises(OSError) as refused:
            os.rmdir(folder)
        assert refused.value.errno == errno.ENOTEMPTY
    assert sorted(os.listdir(scans / scan / "resources" / "DICOM" / "files"))
    gio_like = subprocess.run(["rmdir", str(session)], capture_output=True, text=True)
    assert gio_like.returncode != 0 and "not empty" in gio_like.stderr
    with httpx.Client(base_url=mount.server.url, auth=ADMIN) as c:
        assert c.get(uri + "?format=json").status_code == 200
    subprocess.run(["rm", "-r", str(session)], check=True)
    with httpx.Client(base_url=mount.server.url, auth=ADMIN) as c:
        assert c.get(uri + "?format=json").status_code == 404


def test_refused_archive_action_maps_to_errno(mount: Mount, tmp_path: Path) -> None:
    _, uri = drop_archive(mount, tmp_path, "conflict.zip", ("Con^Flict", "CONFL1"), slices=2,
                          seed=31)
    session_dir = mounted_prearchive(mount, uri)
    # NP001_MR1 already exists in NP001 and is a different study: XNAT refuses
    # with 500 "FAILED: ...", which is final (one request) and a conflict.
    mark = mount.server.log_mark()
    with pytest.raises(OSError) as info:
        os.rename(session_dir, mount.path / "NEURO_PUB" / "NP001" / "NP001_MR1")
    assert info.value.errno == errno.EEXIST
    archives = [e for e in mount.server.requests_since(mark)
                if e["path"] == "/data/services/archive"]
    assert [e["status"] for e in archives] == [500]
    assert session_dir.exists()
    log = (mount.cache_dir.parent / "mount.log").read_text()
    assert "seems down" not in log  # the server answered; it is not down


def test_prearchive_files_read_through_the_mount(mount: Mount, tmp_path: Path) -> None:
    archive, uri = drop_archive(mount, tmp_path, "readback.zip", ("Re^Ad", "PREREAD2"),
                                slices=3, seed=52)
    session_dir = mounted_prearchive(mount, uri)
    mounted = {p.name: hashlib.md5(p.read_bytes()).hexdigest()
               for p in session_dir.rglob("*.dcm")}
    assert mounted == member_digests(archive)
    assert os.getxattr(session_dir, "user.xnat.status") == b"READY"


def test_outside_uploads_appear_within_the_prearchive_lifetime(mount: Mount,
                                                               tmp_path: Path) -> None:
    assert os.listdir(mount.path / "prearchive" / "NEURO_PUB") is not None  # cached now
    archive = tmp_path / "outside.zip"
    write_dicom_archive(archive, synthetic_study("Out^Side", "OUTSIDE1", slices=2, rows=16,
                                                 cols=16, seed=53))
    with httpx.Client(base_url=mount.server.url, auth=ADMIN) as c:
        outside = c.post("/data/services/import?import-handler=DICOM-zip&project=NEURO_PUB",
                         content=archive.read_bytes(), headers={"Content-Type": "application/zip"})
    assert outside.status_code == 200
    target = mounted_prearchive(mount, outside.text)
    deadline = time.monotonic() + 15  # the mount trusts its listing for 1 s (--prearchive-ttl)
    while not target.exists():
        assert time.monotonic() < deadline, "the outside upload never appeared"
        time.sleep(0.2)
    # Its status, as scripts poll it, follows the server's (no listing in between:
    # the attributes are read through an open folder).
    folder = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.getxattr(folder, "user.xnat.status") == b"READY"
        info = target / "prearchive-info.json"
        assert json.loads(info.read_bytes())["status"] == "READY"
        store = Store(mount.server.data_dir)
        try:
            store.execute("UPDATE prearc_sessions SET status = 'CONFLICT'"
                          " WHERE name = 'OUTSIDE1'")
        finally:
            store.close()
        deadline = time.monotonic() + 15
        while os.getxattr(folder, "user.xnat.status") != b"CONFLICT":
            assert time.monotonic() < deadline, "the status attribute never changed"
            time.sleep(0.2)
        assert os.stat(info).st_size == len(info.read_bytes())  # stat first: the new size
        assert json.loads(info.read_bytes())["status"] == "CONFLICT"
    finally:
        os.close(folder)


def test_prearchive_cli_commands(mount: Mount, tmp_path: Path) -> None:
    archive = tmp_path / "cli.zip"
    write_dicom_archive(archive, synthetic_study("C^Li", "CLI1", slices=2, rows=16, cols=16,
                                                 seed=71))
    subprocess.run(["cp", str(archive), str(mount.path / "uploads" / "NEURO_PUB")], check=True)
    [uri] = upload_result(mount.path / "uploads" / "NEURO_PUB" / "cli.zip")
    cli = [sys.executable, "-m", "xnatfs.cli", "prearchive"]
    site = ["--url", mount.server.url]
    listed = subprocess.run([*cli, "list", *site], env=mount.env, capture_output=True,
                            text=True, check=True).stdout
    assert uri in listed
    for labels in (["--subject", "CLI SUBJ"], ["--label", "CLI MR"]):  # XNAT would change them
        refused = subprocess.run([*cli, "archive", uri, *labels, *site], env=mount.env,
                                 capture_output=True, text=True)
        assert refused.returncode != 0 and "XNAT labels are ASCII letters" in refused.stderr
    assert uri in subprocess.run([*cli, "list", *site], env=mount.env, capture_output=True,
                                 text=True, check=True).stdout  # still there
    archived = subprocess.run([*cli, "archive", uri, "--subject", "CLISUBJ", "--label", "CLI_MR",
                               *site], env=mount.env, capture_output=True, text=True, check=True)
    assert archived.stdout.strip().endswith("/subjects/CLISUBJ/experiments/CLI_MR")
