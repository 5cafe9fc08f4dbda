"""The ``xnatfs`` command: ``mount``, ``umount``, ``demo`` and ``testserver``.

``xnatfs mount`` returns once the mount answers: it starts a detached child
(``--foreground`` runs in this process instead), hands it the credentials on
a pipe (never on argv or in the environment) and waits for its "ready" line.
``xnatfs [URL] MOUNTPOINT -o OPTIONS`` (how mount(8) runs it for an fstab
line of type ``fuse.xnatfs``) is ``xnatfs mount`` with the options as switches.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .status import STATUS_FILE_NAME

if TYPE_CHECKING:
    from .credentials import Credentials

DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xnatfs"


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 10G or 500M)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(float(match.group(1)) * scale[match.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xnatfs", description="Mount an XNAT archive.")
    commands = parser.add_subparsers(dest="command", required=True)

    # No abbreviations: an fstab option such as "debug" must not pass for --debug-fuse.
    mount = commands.add_parser("mount", help="mount an XNAT site (returns once mounted)",
                                allow_abbrev=False)
    mount.add_argument("target", nargs="+", metavar="[URL] MOUNTPOINT",
                       help="site URL (or XNAT_URL / --profile) and the mount point")
    mount.add_argument("--user", help="XNAT user or alias token (the password is prompted)")
    mount.add_argument("--profile", help="profile in ~/.config/xnatfs/config.toml")
    mount.add_argument("--foreground", action="store_true", help="stay attached")
    mount.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                       help=f"block cache location (default {DEFAULT_CACHE_DIR})")
    mount.add_argument("--cache-size", type=parse_size, default=parse_size("10G"),
                       help="disk cache limit (default 10G)")
    mount.add_argument("--shared-cache", type=Path, metavar="DIR",
                       help="shared block cache of a cluster, on a file system the nodes "
                            "share (default: none)")
    mount.add_argument("--shared-cache-max", type=parse_size, metavar="SIZE",
                       help="trim the shared cache to this size (default: no bound; "
                            "or run xnatfs cache prune)")
    mount.add_argument("--metadata-ttl", type=float, default=60.0,
                       help="seconds listings are cached (default 60, minimum 1)")
    mount.add_argument("--read-only", action="store_true", help="mount read-only")
    sharing = mount.add_mutually_exclusive_group()
    sharing.add_argument("--allow-other", action="store_true",
                         help="let every user of this machine read the mount (only you "
                              "can upload); needs user_allow_other in /etc/fuse.conf")
    sharing.add_argument("--allow-root", action="store_true",
                         help="let root read the mount too, e.g. the Docker daemon for "
                              "'docker run -v'; needs user_allow_other in /etc/fuse.conf")
    mount.add_argument("--direct-archive", action="store_true",
                       help="uploads go straight to the archive (XNAT's Direct-Archive)")
    mount.add_argument("--write-behind", action="store_true",
                       help="close() of a loose DICOM file or a file written into a resource "
                            "returns once it is on local disk; it is sent in the background "
                            "(fsync, 'sync FOLDER' and unmount wait for it)")
    mount.add_argument("--allow-overwrite", action="store_true",
                       help="files XNAT has may be replaced (refused otherwise: EPERM)")
    mount.add_argument("--allow-delete", action="store_true",
                       help="files and resources XNAT has may be deleted (refused otherwise)")
    mount.add_argument("--prearchive-ttl", type=float, default=5.0,
                       help="seconds the prearchive listing is cached (default 5)")
    mount.add_argument("--insecure", action="store_true",
                       help="do not verify the server's TLS certificate")
    mount.add_argument("--range", choices=("auto", "on", "off"), default="auto",
                       help="use HTTP Range requests: learn from the first download (auto), or force")
    mount.add_argument("--timeout", type=float, default=30.0,
                       help="seconds before an unanswered request counts as failed; "
                            "a file operation gives up after 4 times as long")
    mount.add_argument("--import-timeout", type=float, default=900.0,
                       help="seconds to wait for XNAT's answer once an upload is sent "
                            "(it imports the whole archive first; default 900)")
    mount.add_argument("--log-level", default="WARNING")
    mount.add_argument("--log-file", type=Path,
                       help="log here (default: stderr in the foreground, "
                            "CACHE_DIR/xnatfs.log in the background)")
    mount.add_argument("--debug-fuse", action="store_true", help=argparse.SUPPRESS)
    mount.add_argument("--credentials-on-stdin", action="store_true", help=argparse.SUPPRESS)
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    # Each action is a parser of its own, so that options may come before or after
    # the ids ("retry --url URL ID" as well as "retry ID --url URL").
    uploads = commands.add_parser("uploads", help="list, retry or discard kept uploads")
    upload_actions = uploads.add_subparsers(dest="action", required=True)
    for action, text in (("list", "list kept uploads"), ("retry", "send kept uploads again"),
                         ("discard", "delete kept uploads")):
        parser_ = upload_actions.add_parser(action, help=text)
        parser_.add_argument("ids", nargs="*", help="upload ids (default: all kept uploads)")
        _add_site_options(parser_)

    prearchive = commands.add_parser("prearchive", help="list, archive, move or delete "
                                                        "prearchive sessions")
    prearchive_actions = prearchive.add_subparsers(dest="action", required=True)
    listing = prearchive_actions.add_parser("list", help="list prearchive sessions")
    listing.add_argument("--project", help="only this project's")
    _add_site_options(listing)
    for action, text in (("archive", "archive a session"),
                         ("move", "move a session to another project's prearchive"),
                         ("delete", "delete a session")):
        parser_ = prearchive_actions.add_parser(action, help=text)
        parser_.add_argument("session", help="/data/prearchive/projects/P/TIMESTAMP/NAME")
        if action != "delete":
            parser_.add_argument("--project", required=action == "move",
                                 help="archive into / move to this project")
        if action == "archive":
            parser_.add_argument("--subject", help="subject label to archive into")
            parser_.add_argument("--label", help="session label to archive as")
        _add_site_options(parser_)

    status = commands.add_parser("status", help="what a mount is doing: requests, bytes, "
                                                 "downloads, uploads, errors")
    status.add_argument("mountpoint", type=Path)
    cache = commands.add_parser("cache", help="look after a cache")
    cache_actions = cache.add_subparsers(dest="action", required=True)
    prune = cache_actions.add_parser(
        "prune", help="bound a shared cache: remove least recently used files, and "
                      "temporaries and claims older than --age")
    prune.add_argument("--shared", type=Path, required=True, metavar="DIR",
                       help="the shared cache folder (as given to --shared-cache)")
    prune.add_argument("--max", type=parse_size, required=True, metavar="SIZE",
                       help="keep at most this much (10G, 500M...)")
    prune.add_argument("--age", type=float, default=3600.0, metavar="SECONDS",
                       help="temporaries and claims older than this are left-overs "
                            "(default 3600)")
    status.add_argument("--json", action="store_true",
                        help=f"print the mount's {STATUS_FILE_NAME} as it is")

    umount = commands.add_parser("umount", help="unmount")
    umount.add_argument("mountpoint", type=Path)

    demo = commands.add_parser("demo", help="start the bundled server with demo data and "
                                            "mount it (Ctrl-C stops both)")
    demo.add_argument("mountpoint", type=Path, nargs="?", default=Path("xnat-demo"))
    demo.add_argument("--data", type=Path, default=DEFAULT_CACHE_DIR / "demo-server")
    demo.add_argument("--port", type=int, default=0, help="server port (default: a free one)")

    testserver = commands.add_parser(
        "testserver", help="run the bundled XNAT-compatible server (tests, demos, benchmarks)")
    from .testing.cli import add_arguments

    add_arguments(testserver)
    return parser


def _add_site_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="site URL (default: XNAT_URL or the profile's)")
    parser.add_argument("--user", help="XNAT user or alias token (the password is prompted)")
    parser.add_argument("--profile", help="profile in ~/.config/xnatfs/config.toml")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--insecure", action="store_true")
    parser.set_defaults(credentials_on_stdin=False)


def run_with_client(args: argparse.Namespace, work):  # noqa: ANN001, ANN202
    """Run ``work(client)`` under trio with a logged-in client for ``args``' site."""
    import trio

    from .client import ClientSettings, XnatClient
    from .credentials import SessionCache
    from .errors import XnatError

    credentials = _resolve_credentials(args, args.url)

    async def main():  # noqa: ANN202
        settings = ClientSettings(verify_tls=not args.insecure)
        async with XnatClient(credentials, settings=settings,
                              session_cache=SessionCache()) as client:
            return await work(client)

    try:
        return trio.run(main)
    except XnatError as exc:
        raise UserError(f"xnatfs: {exc}") from None


