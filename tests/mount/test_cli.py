"""The ``xnatfs mount``/``umount`` commands: backgrounding, credentials, sessions, errors."""

from __future__ import annotations

import os
import platform
import select
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import xnatfs
from xnatfs.testing.harness import TestServer, free_port

from .conftest import Mount, daemon_pid, make_env, mount_xnatfs, unmount_and_wait


@pytest.fixture
def fresh_server(started_fresh_server: TestServer) -> TestServer:
    """conftest's ``fresh_server``, started while the test before ran (none of
    this module's tests looks for its data under ``tmp_path``)."""
    return started_fresh_server


def mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path)
               for line in Path("/proc/self/mounts").read_text().splitlines())


def test_mount_returns_once_mounted_and_umount_logs_out(demo_mount: Mount) -> None:
    assert mounted(demo_mount.path)
    assert os.listdir(demo_mount.path)  # answers right away
    mark = demo_mount.server.log_mark()
    subprocess.run([sys.executable, "-m", "xnatfs.cli", "umount", str(demo_mount.path)],
                   check=True, timeout=30)
    assert not mounted(demo_mount.path)
    # The mount process logs out as it exits; wait for that request to be logged.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        entries = demo_mount.server.requests_since(mark)
        if any(e["method"] == "DELETE" and e["route"] == "jsession" for e in entries):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"no DELETE /data/JSESSION after unmount: {entries}")


