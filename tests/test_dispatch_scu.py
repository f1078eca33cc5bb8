"""The Storage SCU against real peers: DCMTK storescp, Orthanc, and a pynetdicom SCP.

Every failure must come back as a SendResult with a sentence a technologist can act on,
fast, and never as an exception.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dsutils import split_dataset

from factory import nm_dataset, write
from mibi_node.dispatch import (
    Destination,
    DestinationTLS,
    SendResult,
    parse_destination,
    send_file,
    send_files,
)
from mibi_node.errors import ConfigError
from mibi_node.imaging.study import PhaseImage
from mibi_node.inference.result import Focus, StudyResult
from mibi_node.report import build_sr
from node import dcmtk_env
from orthanc import OrthancServer, orthanc_server  # noqa: F401
from ports import free_port

pytestmark = pytest.mark.peers

CALLING = "MIBI_NODE"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


# --- files ---------------------------------------------------------------------------------


def sr_for(sources: list[Dataset]) -> Dataset:
    """The SR the node returns for a study of early and delayed NM images."""

    def phase(name: str, ds: Dataset) -> PhaseImage:
        return PhaseImage(
            name=name,
            pixels=np.zeros((int(ds.Rows), int(ds.Columns)), np.float32),
            pixel_spacing=(2.2, 2.2),
            sop_instance_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID,
            series_instance_uid=ds.SeriesInstanceUID,
            frame_number=1,
        )

    result = StudyResult(
        study_instance_uid=sources[0].StudyInstanceUID,
        probabilities={"normal": 0.1, "adenoma": 0.9},
        predicted="adenoma",
        member_probabilities={},
        agreement=1.0,
        normalised_entropy=0.47,
        focus=Focus(row=40.0, col=20.0, side="right", pole="lower"),
        source_images={
            "early": phase("early", sources[0]),
            "delayed": phase("delayed", sources[1]),
        },
        timings={},
        bundle_name="mibi-demo",
        bundle_version="0.1.0",
        intended_use="demonstration",
    )
    return build_sr(result, sources, device_uid="1.2.826.0.1.3680043.8.498.1")


@pytest.fixture
def study(tmp_path: Path) -> tuple[Path, Path]:
    """An NM file and the Comprehensive 3D SR of its study."""
    study_uid = generate_uid()
    sources = [nm_dataset(study_uid, seed=i) for i in range(2)]
    nm = write(sources[0], tmp_path / "send" / "nm.dcm")
    sr = write(sr_for(sources), tmp_path / "send" / "sr.dcm")
    return nm, sr


def data_set_bytes(path: Path) -> bytes:
    """The file's data set as encoded, without preamble and File Meta."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def received(folder: Path) -> dict[str, Path]:
    """SOP Instance UID -> file, for what storescp wrote into ``folder``."""
    return {
        dcmread(path, stop_before_pixels=True).SOPInstanceUID: path for path in folder.iterdir()
    }


# --- peers ---------------------------------------------------------------------------------


def wait_listening(port: int, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"peer exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@pytest.fixture
def storescp(tmp_path: Path, require_tool) -> Iterator[Callable[..., tuple[Destination, Path]]]:
    """Start ``storescp -aet PACS`` with extra options; returns its destination and folder."""
    require_tool("storescp")
    started: list[subprocess.Popen[bytes]] = []

    def _start(*options: str) -> tuple[Destination, Path]:
        port = free_port()
        folder = tmp_path / f"storescp-{port}"
        folder.mkdir()
        with open(tmp_path / f"storescp-{port}.log", "wb") as log:
            process = subprocess.Popen(
                ["storescp", "-aet", "PACS", "-od", str(folder), *options, str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dcmtk_env(),
            )
        started.append(process)
        wait_listening(port, process)
        return Destination(ae_title="PACS", host="127.0.0.1", port=port), folder

    yield _start
    for process in started:
        process.terminate()
        process.wait(10)


@pytest.fixture
def answering(port: int) -> Iterator[Callable[[int], Destination]]:
    """A pynetdicom Storage SCP that answers every C-STORE with the status it is given."""
    ae = AE(ae_title="STATUS_SCP")
    ae.add_supported_context(COMPREHENSIVE_3D_SR)
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.20")
    answer = {"status": 0x0000}
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda event: answer["status"])],
    )

    def _answer(status: int) -> Destination:
        answer["status"] = status
        return Destination(ae_title="STATUS_SCP", host="127.0.0.1", port=port)

    yield _answer
    server.shutdown()


