"""What can go wrong talking to XNAT, and the errno each failure becomes.

Every layer raises these and only these for remote failures; ``fs.py`` turns
them into ``FUSEError(errno_for(exc))``. Anything else (a ``KeyError``, a
``TypeError``) is a bug and must propagate, never become an errno::

    XnatError                 the server's status and message, if it answered
    ├── NotFound              404: no such project, subject, session or file
    ├── Forbidden             403: visible but not readable or writable
    ├── AuthenticationFailed  401 after a fresh login: bad or revoked credentials
    ├── Conflict              409: it already exists, or is locked
    ├── BadRequest            any other 4xx: XNAT refused what we asked
    ├── ServerError           5xx that outlived the retries, or an unusable answer
    ├── Unreachable           no (complete) answer in time, after the retries
    ├── TlsFailure            the server's certificate is refused, or it speaks no TLS
    ├── Stale                 the object changed under us (size or digest differ)
    ├── ReadOnly              a write to archived content, which the mount refuses
    ├── NoSpace               the local disk holding an upload's copy is full
    └── Refused               the mount itself refuses the operation (no request sent)
        ├── NotPermitted      not done here, and never will be: EPERM
        ├── CrossDevice       a move that ``mv`` should do as a copy: EXDEV
        ├── Busy              being written or sent: EBUSY
        ├── NotEmpty          a folder with entries: ENOTEMPTY
        ├── Exists            the name is taken: EEXIST
        ├── IsADirectory, NotADirectory
        ├── InvalidArgument   EINVAL (not BadRequest, which a rename turns into EPERM)
        ├── BadHandle         EBADF
        ├── NoAttribute       ENOATTR
        └── NotSupported      ENOTSUP

Adding a class means adding it to :data:`ERRNO_BY_ERROR`; a test checks that
every subclass has an entry.
"""

from __future__ import annotations

import errno

__all__ = [
    "ERRNO_BY_ERROR",
    "AuthenticationFailed",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "BadHandle",
    "Busy",
    "CrossDevice",
    "Exists",
    "InvalidArgument",
    "IsADirectory",
    "NoAttribute",
    "NoSpace",
    "NotADirectory",
    "NotEmpty",
    "NotPermitted",
    "NotSupported",
    "Refused",
    "NotFound",
    "ReadOnly",
    "ServerError",
    "Stale",
    "TlsFailure",
    "Unreachable",
    "XnatError",
    "errno_for",
]


