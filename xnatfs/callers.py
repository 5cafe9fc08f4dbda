"""What the processes writing into the mount are doing, read from ``/proc``.

FUSE does not say why a file is closed: ``cp`` finishing and ``cp`` killed by
Ctrl-C both end in one FLUSH, and sending a half-written DICOM file would
import it as if whole (XNAT reads the header and stores the rest as it
comes). A process dying of a signal has flagged itself exiting and recorded
the signal before its files are closed, so a flush can tell the two apart.
pyfuse3 gives a flush no caller, so the mount asks about the process that
opened the file for writing (for ``cp``, ``rsync`` and shells, the one that
closes it).
"""

from __future__ import annotations

import signal

PF_EXITING = 0x4  # include/linux/sched.h: set by do_exit() before the files are closed
_FLAGS = 9 - 3       # /proc/PID/stat fields after "(comm)", counted from field 3
_EXIT_CODE = 52 - 3  # the status waitpid() will report; 0 until the process exits


def killed_by(pid: int | None) -> int | None:
    """The signal ``pid`` is dying of, if it is exiting because of one (None when
    it is alive, exits normally, or is gone)."""
    stat = _proc_file(pid, "stat")
    if stat is None:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()  # the name may hold spaces and ")"
    try:
        flags, exit_code = int(fields[_FLAGS]), int(fields[_EXIT_CODE])
    except (IndexError, ValueError):
        return None
    if not flags & PF_EXITING:
        return None
    return (exit_code & 0x7F) or None


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# Signals whose default action is not to end the process: one of them pending
# (and not caught) does not stop a wait.
_HARMLESS_BY_DEFAULT = {signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH,
                        signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}


def interrupted(pid: int | None) -> bool:
    """Whether ``pid`` has a signal pending that should end its wait in the mount:
    SIGKILL, a signal it handles (it expects EINTR), or one that ends it
    (Ctrl-C). The kernel holds such a process until the mount answers, and
    pyfuse3 passes on no FUSE INTERRUPT, so the mount asks instead."""
    status = _proc_file(pid, "status")
    if status is None:
        return False
    masks: dict[bytes, int] = {}
    for line in status.splitlines():
        key, _, value = line.partition(b":")
        if key in (b"SigPnd", b"ShdPnd", b"SigBlk", b"SigIgn", b"SigCgt"):
            masks[key] = int(value.strip(), 16)
    pending = (masks.get(b"SigPnd", 0) | masks.get(b"ShdPnd", 0)) & ~masks.get(b"SigIgn", 0)
    if pending & _bit(signal.SIGKILL):
        return True
    pending &= ~masks.get(b"SigBlk", 0)
    for number in range(1, 65):
        if pending & _bit(number) and (masks.get(b"SigCgt", 0) & _bit(number)
                                       or number not in _HARMLESS_BY_DEFAULT):
            return True
    return False


def _bit(number: int) -> int:
    return 1 << (number - 1)


def _proc_file(pid: int | None, name: str) -> bytes | None:
    """``/proc/PID/NAME``, or None when there is no such process (any more)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return None