# --- storescp ------------------------------------------------------------------------------


def test_nm_and_sr_arrive_byte_for_byte(storescp, study: tuple[Path, Path]) -> None:
    destination, folder = storescp("+B")  # bit-preserving: writes the data set as received
    nm, sr = study
    results = send_files([nm, sr], destination, calling_ae_title=CALLING)
    assert [(r.success, r.status, r.message) for r in results] == [
        (True, 0x0000, "stored (status 0x0000)")
    ] * 2
    stored = received(folder)
    for sent in (nm, sr):
        uid = dcmread(sent, stop_before_pixels=True).SOPInstanceUID
        assert data_set_bytes(stored[uid]) == data_set_bytes(sent)
    assert dcmread(stored[dcmread(sr).SOPInstanceUID]).SOPClassUID == COMPREHENSIVE_3D_SR


def test_sr_is_re_encoded_for_a_pacs_that_takes_only_implicit_vr(
    storescp, study: tuple[Path, Path]
) -> None:
    destination, folder = storescp("+xi")
    _, sr = study
    result = send_file(sr, destination, calling_ae_title=CALLING)
    assert result.success, result.message
    [path] = received(folder).values()
    arrived = dcmread(path)
    assert arrived.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    original = dcmread(sr)
    assert arrived.SOPInstanceUID == original.SOPInstanceUID
    assert arrived.ContentSequence == original.ContentSequence


def test_refused_association_is_reported(storescp, study: tuple[Path, Path]) -> None:
    destination, folder = storescp("--refuse")
    results = send_files(list(study), destination, calling_ae_title=CALLING)
    assert [r.success for r in results] == [False, False]
    # storescp --refuse sends A-ASSOCIATE-RJ and closes the socket at once; on a busy machine
    # pynetdicom sometimes sees the close before it reads the reject. Both are refusals.
    assert results[0].message in (
        "PACS refused the association: no reason given",
        f"127.0.0.1:{destination.port} closed the connection before accepting the association "
        "(if that port expects DICOM TLS, enable tls for this destination)",
    )
    assert results[0].status is None
    assert list(folder.iterdir()) == []


def test_abort_during_c_store_fails_that_file_and_skips_the_rest(
    storescp, study: tuple[Path, Path]
) -> None:
    destination, _ = storescp("--abort-after")
    started = time.monotonic()
    first, second = send_files(list(study), destination, calling_ae_title=CALLING, timeout=10)
    assert time.monotonic() - started < 5
    assert not first.success
    assert first.message == "the PACS ended the association without a valid C-STORE response"
    assert not second.success
    assert second.message == "not sent: the association ended while storing an earlier file"


def test_slow_pacs_times_out(storescp, study: tuple[Path, Path]) -> None:
    destination, _ = storescp("--sleep-during", "5")
    nm, _ = study
    started = time.monotonic()
    result = send_file(nm, destination, calling_ae_title=CALLING, timeout=1)
    assert time.monotonic() - started < 4
    assert (result.success, result.status, result.message) == (
        False,
        None,
        "no response within 1 s",
    )


def test_not_dicom_file_is_named_and_the_others_are_sent(
    storescp, study: tuple[Path, Path], tmp_path: Path
) -> None:
    destination, folder = storescp()
    text = tmp_path / "report.txt"
    text.write_text("not DICOM at all\n" * 20)
    missing = tmp_path / "gone.dcm"
    nm, _ = study
    results = send_files([text, nm, missing], destination, calling_ae_title=CALLING)
    assert not results[0].success
    assert results[0].message == (
        f"{text} is not a DICOM file (no 'DICM' prefix after the 128-byte preamble)"
    )
    assert results[1].success
    assert results[2].message == f"{missing} does not exist"
    assert list(received(folder)) == [dcmread(nm).SOPInstanceUID]