class XnatError(Exception):
    """A remote operation failed.

    Attributes:
        message: XNAT's own explanation (the ``<h3>`` of its status page) or ours.
        status: the HTTP status, or None when the server never answered.
        path: the request path (``/data/...``) the failure belongs to, if any.
    """

    def __init__(self, message: str, *, status: int | None = None,
                 path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.path = path

    def __str__(self) -> str:
        text = self.message if self.status is None else f"{self.status} {self.message}"
        return f"{text} ({self.path})" if self.path else text


class NotFound(XnatError):
    """404: the object does not exist, or is private to others (XNAT hides it)."""


class Forbidden(XnatError):
    """403: the object is visible but this user may not read or change it."""


class AuthenticationFailed(XnatError):
    """401 from a fresh login: the credentials are wrong, expired or revoked."""


class Conflict(XnatError):
    """409: the object already exists or is locked by another operation."""


class BadRequest(XnatError):
    """A 4xx other than 401/403/404/409/429: XNAT will not do what we asked."""


class ServerError(XnatError):
    """The server kept failing (5xx) through every retry, or answered nonsense."""


class HtmlAnswer(ServerError):
    """A web page where JSON was expected: a proxy's error page, or a login page
    for a session the server lost (the session is renewed once, then this)."""


class Unreachable(XnatError):
    """No complete answer: connection refused or reset, timeout, truncated body."""


class Unanswered(Unreachable):
    """The server received a whole upload but gave no answer in time: it may have
    imported it (XNAT answers an import once it is done), so it is not sent again."""


class TlsFailure(XnatError):
    """TLS failed in a way no retry mends: the server's certificate is not
    trusted, has expired or names another host, or the port speaks no TLS.
    Not a server that is down: it is said at once, with what to do."""


class Stale(XnatError):
    """The object changed while we used it (its size or digest no longer match)."""


class ReadOnly(XnatError):
    """Archived content cannot be changed through the mount."""


class NoSpace(XnatError):
    """The local disk that keeps an upload's copy (the spool) is full: the upload
    cannot be kept, so it is refused before XNAT sees a partial file."""


class Interrupted(XnatError):
    """The program writing an upload was killed before it finished: what it wrote
    is incomplete, so it is not sent."""


class Refused(XnatError):
    """The mount refuses the operation itself, before any request: what it asks
    means nothing in this part of the mount (see ``xnatfs/areas``)."""


class NotPermitted(Refused):
    """Never done here (a link in ``uploads/``, a session moved where it cannot go)."""


class CrossDevice(Refused):
    """A move between places the mount cannot join: ``mv`` copies instead."""


class Busy(Refused):
    """In use: an upload being written or sent keeps the labels of its folders."""


class NotEmpty(Refused):
    """A folder that still shows entries."""


class Exists(Refused):
    """The name is taken."""


class IsADirectory(Refused):
    """A file operation on a folder."""


class NotADirectory(Refused):
    """A folder operation on a file."""


class InvalidArgument(Refused):
    """A request that makes no sense (a name with ``/``, an exchange of names)."""


class BadHandle(Refused):
    """A handle that cannot do this (a write to a file opened on the archive)."""


class NoAttribute(Refused):
    """No such extended attribute."""


class NotSupported(Refused):
    """Not supported here (extended attributes outside the upload area)."""


# One table, so the mapping can be reviewed at a glance (mountpoint-s3's fs/error.rs).
# Unreachable is EIO rather than ETIMEDOUT: it also covers refused connections,
# resets and truncated bodies, for which "Connection timed out" would mislead, and
# EIO is the errno read(2) documents for I/O failures. Stale is ESTALE, which makes
# the kernel drop its cached entry and look the name up again.
ERRNO_BY_ERROR: dict[type[XnatError], int] = {
    XnatError: errno.EIO,
    NotFound: errno.ENOENT,
    Forbidden: errno.EACCES,
    AuthenticationFailed: errno.EACCES,
    Conflict: errno.EEXIST,
    BadRequest: errno.EINVAL,
    ServerError: errno.EIO,
    HtmlAnswer: errno.EIO,
    Unreachable: errno.EIO,
    Unanswered: errno.ETIMEDOUT,
    TlsFailure: errno.EIO,  # nothing closer: ECONNREFUSED would say the server is off
    Stale: errno.ESTALE,
    ReadOnly: errno.EROFS,
    NoSpace: errno.ENOSPC,
    Interrupted: errno.EINTR,
    Refused: errno.EPERM,
    NotPermitted: errno.EPERM,
    CrossDevice: errno.EXDEV,
    Busy: errno.EBUSY,
    NotEmpty: errno.ENOTEMPTY,
    Exists: errno.EEXIST,
    IsADirectory: errno.EISDIR,
    NotADirectory: errno.ENOTDIR,
    InvalidArgument: errno.EINVAL,
    BadHandle: errno.EBADF,
    NoAttribute: errno.ENODATA,  # ENOATTR on Linux
    NotSupported: errno.ENOTSUP,
}


def errno_for(exc: XnatError) -> int:
    """The errno a FUSE handler should answer for ``exc`` (its nearest listed class)."""
    for cls in type(exc).__mro__:
        if cls in ERRNO_BY_ERROR:
            return ERRNO_BY_ERROR[cls]
    raise TypeError(f"{type(exc).__name__} is not an XnatError")
