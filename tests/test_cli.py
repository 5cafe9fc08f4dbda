"""The command line's own helpers (the commands themselves run against real
mounts in tests/mount/test_cli.py)."""

from __future__ import annotations

import logging
import os
import sys

import pytest

from xnatfs.cli import OneLineFormatter, UserError, build_parser, fstab_arguments


def test_log_messages_stay_one_line() -> None:
    """A server's file name with a newline or an escape sequence cannot forge a
    log line or reach the terminal; a traceback keeps its lines."""
    formatter = OneLineFormatter("%(levelname)s %(message)s")
    name = "a.dcm\nERROR forged line\x1b[2J"
    record = logging.LogRecord("xnatfs", logging.WARNING, __file__, 1,
                               "download of %s failed", (name,), None)
    assert formatter.format(record) == (
        "WARNING download of a.dcm\\nERROR forged line\\x1b[2J failed")
    # C1 controls (CSI), Unicode line separators, undecodable bytes (surrogates).
    odd = "b\x9b2J\u2028c" + os.fsdecode(b"\xff")
    record = logging.LogRecord("xnatfs", logging.WARNING, __file__, 1, "%s", (odd,), None)
    assert formatter.format(record) == "WARNING b\\x9b2J\\u2028c\\udcff"
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("xnatfs", logging.ERROR, __file__, 1, "bug in %s", (name,),
                                   sys.exc_info())
    first, *traceback = formatter.format(failed).splitlines()
    assert first == "ERROR bug in a.dcm\\nERROR forged line\\x1b[2J"
    assert traceback[0].startswith("Traceback") and traceback[-1] == "ValueError: boom"


def test_fstab_options_become_mount_switches() -> None:
    """What mount.fuse3 hands ``xnatfs``: generic options dropped, ``name=value``
    as ``--name=value``, ``ro`` and ``xnat_user`` under their own names."""
    argv = fstab_arguments(["https://xnat.example.org", "/mnt/x", "-o",
                            "rw,noauto,user,user=jdoe,_netdev,x-systemd.automount,ro,"
                            "profile=work,cache_dir=/c,allow_root,xnat_user=bob,dev,suid"])
    assert argv == ["mount", "https://xnat.example.org", "/mnt/x", "--read-only",
                    "--profile=work", "--cache-dir=/c", "--allow-root", "--user=bob"]
    args = build_parser().parse_args(argv)
    assert (args.read_only, args.allow_root, args.user, args.profile) == (True, True, "bob",
                                                                          "work")
    assert fstab_arguments(["/mnt/x", "-o", "dev,suid"]) == ["mount", "/mnt/x"]  # no source
    assert fstab_arguments(["mount", "/mnt/x", "-o", "x"]) == ["mount", "/mnt/x", "-o", "x"]
    assert fstab_arguments(["none", "/mnt/x", "-o", ",profile=p,"]) == [
        "mount", "/mnt/x", "--profile=p"]  # fstab's placeholder source; empty items
    for refused in ("foreground", "ready_fd=3", "credentials_on_stdin"):  # the daemon's own
        with pytest.raises(UserError):
            fstab_arguments(["/mnt/x", "-o", refused])
    for unknown in ("debug", "fore", "ready=3", "us=bob", "bogus"):  # no abbreviations
        with pytest.raises(SystemExit):
            build_parser().parse_args(fstab_arguments(["/mnt/x", "-o", unknown]))


@pytest.mark.parametrize("argv", [["uploads", "retry", "--url", "https://x.org", "a1", "b2"],
                                  ["uploads", "retry", "a1", "b2", "--url", "https://x.org"]])
def test_upload_ids_and_options_in_any_order(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.action, args.ids, args.url) == ("retry", ["a1", "b2"], "https://x.org")


def test_prearchive_actions_take_their_own_options() -> None:
    parser = build_parser()
    args = parser.parse_args(["prearchive", "archive", "--subject", "S1",
                              "/data/prearchive/projects/P/T/N", "--label", "S1_MR"])
    assert (args.session, args.subject, args.label) == ("/data/prearchive/projects/P/T/N",
                                                        "S1", "S1_MR")
    with pytest.raises(SystemExit):  # a move needs the project it moves to
        parser.parse_args(["prearchive", "move", "/data/prearchive/projects/P/T/N"])
    with pytest.raises(SystemExit):  # a delete has no labels to give
        parser.parse_args(["prearchive", "delete", "/data/prearchive/projects/P/T/N",
                           "--subject", "S1"])
