"""TLS: what the client checks the server's certificate against, and the TLS
failures no retry mends, told apart from a server that is down.

A certificate that is not trusted, has expired or names another host fails
every attempt the same way; so does an ``https://`` URL on a port that speaks
plain HTTP. httpx reports each as a ``ConnectError`` (with no message) wrapping
the ``ssl`` error, as it reports a refused connection: retried four times, it
read as "the server seems down".
"""

from __future__ import annotations

import ssl

from ..errors import TlsFailure
from .settings import ClientSettings

# OpenSSL's X509_V_ERR_* codes that say more than "not trusted".
_HOSTNAME_MISMATCH = 62
_EXPIRED = 10
_NOT_YET_VALID = 9
# An https:// URL answered by something that is not TLS (plain HTTP, say).
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST",
                      "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"})
WHAT_TO_DO = ("if it is your site's own, point --ca-bundle FILE (or ca_bundle in the "
              "config file, or the SSL_CERT_FILE variable) at its certificate or its "
              "issuer's; or mount with --insecure (no check at all)")


def verification(settings: ClientSettings) -> ssl.SSLContext | bool:
    """httpx's ``verify``: a context holding ``ca_bundle`` when given, else True
    (httpx then trusts ``SSL_CERT_FILE``/``SSL_CERT_DIR`` if set, else certifi's
    bundle), or False with ``verify_tls`` off."""
    if not settings.verify_tls:
        return False
    if settings.ca_bundle:
        return ssl.create_default_context(cafile=settings.ca_bundle)
    return True


def tls_failure(exc: BaseException, path: str, *, ca_bundle: str | None = None
                ) -> TlsFailure | None:
    """The :class:`TlsFailure` behind a failed request, if TLS is what failed."""
    cause = _ssl_error(exc)
    if cause is None:
        return None
    if isinstance(cause, ssl.SSLCertVerificationError):
        detail = cause.verify_message or str(cause)
        code = cause.verify_code
        if code == _HOSTNAME_MISMATCH:
            message = (f"the server's TLS certificate is for another host name ({detail}); "
                       "use a host name it names in the URL, or mount with --insecure")
        elif code in (_EXPIRED, _NOT_YET_VALID):
            message = (f"the server's TLS certificate is out of its dates ({detail}); the "
                       "site must renew it (or mount with --insecure)")
        else:
            trusted = f"by the CA bundle {ca_bundle}" if ca_bundle else "here"
            message = (f"the server's TLS certificate is not trusted {trusted} ({detail}): "
                       + WHAT_TO_DO)
    else:
        message = (f"the server does not speak TLS there ({cause.reason or cause}); is the "
                   "site http://, or on another port?")
    return TlsFailure(message, path=path)


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """An ``ssl`` error anywhere in the chain of causes that no retry mends."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        if isinstance(current, ssl.SSLError) and current.reason in _NOT_TLS:
            return current
        current = current.__cause__ or current.__context__
    return None