# ------------------------------------------------------------------- mount
def _mount_target(args: argparse.Namespace) -> tuple[str | None, Path]:
    if len(args.target) == 2:
        return args.target[0], Path(args.target[1])
    if len(args.target) == 1:
        return None, Path(args.target[0])
    raise UserError("usage: xnatfs mount [URL] MOUNTPOINT")


def _resolve_credentials(args: argparse.Namespace, url: str | None) -> Credentials:
    from .credentials import Credentials, CredentialsError, resolve_credentials

    if args.credentials_on_stdin:
        data = json.loads(sys.stdin.readline())
        return Credentials(data["url"], data["user"], data["password"], "parent process")
    try:
        return resolve_credentials(
            url, user=args.user, profile=args.profile,
            ask_password=lambda site, user: getpass.getpass(f"Password for {user} at {site}: "))
    except CredentialsError as exc:
        raise UserError(f"xnatfs: {exc}") from None


def _apply_config_switches(args: argparse.Namespace, site: str) -> None:
    """Mount switches (``direct_archive``, ``allow_other``...) and values
    (``shared_cache``...) from the config file, unless given here;
    ``args.from_config`` names the switches taken from the file."""
    from .credentials import CredentialsError, mount_switches, mount_values

    try:
        switches = mount_switches(site, args.profile)
        values = mount_values(site, args.profile)
    except CredentialsError as exc:
        raise UserError(f"xnatfs: {exc}") from None
    if args.shared_cache is None and "shared_cache" in values:
        args.shared_cache = Path(values["shared_cache"]).expanduser()
    if args.shared_cache_max is None and "shared_cache_max" in values:
        try:
            args.shared_cache_max = parse_size(values["shared_cache_max"])
        except argparse.ArgumentTypeError as exc:
            raise UserError(f"xnatfs: shared_cache_max in the config file: {exc}") from None
    args.from_config = set()
    for name, value in switches.items():
        if not getattr(args, name):
            setattr(args, name, value)
            if value:
                args.from_config.add(name)


