"""The generated files through the mount: UPLOAD_STATUS.txt and prearchive-info.json.

Their text is made by the mount and changes at any time, so ``stat`` must
always give the size of what a read returns (``tail``, ``wc -c`` and ``rsync``
go by ``st_size``), and they cannot be written or removed on their own.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import Mount, drop_archive, mounted_prearchive


def read_as_tools_do(path: Path) -> bytes:
    """What a tool that trusts ``st_size`` (rsync, ``wc -c``) would copy."""
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        return f.read(size + 1)[:size]


def test_status_file_size_follows_its_text(mount: Mount, tmp_path: Path) -> None:
    status = mount.path / "uploads" / "NEURO_PUB" / "UPLOAD_STATUS.txt"
    before = status.read_bytes()
    assert read_as_tools_do(status) == before
    drop_archive(mount, tmp_path, "gen-status.zip", ("Ge^Nerated", "GEN1"), slices=2,
                          seed=81)
    after = status.read_bytes()
    assert b"gen-status.zip" in after and len(after) > len(before)
    assert read_as_tools_do(status) == after  # no size kept from before the upload
    assert os.stat(status).st_mode & 0o222 == 0  # read-only
    with pytest.raises(OSError) as refused:
        status.write_text("x")
    assert refused.value.errno in (errno.EACCES, errno.EROFS)
    removed = subprocess.run(["rm", "-f", str(status)], capture_output=True, text=True)
    assert removed.returncode != 0 and status.exists()


def test_prearchive_info_is_the_sessions_row(mount: Mount, tmp_path: Path) -> None:
    _, uri = drop_archive(mount, tmp_path, "gen-info.zip", ("In^Fo", "INFO1"), slices=2,
                          seed=82)
    info = mounted_prearchive(mount, uri) / "prearchive-info.json"
    text = read_as_tools_do(info)
    row = json.loads(text)
    assert (row["name"], row["project"], row["uri"]) == ("INFO1", "NEURO_PUB", uri)
    assert os.getxattr(info, "user.xnat.uri") == uri.encode()
    with pytest.raises(OSError) as refused:
        info.write_text("{}")
    assert refused.value.errno in (errno.EACCES, errno.EROFS)
