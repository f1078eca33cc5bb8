"""DICOM TLS with DCMTK storescu: server authentication and client certificates."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from factory import nm_files
from node import storescu

pytestmark = pytest.mark.peers


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _issue(folder: Path, name: str, ca: str | None, extension: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl("genrsa", "-out", str(key), "2048")
    if ca is None:
        _openssl(
            "req",
            "-x509",
            "-new",
            "-key",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
        return key, cert
    csr = folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text(extension)
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(folder / f"{ca}.crt"),
        "-CAkey",
        str(folder / f"{ca}.key"),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if subprocess.run(["which", "openssl"], capture_output=True, check=False).returncode:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("pki")
    _issue(folder, "ca", None, "")
    _issue(folder, "rogue", None, "")
    _issue(
        folder,
        "node",
        "ca",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    _issue(folder, "camera", "ca", "extendedKeyUsage=clientAuth\n")
    _issue(folder, "intruder", "rogue", "extendedKeyUsage=clientAuth\n")
    return folder


def _tls(pki: Path, require_client: bool) -> dict[str, dict[str, object]]:
    return {
        "reception.tls": {
            "enabled": True,
            "certificate": str(pki / "node.crt"),
            "private_key": str(pki / "node.key"),
            "ca_certificates": str(pki / "ca.crt"),
            "require_client_certificate": require_client,
        }
    }


def test_storescu_over_tls_stores_instances(
    node_factory, pki: Path, tmp_path: Path, require_tool
) -> None:
    require_tool("storescu")
    node = node_factory(_tls(pki, require_client=False))
    files = nm_files(tmp_path / "in", 3)
    plain = storescu(node.port, files)
    assert plain.returncode != 0
    result = storescu(node.port, files, extra=["+tla", "+cf", str(pki / "ca.crt")])
    assert result.returncode == 0, result.stderr
    assert node.query("SELECT count(*) FROM instance") == [(3,)]


def test_client_certificate_is_verified(
    node_factory, pki: Path, tmp_path: Path, require_tool
) -> None:
    require_tool("storescu")
    node = node_factory(_tls(pki, require_client=True))
    files = nm_files(tmp_path / "in", 2)
    anonymous = storescu(node.port, files, extra=["+tla", "+cf", str(pki / "ca.crt")])
    assert anonymous.returncode != 0
    untrusted = storescu(
        node.port,
        files,
        extra=[
            "+tls",
            str(pki / "intruder.key"),
            str(pki / "intruder.crt"),
            "-pw",
            "+cf",
            str(pki / "ca.crt"),
        ],
    )
    assert untrusted.returncode != 0
    assert node.query("SELECT count(*) FROM instance") == [(0,)]
    trusted = storescu(
        node.port,
        files,
        extra=[
            "+tls",
            str(pki / "camera.key"),
            str(pki / "camera.crt"),
            "-pw",
            "+cf",
            str(pki / "ca.crt"),
        ],
    )
    assert trusted.returncode == 0, trusted.stderr
    assert node.query("SELECT count(*) FROM instance") == [(2,)]


def test_silent_connections_do_not_block_tls_reception(
    node_factory, pki: Path, tmp_path: Path, require_tool
) -> None:
    # Peers that open TCP and never start the TLS handshake (a port scanner, a stalled
    # camera) must not hold the accept loop: other cameras still get in at once.
    require_tool("storescu")
    config = _tls(pki, require_client=False)
    config["reception"] = {"acceptors": 1, "acse_timeout": 30}
    node = node_factory(config)
    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
    try:
        time.sleep(0.5)
        started = time.monotonic()
        result = storescu(
            node.port,
            nm_files(tmp_path / "in", 1),
            extra=["+tla", "+cf", str(pki / "ca.crt"), "-to", "10", "-ta", "10"],
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 20  # not behind the 30 s ACSE timeout
    finally:
        for connection in silent:
            connection.close()
    assert node.query("SELECT count(*) FROM instance") == [(1,)]