def test_only_unreadable_files_opens_no_association(tmp_path: Path) -> None:
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with socket.create_server(("127.0.0.1", 0)) as pacs:
        pacs.setblocking(False)
        destination = Destination(ae_title="PACS", host="127.0.0.1", port=pacs.getsockname()[1])
        [result] = send_files([empty], destination, calling_ae_title=CALLING)
        with pytest.raises(BlockingIOError):
            pacs.accept()
    assert result == SendResult(
        False,
        None,
        f"{empty} is not a DICOM file (no 'DICM' prefix after the 128-byte preamble)",
        0.0,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a rogue CA, the PACS's server certificate and the node's client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue"):
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
            "-keyout", str(folder / f"{ca}.key"), "-out", str(folder / f"{ca}.crt"),
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
    usages = {
        "pacs": "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        "node": "extendedKeyUsage=clientAuth\n",
    }
    for name, extensions in usages.items():
        key, csr, cert, ext = (folder / f"{name}.{e}" for e in ("key", "csr", "crt", "ext"))
        ext.write_text(extensions)
        openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(key), "-out", str(csr))  # fmt: skip
        openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(folder / "ca.crt"),
            "-CAkey", str(folder / "ca.key"), "-CAcreateserial", "-days", "2",
            "-out", str(cert), "-extfile", str(ext),
        )  # fmt: skip
    return folder


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def test_tls(storescp, study: tuple[Path, Path], pki: Path) -> None:
    destination, folder = storescp("+tls", str(pki / "pacs.key"), str(pki / "pacs.crt"), "-ic")
    trusted = destination.model_copy(
        update={"tls": DestinationTLS(enabled=True, ca_certificates=pki / "ca.crt")}
    )
    nm, sr = study
    results = send_files([nm, sr], trusted, calling_ae_title=CALLING)
    assert [r.success for r in results] == [True, True]
    assert len(received(folder)) == 2

    untrusted = destination.model_copy(
        update={"tls": DestinationTLS(enabled=True, ca_certificates=pki / "rogue.crt")}
    )
    result = send_file(nm, untrusted, calling_ae_title=CALLING)
    assert not result.success
    assert result.message == (
        f"TLS handshake with {destination.address} failed: "
        "PACS certificate not trusted (unable to get local issuer certificate)"
    )
    plain = send_file(nm, destination, calling_ae_title=CALLING, timeout=3)
    assert plain.message == (
        f"{destination.address} closed the connection before accepting the association"
        " (if that port expects DICOM TLS, enable tls for this destination)"
    )


def test_tls_client_certificate(storescp, study: tuple[Path, Path], pki: Path) -> None:
    # storescp's default -rc: the client must present a certificate signed by ca.crt.
    destination, folder = storescp(
        "+tls", str(pki / "pacs.key"), str(pki / "pacs.crt"), "+cf", str(pki / "ca.crt")
    )
    anonymous = DestinationTLS(enabled=True, ca_certificates=pki / "ca.crt")
    result = send_file(
        study[0], destination.model_copy(update={"tls": anonymous}), calling_ae_title=CALLING
    )
    assert not result.success
    assert "did not accept our client certificate" in result.message
    node = anonymous.model_copy(
        update={"certificate": pki / "node.crt", "private_key": pki / "node.key"}
    )
    results = send_files(
        list(study), destination.model_copy(update={"tls": node}), calling_ae_title=CALLING
    )
    assert [r.status for r in results] == [0x0000, 0x0000]
    assert len(received(folder)) == 2


# --- the network ---------------------------------------------------------------------------


def test_nothing_listening_fails_fast(study: tuple[Path, Path]) -> None:
    port = free_port()
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=port)
    started = time.monotonic()
    results = send_files(list(study), destination, calling_ae_title=CALLING, timeout=5)
    assert time.monotonic() - started < 2
    assert [(r.success, r.status, r.message) for r in results] == [
        (False, None, f"connection refused by 127.0.0.1:{port}")
    ] * 2


