"""The rules of tests/mount/test_model.py that write into XNAT: results into
resources (mkdir, create/write/close, a temporary renamed into place, refused
overwrites and moves, unlink, rmdir) and a zip into uploads/, read back from
prearchive/. A mixin of :class:`~.test_model.MountModel`, whose state and
checks it uses; its ``teardown`` checks that no write was lost."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from xnatfs.spoolfiles import kept_uploads
from xnatfs.testing.imaging import synthetic_study, write_dicom_archive

from .model_setup import INDEX, PROJECT, RESOURCE, WRITE_SESSION, WRITE_URI, content
from .model_world import Versions, Violation, md5


class WriteRules:
    """Writes through the mount, each checked against XNAT's listings and the spool."""

    # Set by MountModel (see there).
    w: Any
    mnt: Path
    judge: Any
    xnat: Any
    example: int
    files: dict[str, Versions]
    resources: dict[str, Versions]
    written: dict[str, bytes]
    attempts: list[tuple[str, bytes]]
    uploaded: dict[str, dict[str, bytes]]
    uploads: int
    allowed_failure: Any
    changed: Any
    new_name: Any
    pick: Any

    # ------------------------------------------------------ writes into XNAT
    def label(self, k: int) -> str:
        return f"E{self.example}_R{k}"

    def resource_for_writing(self, k: int) -> str:
        """An example's resource label; made first (``mkdir -p``, as a pipeline
        does) when XNAT does not have it, so that most writes have a place to go."""
        label = self.label(k)
        if not self.resources.get(label, Versions(None)).current:
            self.make_resource(k)
        return label

    def own_resources(self) -> list[str]:
        return sorted(lab for lab, v in self.resources.items()
                      if v.current and lab.startswith(f"E{self.example}_"))

    @rule(k=RESOURCE)
    def make_resource(self, k: int) -> None:
        label = self.label(k)
        exists = bool(self.resources.get(label, Versions(None)).current)
        started, result = self.judge.run(
            "mkdir", lambda: os.mkdir(self.mnt / WRITE_SESSION / "resources" / label))
        if exists:
            if not isinstance(result, OSError):
                raise Violation(f"mkdir of {label}, which XNAT has, returned 0")
            if result.errno != errno.EEXIST:
                self.allowed_failure(f"mkdir of existing {label}", started, result)
            return
        truth = label in self.xnat.resource_labels(WRITE_URI)
        if isinstance(result, OSError):
            self.allowed_failure(f"mkdir {label}", started, result)
            self.resources.setdefault(label, Versions(None)).change(truth or None,
                                                                     self.changed())
            return
        if not truth:
            raise self.judge.lost(f"mkdir {label} returned 0 but XNAT has no such resource")
        self.resources.setdefault(label, Versions(None)).change(True, time.monotonic())

    def write_one(self, label: str, name: str, data: bytes) -> tuple[str, float, Any]:
        path = f"{WRITE_SESSION}/resources/{label}/files/{name}"
        stage = ["open"]

        def write() -> None:
            with open(self.mnt / path, "wb") as f:
                stage[0] = "close"
                f.write(data)

        started, result = self.judge.run("write", write)
        return path, started, (result, stage[0])

    def settle_write(self, label: str, path: str, data: bytes, started: float,
                     outcome: tuple[Any, str]) -> None:
        """Hold a finished write to the invariants, and note what the mount now shows."""
        result, stage = outcome
        name = path.rsplit("/", 1)[1]
        if self.no_resource(label, path, started, result):
            return
        listed = self.xnat.listing(f"{WRITE_URI}/resources/{label}")
        if not isinstance(result, OSError):
            if listed.get(name) != (md5(data), len(data)):
                raise self.judge.lost(f"close of {path} returned 0 but XNAT lists "
                                      f"{listed.get(name)}, not {(md5(data), len(data))}")
            self.attempts.append((path, data))
            self.written[path] = data
            self.files[path] = Versions(data)
            return
        exists = self.resources.get(label, Versions(None)).acceptable(started)
        self.allowed_failure(f"write of {path} (at {stage})", started, result,
                             {errno.ENOENT} if None in exists else set())
        if stage == "open":  # nothing was written: nothing to keep
            self.files[path] = Versions(None)
            return
        self.attempts.append((path, data))
        self.check_not_lost(path, data, listed)
        self.files[path] = Versions(data)  # kept: read from its local copy, or from XNAT

    def no_resource(self, label: str, path: str, started: float, result: Any) -> bool:
        """A write into a resource the model says XNAT does not have: the mount
        has no files/ folder there (ENOENT). True if so (and checked)."""
        exists = self.resources.get(label, Versions(None)).acceptable(started)
        if True in exists:
            return False
        if not isinstance(result, OSError):
            raise Violation(f"a write into {label}, which XNAT does not have, returned 0")
        if result.errno != errno.ENOENT:
            self.allowed_failure(f"write of {path}", started, result)
        self.files[path] = Versions(None)
        return True

    def check_not_lost(self, path: str, data: bytes, listed: dict[str, tuple[str, int]]) -> None:
        name = path.rsplit("/", 1)[1]
        if listed.get(name) == (md5(data), len(data)):
            return
        kept = [(rec, where) for rec, where in kept_uploads(self.w.mount.cache_dir / "uploads")
                if rec.relpath.endswith(path.split("/resources/", 1)[1])]
        if not any(md5((where / "data").read_bytes()) == md5(data) for _, where in kept):
            listing = subprocess.run(
                [sys.executable, "-m", "xnatfs.cli", "uploads", "list", "--cache-dir",
                 str(self.w.mount.cache_dir)], env=self.w.mount.env, capture_output=True,
                text=True, timeout=60).stdout
            raise self.judge.lost(f"write of {path} failed, XNAT lists {listed.get(name)} and "
                                  f"the spool keeps no copy: lost. uploads list:\n{listing}")

    @rule(k=RESOURCE, size=st.sampled_from([0, 1, 100, 5000, 70000]))
    def write_file(self, k: int, size: int) -> None:
        label = self.resource_for_writing(k)
        name = self.new_name()
        body = content(name, size)
        path, started, outcome = self.write_one(label, name, body)
        self.settle_write(label, path, body, started, outcome)

    @rule(ks=st.lists(RESOURCE, min_size=2, max_size=4))
    def write_in_parallel(self, ks: list[int]) -> None:
        """Several writers at once, into one resource or several (one writer per
        catalog is the mount's business)."""
        jobs = []
        for k in ks:
            label = self.resource_for_writing(k)
            name = self.new_name()
            jobs.append((label, name, content(name, 3000 + len(jobs))))
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda j: self.write_one(*j), jobs))
        for (label, _, body), (path, started, outcome) in zip(jobs, results):
            self.settle_write(label, path, body, started, outcome)

    @rule(k=RESOURCE)
    def rename_into_place(self, k: int) -> None:
        """A temporary (kept locally, never sent) renamed to its final name: sent then."""
        label = self.resource_for_writing(k)
        final = self.new_name()
        temporary = final + ".tmp"
        body = content(final, 2048)
        tmp_path, started, outcome = self.write_one(label, temporary, body)
        if self.no_resource(label, tmp_path, started, outcome[0]):
            return
        if isinstance(outcome[0], OSError):
            self.allowed_failure(f"write of {tmp_path}", started, outcome[0])
            self.files[tmp_path] = Versions(None)
            self.files[tmp_path].change(body, float("inf"))
            return
        listed = self.xnat.listing(f"{WRITE_URI}/resources/{label}")
        if temporary in listed:
            raise Violation(f"the temporary {tmp_path} was sent to XNAT")
        path = tmp_path[:-len(".tmp")]
        started, result = self.judge.run(
            "rename", lambda: os.rename(self.mnt / tmp_path, self.mnt / path))
        listed = self.xnat.listing(f"{WRITE_URI}/resources/{label}")
        if isinstance(result, OSError):
            self.allowed_failure(f"rename of {tmp_path}", started, result)
            # Unchanged, or sent: either way not lost.
            if listed.get(final) != (md5(body), len(body)):
                self.check_not_lost(tmp_path, body, listed)
            self.files[tmp_path] = Versions(None)
            self.files[tmp_path].change(body, float("inf"))
            self.files[path] = Versions(None)
            self.files[path].change(body, float("inf"))
            return
        if listed.get(final) != (md5(body), len(body)) or temporary in listed:
            raise self.judge.lost(f"rename into {path} returned 0 but XNAT lists "
                                  f"{listed.get(final)} (temporary listed: {temporary in listed})")
        self.written[path] = body
        self.files[path] = Versions(body)
        self.files[tmp_path] = Versions(None)

    def confirmed(self) -> list[str]:
        return sorted(p for p, d in self.written.items()
                      if self.files[p].current is not None and self.files[p].settled(0))

    @rule(index=INDEX, how=st.sampled_from(["overwrite", "move"]))
    def refused(self, index: int, how: str) -> None:
        """What XNAT has is protected: no replacing without --allow-overwrite; a
        move is a copy and a delete (EXDEV)."""
        path = self.pick(self.confirmed(), index)
        if path is None:
            return
        if how == "overwrite":
            def operation() -> None:
                with open(self.mnt / path, "wb") as f:
                    f.write(b"must not reach XNAT")
            expected = errno.EPERM
        else:
            def operation() -> None:
                os.rename(self.mnt / path, self.mnt / (path + ".moved"))
            expected = errno.EXDEV
        started, result = self.judge.run("refused", operation)
        if not isinstance(result, OSError):
            raise Violation(f"{how} of {path}, which XNAT has, was not refused")
        if result.errno != expected:
            self.allowed_failure(f"{how} of {path}", started, result)
        label = path.split("/resources/", 1)[1].split("/", 1)[0]
        listed = self.xnat.listing(f"{WRITE_URI}/resources/{label}")
        data_now = self.written[path]
        if listed.get(path.rsplit("/", 1)[1]) != (md5(data_now), len(data_now)):
            raise self.judge.lost(f"a refused {how} changed {path} in XNAT: {listed}")

    @rule(index=INDEX)
    def unlink(self, index: int) -> None:
        path = self.pick(self.confirmed(), index)
        if path is None:
            return
        started, result = self.judge.run("unlink", lambda: os.unlink(self.mnt / path))
        label = path.split("/resources/", 1)[1].split("/", 1)[0]
        listed = self.xnat.listing(f"{WRITE_URI}/resources/{label}")
        name = path.rsplit("/", 1)[1]
        if isinstance(result, OSError):
            self.allowed_failure(f"unlink of {path}", started, result)
            self.files[path].change(self.written[path] if name in listed else None,
                                    self.changed())
            return
        if name in listed:
            raise Violation(f"unlink of {path} returned 0 but XNAT still lists it")
        self.files[path].change(None, time.monotonic())

    @rule(index=INDEX)
    def remove_resource(self, index: int) -> None:
        label = self.pick(self.own_resources(), index)
        if label is None:
            return
        inside = [p for p, v in self.files.items()
                  if p.startswith(f"{WRITE_SESSION}/resources/{label}/")
                  and any(x is not None for x in v.acceptable(time.monotonic()))]
        started, result = self.judge.run(
            "rmdir", lambda: os.rmdir(self.mnt / WRITE_SESSION / "resources" / label))
        truth = label in self.xnat.resource_labels(WRITE_URI)
        if inside:
            if not isinstance(result, OSError):
                raise Violation(f"rmdir of {label} with files {inside} returned 0")
            if result.errno != errno.ENOTEMPTY:
                self.allowed_failure(f"rmdir of {label}", started, result)
            if not truth:
                raise self.judge.lost(f"a refused rmdir of {label} deleted it in XNAT")
            return
        if isinstance(result, OSError):
            self.allowed_failure(f"rmdir of {label}", started, result)
            self.resources[label].change(truth or None, self.changed())
            return
        if truth:
            raise Violation(f"rmdir of {label} returned 0 but XNAT still has it")
        self.resources[label].change(None, time.monotonic())

    # ---------------------------------------------------- uploads, prearchive
    @precondition(lambda self: self.uploads < 1)
    @rule(slices=st.integers(1, 3))
    def upload_zip(self, slices: int) -> None:
        """cp of a DICOM zip into uploads/: done means the prearchive has every file."""
        self.uploads += 1
        patient = f"MODEL{self.example}U{self.uploads}"
        scratch = self.w.mount.cache_dir.parent / "zips"
        scratch.mkdir(exist_ok=True)
        archive = scratch / f"{patient}.zip"
        write_dicom_archive(archive, synthetic_study("Model^Test", patient, slices=slices,
                                                     rows=16, cols=16, seed=self.example))
        with zipfile.ZipFile(archive) as zf:
            members = {md5(zf.read(n)) for n in zf.namelist()}
        target = self.mnt / "uploads" / PROJECT
        started, result = self.judge.run("upload", lambda: shutil.copy(archive, target))
        sessions = self.xnat.prearchive_names(PROJECT)
        if isinstance(result, OSError):
            self.allowed_failure(f"upload of {archive.name}", started, result)
            if patient not in sessions:
                kept = [rec for rec, _ in kept_uploads(self.w.mount.cache_dir / "uploads")
                        if rec.relpath.endswith(archive.name)]
                if not kept:
                    raise self.judge.lost(f"upload of {archive.name} failed, XNAT has no "
                                          "session of it and the spool keeps none")
            return
        uri = os.getxattr(target / archive.name, "user.xnatfs.upload.result").decode().split()[0]
        if sessions.get(patient) != uri:
            raise self.judge.lost(f"upload of {archive.name} returned 0; the prearchive has "
                                  f"{sessions.get(patient)}, the mount said {uri}")
        files = self.xnat.prearchive_files(uri)
        if {md5(d) for d in files.values()} != members:
            raise self.judge.lost(f"the prearchive's copy of {archive.name} differs from it")
        self.uploaded[uri] = files

    @rule(index=INDEX, which=INDEX)
    def read_prearchive(self, index: int, which: int) -> None:
        uri = self.pick(sorted(self.uploaded), index)
        if uri is None:
            return
        key = self.pick(sorted(self.uploaded[uri]), which)
        assert key is not None
        scan_id, name = key.split("/", 1)
        session = self.mnt / "prearchive" / Path(*uri.split("/")[4:])

        def read() -> bytes:
            [scan] = [s for s in os.listdir(session / "scans") if s.split("-", 1)[0] == scan_id]
            return (session / "scans" / scan / "resources/DICOM/files" / name).read_bytes()

        started, result = self.judge.run("read", read)
        if isinstance(result, OSError):
            self.allowed_failure(f"read of prearchive {key}", started, result)
        elif result != self.uploaded[uri][key]:
            raise self.judge.wrong(f"wrong bytes from prearchive {uri} {key}")


    def teardown(self) -> None:
        """None lost: every write this example tried is in XNAT or kept."""
        self.xnat.calm()
        by_label: dict[str, dict[str, tuple[str, int]]] = {}
        for path, data in self.attempts:
            label = path.split("/resources/", 1)[1].split("/", 1)[0]
            listed = by_label.setdefault(label, self.xnat.listing(f"{WRITE_URI}/resources/{label}"))
            if path in self.written and self.files[path].current is not None:
                if listed.get(path.rsplit("/", 1)[1]) != (md5(data), len(data)):
                    raise self.judge.lost(f"{path}, confirmed, is no longer in XNAT: {listed}")
            elif path not in self.written:
                self.check_not_lost(path, data, listed)