def _check_sharing(args: argparse.Namespace) -> None:
    from .mount import sharing_refusal

    if args.allow_other and args.allow_root:  # one from the config file, one given here
        raise UserError(f"xnatfs: {_switch_name(args, 'allow_other')} and "
                        f"{_switch_name(args, 'allow_root')} exclude each other "
                        "(allow_other already lets root in)")
    switch = "allow_other" if args.allow_other else "allow_root"
    refusal = sharing_refusal(args.allow_other, args.allow_root,
                              named=_switch_name(args, switch))
    if refusal is not None:
        raise UserError(f"xnatfs: {refusal}")


def _switch_name(args: argparse.Namespace, switch: str) -> str:
    """A switch as the user gave it: ``--allow-other``, or the config file's line."""
    if switch in getattr(args, "from_config", ()):
        return f"'{switch} = true' in the config file"
    return "--" + switch.replace("_", "-")


class OneLineFormatter(logging.Formatter):
    """Each message stays one line: control characters in it (a name from the
    server holding a newline or an escape sequence) are shown escaped, so they
    can neither forge log lines nor drive the terminal. Tracebacks keep theirs."""

    # C0 and C1 controls, line and paragraph separators, and the lone surrogates
    # of undecodable bytes (which would also fail the log's encoding).
    _CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return self._CONTROL.sub(lambda m: repr(m.group())[1:-1], super().formatMessage(record))


