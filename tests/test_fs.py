"""The FUSE layer's contract with pyfuse3: an exception other than FUSEError
escaping any handler ends ``pyfuse3.main()``, which is the whole mount."""

from __future__ import annotations

import inspect
import logging
from collections import Counter

import pyfuse3
import pytest
import trio

from xnatfs.deadlines import Deadlines
from xnatfs.fs import Operations, fuse_errors


def test_every_handler_maps_its_errors() -> None:
    """Each request handler we define answers with an errno whatever goes wrong
    (release, statfs and the xattr setters once were not wrapped)."""
    unwrapped = [
        name for name, handler in vars(Operations).items()
        if hasattr(pyfuse3.Operations, name) and inspect.iscoroutinefunction(handler)
        and name != "forget" and getattr(handler, "__wrapped__", None) is None]
    assert unwrapped == []


class _FailingTree:
    def forget(self, inode: int, count: int) -> bool:
        raise RuntimeError("a bug")


async def test_a_failing_forget_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """A forget has no reply to carry an errno: a bug in it is logged, and the
    mount lives on."""
    async with trio.open_nursery() as nursery:
        ops = Operations(_FailingTree(), Deadlines(), nursery=nursery)  # type: ignore[arg-type]
        with caplog.at_level(logging.ERROR, logger="xnatfs.fs"):
            await ops.forget([(5, 1)])
    assert "bug in forget" in caplog.text


async def test_a_bug_in_a_handler_becomes_eio(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        deadlines = Deadlines(op_timeout=5.0, upload_timeout=5.0)
        failures: Counter[str] = Counter()
        failed = Operations.failed

        @fuse_errors
        async def statfs(self, ctx: object) -> None:
            raise KeyError("oops")

    with caplog.at_level(logging.ERROR, logger="xnatfs.fs"), \
            pytest.raises(pyfuse3.FUSEError) as info:
        await Broken().statfs(None)  # type: ignore[arg-type]
    assert info.value.errno == 5 and "bug in statfs" in caplog.text
    assert Broken.failures == {"EIO": 1}  # the status file's errors
