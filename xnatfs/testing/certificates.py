"""Self-signed certificates for serving the test server over HTTPS in tests.

Made with the ``cryptography`` package when it is installed, else with
``openssl req -x509``; nothing here is fit for anything but a loopback test.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from pathlib import Path


def self_signed_certificate(folder: Path, *, dns_names: tuple[str, ...] = (),
                            ip_addresses: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path]:
    """A certificate valid for these names and addresses only, and its key:
    ``(cert.pem, key.pem)`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        _with_cryptography(cert, key, dns_names, ip_addresses)
    except ImportError:
        _with_openssl(cert, key, dns_names, ip_addresses)
    key.chmod(0o600)
    return cert, key


def _with_cryptography(cert_path: Path, key_path: Path, dns_names: tuple[str, ...],
                       ip_addresses: tuple[str, ...]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xnatfs test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    alternatives: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alternatives += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def _with_openssl(cert: Path, key: Path, dns_names: tuple[str, ...],
                  ip_addresses: tuple[str, ...]) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("making a test certificate needs the cryptography package or openssl")
    names = ",".join([f"DNS:{n}" for n in dns_names] + [f"IP:{a}" for a in ip_addresses])
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", "/CN=xnatfs test server", "-addext", f"subjectAltName={names}",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
