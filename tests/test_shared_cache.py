"""The shared cache tier's file-system side (:mod:`xnatfs.blockcache.shared`):
publishing by rename, the checks a reader makes, claims, pruning. Several
``SharedCache`` objects on one folder stand for several nodes."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from xnatfs.blockcache.shared import (
    CLAIM_STALE,
    HEADER_SIZE,
    Lookup,
    SharedCache,
    prune,
)

BS = 1024
KEY = "ab" + "0" * 38
OTHER = "cd" + "1" * 38


@pytest.fixture
def tier(tmp_path: Path) -> SharedCache:
    shared = SharedCache(tmp_path / "shared", BS)
    shared.prepare()
    return shared


def block(n: int, length: int = BS) -> bytes:
    return bytes((n + i) % 251 for i in range(length))


def test_a_published_block_is_read_back_by_another_node(tier: SharedCache) -> None:
    other = SharedCache(tier.root, BS)
    assert tier.read_or_claim(KEY, 0, BS) is Lookup.CLAIMED
    assert other.read_or_claim(KEY, 0, BS) is Lookup.BUSY  # the first node is on it
    assert tier.publish(KEY, 0, block(0))
    assert other.read_or_claim(KEY, 0, BS) == block(0)
    folder = tier.folder(KEY)
    assert sorted(os.listdir(folder)) == ["0"]  # the claim went with the publication
    assert stat.S_IMODE(folder.stat().st_mode) == 0o2770
    assert stat.S_IMODE(tier.entry(KEY, 0).stat().st_mode) == 0o640
    assert folder.parent == tier.root / "v1" / f"b{BS}" / "ab"


def test_a_short_last_block_is_checked_against_its_own_length(tier: SharedCache) -> None:
    tier.publish(KEY, 3, block(3, 100))
    assert tier.read_or_claim(KEY, 3, 100) == block(3, 100)


@pytest.mark.parametrize("damage", ["truncate", "flip", "wrong length asked"])
def test_a_damaged_entry_is_reported_removed_and_claimed_again(tier: SharedCache,
                                                               damage: str) -> None:
    tier.publish(KEY, 1, block(1))
    path = tier.entry(KEY, 1)
    raw = bytearray(path.read_bytes())
    assert len(raw) == HEADER_SIZE + BS
    length = BS
    if damage == "truncate":
        path.write_bytes(raw[:-10])
    elif damage == "flip":
        raw[HEADER_SIZE + 500] ^= 0x01
        path.write_bytes(raw)
    else:
        length = BS - 1  # a file of another size under the same key cannot happen; still refused
    assert tier.read_or_claim(KEY, 1, length) is Lookup.BAD
    assert not path.exists()
    assert tier.read_or_claim(KEY, 1, length) is Lookup.CLAIMED


def test_a_stale_claim_is_taken_over(tier: SharedCache) -> None:
    other = SharedCache(tier.root, BS)
    assert other.read_or_claim(KEY, 2, BS) is Lookup.CLAIMED  # and then that node died
    claim = tier.folder(KEY) / "2.claim"
    assert claim.read_text().split()[1] == str(os.getpid())  # host, pid, time
    old = time.time() - CLAIM_STALE - 1
    os.utime(claim, (old, old))
    assert tier.read_or_claim(KEY, 2, BS) is Lookup.CLAIMED
    assert claim.stat().st_mtime > old


def test_a_claim_released_after_a_failed_download_frees_the_block(tier: SharedCache) -> None:
    other = SharedCache(tier.root, BS)
    assert tier.read_or_claim(KEY, 0, BS) is Lookup.CLAIMED
    tier.release(KEY, 0)
    assert other.read_or_claim(KEY, 0, BS) is Lookup.CLAIMED


def test_keys_are_hex_digests_never_paths(tier: SharedCache) -> None:
    for key in ("../../etc", "ab/../../x", "", "AB" + "0" * 38):
        with pytest.raises(ValueError):
            tier.folder(key)


def test_drop_file_removes_published_blocks_only(tier: SharedCache) -> None:
    tier.publish(KEY, 0, block(0))
    tier.publish(KEY, 1, block(1))
    assert tier.claim(KEY, 2)
    assert not tier.claim(KEY, 2)
    tier.drop_file(KEY)
    assert os.listdir(tier.folder(KEY)) == ["2.claim"]


def test_prune_removes_least_recently_used_files_and_old_leftovers(tier: SharedCache) -> None:
    keys = [f"{i:02x}" + f"{i:x}" * 38 for i in range(1, 6)]
    now = time.time()
    for key in keys:
        tier.publish(key, 0, block(0))
        tier.publish(key, 1, block(1))
    old_temporary = tier.folder(keys[0]) / ".tmp-host-1-abc"
    old_temporary.write_bytes(b"half a block")
    os.utime(old_temporary, (now - 7200, now - 7200))
    fresh_temporary = tier.folder(keys[1]) / ".tmp-host-2-def"
    fresh_temporary.write_bytes(b"being written")
    old_claim = tier.folder(keys[2]) / "7.claim"
    old_claim.write_bytes(b"")
    os.utime(old_claim, (now - 7200, now - 7200))
    for age, key in enumerate(keys):  # keys[0] used last (a folder's mtime is its last use)
        os.utime(tier.folder(key), (now - 100 * age, now - 100 * age))
    per_file = 2 * (HEADER_SIZE + BS)

    report = prune(tier.root, 2 * per_file + 1, max_age=3600, now=now)

    kept = [key for key in keys if tier.entry(key, 0).exists()]
    assert kept == keys[:2]  # the two most recently used
    assert report.kept_bytes == 2 * per_file
    assert report.removed_bytes == 3 * per_file and report.removed_files == 6
    assert not old_temporary.exists() and not old_claim.exists()
    assert fresh_temporary.exists()  # perhaps still being written
    assert report.removed_temporaries == 2
    assert not tier.folder(keys[4]).exists()  # emptied folders go too
    # Concurrent pruners: a second one finds nothing more to do.
    again = prune(tier.root, 2 * per_file + 1, max_age=3600, now=now)
    assert again.removed_bytes == 0 and again.kept_bytes == 2 * per_file


def test_publishing_into_a_folder_pruned_meanwhile_makes_it_again(tier: SharedCache) -> None:
    tier.publish(KEY, 0, block(0))
    prune(tier.root, 0)
    assert not tier.folder(KEY).exists()
    tier.publish(KEY, 1, block(1))
    assert tier.read_or_claim(KEY, 1, BS) == block(1)
