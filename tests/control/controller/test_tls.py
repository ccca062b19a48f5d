"""The HTTP API over TLS, with a certificate authority and a certificate made here."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.control.conftest import new_controller
from tests.control.harness import Controller


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for 127.0.0.1 and localhost, server key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("lmc test CA"))
        .issuer_name(_name("lmc test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("lmc-controller"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "controller.pem", folder / "controller.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem(key))
    return paths


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    folder = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_certificates(folder)
    ctl = new_controller(folder, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    ctl.cacert = ca
    ctl.start()
    yield ctl
    ctl.stop()


def admin(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from lmc_connector.entrypoints import admin; exit(admin())"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)


def test_the_api_answers_over_https_to_a_client_trusting_its_ca(tls: Controller) -> None:
    assert tls.url.startswith("https://")
    with tls.http() as client:
        assert client.get("/health").json()["status"] == "ok"
    assert tls.cacert is not None
    done = admin("--url", tls.url, "--cacert", str(tls.cacert), "--json", "health")
    assert done.returncode == 0, done.stderr
    assert '"status": "ok"' in done.stdout


def test_a_client_that_does_not_trust_the_certificate_is_told_how_to(tls: Controller) -> None:
    done = admin("--url", tls.url, "health")
    assert done.returncode == 3
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr and "--cacert" in done.stderr
    with pytest.raises(httpx.TransportError):
        httpx.get(tls.url.replace("https://", "http://") + "/health", timeout=5)


def test_a_certificate_that_does_not_load_is_a_start_up_error(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    done = subprocess.run(
        [sys.executable, "-m", "lmc_connector.control.controller", "--ssl-certfile",
         str(tmp_path / "cert.pem"), "--ssl-keyfile", str(tmp_path / "cert.pem")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "give a PEM certificate and its private key" in done.stderr