def _setup_logging(level: str, log_file: Path | None, *, daemon: bool = False) -> None:
    """Log to ``log_file`` or stderr. A ``daemon`` (the background mount, whose
    stderr nobody reads) also sends its stderr there: libfuse prints the reason
    for a refused mount on it."""
    handlers: list[logging.Handler]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if daemon:
            os.dup2(fd, 2)
        handlers = [logging.StreamHandler(os.fdopen(fd, "a", buffering=1))]
    else:
        handlers = [logging.StreamHandler()]
    for handler in handlers:
        handler.setFormatter(OneLineFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True)
    # httpcore's debug lines carry every header, session cookies included.
    logging.getLogger("httpcore").setLevel(max(logging.INFO, logging.getLogger().level))


def mount(args: argparse.Namespace) -> int:
    url, mountpoint = _mount_target(args)
    try:
        is_dir = mountpoint.is_dir()
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:  # a mount whose process died (kill -9)
            raise UserError(f"xnatfs: {mountpoint} holds a dead mount (Transport endpoint "
                            f"is not connected); unmount it first: xnatfs umount "
                            f"{mountpoint}") from None
        raise UserError(f"mount point {mountpoint}: {exc.strerror}") from None
    if not is_dir:
        raise UserError(f"mount point {mountpoint} is not a directory")
    from .mount import mounted_type

    already = mounted_type(mountpoint.resolve())
    if already is not None and already.startswith("fuse"):
        # A second FUSE mount would hide the first, which then cannot be unmounted
        # until this one is.
        raise UserError(f"xnatfs: {mountpoint} is already mounted ({already}); unmount it "
                        f"first: xnatfs umount {mountpoint}")
    credentials = _resolve_credentials(args, url)
    if not args.credentials_on_stdin:  # the parent already applied the config file
        _apply_config_switches(args, credentials.url)
    _check_sharing(args)
    if not args.foreground:
        return _mount_in_background(args, credentials, mountpoint)
    return _mount_in_foreground(args, credentials, mountpoint)


def _mount_in_foreground(args: argparse.Namespace, credentials: Credentials,
                         mountpoint: Path) -> int:
    import trio

    from .errors import XnatError
    from .mount import MountConfig, MountRefused, run_mount

    daemon = args.ready_fd is not None  # started by _mount_in_background
    _setup_logging(args.log_level, args.log_file, daemon=daemon)
    config = MountConfig(credentials=credentials, mountpoint=mountpoint.resolve(),
                         cache_dir=args.cache_dir, cache_size=args.cache_size,
                         metadata_ttl=args.metadata_ttl, read_only=args.read_only,
                         verify_tls=not args.insecure, range_mode=args.range,
                         direct_archive=args.direct_archive, write_behind=args.write_behind,
                         allow_overwrite=args.allow_overwrite, allow_delete=args.allow_delete,
                         prearchive_ttl=args.prearchive_ttl,
                         request_timeout=args.timeout, import_timeout=args.import_timeout,
                         debug_fuse=args.debug_fuse,
                         allow_other=args.allow_other, allow_root=args.allow_root,
                         shared_cache=args.shared_cache, shared_cache_max=args.shared_cache_max)
    ready_pipe = os.fdopen(args.ready_fd, "w") if args.ready_fd is not None else None
    mounted = False

    def on_ready() -> None:
        nonlocal mounted
        mounted = True
        if ready_pipe is not None:
            ready_pipe.write("ready\n")
            ready_pipe.close()

    try:
        trio.run(run_mount, config, on_ready)
    except (XnatError, OSError) as exc:
        if mounted:  # it failed while serving: say so in the log (stderr may be gone)
            logging.getLogger("xnatfs").exception("the mount stopped on an error")
            raise
        message = f"xnatfs: cannot mount {credentials.url}: {exc}"
        if isinstance(exc, MountRefused):
            where = args.log_file if daemon and args.log_file else "the lines above"
            message += f" (libfuse gave the reason in {where})"
        if ready_pipe is not None and not ready_pipe.closed:
            ready_pipe.write(f"error: {message}\n")
            ready_pipe.close()
        raise UserError(message) from None
    except Exception:
        logging.getLogger("xnatfs").exception("the mount stopped on an unexpected error")
        raise
    return 0


