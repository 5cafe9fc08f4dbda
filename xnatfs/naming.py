"""Turning XNAT labels into file names, and back.

Names come from the server and are never trusted as paths: a label with
``/``, NUL or other control characters (a newline would split ``ls``'s output
and forge log lines), or one that is ``.``, ``..`` or empty, is
percent-encoded into a single safe component. ``%`` itself is encoded too, so
the mapping is reversible and labels without these characters (nearly all,
since XNAT's importers produce ``[\\w-]+``) keep their names. A lone
surrogate, which has no UTF-8 form, is percent-encoded too. A name longer
than the kernel's 255 bytes is cut short and ends in a hash of the whole
label, so that it can still be listed, opened and copied.
"""

from __future__ import annotations

import hashlib
import logging
import re

from .errors import BadRequest

log = logging.getLogger(__name__)

NAME_MAX = 255  # bytes in one path component (Linux)
_CONTROL = [*range(0x20), 0x7F]
_ESCAPES = {"%": "%25", "/": "%2F", **{chr(c): f"%{c:02X}" for c in _CONTROL}}
_UNESCAPES = {code[1:]: ch for ch, code in _ESCAPES.items()}
_ESCAPED = re.compile(r"%(25|2F|[01][0-9A-F]|7F)")
_NOT_IN_LABEL = re.compile(r"[^A-Za-z0-9_-]")  # XNAT turns each of these into _
_SPECIAL = {"": "%", ".": "%2E", "..": "%2E%2E"}
_REVERSE_SPECIAL = {v: k for k, v in _SPECIAL.items()}


def safe_name(label: str) -> str:
    """One path component standing for ``label``."""
    if label in _SPECIAL:
        return _SPECIAL[label]
    name = "".join(_ESCAPES.get(ch) or (_surrogate(ch) if _is_surrogate(ch) else ch)
                   for ch in label)
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        name = _shortened(name, label)
    return name


def _is_surrogate(ch: str) -> bool:
    return "\ud800" <= ch <= "\udfff"


def _surrogate(ch: str) -> str:
    """A lone surrogate (JSON allows ``"\\ud800"``) has no UTF-8 form: written as
    the bytes Java would give it, percent-encoded."""
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))


def _shortened(name: str, label: str) -> str:
    """``name`` cut to fit NAME_MAX bytes, ending in ``%~`` and a hash of ``label``."""
    tag = "%~" + hashlib.sha256(label.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    room = NAME_MAX - len(tag)
    head = name.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")
    return head + tag


def label_from_name(name: str) -> str:
    """The inverse of :func:`safe_name` (for names short enough to be whole)."""
    if name in _REVERSE_SPECIAL:
        return _REVERSE_SPECIAL[name]
    return _ESCAPED.sub(lambda m: _UNESCAPES[m.group(1)], name)


def scan_folder_name(scan_id: str, scan_type: str) -> str:
    """``<ID>-<type>`` with the type sanitised as XNAT's zip download does (``\\W`` → ``_``)."""
    if not scan_type:
        return safe_name(scan_id)
    return safe_name(f"{scan_id}-{re.sub(r'[^A-Za-z0-9_]', '_', scan_type)}")


def require_label(label: str, what: str) -> str:
    """``label``, when XNAT would keep it as given. Its importers and archiver
    replace every character but letters, digits, ``_`` and ``-`` with ``_``, so
    a subject made as ``My Sub`` would appear as ``My_Sub``: refused instead.

    Raises:
        BadRequest: (EINVAL) the label is not one XNAT keeps; the log says why.
    """
    message = label_problem(label, what)
    if message is not None:
        log.warning("refused: %s", message)
        raise BadRequest(message)
    return label


def label_problem(label: str, what: str) -> str | None:
    """Why XNAT would not keep ``label`` as given (see :func:`require_label`), or None."""
    if label and not _NOT_IN_LABEL.search(label):
        return None
    cleaned = _NOT_IN_LABEL.sub("_", label)
    return (f"{what} label {label!r}: XNAT labels are ASCII letters, digits, "
            f"'_' and '-' only (XNAT would make it {cleaned!r})")
