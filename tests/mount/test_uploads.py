"""The upload area through the mount: cp into uploads/<PROJECT>/ lands in XNAT's prearchive."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from xnatfs.testing.imaging import synthetic_study, write_dicom_archive, write_dicom_series
from xnatfs.testing.harness import TestServer

from .conftest import (
    ADMIN,
    Mount,
    daemon_pid,
    drop_kernel_entries,
    member_digests,
    mount_xnatfs,
    peak_in_flight,
    prearchive_session,
    unmount_and_wait,
    upload_result,
)


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_cp_archive_lands_in_prearchive_byte_identical(mount: Mount, tmp_path: Path,
                                                      suffix: str) -> None:
    archive = tmp_path / f"study{suffix}"
    patient = f"ARCH{suffix.replace('.', '').upper()}"
    write_dicom_archive(archive, synthetic_study("Arch^Ive", patient, slices=5, rows=32,
                                                 cols=32, seed=11))
    target = mount.path / "uploads" / "NEURO_PUB" / archive.name
    subprocess.run(["cp", str(archive), str(target)], check=True)
    [uri] = upload_result(target)
    assert uri.startswith("/data/prearchive/projects/NEURO_PUB/") and uri.endswith(patient)
    uploaded = {name: hashlib.md5(data).hexdigest()
                for name, data in prearchive_session(mount.server, uri).items()}
    assert uploaded == member_digests(archive)
    # The new session shows up in the prearchive folder at once.
    _, _, _, _, project, timestamp, folder = uri.split("/")
    session_dir = mount.path / "prearchive" / project / timestamp / folder
    assert (session_dir / "scans").is_dir()
    info_file = session_dir / "prearchive-info.json"
    info = json.loads(info_file.read_text())
    assert info["status"] == "READY" and info["uri"] == uri
    # Its size is that of its content, so tar and rsync copy it whole.
    assert info_file.stat().st_size == len(info_file.read_bytes())
    copy = tmp_path / "copy"
    subprocess.run(["rsync", "-a", f"{session_dir}/", str(copy)], check=True)
    assert json.loads((copy / "prearchive-info.json").read_text()) == info
    assert "NEURO_PUB/" + archive.name in (mount.path / "uploads" / "UPLOAD_STATUS.txt").read_text()


def test_unmount_finishes_write_behind_uploads(upload_server: TestServer, mount_factory,  # noqa: ANN001
                                               tmp_path: Path) -> None:
    """--write-behind: cp returns before XNAT has the files; an unmount right
    after must not drop the ones still queued (it left them half-uploaded)."""
    mount = mount_factory(upload_server, "--write-behind")
    source = tmp_path / "series"
    write_dicom_series(source / "s1", patient_name="Un^Mount", patient_id="UM30",
                       study_uid="1.2.826.0.1.3680043.8.498.779", series_number=1,
                       series_description="unmount", slices=30, rows=8, cols=8, seed=7)
    target = mount.path / "uploads" / "NEURO_PUB"
    upload_server.set_knobs(latency_ms=200)  # every import takes a while
    try:
        mark = upload_server.log_mark()
        subprocess.run(["cp", "-r", str(source / "s1"), str(target)], check=True)
        unmount_and_wait(mount.path, timeout=120)
        imports = [e for e in upload_server.requests_since(mark)
                   if e["route"] == "services.import"]
    finally:
        upload_server.set_knobs(latency_ms=0)
    assert len(imports) == 30 and all(e["status"] == 200 for e in imports)


def test_cp_r_loose_dicom_with_bounded_parallelism(mount: Mount, tmp_path: Path) -> None:
    source = tmp_path / "series"
    for number in (1, 2, 3):
        write_dicom_series(source / f"s{number}", patient_name="Lo^Ose", patient_id="LOOSE300",
                           study_uid="1.2.826.0.1.3680043.8.498.777", series_number=number,
                           series_description=f"series {number}", slices=100, rows=8, cols=8,
                           seed=number)
    target = mount.path / "uploads" / "NEURO_PUB" / "subject=LSUBJ" / "session=LOOSE_MR"
    target.mkdir(parents=True)
    mark = mount.server.log_mark()
    # Several writers at once, as a file manager or `xargs -P` would copy.
    files = sorted(source.rglob("*.dcm"))
    assert len(files) == 300
    # One series with plain `cp -r` (one writer), two with 16 writers at once.
    subprocess.run(["cp", "-r", str(source / "s1"), str(target)], check=True)
    for number in (2, 3):
        (target / f"s{number}").mkdir()
    subprocess.run(f"cd {source} && find ./s2 ./s3 -name '*.dcm' | xargs -P 16 -I{{}} "
                   f"cp {{}} '{target}/{{}}'", shell=True, check=True)
    imports = [e for e in mount.server.requests_since(mark) if e["route"] == "services.import"]
    assert len(imports) == 300 and all(e["status"] == 200 for e in imports)
    # Requests in flight at the server never exceeded the mount's limit (8).
    assert 1 < peak_in_flight(imports) <= 8
    with httpx.Client(base_url=mount.server.url, auth=ADMIN) as c:
        rows = c.get("/data/prearchive/projects/NEURO_PUB?format=json").json()
        sessions = [r for r in rows["ResultSet"]["Result"] if r["name"] == "LOOSE_MR"]
        assert len(sessions) == 1 and sessions[0]["subject"] == "LSUBJ"
        scans = c.get("/data" + sessions[0]["url"] + "/scans").json()["ResultSet"]["Result"]
        assert sorted(s["ID"] for s in scans) == ["1", "2", "3"]


def test_write_behind_pipelines_a_serial_cp_and_reports_refusals(
        upload_server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """--write-behind: plain `cp -r` (one writer) of loose DICOM files is uploaded
    several at a time; a refusal cannot fail that close(), so it is recorded in
    the status file and the kept uploads, and fsync() still reports it."""
    mount = mount_factory(upload_server, "--prearchive-ttl", "1", "--write-behind")
    source = tmp_path / "series"
    write_dicom_series(source / "s1", patient_name="Write^Behind", patient_id="WB40",
                       study_uid="1.2.826.0.1.3680043.8.498.778", series_number=1,
                       series_description="write-behind", slices=40, rows=8, cols=8, seed=5)
    target = mount.path / "uploads" / "NEURO_PUB" / "subject=WBSUBJ" / "session=WB_MR"
    target.mkdir(parents=True)
    upload_server.set_knobs(latency_ms=50)  # every import takes a while
    try:
        mark = upload_server.log_mark()
        subprocess.run(["cp", "-r", str(source / "s1"), str(target)], check=True)
        # Wait for the background uploads through the files themselves: fsync
        # returns once XNAT has answered.
        for path in sorted((target / "s1").iterdir()):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            assert upload_result(path)
        imports = [e for e in upload_server.requests_since(mark)
                   if e["route"] == "services.import"]
    finally:
        upload_server.set_knobs(latency_ms=0)
    assert len(imports) == 40 and all(e["status"] == 200 for e in imports)
    assert 1 < peak_in_flight(imports) <= 8  # one writer, yet uploads overlapped
    # A file XNAT refuses: cp succeeds (write-behind), the refusal is on record.
    bad_dicom = tmp_path / "bad.dcm"
    bad_dicom.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 50)
    subprocess.run(["cp", str(bad_dicom), str(mount.path / "uploads/NEURO_PUB/wb-bad.dcm")],
                   check=True)
    fd = os.open(mount.path / "uploads/NEURO_PUB/wb-bad.dcm", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as refused:
            os.fsync(fd)
        assert refused.value.errno == errno.EINVAL
    finally:
        with contextlib.suppress(OSError):  # close() reports the refusal again
            os.close(fd)
    status = (mount.path / "uploads/NEURO_PUB/UPLOAD_STATUS.txt").read_text()
    line = next(line for line in status.splitlines() if "NEURO_PUB/wb-bad.dcm" in line)
    assert line.startswith("failed") and "400" in line
    assert os.getxattr(mount.path / "uploads/NEURO_PUB/wb-bad.dcm",
                       "user.xnatfs.upload.state") == b"failed"


def test_refused_upload_fails_cp_and_keeps_the_bytes(mount: Mount, tmp_path: Path) -> None:
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("hello")
    result = subprocess.run(["cp", str(not_dicom), str(mount.path / "uploads/NEURO_PUB/")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Invalid argument" in result.stderr
    status_file = mount.path / "uploads/NEURO_PUB/UPLOAD_STATUS.txt"
    os.stat(status_file)  # the kernel now holds its attributes
    bad_dicom = tmp_path / "bad.dcm"
    bad_dicom.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 50)
    result = subprocess.run(["cp", str(bad_dicom), str(mount.path / "uploads/NEURO_PUB/")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    # tail and wc -c go by the size stat gives: it is the new text's, not the old one's.
    tail = subprocess.run(["tail", "-n", "1", str(status_file)], capture_output=True,
                          text=True, check=True).stdout
    assert "NEURO_PUB/bad.dcm" in tail
    status = status_file.read_text()
    assert os.stat(status_file).st_size == len(status.encode())
    line = next(line for line in status.splitlines() if "NEURO_PUB/bad.dcm" in line)
    assert line.startswith("failed") and "400" in line  # the server's refusal, verbatim
    kept = subprocess.run([sys.executable, "-m", "xnatfs.cli", "uploads", "list",
                           "--cache-dir", str(mount.cache_dir)], env=mount.env,
                          capture_output=True, text=True, check=True).stdout
    assert "NEURO_PUB/bad.dcm" in kept and "NEURO_PUB/notes.txt" in kept
    # Discarded from the command line: gone from the running mount too.
    [upload_id] = [line.split()[0] for line in kept.splitlines() if "NEURO_PUB/notes.txt" in line]
    notes = mount.path / "uploads/NEURO_PUB/notes.txt"
    assert notes.exists()  # the kernel holds its entry now
    subprocess.run([sys.executable, "-m", "xnatfs.cli", "uploads", "discard", upload_id,
                    "--cache-dir", str(mount.cache_dir)], env=mount.env, check=True,
                   capture_output=True)
    deadline = time.monotonic() + 10  # the kernel keeps upload-area entries for 1 s
    while notes.exists():
        assert time.monotonic() < deadline, "a discarded upload is still there"
        time.sleep(0.2)
    assert "notes.txt" not in os.listdir(mount.path / "uploads/NEURO_PUB")
    assert "notes.txt" not in (mount.path / "uploads/NEURO_PUB/UPLOAD_STATUS.txt").read_text()


WRITE_THEN_WAIT = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
data = open(sys.argv[2], "rb").read()
os.write(fd, data[:int(sys.argv[3])])
print("written", flush=True)
if sys.argv[4] == "exit":
    os._exit(0)  # the kernel closes the file, as at the end of `cat x > file`
sys.stdin.read()
"""