def test_silent_peer_times_out_at_association(study: tuple[Path, Path]) -> None:
    """The kernel completes the TCP handshake, but no A-ASSOCIATE-AC ever comes."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        destination = Destination(ae_title="PACS", host="127.0.0.1", port=port)
        started = time.monotonic()
        [result] = send_files(study[:1], destination, calling_ae_title=CALLING, timeout=1)
    assert time.monotonic() - started < 3
    assert result.message == "no answer to the association request within 1 s"


def test_unknown_host_is_named(study: tuple[Path, Path]) -> None:
    destination = Destination(ae_title="PACS", host="pacs.invalid", port=104)
    result = send_file(study[0], destination, calling_ae_title=CALLING, timeout=5)
    assert not result.success
    assert result.message.startswith("cannot resolve host name 'pacs.invalid'")


def test_ipv6_destination(study: tuple[Path, Path]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    ae = AE(ae_title="V6_PACS")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.20")
    try:
        server = ae.start_server(
            ("::1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)]
        )
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    try:
        destination = parse_destination(f"V6_PACS@[::1]:{server.server_address[1]}")
        result = send_file(study[0], destination, calling_ae_title=CALLING)
    finally:
        server.shutdown()
    assert (result.success, result.message) == (True, "stored (status 0x0000)")


# --- statuses (pynetdicom SCP) -------------------------------------------------------------


STATUSES = [
    (0x0000, True, "stored (status 0x0000)"),
    (0xB000, True, "stored with warning 0xB000 (coercion of data elements)"),
    (0xB007, True, "stored with warning 0xB007 (data set does not match SOP class)"),
    (0xA700, False, "status 0xA700 (out of resources)"),
    (0xA7FF, False, "status 0xA7FF (out of resources)"),
    (0xA900, False, "status 0xA900 (data set does not match SOP class)"),
    (0xC210, False, "status 0xC210 (cannot understand)"),
    (0x0124, False, "status 0x0124 (not authorised)"),
]


@pytest.mark.parametrize(
    ("status", "success", "message"), STATUSES, ids=[f"0x{s:04X}" for s, _, _ in STATUSES]
)
def test_statuses(answering, study, status: int, success: bool, message: str) -> None:
    _, sr = study
    result = send_file(sr, answering(status), calling_ae_title=CALLING)
    assert result == SendResult(success, status, message, result.seconds)


def test_sop_class_the_pacs_does_not_take(answering, tmp_path: Path) -> None:
    ct = write(nm_dataset(sop_class_uid="1.2.840.10008.5.1.4.1.1.2"), tmp_path / "ct.dcm")
    nm = write(nm_dataset(), tmp_path / "nm.dcm")
    first, second = send_files([ct, nm], answering(0x0000), calling_ae_title=CALLING)
    assert (first.success, first.message) == (
        False,
        "PACS does not take CT Image Storage: SOP class not supported",
    )
    assert second.success


def test_bad_calling_ae_title_is_a_value_error(study: tuple[Path, Path]) -> None:
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=104)
    with pytest.raises(ValueError, match="calling_ae_title"):
        send_files(list(study), destination, calling_ae_title="A" * 17)


# --- Orthanc -------------------------------------------------------------------------------


def test_orthanc_stores_the_instance_in_its_study(
    orthanc_server: OrthancServer,  # noqa: F811 - the fixture imported above
    study: tuple[Path, Path],
) -> None:
    nm, sr = study
    destination = Destination(
        ae_title=orthanc_server.ae_title, host="127.0.0.1", port=orthanc_server.dicom_port
    )
    results = send_files([nm, sr], destination, calling_ae_title=CALLING)
    assert [r.status for r in results] == [0x0000, 0x0000]
    sent = {dcmread(path).SOPInstanceUID: dcmread(path) for path in (nm, sr)}
    study_uid = dcmread(nm).StudyInstanceUID
    stored = orthanc_server.instances_of_study(study_uid)
    assert sorted(tags["SOPInstanceUID"] for tags in stored) == sorted(sent)
    assert {tags["StudyInstanceUID"] for tags in stored} == {study_uid}
    [nm_uid] = [uid for uid, ds in sent.items() if ds.Modality == "NM"]
    kept = dcmread(BytesIO(orthanc_server.instance_file(nm_uid)))
    assert kept.PixelData == sent[nm_uid].PixelData
    assert kept.PatientName == sent[nm_uid].PatientName


def test_orthanc_refuses_a_wrong_called_ae_title(
    orthanc_server: OrthancServer,  # noqa: F811 - the fixture imported above
    study: tuple[Path, Path],
) -> None:
    destination = Destination(
        ae_title="NOT_ORTHANC", host="127.0.0.1", port=orthanc_server.dicom_port
    )
    results = send_files(list(study), destination, calling_ae_title=CALLING)
    assert [(r.success, r.message) for r in results] == [
        (False, "PACS refused the association: called AE title 'NOT_ORTHANC' not recognised")
    ] * 2
    assert orthanc_server.studies() == []


# --- destinations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ae_title", "host", "port", "label"),
    [
        ("PACS@10.0.0.5:104", "PACS", "10.0.0.5", 104, "PACS@10.0.0.5:104"),
        ("ORTHANC@pacs.hospital.example:4242", "ORTHANC", "pacs.hospital.example", 4242, None),
        ("PACS@[::1]:11112", "PACS", "::1", 11112, "PACS@[::1]:11112"),
        (" MY AE@localhost:1 ", "MY AE", "localhost", 1, "MY AE@localhost:1"),
        ("A@B@host:65535", "A@B", "host", 65535, None),
    ],
)
def test_parse_destination(
    text: str, ae_title: str, host: str, port: int, label: str | None
) -> None:
    destination = parse_destination(text)
    assert (destination.ae_title, destination.host, destination.port) == (ae_title, host, port)
    assert destination.label == (label or text.strip())
    assert destination.tls.enabled is False
    assert parse_destination(destination.label) == destination


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("PACS", "expected AE@HOST:PORT"),
        ("PACS@host", "expected AE@HOST:PORT"),
        ("@host:104", "expected AE@HOST:PORT"),
        ("PACS@:104", "expected AE@HOST:PORT"),
        ("PACS@[::1]104", "expected AE@HOST:PORT"),
        ("PACS@::1:104", "write an IPv6 address in brackets, AE@[::1]:PORT"),
        ("PACS@host:0", "port must be 1-65535, not '0'"),
        ("PACS@host:65536", "port must be 1-65535, not '65536'"),
        ("PACS@host:http", "port must be 1-65535, not 'http'"),
        ("PACS@host:", "port must be 1-65535, not ''"),
        (
            "ABCDEFGHIJKLMNOPQ@host:104",
            "bad AE title 'ABCDEFGHIJKLMNOPQ': an AE title has at most 16 characters",
        ),
        ("BACK\\SLASH@host:104", "bad AE title 'BACK\\\\SLASH': an AE title holds printable ASCII"),
        ("PACS@ho st:104", "bad host 'ho st'"),
    ],
)
def test_parse_destination_rejects(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_destination(text)
    message = str(raised.value)
    assert message.startswith(f"destination {text!r}: ")
    assert problem in message


def test_destination_validation() -> None:
    named = Destination(ae_title=" PACS ", host="[::1]", port=104, name="Main PACS")
    assert (named.ae_title, named.host, named.label, named.address) == (
        "PACS",
        "::1",
        "Main PACS",
        "[::1]:104",
    )
    with pytest.raises(ValueError, match="port"):
        Destination(ae_title="PACS", host="h", port=70000)
    with pytest.raises(ValueError, match="Extra inputs"):
        Destination(ae_title="PACS", host="h", port=104, colour="red")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="private_key is given without certificate"):
        DestinationTLS(enabled=True, private_key=Path("k.pem"))
    with pytest.raises(ValueError):
        named.port = 1  # type: ignore[misc]  # frozen
