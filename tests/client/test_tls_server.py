"""TLS and mutual TLS between SearchClient and the real tritonserver, with a CA and certificates
the test issues itself: who can call, who cannot, and that the launcher still probes and warms."""
from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys

import pytest

from search_rank_client import SearchClient, SearchError
from search_rank_client.channel import ClientTls
from conversion.stages import REPO_ROOT
from model_repository.triton_server import GrpcTls, run_triton_server

pytestmark = pytest.mark.server


def _issue(name: str, issuer=None, ca: bool = False, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(folder, name: str, cert, key) -> tuple:
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = _issue("test CA", ca=True)
    other_ca = _issue("someone else's CA", ca=True)
    files = {"ca": _write(folder, "ca", *ca)[0], "other_ca": _write(folder, "other-ca", *other_ca)[0]}
    files["server_cert"], files["server_key"] = _write(folder, "server", *_issue("127.0.0.1", ca, server=True))
    files["client_cert"], files["client_key"] = _write(folder, "client", *_issue("search-backend", ca))
    files["stranger_cert"], files["stranger_key"] = _write(folder, "stranger", *_issue("stranger", other_ca))
    return files


def _ranks(url: str, **kw) -> bool:
    try:
        with SearchClient(url, timeout_s=20.0, **kw) as c:
            return len(c.rank("waterproof hiking boots", 1, [11, 12, 13], top_k=2)) == 2
    except SearchError as e:
        assert e.code in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, e  # a refused handshake, nothing else
        return False


def test_tls_only_clients_that_trust_the_server_ca_get_through(ci_repository, pki):
    tls = GrpcTls(pki["server_cert"], pki["server_key"])
    with run_triton_server(ci_repository, tls=tls) as server:  # probes and warm-up work with TLS on
        assert _ranks(server.grpc_url, tls=ClientTls(pki["ca"]))
        assert not _ranks(server.grpc_url)  # plaintext client
        assert not _ranks(server.grpc_url, tls=ClientTls(pki["other_ca"]))  # does not trust this server
        assert server.process.poll() is None


def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(ci_repository, pki):
    tls = GrpcTls(pki["server_cert"], pki["server_key"], client_ca=pki["ca"])
    with run_triton_server(ci_repository, tls=tls) as server:
        assert _ranks(server.grpc_url, tls=ClientTls(pki["ca"], pki["client_cert"], pki["client_key"]))
        assert not _ranks(server.grpc_url, tls=ClientTls(pki["ca"]))  # no client certificate
        assert not _ranks(server.grpc_url, tls=ClientTls(pki["ca"], pki["stranger_cert"], pki["stranger_key"]))
        # the CLI's TLS flags reach the same channel
        result = subprocess.run([sys.executable, "-m", "search_rank_client", "--url", server.grpc_url, "--timeout", "20",
                                 "--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["client_cert"]),
                                 "--tls-key", str(pki["client_key"]), "health"],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.strip() == "ready", result.stderr


@pytest.mark.unit
def test_tls_settings_refuse_missing_files_and_half_pairs(tmp_path, pki):
    with pytest.raises(ValueError, match="cert file not found"):
        GrpcTls(tmp_path / "nope.pem", pki["server_key"])
    with pytest.raises(ValueError, match="needs its key"):
        ClientTls(pki["ca"], cert=pki["client_cert"])
    flags = GrpcTls(pki["server_cert"], pki["server_key"], client_ca=pki["ca"]).flags()
    assert "--grpc-use-ssl=true" in flags and "--grpc-use-ssl-mutual=true" in flags
    result = subprocess.run([sys.executable, "-m", "model_repository.triton_server", "--grpc-tls-cert",
                             str(pki["server_cert"])], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--grpc-tls-key" in result.stderr.strip().splitlines()[-1]