def wait_for_unmount(path: Path, timeout: float) -> bool:
    """Wait (polling the mount table for changes, not sleeping) until ``path``
    is no longer mounted; False if it still is after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with open("/proc/self/mounts") as table:
        poller = select.poll()
        poller.register(table, select.POLLPRI | select.POLLERR)
        while mounted(path):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(left * 1000)  # the table changed (or time is up)
            table.seek(0)
            table.read()  # re-arm
    return True


def test_a_killed_mount_process_leaves_no_dead_mount(demo_mount: Mount) -> None:
    """``kill -9`` (or a crash, or the OOM killer) must not leave a mount that
    answers "Transport endpoint is not connected" until someone unmounts it."""
    assert mounted(demo_mount.path) and os.listdir(demo_mount.path)
    os.kill(daemon_pid(demo_mount.path), signal.SIGKILL)
    assert wait_for_unmount(demo_mount.path, timeout=30)
    assert os.listdir(demo_mount.path) == []  # the empty mount point, usable again
    mount_xnatfs(demo_mount.server, demo_mount.path, demo_mount.cache_dir, demo_mount.env,
                 demo_mount.options)
    assert "NEURO_PUB" in os.listdir(demo_mount.path)


READ_SYSCALL = {"x86_64": "0", "aarch64": "63"}.get(platform.machine())


def reading_its_file(pid: int) -> bool:
    """Whether ``cat`` is inside read(2) of the file it opened (fd 3), blocked."""
    syscall = Path(f"/proc/{pid}/syscall").read_text().split()
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return syscall[:2] == [READ_SYSCALL, "0x3"] and state in ("S", "D")


def test_sigterm_unmounts_at_once_while_a_read_waits_for_a_hung_server(
        fresh_server: TestServer, mount_factory) -> None:  # noqa: ANN001
    """The unmount waits for the requests being answered; one waiting for a
    server that does not answer held it (and a system shutdown) for the whole
    timeout. The waiting read now fails at once."""
    if READ_SYSCALL is None:
        pytest.skip(f"read(2)'s number on {platform.machine()} is not known here")
    with httpx.Client(base_url=fresh_server.url, auth=("admin", "admin")) as c:
        for path in ("/data/projects/P", "/data/projects/P/subjects/S",
                     "/data/projects/P/subjects/S/experiments/E?xsiType=xnat:mrSessionData",
                     "/data/projects/P/subjects/S/experiments/E/resources/R/files/a.bin"):
            assert c.put(path, content=b"a" if path.endswith(".bin") else None).is_success
    mount = mount_factory(fresh_server, "--timeout", "20")  # a read gives up after 80 s
    target = mount.path / "P/S/E/resources/R/files/a.bin"
    os.stat(target)
    fresh_server.set_knobs(hang=True)
    try:
        reader = subprocess.Popen(["cat", str(target)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not reading_its_file(reader.pid):
            assert time.monotonic() < deadline, "cat never waited for the mount"
            time.sleep(0.05)
        started = time.monotonic()
        os.kill(daemon_pid(mount.path), signal.SIGTERM)
        assert wait_for_unmount(mount.path, timeout=60)
        reader.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        fresh_server.set_knobs(hang=False)
    assert reader.returncode != 0
    assert took < 20, f"the unmount waited {took:.0f} s for the hung read"


def test_password_never_in_argv_logs_or_world_readable_files(demo_server: TestServer,
                                                             mount_factory) -> None:  # noqa: ANN001
    mount = mount_factory(demo_server, "--log-level", "DEBUG")
    # XNAT_PASS was in the mount command's environment; the daemon's is clean.
    assert mount.env["XNAT_PASS"] == "admin"
    assert b"XNAT_PASS=" not in Path(f"/proc/{daemon_pid(mount.path)}/environ").read_bytes()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"xnatfs" in cmdline:
            assert b"admin:admin" not in cmdline and b"XNAT_PASS" not in cmdline
            args = cmdline.split(b"\0")
            assert b"admin" not in args  # the password (admin) is never an argument
    os.listdir(mount.path / "NEURO_PUB")
    log = (mount.cache_dir.parent / "mount.log").read_text()
    assert "Authorization" not in log and "YWRtaW46YWRtaW4" not in log  # base64 admin:admin
    assert "JSESSIONID=" not in log  # the session cookie is a credential too
    sessions = Path(mount.env["XDG_CACHE_HOME"]) / "xnatfs" / "sessions.json"
    assert sessions.exists()
    assert stat.S_IMODE(sessions.stat().st_mode) == 0o600
    assert stat.S_IMODE(sessions.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(mount.cache_dir.stat().st_mode) == 0o700
    assert "admin\"" not in sessions.read_text().replace('"user": "admin"', "")


def test_second_mount_reuses_the_cached_session(demo_server: TestServer,
                                               mount_factory) -> None:  # noqa: ANN001
    first = mount_factory(demo_server, name="first")
    mark = demo_server.log_mark()
    env = first.env
    second = first.path.parent / "second"
    second.mkdir()
    subprocess.run([sys.executable, "-m", "xnatfs.cli", "mount", demo_server.url, str(second),
                    "--cache-dir", str(first.cache_dir)], env=env, check=True, timeout=60)
    try:
        os.listdir(second)
        logins = [e for e in demo_server.requests_since(mark)
                  if e["route"] == "jsession" and e["method"] == "POST"]
        assert logins == []
    finally:
        # The second mount borrowed the session: its end (waited for) leaves it to the first.
        unmount_and_wait(second)
    assert "NP001" in os.listdir(first.path / "NEURO_PUB")
    jsession = [(e["method"], e["status"]) for e in demo_server.requests_since(mark)
                if e["route"] == "jsession"]
    assert jsession == [("GET", 200)], jsession  # the check that it is alive, nothing else


def test_mounting_over_a_mount_is_refused(demo_server: TestServer, mount_factory) -> None:  # noqa: ANN001
    """A second mount on the same folder would hide the first one (found in
    mountinfo, which writes the space in this folder's name as \\040)."""
    mount = mount_factory(demo_server, name="with space")
    result = subprocess.run([sys.executable, "-m", "xnatfs.cli", "mount",
                             demo_server.url, str(mount.path)], env=mount.env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "already mounted (fuse.xnatfs)" in result.stderr
    escaped = str(mount.path).replace(" ", "\\040")
    mounts = Path("/proc/self/mountinfo").read_text().split("\n")
    assert sum(f" {escaped} " in line for line in mounts) == 1


def test_mounting_over_a_dead_mount_says_what_to_do(demo_server: TestServer,
                                                    tmp_path: Path) -> None:
    """A FUSE mount whose process is gone (and its helper: kill -9 of both)
    answers ENOTCONN; mounting there said so with a traceback."""
    if os.geteuid() != 0:
        pytest.skip("making a dead FUSE mount by hand needs root")
    mountpoint = tmp_path / "dead"
    mountpoint.mkdir()
    fuse = os.open("/dev/fuse", os.O_RDWR)
    try:
        subprocess.run(["mount", "-i", "-t", "fuse.dead", "-o",
                        f"fd={fuse},rootmode=40000,user_id=0,group_id=0", "dead",
                        str(mountpoint)], pass_fds=(fuse,), check=True)
    finally:
        os.close(fuse)  # nobody answers the mount now
    try:
        result = subprocess.run([sys.executable, "-m", "xnatfs.cli", "mount", demo_server.url,
                                 str(mountpoint)], env=make_env(tmp_path),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert "dead mount" in result.stderr and "xnatfs umount" in result.stderr
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def test_bad_password_fails_clearly_and_leaves_no_mount(demo_server: TestServer,
                                                       tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    env = make_env(tmp_path) | {"XNAT_PASS": "wrong"}
    result = subprocess.run([sys.executable, "-m", "xnatfs.cli", "mount", demo_server.url,
                             str(mountpoint)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "cannot mount" in result.stderr and "wrong" not in result.stderr
    assert not mounted(mountpoint)


def test_unreachable_server_fails_within_a_bound(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "xnatfs.cli", "mount",
                             f"http://127.0.0.1:{free_port()}", str(mountpoint), "--timeout", "2"],
                            env=make_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "cannot mount" in result.stderr
    assert time.monotonic() - started < 90
    assert not mounted(mountpoint)


def test_missing_credentials_are_reported(demo_server: TestServer, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    env = make_env(tmp_path)
    del env["XNAT_USER"], env["XNAT_PASS"]
    env["HOME"] = str(tmp_path)  # no ~/.netrc
    result = subprocess.run([sys.executable, "-m", "xnatfs.cli", "mount", demo_server.url,
                             str(mountpoint)], env=env, capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode != 0 and "no credentials" in result.stderr


def test_demo_command_mounts_the_bundled_server_and_cleans_up(tmp_path: Path) -> None:
    """The README's first command: server + demo data + mount, undone by SIGTERM."""
    import signal

    env = make_env(tmp_path)
    del env["XNAT_USER"], env["XNAT_PASS"]
    demo = subprocess.Popen([sys.executable, "-m", "xnatfs.cli", "demo", "--data",
                             str(tmp_path / "server")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, text=True)
    assert demo.stdout is not None
    try:
        lines = []
        for line in demo.stdout:
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        mountpoint = tmp_path / "xnat-demo"
        assert mounted(mountpoint), "".join(lines)
        assert "NEURO_PUB" in os.listdir(mountpoint)
        assert any("ls xnat-demo" in line for line in lines)
    finally:
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=60)
    assert not mounted(tmp_path / "xnat-demo")
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "server")], capture_output=True)
    assert leftovers.returncode != 0, leftovers.stdout  # the server is gone too


def test_an_fstab_line_mounts_through_mount_8(demo_server: TestServer, tmp_path: Path) -> None:
    """``mount -t fuse.xnatfs URL DIR -o OPTIONS``, as an fstab line does: mount(8)
    runs mount.fuse3, which runs ``xnatfs URL DIR -o OPTIONS`` with the generic
    options (dev, suid, noauto...) mixed in. mount(8) gives helpers the standard
    PATH only, so, in a private mount namespace, ``xnatfs`` is bind-mounted there."""
    bin_dir, mountpoint, log = tmp_path / "bin", tmp_path / "mnt", tmp_path / "mount.log"
    bin_dir.mkdir()
    mountpoint.mkdir()
    source_root = Path(xnatfs.__file__).resolve().parents[1]
    wrapper = bin_dir / "xnatfs"
    wrapper.write_text(f"#!/bin/sh\ncd {shlex.quote(str(source_root))} && "
                       f"exec {shlex.quote(sys.executable)} -m xnatfs.cli \"$@\"\n")
    wrapper.chmod(0o755)
    options = (f"noauto,_netdev,x-systemd.automount,ro,metadata_ttl=5,log_level=INFO,"
               f"cache_dir={tmp_path / 'cache'},log_file={log}")
    mnt, url = shlex.quote(str(mountpoint)), shlex.quote(demo_server.url)
    script = f"""set -e
mount --bind {shlex.quote(str(bin_dir))} /usr/local/bin
if mount -t fuse.xnatfs {url} {mnt} -o noauto,bogus_option=1 2>&1; then exit 3; fi
echo "refused"
mount -t fuse.xnatfs {url} {mnt} -o {shlex.quote(options)}
echo "mounted: $(grep " {mountpoint} " /proc/self/mounts)"
ls {mnt}/NEURO_PUB
umount {mnt}
"""
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            env=make_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    refusal, _, rest = result.stdout.partition("refused\n")
    assert "unrecognized arguments: --bogus-option=1" in refusal
    table, _, listing = rest.partition("\n")
    assert " fuse.xnatfs ro," in table and "nosuid,nodev" in table  # not dev, suid
    assert "NP001" in listing.split()
    assert f"mounted {demo_server.url} on {mountpoint}" in log.read_text()
    assert not mounted(mountpoint)
