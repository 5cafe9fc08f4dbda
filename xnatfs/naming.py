"""Turning XNAT labels into file names, and back.

Names come from the server and are never trusted as paths: a label with
``/`` or NUL, or one that is ``.``, ``..`` or empty, is percent-encoded into
a single safe component. ``%`` itself is encoded too, so the mapping is
reversible and labels without these characters (nearly all, since XNAT's
importers produce ``[\\w-]+``) keep their names.
"""

from __future__ import annotations

import re

_ESCAPES = {"%": "%25", "/": "%2F", "\x00": "%00"}
_SPECIAL = {"": "%", ".": "%2E", "..": "%2E%2E"}
_REVERSE_SPECIAL = {v: k for k, v in _SPECIAL.items()}


def safe_name(label: str) -> str:
    """One path component standing for ``label``."""
    if label in _SPECIAL:
        return _SPECIAL[label]
    return "".join(_ESCAPES.get(ch, ch) for ch in label)


def label_from_name(name: str) -> str:
    """The inverse of :func:`safe_name`."""
    if name in _REVERSE_SPECIAL:
        return _REVERSE_SPECIAL[name]
    return re.sub(r"%(25|2F|00)", lambda m: {"25": "%", "2F": "/", "00": "\x00"}[m.group(1)],
                  name)


def scan_folder_name(scan_id: str, scan_type: str) -> str:
    """``<ID>-<type>`` with the type sanitised as XNAT's zip download does (``\\W`` → ``_``)."""
    if not scan_type:
        return safe_name(scan_id)
    return safe_name(f"{scan_id}-{re.sub(r'[^A-Za-z0-9_]', '_', scan_type)}")