def _mount_in_background(args: argparse.Namespace, credentials: Credentials,
                         mountpoint: Path) -> int:
    read_fd, write_fd = os.pipe()
    log_file = args.log_file or (args.cache_dir / "xnatfs.log")
    argv = [sys.executable, "-m", "xnatfs.cli", "mount", str(mountpoint.resolve()),
            "--foreground", "--credentials-on-stdin", "--ready-fd", str(write_fd),
            "--cache-dir", str(args.cache_dir), "--cache-size", str(args.cache_size),
            "--metadata-ttl", str(args.metadata_ttl), "--range", args.range,
            "--timeout", str(args.timeout), "--import-timeout", str(args.import_timeout),
            "--log-level", args.log_level,
            "--prearchive-ttl", str(args.prearchive_ttl),
            "--log-file", str(log_file)]
    if args.read_only:
        argv.append("--read-only")
    if args.direct_archive:
        argv.append("--direct-archive")
    if args.write_behind:
        argv.append("--write-behind")
    if args.allow_overwrite:
        argv.append("--allow-overwrite")
    if args.allow_delete:
        argv.append("--allow-delete")
    if args.insecure:
        argv.append("--insecure")
    if args.allow_other:
        argv.append("--allow-other")
    if args.allow_root:
        argv.append("--allow-root")
    if args.shared_cache is not None:
        argv += ["--shared-cache", str(args.shared_cache.absolute())]
    if args.shared_cache_max is not None:
        argv += ["--shared-cache-max", str(args.shared_cache_max)]
    # The password goes over the pipe only: not left in the daemon's environment
    # (readable in /proc by root, inherited by everything the daemon starts).
    env = {name: value for name, value in os.environ.items() if name != "XNAT_PASS"}
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, pass_fds=(write_fd,),
                             start_new_session=True, env=env)
    os.close(write_fd)
    assert child.stdin is not None
    child.stdin.write(json.dumps({"url": credentials.url, "user": credentials.user,
                                  "password": credentials.password}).encode() + b"\n")
    child.stdin.close()
    with os.fdopen(read_fd) as ready:
        line = ready.readline().strip()
    if line == "ready":
        return 0
    child.wait(timeout=30)
    raise UserError(line.removeprefix("error: ") if line else
                    f"xnatfs: the mount process exited (see {log_file})")


def umount(args: argparse.Namespace) -> int:
    """Unmount, then wait until the mount process has ended: files written
    behind a close (--write-behind) are sent by it after the mount point is
    free, and a batch job that ends right after ``xnatfs umount`` must not
    take them down with it. Ctrl-C stops the waiting, not the sending."""
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if fusermount is None:
        raise UserError("fusermount3 not found (install the fuse3 package)")
    serving = _mount_processes(Path(args.mountpoint))
    result = subprocess.run([fusermount, "-u", str(args.mountpoint)], check=False)
    if result.returncode != 0:
        return result.returncode
    told = False
    started = time.monotonic()
    try:
        while any(_alive(pid) for pid in serving):
            if not told and time.monotonic() - started > 1:
                print("xnatfs: waiting for the mount to send the files it still has queued "
                      "(Ctrl-C stops waiting; they are sent anyway)", file=sys.stderr)
                told = True
            time.sleep(0.1)
    except KeyboardInterrupt:
        return 130
    return 0