def write_part_then(target: Path, source: Path, nbytes: int, end: str) -> None:
    """A writer that writes ``nbytes`` of ``source`` into ``target`` and then exits
    without closing (``end="exit"``) or is killed by SIGINT (``end="SIGINT"``)."""
    writer = subprocess.Popen([sys.executable, "-c", WRITE_THEN_WAIT, str(target),
                               str(source), str(nbytes), end], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdout.readline() == "written\n"
    if end == "SIGINT":
        writer.send_signal(2)
    writer.wait(timeout=60)  # a dying process's files are closed (FLUSH) before it is reaped


def test_a_killed_copy_is_not_sent(mount: Mount, tmp_path: Path) -> None:
    """Ctrl-C or kill of a copy closes the half-written file like a finished one;
    XNAT would import a cut-off DICOM file as if whole. It is kept, marked
    incomplete, and not sent, not even by ``xnatfs uploads retry``. A writer
    exiting without closing (``cat x > file``) still sends its file."""
    write_dicom_series(tmp_path / "cut", patient_name="Cu^T", patient_id="CUT1",
                       study_uid="1.2.826.0.1.3680043.8.498.795", series_number=1,
                       series_description="cut", slices=2, rows=32, cols=32, seed=18)
    first, second = sorted((tmp_path / "cut").iterdir())
    folder = mount.path / "uploads" / "NEURO_PUB"
    mark = mount.server.log_mark()
    write_part_then(folder / "cut.dcm", first, first.stat().st_size // 2, "SIGINT")
    assert not [e for e in mount.server.requests_since(mark) if e["route"] == "services.import"]
    assert os.getxattr(folder / "cut.dcm", "user.xnatfs.upload.state") == b"failed"
    message = os.getxattr(folder / "cut.dcm", "user.xnatfs.upload.message").decode()
    assert "killed (SIGINT)" in message
    retried = subprocess.run([sys.executable, "-m", "xnatfs.cli", "uploads", "retry",
                              "--cache-dir", str(mount.cache_dir)], env=mount.env,
                             capture_output=True, text=True, check=True).stdout
    assert "cut.dcm: incomplete" in retried
    assert not [e for e in mount.server.requests_since(mark) if e["route"] == "services.import"]
    # An archive streams while it is written: the request is cut off, unfinished.
    archive = tmp_path / "cut.zip"
    write_dicom_archive(archive, synthetic_study("Cu^Tzip", "CUTZIP1", slices=3, rows=16,
                                                 cols=16, seed=19))
    write_part_then(folder / "cut.zip", archive, archive.stat().st_size // 2, "SIGINT")
    assert os.getxattr(folder / "cut.zip", "user.xnatfs.upload.state") == b"failed"
    assert b"prearchive/" in os.getxattr(folder / "cut.zip", "user.xnatfs.upload.message")
    assert not [e for e in mount.server.requests_since(mark)
                if e["route"] == "services.import" and e["status"] == 200]
    # Copied again over it: sent whole.
    subprocess.run(["cp", str(first), str(folder / "cut.dcm")], check=True)
    assert upload_result(folder / "cut.dcm")
    write_part_then(folder / "whole.dcm", second, second.stat().st_size, "exit")
    assert upload_result(folder / "whole.dcm")


def test_ctrl_c_stops_a_copy_waiting_for_xnat(upload_server: TestServer, mount_factory,  # noqa: ANN001
                                              tmp_path: Path) -> None:
    """close() waits for XNAT's answer, and the kernel keeps a process waiting
    in the mount until it answers, Ctrl-C or not (for up to --import-timeout).
    The mount answers an interrupted close at once; the upload it had sent goes
    on and its outcome is recorded."""
    mount = mount_factory(upload_server)
    write_dicom_series(tmp_path / "slow", patient_name="Sl^Ow", patient_id="SLOW1",
                       study_uid="1.2.826.0.1.3680043.8.498.796", series_number=1,
                       series_description="slow", slices=1, rows=1024, cols=1024, seed=20)
    [dicom] = (tmp_path / "slow").iterdir()  # 2 MiB: 4 s to send at 0.5 MB/s
    target = mount.path / "uploads" / "NEURO_PUB" / "slow.dcm"
    upload_server.set_knobs(bandwidth_mb_s=0.5)
    try:
        copy = subprocess.Popen(["cp", str(dicom), str(target)], stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 30
        while not (target.exists()
                   and os.getxattr(target, "user.xnatfs.upload.state") == b"uploading"):
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.05)
        copy.send_signal(2)  # Ctrl-C
        copy.communicate(timeout=30)
        # cp is gone while the upload still runs...
        assert os.getxattr(target, "user.xnatfs.upload.state") == b"uploading"
        # ...which then ends as it would have.
        deadline = time.monotonic() + 60
        while os.getxattr(target, "user.xnatfs.upload.state") == b"uploading":
            assert time.monotonic() < deadline, "the upload never finished"
            time.sleep(0.2)
    finally:
        upload_server.set_knobs(bandwidth_mb_s=0)
    assert copy.returncode != 0
    assert upload_result(target)


def test_failed_uploads_are_listed_again_after_a_remount(mount: Mount, tmp_path: Path) -> None:
    """A file manager user sees what failed after a restart too, not only
    ``xnatfs uploads list``; rm there discards it, as before the restart."""
    (tmp_path / "notes.txt").write_text("not dicom\n")
    folder = mount.path / "uploads" / "NEURO_PUB" / "again"
    folder.mkdir()
    result = subprocess.run(["cp", str(tmp_path / "notes.txt"), str(folder)],
                            capture_output=True, text=True)
    assert result.returncode != 0
    unmount_and_wait(mount.path)
    mount_xnatfs(mount.server, mount.path, mount.cache_dir, mount.env, mount.options)
    kept = folder / "notes.txt"
    assert os.getxattr(kept, "user.xnatfs.upload.state") == b"failed"
    assert kept.read_text() == "not dicom\n"
    assert "NEURO_PUB/again/notes.txt" in (folder.parent / "UPLOAD_STATUS.txt").read_text()
    kept.unlink()
    listed = subprocess.run([sys.executable, "-m", "xnatfs.cli", "uploads", "list",
                             "--cache-dir", str(mount.cache_dir)], env=mount.env,
                            capture_output=True, text=True, check=True).stdout
    assert "again/notes.txt" not in listed


def test_a_full_spool_disk_fails_cp_with_enospc(upload_server: TestServer, mount_factory,  # noqa: ANN001
                                                 tmp_path: Path) -> None:
    """The local copy of an upload has no room: ``cp`` says "No space left on
    device" (not an I/O error), the log does not hold the bytes written, and the
    mount goes on."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    cache = tmp_path / "home-small" / "blocks"  # where mount_factory puts name="small"'s cache
    cache.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(cache)],
                   check=True)
    try:
        mount = mount_factory(upload_server, name="small")
        source = tmp_path / "scan.bin"
        source.write_bytes(b"PATIENT-NAME-" * ((8 << 20) // 13))  # twice the disk
        copy = subprocess.run(["cp", str(source), str(mount.path / "uploads" / "NEURO_PUB")],
                              capture_output=True, text=True, timeout=120)
        assert copy.returncode != 0
        assert "No space left on device" in copy.stderr, copy.stderr
        log = (tmp_path / "home-small" / "mount.log").read_text()
        assert "bug in" not in log and "PATIENT-NAME" not in log
        assert "NEURO_PUB" in os.listdir(mount.path / "uploads")  # still serving
    finally:
        subprocess.run(["fusermount3", "-u", str(tmp_path / "small")], check=False)
        subprocess.run(["umount", "--lazy", str(cache)], check=True)  # the daemon may still be exiting


def test_server_error_fails_cp_then_retry_succeeds(mount: Mount, tmp_path: Path) -> None:
    archive = tmp_path / "retry.zip"
    write_dicom_archive(archive, synthetic_study("Re^Try", "RETRY1", slices=3, rows=16,
                                                 cols=16, seed=5))
    mount.server.set_knobs(fail_rate=1.0, fault_path="/data/services/import")
    try:
        result = subprocess.run(["cp", str(archive), str(mount.path / "uploads/NEURO_PUB/")],
                                capture_output=True, text=True, timeout=300)
    finally:
        mount.server.set_knobs(fail_rate=0.0, fault_path="")
    assert result.returncode != 0 and "Input/output error" in result.stderr
    for flags in (os.O_RDONLY, os.O_RDWR):  # fsync reports the failure as it was, not EINVAL
        fd = os.open(mount.path / "uploads/NEURO_PUB/retry.zip", flags)
        try:
            with pytest.raises(OSError) as failed:
                os.fsync(fd)
            assert failed.value.errno == errno.EIO
        finally:
            with contextlib.suppress(OSError):  # a writer's close reports it again
                os.close(fd)
    cli = [sys.executable, "-m", "xnatfs.cli", "uploads"]
    common = ["--cache-dir", str(mount.cache_dir), "--url", mount.server.url]
    kept = subprocess.run([*cli, "list", *common], env=mount.env, capture_output=True,
                          text=True, check=True).stdout
    line = next(line for line in kept.splitlines() if "retry.zip" in line)
    upload_id = line.split()[0]
    assert f"on {mount.server.url}" in line  # the XNAT it was dropped into
    for action in ("retry", "discard"):  # a mistyped id fails and leaves the rest alone
        typo = subprocess.run([*cli, action, upload_id, upload_id[:-1] + "x", *common],
                              env=mount.env, capture_output=True, text=True)
        assert typo.returncode != 0 and "no kept upload" in typo.stderr
        assert upload_id[:-1] + "x" in typo.stderr and upload_id not in typo.stderr
    # Never sent to another XNAT (here, the same server under another name).
    elsewhere = mount.server.url.replace("127.0.0.1", "localhost")
    assert elsewhere != mount.server.url
    refused = subprocess.run([*cli, "retry", upload_id, "--cache-dir", str(mount.cache_dir),
                              "--url", elsewhere], env=mount.env, capture_output=True, text=True)
    assert refused.returncode != 0 and f"dropped into {mount.server.url}" in refused.stderr
    assert "uploaded" not in refused.stdout
    for action in ("list", "discard"):  # another site's uploads are not its to list or drop
        other = subprocess.run([*cli, action, "--cache-dir", str(mount.cache_dir),
                                "--url", elsewhere], env=mount.env, capture_output=True,
                               text=True, check=True)
        assert "retry.zip" not in other.stdout
    # Without --url, the upload goes to its own XNAT (the environment names none).
    assert "XNAT_URL" not in mount.env
    done = subprocess.run([*cli, "retry", upload_id, "--cache-dir", str(mount.cache_dir)],
                          env=mount.env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # The running mount shows what the command did (it kept showing "failed"),
    # in the status file and then in the attributes too.
    status = (mount.path / "uploads/NEURO_PUB/UPLOAD_STATUS.txt").read_text()
    assert "/data/prearchive/projects/NEURO_PUB/" in done.stdout
    kept = subprocess.run([*cli, "list", *common], env=mount.env, capture_output=True,
                          text=True, check=True).stdout
    assert "retry.zip" not in kept
    nothing = subprocess.run([*cli, "retry", "--cache-dir", str(mount.cache_dir)],
                             env=mount.env, capture_output=True, text=True)
    assert (nothing.returncode, nothing.stdout) == (0, "")  # nothing kept: nothing to do
    [uri] = upload_result(mount.path / "uploads/NEURO_PUB/retry.zip")
    assert uri in done.stdout
    assert f"done      NEURO_PUB/retry.zip  {uri}" in status


def test_an_import_answered_too_late_is_not_sent_again(upload_server: TestServer,
                                                       mount_factory,  # noqa: ANN001
                                                       tmp_path: Path) -> None:
    """XNAT answers an import once it has imported the archive. If that answer
    does not come in time, the archive is not sent again (XNAT may have it, and
    a big one would go over the wire again and again): cp fails with "Connection
    timed out", the bytes are kept, and the status says to look first."""
    mount = mount_factory(upload_server, "--import-timeout", "2", name="late-answer")
    archive = tmp_path / "late.zip"
    write_dicom_archive(archive, synthetic_study("La^Te", "LATEANS1", slices=2, rows=16,
                                                 cols=16, seed=41))
    mark = upload_server.log_mark()
    upload_server.set_knobs(answer_delay_ms=4000, fault_path="/data/services/import")
    try:
        result = subprocess.run(["cp", str(archive), str(mount.path / "uploads/NEURO_PUB/")],
                                capture_output=True, text=True, timeout=120)
        imports: list[dict] = []
        deadline = time.monotonic() + 30
        while not imports:  # the server logs a request once it has answered
            assert time.monotonic() < deadline, "the import never reached the server"
            imports = [e for e in upload_server.requests_since(mark)
                       if e["route"] == "services.import"]
    finally:
        upload_server.set_knobs(answer_delay_ms=0, fault_path="")
    assert result.returncode != 0 and "Connection timed out" in result.stderr
    assert len(imports) == 1
    with httpx.Client(base_url=upload_server.url, auth=ADMIN) as c:  # XNAT did import it
        rows = c.get("/data/prearchive/projects/NEURO_PUB?format=json").json()
        assert any(r["name"] == "LATEANS1" for r in rows["ResultSet"]["Result"])
    entry = mount.path / "uploads/NEURO_PUB/late.zip"
    assert os.getxattr(entry, "user.xnatfs.upload.state") == b"failed"
    assert b"not sent again" in os.getxattr(entry, "user.xnatfs.upload.message")
    assert entry.read_bytes() == archive.read_bytes()  # kept


def test_an_import_dying_mid_stream_fails_cp_instead_of_hanging_it(upload_server: TestServer,
                                                                   mount_factory,  # noqa: ANN001
                                                                   tmp_path: Path) -> None:
    """The server stops taking the archive while ``cp`` still writes (12 MB,
    more than the stream buffers): ``cp`` goes on into the local copy and fails
    at close, with the bytes kept. It used to wait in write() for the dead
    request to take more, unkillable, for the upload timeout (an hour)."""
    mount = mount_factory(upload_server, "--timeout", "1")
    archive = tmp_path / "stalled.zip"
    write_dicom_archive(archive, synthetic_study("Stal^Led", "STALL1", slices=120, rows=256,
                                                 cols=256, seed=6))
    minor = os.minor(os.stat(mount.path).st_dev)
    upload_server.set_knobs(hang=True, fault_path="/data/services/import")
    copy = subprocess.Popen(["cp", str(archive), str(mount.path / "uploads/NEURO_PUB/")],
                            stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = copy.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        # cp cannot be killed while it waits in the kernel: abort the connection.
        Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
        copy.communicate()
        pytest.fail("cp hung on the dead import")
    finally:
        upload_server.set_knobs(hang=False, fault_path="")
    assert copy.returncode != 0 and "Input/output error" in stderr, stderr
    kept = subprocess.run([sys.executable, "-m", "xnatfs.cli", "uploads", "list",
                           "--cache-dir", str(mount.cache_dir)], env=mount.env,
                          capture_output=True, text=True, check=True).stdout
    assert "NEURO_PUB/stalled.zip" in kept


def test_session_expiry_in_the_middle_of_a_large_upload(mount: Mount, tmp_path: Path) -> None:
    archive = tmp_path / "large.zip"
    write_dicom_archive(archive, synthetic_study("Lar^Ge", "LARGE1", slices=60, rows=256,
                                                 cols=256, seed=2))
    assert archive.stat().st_size > 5_000_000
    target = mount.path / "uploads" / "NEURO_PUB" / "large.zip"
    with open(archive, "rb") as src, open(target, "wb") as dst:
        half = archive.stat().st_size // 2
        dst.write(src.read(half))
        dst.flush()
        mount.server.expire_sessions()
        dst.write(src.read())
    [uri] = upload_result(target)
    assert len(prearchive_session(mount.server, uri)) == len(member_digests(archive))


def test_a_sent_file_stays_listed_but_is_not_read_back(mount: Mount, tmp_path: Path) -> None:
    """Its local copy is removed once XNAT has it: reading it says so (EACCES),
    where it used to fail with EIO; it can be sent again."""
    archive = tmp_path / "sent.zip"
    write_dicom_archive(archive, synthetic_study("Sent^Once", "SENT1", slices=2, rows=16,
                                                 cols=16, seed=5))
    target = mount.path / "uploads" / "NEURO_PUB" / "sent.zip"
    subprocess.run(["cp", str(archive), str(target)], check=True)
    assert upload_result(target)[0].endswith("/SENT1")
    assert target.stat().st_size == archive.stat().st_size
    result = subprocess.run(["cat", str(target)], capture_output=True, text=True)
    assert result.returncode != 0 and "Permission denied" in result.stderr
    subprocess.run(["cp", str(archive), str(target)], check=True)  # sent again
    assert upload_result(target)[0].endswith("/SENT1")


def test_free_space_is_the_room_uploads_have(mount: Mount) -> None:
    """File managers refuse to copy into a folder whose file system reports no
    free space (GNOME Files: "not enough space"): the mount reports the local
    disk its upload copies go to, where it reported zero."""
    mounted, disk = os.statvfs(mount.path), os.statvfs(mount.cache_dir)
    assert mounted.f_blocks * mounted.f_frsize == pytest.approx(
        disk.f_blocks * disk.f_frsize, rel=1e-3)
    free = mounted.f_bavail * mounted.f_frsize
    assert free > 0 and free == pytest.approx(disk.f_bavail * disk.f_frsize, rel=1e-2)
    df = subprocess.run(["df", "-B1", "--output=avail", str(mount.path / "uploads")],
                        capture_output=True, text=True, check=True).stdout.split()
    assert int(df[-1]) == pytest.approx(free, rel=1e-2)


def test_write_to_temporary_name_then_rename(mount: Mount, tmp_path: Path) -> None:
    archive = tmp_path / "renamed.zip"
    write_dicom_archive(archive, synthetic_study("Re^Name", "RENAME1", slices=3, rows=16,
                                                 cols=16, seed=8))
    folder = mount.path / "uploads" / "NEURO_PUB"
    temp = folder / ".goutputstream-ABC123"
    temp.write_bytes(archive.read_bytes())   # litter name: kept locally, not uploaded
    assert os.getxattr(temp, "user.xnatfs.upload.state") == b"kept"
    # A real name: uploaded now, though an indexer still holds it open for reading.
    with open(temp, "rb"):
        os.rename(temp, folder / "renamed.zip")
    [uri] = upload_result(folder / "renamed.zip")
    assert uri.endswith("/RENAME1")
    os.utime(folder / "renamed.zip", (1, 1))  # cp -a / rsync set times afterwards
    os.chmod(folder / "renamed.zip", 0o600)


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_rsync_writes_a_temporary_and_renames(mount: Mount, tmp_path: Path) -> None:
    archive = tmp_path / "synced.zip"
    write_dicom_archive(archive, synthetic_study("Rs^Ync", "RSYNC1", slices=2, rows=16,
                                                 cols=16, seed=9))
    folder = mount.path / "uploads" / "NEURO_PUB"
    subprocess.run(["rsync", "-a", str(archive), str(folder) + "/"], check=True)
    [uri] = upload_result(folder / "synced.zip")
    assert uri.endswith("/RSYNC1")
    # The kernel moved its entry itself: nothing to invalidate, nothing logged.
    assert "ERROR" not in (mount.cache_dir.parent / "mount.log").read_text()


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_a_second_rsync_sends_nothing_again(mount: Mount, tmp_path: Path) -> None:
    """rsync -a keeps times on what it sent, so running it again (after an
    interruption, say) skips what XNAT already has instead of importing it twice."""
    source = tmp_path / "again"
    write_dicom_series(source, patient_name="Ag^Ain", patient_id="AGAIN3",
                       study_uid="1.2.826.0.1.3680043.8.498.781", series_number=1,
                       series_description="again", slices=3, rows=8, cols=8, seed=11)
    folder_time = 1_600_000_000 * 10**9  # unlike the new folder's, so rsync sets it
    os.utime(source, ns=(folder_time, folder_time))
    target = mount.path / "uploads" / "NEURO_PUB" / "subject=AGSUBJ" / "session=AGAIN_MR"
    target.mkdir(parents=True)
    mark = mount.server.log_mark()
    subprocess.run(["rsync", "-a", f"{source}/", f"{target}/"], check=True)
    first = [e for e in mount.server.requests_since(mark) if e["route"] == "services.import"]
    assert len(first) == 3
    for path in source.iterdir():
        assert (target / path.name).stat().st_mtime_ns == path.stat().st_mtime_ns
    assert target.stat().st_mtime_ns == folder_time  # kept, or rsync would set it again
    mark = mount.server.log_mark()
    again = subprocess.run(["rsync", "-a", "--itemize-changes", f"{source}/", f"{target}/"],
                           check=True, capture_output=True, text=True)
    assert again.stdout.strip() == ""
    assert not [e for e in mount.server.requests_since(mark)
                if e["route"] == "services.import"]


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_rsync_goes_on_past_a_file_xnat_refuses(mount: Mount, tmp_path: Path) -> None:
    """A failed close ends rsync's whole run ("error in file IO", nothing more
    sent); a failed rename only that file's. A CD export's README is refused at
    its rename, the DICOM files still go, and a second run tries the README again."""
    source = tmp_path / "export"
    write_dicom_series(source, patient_name="Ex^Port", patient_id="EXPORT1",
                       study_uid="1.2.826.0.1.3680043.8.498.791", series_number=1,
                       series_description="export", slices=3, rows=8, cols=8, seed=12)
    (source / "00README.TXT").write_text("exported by the scanner\n")
    target = mount.path / "uploads" / "NEURO_PUB" / "export"
    target.mkdir()
    for run in (1, 2):
        mark = mount.server.log_mark()
        result = subprocess.run(["rsync", "-a", f"{source}/", f"{target}/"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 23, result.stderr  # partial transfer, not code 11
        assert "rename" in result.stderr and "00README.TXT" in result.stderr
        sent = [e for e in mount.server.requests_since(mark) if e["route"] == "services.import"]
        assert len(sent) == (3 if run == 1 else 0)
        names = sorted(os.listdir(target))
        assert names == sorted(p.name for p in source.iterdir() if p.suffix == ".dcm")
    for name in names:
        assert os.getxattr(target / name, "user.xnatfs.upload.state") == b"done"


def test_a_refused_rename_changes_nothing(mount: Mount, tmp_path: Path) -> None:
    """GNOME writes ``.goutputstream-*`` and renames it to the real name, which is
    when it is uploaded; refused, the rename fails and the file keeps its name."""
    folder = mount.path / "uploads" / "NEURO_PUB"
    temp = folder / ".goutputstream-REFUSE"
    temp.write_text("not dicom\n")
    with pytest.raises(OSError) as refused:
        os.rename(temp, folder / "report.txt")
    assert refused.value.errno == errno.EPERM
    assert temp.read_text() == "not dicom\n"  # the bytes are kept
    assert "report.txt" not in os.listdir(folder)
    assert os.getxattr(temp, "user.xnatfs.upload.state") == b"failed"


def test_empty_files_are_kept_not_left_writing(mount: Mount, tmp_path: Path) -> None:
    """touch, "New Document", cp of an empty file: nothing to upload, nothing to
    retry; written to afterwards, the file is uploaded then."""
    folder = mount.path / "uploads" / "NEURO_PUB" / "empty"
    folder.mkdir()
    (tmp_path / "empty.dcm").write_bytes(b"")
    subprocess.run(["cp", str(tmp_path / "empty.dcm"), str(folder)], check=True)
    subprocess.run(["touch", str(folder / "later.dcm")], check=True)
    for name in ("empty.dcm", "later.dcm"):
        assert os.getxattr(folder / name, "user.xnatfs.upload.state") == b"kept"
    kept = subprocess.run([sys.executable, "-m", "xnatfs.cli", "uploads", "list",
                           "--cache-dir", str(mount.cache_dir)], env=mount.env,
                          capture_output=True, text=True, check=True).stdout
    assert "empty/" not in kept
    write_dicom_series(tmp_path / "one", patient_name="La^Ter", patient_id="LATER1",
                       study_uid="1.2.826.0.1.3680043.8.498.792", series_number=1,
                       series_description="later", slices=1, rows=8, cols=8, seed=13)
    [dicom] = (tmp_path / "one").iterdir()
    with open(folder / "later.dcm", "ab") as f:
        f.write(dicom.read_bytes())
    assert upload_result(folder / "later.dcm")


def test_a_file_being_sent_keeps_its_labels(mount: Mount, tmp_path: Path) -> None:
    """An archive streams to XNAT while it is written, with the labels of its
    folders: moving it to another ``subject=`` folder meanwhile is EBUSY (as for
    its folders), renaming it where it is is not."""
    archive = tmp_path / "moving.zip"
    write_dicom_archive(archive, synthetic_study("Mo^Ving", "MOVING1", slices=3, rows=16,
                                                 cols=16, seed=15))
    data = archive.read_bytes()
    project = mount.path / "uploads" / "NEURO_PUB"
    first, other = project / "subject=MOVSUBJ", project / "subject=OTHERSUBJ"
    first.mkdir()
    other.mkdir()
    with open(first / "moving.zip", "wb") as writer:
        writer.write(data[:len(data) // 2])
        writer.flush()
        with pytest.raises(OSError) as busy:
            os.rename(first / "moving.zip", other / "moving.zip")
        assert busy.value.errno == errno.EBUSY
        os.rename(first / "moving.zip", first / "renamed.zip")
        writer.write(data[len(data) // 2:])
    [uri] = upload_result(first / "renamed.zip")
    with httpx.Client(base_url=mount.server.url, auth=ADMIN) as c:
        info = c.get(f"{uri}?format=json").json()["ResultSet"]["Result"][0]
    assert info["subject"] == "MOVSUBJ"


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_rsync_keeping_extended_attributes_succeeds(mount: Mount, tmp_path: Path) -> None:
    """``rsync -aX`` sets the source's user attributes (kept while listed) and
    removes the entry's others, our upload status among them: that status is
    not stored, so removing it does nothing, and every run ended with code 23."""
    source = tmp_path / "xattrs"
    write_dicom_series(source, patient_name="Xa^Ttr", patient_id="XATTR1",
                       study_uid="1.2.826.0.1.3680043.8.498.793", series_number=1,
                       series_description="xattrs", slices=2, rows=8, cols=8, seed=16)
    for path in source.iterdir():
        os.setxattr(path, "user.xdg.origin.url", b"https://scanner.example/export")
    target = mount.path / "uploads" / "NEURO_PUB" / "xattrs"
    target.mkdir()
    for _ in range(2):
        result = subprocess.run(["rsync", "-aX", f"{source}/", f"{target}/"],
                                capture_output=True, text=True, timeout=120)
        assert (result.returncode, result.stderr) == (0, "")
    for path in source.iterdir():
        entry = target / path.name
        assert os.getxattr(entry, "user.xdg.origin.url") == b"https://scanner.example/export"
        assert os.getxattr(entry, "user.xnatfs.upload.state") == b"done"
        os.removexattr(entry, "user.xdg.origin.url")
        assert "user.xdg.origin.url" not in os.listxattr(entry)
        with pytest.raises(OSError) as absent:
            os.removexattr(entry, "user.xdg.origin.url")
        assert absent.value.errno == errno.ENODATA
    with pytest.raises(OSError) as ours:
        os.setxattr(target / path.name, "user.xnatfs.upload.state", b"done")
    assert ours.value.errno == errno.ENOTSUP


def test_moving_an_upload_to_another_project(mount: Mount, tmp_path: Path) -> None:
    """mv between projects copies (EXDEV): fine for a kept upload, read from its
    local copy; one XNAT already has has none, so it is refused at once instead
    of leaving an empty file in the other project. Links cannot be uploaded."""
    project, other = mount.path / "uploads" / "NEURO_PUB", mount.path / "uploads" / "ONC-PROT"
    write_dicom_series(tmp_path / "sent", patient_name="Mo^Ved", patient_id="MOVED1",
                       study_uid="1.2.826.0.1.3680043.8.498.794", series_number=1,
                       series_description="moved", slices=1, rows=8, cols=8, seed=17)
    [dicom] = (tmp_path / "sent").iterdir()
    (project / "moved").mkdir()
    subprocess.run(["cp", str(dicom), str(project / "moved")], check=True)
    assert upload_result(project / "moved" / dicom.name)
    for path in (project / "moved" / dicom.name, project / "moved"):
        result = subprocess.run(["mv", str(path), str(other)], capture_output=True, text=True)
        assert result.returncode != 0 and "Operation not permitted" in result.stderr
    assert os.listdir(other) == ["UPLOAD_STATUS.txt"]
    (tmp_path / "notes.txt").write_text("not dicom\n")
    result = subprocess.run(["cp", str(tmp_path / "notes.txt"), str(project)],
                            capture_output=True, text=True)
    assert result.returncode != 0  # refused, and kept
    result = subprocess.run(["mv", str(project / "notes.txt"), str(other)],
                            capture_output=True, text=True)
    assert "Invalid argument" in result.stderr  # copied, so sent again: refused there too
    assert (other / "notes.txt").read_text() == "not dicom\n"
    with pytest.raises(OSError) as link:
        os.symlink(dicom, project / "link.dcm")
    assert link.value.errno == errno.EPERM


def test_a_new_folder_renamed_names_the_subject(mount: Mount, tmp_path: Path) -> None:
    """The file-manager way: make "New Folder", rename it to ``subject=...``,
    drop files in. The folders keep their inodes; what lands below follows the
    new names, and a folder cannot be renamed while an upload below it runs."""
    project = mount.path / "uploads" / "NEURO_PUB"
    (project / "New Folder" / "inner").mkdir(parents=True)
    inode = (project / "New Folder").stat().st_ino
    inner_inode = (project / "New Folder" / "inner").stat().st_ino
    os.rename(project / "New Folder", project / "subject=NFSUBJ")
    assert "New Folder" not in os.listdir(project)
    assert (project / "subject=NFSUBJ").stat().st_ino == inode
    drop_kernel_entries()  # the names now come from the mount, not the kernel's memory
    assert (project / "subject=NFSUBJ").stat().st_ino == inode
    os.rename(project / "subject=NFSUBJ" / "inner", project / "subject=NFSUBJ" / "session=NF_MR")
    session = project / "subject=NFSUBJ" / "session=NF_MR"
    assert session.stat().st_ino == inner_inode
    archive = tmp_path / "newfolder.zip"
    write_dicom_archive(archive, synthetic_study("New^Folder", "NEWF1", slices=2, rows=16,
                                                 cols=16, seed=12))
    with open(session / "newfolder.zip", "wb") as open_upload:
        open_upload.write(archive.read_bytes()[:1000])
        with pytest.raises(OSError) as busy:
            os.rename(project / "subject=NFSUBJ", project / "subject=OTHER")
        assert busy.value.errno == errno.EBUSY
        open_upload.write(archive.read_bytes()[1000:])
    [uri] = upload_result(session / "newfolder.zip")
    assert uri.endswith("/NF_MR")
    with httpx.Client(base_url=mount.server.url, auth=ADMIN) as c:
        rows = c.get("/data/prearchive/projects/NEURO_PUB?format=json").json()
        [row] = [r for r in rows["ResultSet"]["Result"] if r["name"] == "NF_MR"]
        assert row["subject"] == "NFSUBJ"
    # Once uploaded, the folder moves with its entries (a rename changes nothing sent).
    os.rename(project / "subject=NFSUBJ", project / "done")
    assert os.listdir(project / "done" / "session=NF_MR") == ["newfolder.zip"]
    (project / "empty").mkdir()
    os.rename(project / "done", project / "empty")  # over an empty folder: replaced
    assert "done" not in os.listdir(project)
    with pytest.raises(OSError) as cross:  # sent: mv could not copy it there
        os.rename(project / "empty", mount.path / "uploads" / "ONC-PROT" / "empty")
    assert cross.value.errno == errno.EPERM


def test_labels_xnat_would_change_are_refused(mount: Mount) -> None:
    """XNAT keeps only letters, digits, _ and - in labels: ``subject=My Sub`` would
    land as My_Sub, so the folder is refused (EINVAL, EPERM for a rename; reason in
    the log)."""
    project = mount.path / "uploads" / "NEURO_PUB"
    for name in ("subject=My Sub", "session=MR.1", "subject=Zoë"):
        with pytest.raises(OSError) as refused:
            (project / name).mkdir()
        assert refused.value.errno == errno.EINVAL
        assert name not in os.listdir(project)
    (project / "New Folder").mkdir()
    with pytest.raises(OSError) as refused:
        os.rename(project / "New Folder", project / "subject=My Sub")
    assert refused.value.errno == errno.EPERM  # EINVAL would make mv blame the target
    os.rename(project / "New Folder", project / "subject=My_Sub")
    assert (project / "subject=My_Sub").is_dir()
    log = (mount.cache_dir.parent / "mount.log").read_text()
    assert "'My Sub'" in log
    assert "Failed to submit" not in log  # an invalidation of what the kernel had dropped


@pytest.mark.parametrize("command", [["cp", "-a"], ["cp", "-p"], ["mv"]])
def test_copies_that_keep_attributes_succeed_quietly(mount: Mount, tmp_path: Path,
                                                     command: list[str]) -> None:
    """cp -a/-p and mv copy modes, times and the ACL; the mount keeps no ACL and
    says so with ENOTSUP, which they accept (EROFS made them fail)."""
    patient = "KEEP" + command[-1].strip("-").upper()
    archive = tmp_path / f"{patient.lower()}.zip"
    write_dicom_archive(archive, synthetic_study("Ke^Ep", patient, slices=2, rows=16,
                                                 cols=16, seed=10))
    folder = mount.path / "uploads" / "NEURO_PUB"
    result = subprocess.run([*command, str(archive), str(folder) + "/"], capture_output=True,
                            text=True, timeout=120)
    assert (result.returncode, result.stderr) == (0, "")
    [uri] = upload_result(folder / archive.name)
    assert uri.endswith("/" + patient)


def test_made_folders_and_files_outlive_the_kernel_forgetting(mount: Mount,
                                                             tmp_path: Path) -> None:
    """mkdir and create hand the kernel entries of their own; the mount keeps them
    while the kernel does."""
    folder = mount.path / "uploads" / "NEURO_PUB" / "batch"
    folder.mkdir()
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        kept = folder / ".DS_Store"  # litter: kept locally, never uploaded
        with open(kept, "wb") as f:
            f.write(b"\0" * 300)
            drop_kernel_entries()
            assert os.getxattr(f.fileno(), "user.xnatfs.upload.state") == b"writing"
        drop_kernel_entries()
        assert os.listdir(folder_fd) == [".DS_Store"]
        assert os.getxattr(kept, "user.xnatfs.upload.state") == b"kept"
        archive = tmp_path / "late.zip"
        write_dicom_archive(archive, synthetic_study("La^Te", "LATE1", slices=2, rows=16,
                                                     cols=16, seed=10))
        shutil.copy(archive, folder / "late.zip")
        [uri] = upload_result(folder / "late.zip")
        assert uri.endswith("/LATE1")
    finally:
        os.close(folder_fd)


def test_a_reader_closing_a_file_being_copied_sends_nothing(mount: Mount,
                                                             tmp_path: Path) -> None:
    """File managers open a file being copied in (thumbnails, indexing) and close
    it again; only the writer's close sends it, whole (a reader's close once
    sent the first half)."""
    archive = tmp_path / "peeked.zip"
    write_dicom_archive(archive, synthetic_study("Pe^Ek", "PEEK1", slices=3, rows=16,
                                                 cols=16, seed=14))
    data = archive.read_bytes()
    target = mount.path / "uploads" / "NEURO_PUB" / "peeked.zip"
    mark = mount.server.log_mark()
    with open(target, "wb") as writer:
        writer.write(data[:len(data) // 2])
        writer.flush()
        with open(target, "rb") as reader:
            assert reader.read(4) == b"PK\x03\x04"
        # Not sent: still being written (and streamed to XNAT as it is written).
        assert os.getxattr(target, "user.xnatfs.upload.state") in (b"writing", b"uploading")
        writer.write(data[len(data) // 2:])
    imports = [e for e in mount.server.requests_since(mark) if e["route"] == "services.import"]
    assert len(imports) == 1 and imports[0]["status"] == 200
    [uri] = upload_result(target)
    assert uri.endswith("/PEEK1")


def test_file_manager_litter_is_not_uploaded(mount: Mount) -> None:
    folder = mount.path / "uploads" / "NEURO_PUB"
    mark = mount.server.log_mark()
    for name in (".DS_Store", "._photo.dcm", "Thumbs.db"):
        (folder / name).write_bytes(b"\0" * 300)
    assert not [e for e in mount.server.requests_since(mark) if e["route"] == "services.import"]
    assert ".DS_Store" not in (folder / "UPLOAD_STATUS.txt").read_text()
    # Kept locally, so the file manager can read back what it wrote (KDE's .directory).
    (folder / ".directory").write_text("[Dolphin]\nViewMode=1\n")
    assert (folder / ".directory").read_text() == "[Dolphin]\nViewMode=1\n"
    assert (folder / ".DS_Store").read_bytes() == b"\0" * 300


def test_uploads_root_lists_writable_projects_only(mount: Mount, mount_factory) -> None:  # noqa: ANN001
    """Where XNAT lets the user add sessions: as owner or member, and, for a
    site admin, every project."""
    names = set(os.listdir(mount.path / "uploads"))
    assert names == {"NEURO_PUB", "ONC-PROT", "ALICE_LAB", "SECRET", "SAMPLES",
                     "UPLOAD_STATUS.txt"}
    alice = mount_factory(mount.server, name="alice", user="alice")
    # Member of NEURO_PUB, owner of ALICE_LAB; a collaborator (ONC-PROT) only reads.
    assert set(os.listdir(alice.path / "uploads")) == {"NEURO_PUB", "ALICE_LAB",
                                                        "UPLOAD_STATUS.txt"}
    with pytest.raises(OSError) as info:
        (mount.path / "uploads" / "loose.dcm").write_bytes(b"x")
    assert info.value.errno in (errno.EACCES, errno.EROFS)


def peak_rss(pids: list[int], stop: threading.Event, peaks: dict[int, int]) -> None:
    """Sample each process's resident set until ``stop``; the highest is kept in ``peaks``."""
    while not stop.is_set():
        for pid in pids:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    peaks[pid] = max(peaks.get(pid, 0), int(line.split()[1]) * 1024)
        stop.wait(0.05)


def test_memory_stays_bounded_while_streaming(mount: Mount) -> None:
    """A 2 GiB archive (issue #4) streams through the mount's bounded channel into the
    server's spool: neither process's RSS comes near its size. The data is one 1 MiB
    chunk written again and again, so the test itself holds 1 MiB and writes nothing
    locally (the mount's and the server's spools each take 2 GiB of disk meanwhile)."""
    mount_pid, server_pid = daemon_pid(mount.path), mount.server.process.pid
    size = 2 * 1024**3
    target = mount.path / "uploads" / "NEURO_PUB" / "big.zip"
    chunk = b"PK\x03\x04" + os.urandom(1024 * 1024 - 4)
    peaks: dict[int, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=peak_rss, args=([mount_pid, server_pid], stop, peaks))
    mark = mount.server.log_mark()
    sampler.start()
    try:
        with pytest.raises(OSError):  # not a real zip: XNAT refuses it at the end
            with open(target, "wb") as f:
                for _ in range(size // len(chunk)):
                    f.write(chunk)
    finally:
        stop.set()
        sampler.join()
        with contextlib.suppress(OSError):
            os.unlink(target)  # its 2 GiB spool goes too, even when an assertion fails
    assert peaks[mount_pid] < 250 * 1024 * 1024, peaks
    assert peaks[server_pid] < 250 * 1024 * 1024, peaks
    # It was streamed (once, while being written), not sent again from the spool at close.
    imports = [e for e in mount.server.requests_since(mark) if e["route"] == "services.import"]
    assert [e["status"] for e in imports] == [400], imports


def test_out_of_order_writes_upload_from_the_local_copy(mount: Mount, tmp_path: Path) -> None:
    archive = tmp_path / "shuffled.zip"
    write_dicom_archive(archive, synthetic_study("Shuf^Fled", "SHUF1", slices=4, rows=64,
                                                 cols=64, seed=41))
    data = archive.read_bytes()
    half = len(data) // 2
    target = mount.path / "uploads" / "NEURO_PUB" / "shuffled.zip"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data[half:], half)  # the second half first
        os.pwrite(fd, data[:half], 0)
    finally:
        os.close(fd)
    [uri] = upload_result(target)
    assert {n: hashlib.md5(d).hexdigest()
            for n, d in prearchive_session(mount.server, uri).items()} == member_digests(archive)


@pytest.mark.parametrize("how", ["option", "config"])
def test_direct_archive_sends_uploads_to_the_archive(upload_server: TestServer, mount_factory,  # noqa: ANN001
                                                     tmp_path: Path, how: str) -> None:
    if how == "config":  # the site's profile in ~/.config/xnatfs/config.toml says so
        config = tmp_path / "home-direct" / "config" / "xnatfs" / "config.toml"
        config.parent.mkdir(parents=True)
        config.write_text(f'[profiles.site]\nurl = "{upload_server.url}"\n'
                          "direct_archive = true\n")
        mount = mount_factory(upload_server, name="direct")
    else:
        mount = mount_factory(upload_server, "--direct-archive", name="direct")
    archive = tmp_path / "direct.zip"
    write_dicom_archive(archive, synthetic_study("Di^Rect", f"DIRECT-{how}", slices=2, rows=16,
                                                 cols=16, seed=61))
    session = f"DIRECT_{how.upper()}"
    folder = mount.path / "uploads" / "NEURO_PUB" / "subject=DSUBJ" / f"session={session}"
    folder.mkdir(parents=True)
    subprocess.run(["cp", str(archive), str(folder)], check=True)
    [uri] = upload_result(folder / "direct.zip")
    assert uri == f"/data/archive/projects/NEURO_PUB/subjects/DSUBJ/experiments/{session}"
    assert os.listdir(mount.path / "NEURO_PUB" / "DSUBJ" / session / "scans")


def test_a_retried_upload_keeps_the_mounts_direct_archive(upload_server: TestServer,
                                                          mount_factory,  # noqa: ANN001
                                                          tmp_path: Path) -> None:
    """``xnatfs uploads retry`` sends a kept upload where the mount would have:
    with --direct-archive, into the archive (it went to the prearchive)."""
    mount = mount_factory(upload_server, "--direct-archive", name="direct-retry")
    archive = tmp_path / "later.zip"
    write_dicom_archive(archive, synthetic_study("La^Ter", "LATER1", slices=2, rows=16,
                                                 cols=16, seed=62))
    folder = mount.path / "uploads" / "NEURO_PUB" / "subject=LSUBJ2" / "session=LATER_MR"
    folder.mkdir(parents=True)
    upload_server.set_knobs(fail_rate=1.0, fault_path="/data/services/import")
    try:
        failed = subprocess.run(["cp", str(archive), str(folder)], capture_output=True,
                                timeout=120)
    finally:
        upload_server.set_knobs(fail_rate=0.0, fault_path="")
    assert failed.returncode != 0
    done = subprocess.run([sys.executable, "-m", "xnatfs.cli", "uploads", "retry",
                           "--cache-dir", str(mount.cache_dir), "--url", upload_server.url],
                          env=mount.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "-> /data/archive/projects/NEURO_PUB/subjects/LSUBJ2/experiments/LATER_MR" in done.stdout
