"""Who may use a mount: only its user by default; ``--allow-other`` and
``--allow-root`` share reading, never uploading. Other users are real uids
(``setpriv``), so the kernel's and libfuse's checks are what is tested."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from xnatfs.mount import sharing_refusal
from xnatfs.testing.harness import TestServer

from .conftest import make_env, mount_xnatfs, reachable_by_everyone

NOBODY = 65534   # the user a mount is shared with
STRANGER = 65533  # a third user
FILE = Path("NEURO_PUB/NP001/NP001_MR1/resources/QC/files/qc.json")


def as_user(uid: int, *cmd: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           "--", *cmd], capture_output=True, timeout=120, env=env)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp_path and /tmp may be 0700)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("acting as other users needs root and setpriv")
    with reachable_by_everyone("xnatfs-access-") as path:
        yield path


def mount_in(open_dir: Path, server: TestServer, tmp_path: Path, *options: str) -> Path:
    mountpoint = open_dir / "mnt"
    mount_xnatfs(server, mountpoint, tmp_path / "home" / "blocks", make_env(tmp_path / "home"),
                 list(options))
    return mountpoint


def test_other_users_are_refused_by_default(demo_server: TestServer, open_dir: Path,
                                            tmp_path: Path) -> None:
    mountpoint = mount_in(open_dir, demo_server, tmp_path)
    assert as_user(NOBODY, "ls", str(open_dir)).returncode == 0  # the way there is open
    refused = as_user(NOBODY, "ls", str(mountpoint))
    assert refused.returncode != 0 and b"Permission denied" in refused.stderr
    assert (mountpoint / "NEURO_PUB").is_dir()  # the owner (here root) is served


def test_allow_other_shares_reading_but_not_uploading(demo_server: TestServer,
                                                      open_dir: Path, tmp_path: Path) -> None:
    mountpoint = mount_in(open_dir, demo_server, tmp_path, "--allow-other")
    listing = as_user(NOBODY, "ls", str(mountpoint))
    assert listing.returncode == 0 and b"NEURO_PUB" in listing.stdout.split()
    read = as_user(NOBODY, "cat", str(mountpoint / FILE))
    assert read.returncode == 0 and read.stdout == (mountpoint / FILE).read_bytes() != b""
    attrs = as_user(NOBODY, "getfattr", "-n", "user.xnat.uri", str(mountpoint / FILE))
    assert attrs.returncode == 0 and b"/files/qc.json" in attrs.stdout

    # Uploads, new subjects and prearchive moves go out under the owner's XNAT
    # account: the kernel refuses them to anyone else (default_permissions).
    source = open_dir / "scan.dcm"
    source.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    source.chmod(0o644)
    upload = as_user(NOBODY, "cp", str(source), str(mountpoint / "uploads" / "NEURO_PUB"))
    assert upload.returncode != 0 and b"Permission denied" in upload.stderr
    made = as_user(NOBODY, "mkdir", str(mountpoint / "NEURO_PUB" / "NEW_SUBJECT"))
    assert made.returncode != 0 and b"Permission denied" in made.stderr
    assert not (mountpoint / "uploads" / "NEURO_PUB" / "scan.dcm").exists()
    assert not (mountpoint / "NEURO_PUB" / "NEW_SUBJECT").exists()


def run_in_private_namespace(script: str, fuse_conf: str, open_dir: Path,
                             dev_fuse_mode: str = "666", **variables: str) -> str:
    """Run ``script`` (bash) in a mount namespace of its own where
    /etc/fuse.conf is ``fuse_conf`` and every user may open /dev/fuse (as on
    a desktop; containers often make it 0600): the machine's own files are
    left alone."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    conf = open_dir / "fuse.conf"
    conf.write_text(fuse_conf)
    setup = ('mount --bind "$CONF" /etc/fuse.conf\n'
             'mknod -m "$DEV_MODE" "$DEV" c 10 229 && mount --bind "$DEV" /dev/fuse || exit 1\n')
    env = dict(variables, CONF=str(conf), DEV=str(open_dir / "fuse"), DEV_MODE=dev_fuse_mode,
               PATH=os.environ["PATH"], PY=sys.executable)
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                             setup + script], capture_output=True, text=True, timeout=180,
                            env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


# An ordinary user that may still read every file (a checkout or venv under
# /root): the mount is theirs, the capability only lets Python start.
AS_READER = "setpriv --reuid={0} --regid={0} --clear-groups " \
            "--inh-caps=+dac_read_search --ambient-caps=+dac_read_search --"