def _mount_processes(mountpoint: Path) -> list[int]:
    """This user's xnatfs processes serving ``mountpoint`` (by their command line)."""
    target = str(mountpoint.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            argv = [a.decode(errors="replace")
                    for a in (entry / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if "--foreground" in argv and target in argv and any("xnatfs" in a for a in argv[:3]):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (its parent has not reaped it) has ended too.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


# -------------------------------------------------------------------- demo
def demo(args: argparse.Namespace) -> int:
    """One command for a new user: the bundled server with demo data, mounted."""
    from .testing.harness import TestServer

    args.mountpoint.mkdir(parents=True, exist_ok=True)
    # SIGTERM (kill, timeout, logout) must unmount and stop the server as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server = TestServer(args.data, dataset="demo", port=args.port or None)
    print(f"Starting the bundled XNAT server (demo data in {args.data}) ...", flush=True)
    with server:
        env = dict(os.environ, XNAT_USER="admin", XNAT_PASS="admin")
        cmd = [sys.executable, "-m", "xnatfs.cli", "mount", server.url, str(args.mountpoint)]
        result = subprocess.run(cmd, env=env, check=False)
        if result.returncode != 0:
            return result.returncode
        mp = args.mountpoint
        print(f"""
XNAT demo mounted at {mp} (server {server.url}, user admin/admin). Try:

    ls {mp}
    ls -l {mp}/NEURO_PUB/NP001/NP001_MR1/scans/
    find {mp}/NEURO_PUB -name '*.nii.gz'
    getfattr -d {mp}/NEURO_PUB/NP001/NP001_MR1
    python -c "import nibabel; print(nibabel.load('{mp}/SAMPLES/nibabel_1234/nibabel_1234_MR/resources/NIFTI/files/example4d.nii.gz').shape)"

Press Ctrl-C to unmount and stop the server.""", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("\nUnmounting ...", flush=True)
        finally:
            subprocess.run(["fusermount3", "-u", str(mp)], check=False)
    return 0


# What mount(8) and mount.fuse3 pass every helper; nothing to xnatfs (its
# mounts are always nodev and nosuid, whatever "dev" and "suid" say).
GENERIC_MOUNT_OPTIONS = {
    "defaults", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto", "noauto",
    "user", "users", "nouser", "owner", "group", "_netdev", "nofail", "async", "atime",
    "noatime", "relatime", "diratime", "nodiratime"}
FSTAB_ALIASES = {"ro": "read-only", "xnat-user": "user"}  # "user" means another thing there
NOT_FROM_FSTAB = {"foreground", "debug-fuse", "credentials-on-stdin", "ready-fd"}
NO_SOURCE = {"none", "xnatfs"}  # fstab's placeholders for "the URL comes from the profile"
COMMANDS = {"mount", "umount", "status", "uploads", "prearchive", "cache", "demo",
            "testserver"}


def fstab_arguments(argv: list[str]) -> list[str]:
    """``xnatfs [URL] MOUNTPOINT -o OPTIONS`` is how mount(8) runs us (through
    mount.fuse3) for an fstab line of type ``fuse.xnatfs``: the same as ``xnatfs
    mount``, each option ``name[=value]`` being the switch ``--name[=value]``.
    Other command lines come back as they are."""
    if not argv or argv[0] in COMMANDS or "-o" not in argv:
        return argv
    targets: list[str] = []
    switches: list[str] = []
    words = iter(argv)
    for word in words:
        if word != "-o":
            targets.append(word)
            continue
        for option in next(words, "").split(","):
            name, has_value, value = option.partition("=")
            if (not name or (name in GENERIC_MOUNT_OPTIONS and not has_value)
                    or name.lower().startswith("x-")
                    or name in ("comment", "user")):  # user=NAME: who mounted (util-linux)
                continue
            name = name.replace("_", "-")
            if name in NOT_FROM_FSTAB:
                raise UserError(f"xnatfs: mount option {option!r} cannot be given in fstab")
            name = FSTAB_ALIASES.get(name, name)
            switches.append(f"--{name}={value}" if has_value else f"--{name}")
    if len(targets) == 2 and targets[0] in NO_SOURCE:
        del targets[0]
    return ["mount", *targets, *switches]


def main(argv: list[str] | None = None) -> int:
    try:
        argv = fstab_arguments(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(exc, file=sys.stderr)
        return 1
    args = build_parser().parse_args(argv)
    try:
        if args.command == "mount":
            return mount(args)
        if args.command == "umount":
            return umount(args)
        if args.command == "status":
            from .sitecommands import status_command

            return status_command(args)
        if args.command == "uploads":
            from .sitecommands import uploads_command

            return uploads_command(args)
        if args.command == "prearchive":
            from .sitecommands import prearchive_command

            return prearchive_command(args)
        if args.command == "cache":
            from .sitecommands import cache_command

            return cache_command(args)
        if args.command == "demo":
            return demo(args)
        if args.command == "testserver":
            from .testing.cli import run

            return run(args)
    except UserError as exc:
        print(exc, file=sys.stderr)
        return 1
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