def test_allow_root_lets_root_in_and_keeps_others_out(demo_server: TestServer,
                                                      open_dir: Path) -> None:
    """A mount made by an ordinary user: root (a Docker daemon, say) may read it,
    a third user may not."""
    home = open_dir / "home"
    (open_dir / "mnt").mkdir()
    home.mkdir()
    for path in (home, open_dir / "mnt"):
        os.chown(path, NOBODY, NOBODY)
    script = """
    set -u
    user() { uid=$1; shift; setpriv --reuid=$uid --regid=$uid --clear-groups -- "$@"; }
    HOME="$HOME_DIR" XNAT_USER=admin XNAT_PASS=admin $AS_READER \
        "$PY" -m xnatfs.cli mount "$URL" "$MNT" --allow-root --cache-dir "$HOME_DIR/cache" \
        || exit 1
    trap 'user $NOBODY fusermount3 -u "$MNT"' EXIT
    echo "mounted: $(grep " $MNT " /proc/self/mounts | cut -d' ' -f3,4)"
    ls "$MNT" | sed 's/^/root: /'
    user $NOBODY ls "$MNT" | sed 's/^/owner: /'
    user $STRANGER ls "$MNT" 2>&1 | sed 's/^/stranger: /'
    """
    out = run_in_private_namespace(script, "user_allow_other\n", open_dir,
                                   AS_READER=AS_READER.format(NOBODY), NOBODY=str(NOBODY),
                                   STRANGER=str(STRANGER), HOME_DIR=str(home),
                                   URL=demo_server.url, MNT=str(open_dir / "mnt"))
    assert "mounted: fuse.xnatfs " in out and "allow_other" in out  # what the kernel was told
    assert "root: NEURO_PUB" in out.splitlines()
    assert "owner: NEURO_PUB" in out.splitlines()
    assert "Permission denied" in out and "stranger: NEURO_PUB" not in out.splitlines()


@pytest.mark.parametrize("asked_by", ["option", "config"])
def test_sharing_without_user_allow_other_is_refused_clearly(demo_server: TestServer,
                                                             open_dir: Path, asked_by: str) -> None:
    """fusermount3 would refuse it in a background process nobody watches: the
    command says why, naming how sharing was asked for, and nothing is mounted."""
    (open_dir / "mnt").mkdir()
    os.chown(open_dir / "mnt", NOBODY, NOBODY)
    option = "--allow-other"
    if asked_by == "config":
        config = open_dir / ".config" / "xnatfs" / "config.toml"
        config.parent.mkdir(parents=True)
        config.write_text("[mount]\nallow_other = true\n")
        for path in (open_dir / ".config", config.parent, config):
            os.chown(path, NOBODY, NOBODY)
        option = ""
    script = """
    HOME="$MNT/.." XNAT_USER=admin XNAT_PASS=admin $AS_READER \
        "$PY" -m xnatfs.cli mount "$URL" "$MNT" $OPTION 2>&1
    echo "exit: $?"
    grep -c " $MNT " /proc/self/mounts || true
    """
    out = run_in_private_namespace(script, "#user_allow_other\n", open_dir,
                                   AS_READER=AS_READER.format(NOBODY), URL=demo_server.url,
                                   MNT=str(open_dir / "mnt"), OPTION=option)
    named = "--allow-other" if asked_by == "option" else "'allow_other = true' in the config file"
    assert f"{named} needs a line 'user_allow_other' in /etc/fuse.conf" in out
    assert "exit: 1" in out and out.rstrip().endswith("0")


def test_a_refused_mount_says_where_libfuse_gave_the_reason(demo_server: TestServer,
                                                           open_dir: Path) -> None:
    """An ordinary user who may not open /dev/fuse: the command fails at once,
    nothing is mounted, and the log it names holds libfuse's own words."""
    (open_dir / "mnt").mkdir()
    (open_dir / "home").mkdir()
    for path in (open_dir / "mnt", open_dir / "home"):
        os.chown(path, NOBODY, NOBODY)
    script = """
    HOME="$HOME_DIR" XNAT_USER=admin XNAT_PASS=admin $AS_READER \
        "$PY" -m xnatfs.cli mount "$URL" "$MNT" 2>&1
    echo "exit: $?"
    """
    out = run_in_private_namespace(script, "", open_dir, dev_fuse_mode="600",
                                   AS_READER=AS_READER.format(NOBODY),
                                   HOME_DIR=str(open_dir / "home"), URL=demo_server.url,
                                   MNT=str(open_dir / "mnt"))
    log = open_dir / "home" / ".cache" / "xnatfs" / "xnatfs.log"
    assert f"FUSE refused the mount (fuse_session_mount failed) (libfuse gave the reason in {log})" in out
    assert "exit: 1" in out
    assert "failed to open /dev/fuse: Permission denied" in log.read_text()  # fusermount3 says it
    assert not (open_dir / "mnt").is_mount()


def test_config_file_sharing_and_the_other_option_conflict(tmp_path: Path) -> None:
    """``allow_root = true`` in the config and ``--allow-other`` given: refused
    before anything is mounted (libfuse would refuse the pair)."""
    env = make_env(tmp_path)
    config = tmp_path / "config" / "xnatfs" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[mount]\nallow_root = true\n")
    (tmp_path / "mnt").mkdir()
    result = subprocess.run([sys.executable, "-m", "xnatfs.cli", "mount", "http://127.0.0.1:9",
                             str(tmp_path / "mnt"), "--allow-other"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert ("--allow-other and 'allow_root = true' in the config file exclude each other"
            in result.stderr)
    assert not (tmp_path / "mnt").is_mount()


def test_sharing_refusal_reads_fuse_conf(tmp_path: Path) -> None:
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\nmount_max = 1000\n")
    assert sharing_refusal(False, False, euid=1000, fuse_conf=conf) is None
    assert "--allow-root needs" in str(sharing_refusal(False, True, euid=1000, fuse_conf=conf))
    assert sharing_refusal(True, False, euid=0, fuse_conf=conf) is None  # root may
    conf.write_text("  user_allow_other  \n")
    assert sharing_refusal(True, False, euid=1000, fuse_conf=conf) is None
    assert sharing_refusal(True, False, euid=1000, fuse_conf=tmp_path / "missing") is not None
