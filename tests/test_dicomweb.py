"""DICOMweb both ways against real peers: STOW-RS out to Orthanc's DICOMweb plugin, STOW-RS
in from Orthanc's DICOMweb client and from dicomweb-client.

The sending side uses the node's own functions (job, delivery rows, ``deliver``); the
receiving side the node's STOW-RS server, in this process or in ``mibi-node serve``. Every
assertion reads what arrived: Orthanc's QIDO-RS and stored files, the node's rows and files.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import text

from factory import CT_STORAGE, nm_dataset, nm_files, write
from mibi_node.config import Config
from mibi_node.dispatch.deliveries import deliver
from mibi_node.dispatch.destinations import destination_from_row
from mibi_node.jobs.queue import CompletedJob, claim_jobs, complete_job
from mibi_node.reception.stow_server import StowServer
from mibi_node.storage.database import Database, open_database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import InstanceStore
from mibi_node.storage.models import Job, Study, StudyState
from orthanc import DICOMWEB_PLUGIN, OrthancServer, find_orthanc
from ports import free_port
from test_dispatch_scu import sr_for, wait_listening
from test_reception_tls import pki  # noqa: F401 - a fixture

TOKEN = "stow-test-token"
MULTIPART = 'multipart/related; type="application/dicom"; boundary=XYZ'


@pytest.fixture
def orthanc_dicomweb() -> None:
    if find_orthanc() is None or not DICOMWEB_PLUGIN.is_file():
        pytest.skip("Orthanc or its DICOMweb plugin is not installed: run scripts/install-peers.sh")


@dataclass
class Local:
    """The parts of a node that send and receive over DICOMweb: configuration, database."""

    config: Config
    database: Database

    @property
    def results(self) -> Path:
        return self.config.results_dir

    def store(self) -> InstanceStore:
        return InstanceStore(self.database, FileStore(self.config.store_dir))

    def result(self, destinations: list[dict[str, Any]]) -> tuple[list[int], Dataset]:
        """A result (an SR of a new study) with a delivery to each destination, recorded as
        the worker records it (the configured destination's dump: no secrets)."""
        study_uid = generate_uid()
        sr = sr_for([nm_dataset(study_uid, seed=i) for i in range(2)])
        name = f"sr-{len(list(self.results.glob('*.dcm')))}.dcm"
        write(sr, self.results / name)
        with self.database.session() as session, session.begin():
            study = Study(study_instance_uid=study_uid, state=StudyState.QUEUED)
            session.add(study)
            session.flush()
            session.add(Job(study_id=study.id, version=1))
        [job] = claim_jobs(self.database, "w", 60, 1)
        done = CompletedJob(
            {}, {}, "b 1", name, str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID), (name,),
            tuple(destination_from_row(d).model_dump(mode="json") for d in destinations),
        )  # fmt: skip
        return complete_job(self.database, "w", job.id, done), sr

    def send(self, config: Config | None = None) -> None:
        """One pass of the dispatch sweep, every delivery due now."""
        with self.database.engine.begin() as connection:
            connection.execute(text("UPDATE delivery SET next_attempt_at = '2000-01-01'"))
        deliver(
            self.database,
            self.results,
            (config or self.config).dispatch,
            calling_ae_title="MIBI_NODE",
            owner="test",
        )

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with self.database.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql))]


def _config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {
        "node": {"data_dir": str(tmp_path / "var")},
        "storage": {"min_free_mb": 0},
        "dispatch": {"initial_backoff_seconds": 1, "timeout": 5},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return Config.model_validate(raw)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    config = _config(tmp_path)
    config.results_dir.mkdir(parents=True)
    database = open_database(config.database_url)
    yield Local(config, database)
    database.dispose()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[StowServer, Local]]:
    """The node's STOW-RS server in this process, with a token, on a free port."""
    config = _config(
        tmp_path / "receiver",
        reception={"dicomweb": {"enabled": True, "port": 0, "token": TOKEN}},
    )
    database = open_database(config.database_url)
    node = Local(config, database)
    server = StowServer(config, node.store())
    server.start()
    yield server, node
    server.stop()
    database.dispose()


def _qido(pacs: OrthancServer, study_uid: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{pacs.http_port}/dicom-web/studies/{study_uid}/instances"
    request = urllib.request.Request(url, headers={"Accept": "application/dicom+json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return list(json.loads(response.read() or b"[]"))


# -- STOW-RS out -------------------------------------------------------------------------------


@pytest.mark.peers
def test_result_reaches_orthanc_over_stow_rs_once_it_is_up(
    orthanc_dicomweb: None, local: Local, tmp_path: Path
) -> None:
    pacs = OrthancServer(tmp_path / "orthanc", dicomweb=True)  # ports chosen, not started
    url = f"http://127.0.0.1:{pacs.http_port}/dicom-web"
    [delivery], sr = local.result([{"kind": "dicomweb", "url": url, "name": "orthanc-web"}])
    local.send()
    [(state, attempts, message)] = local.rows("SELECT state, attempts, last_message FROM delivery")
    assert (state, attempts) == ("PENDING", 1)
    assert message == f"connection refused by 127.0.0.1:{pacs.http_port}"
    with pacs:
        local.send()
        [row] = local.rows(
            "SELECT state, last_status, last_message, commitment, commit_message, label "
            "FROM delivery"
        )
        assert row == (
            "DONE", 0, "stored (HTTP 200)", "COMMITTED",
            "the STOW-RS response listed every instance as stored", "orthanc-web",
        )  # fmt: skip
        # QIDO-RS finds the SR in its study; Orthanc holds the same data set.
        [found] = _qido(pacs, str(sr.StudyInstanceUID))
        assert found["00080018"]["Value"] == [str(sr.SOPInstanceUID)]
        assert found["00080060"]["Value"] == ["SR"]
        stored = pydicom.dcmread(BytesIO(pacs.instance_file(str(sr.SOPInstanceUID))))
        assert stored.ContentSequence == pydicom.dcmread(local.results / "sr-0.dcm").ContentSequence
    assert local.rows("SELECT id FROM delivery") == [(delivery,)]


@pytest.mark.peers
def test_refusals_are_retried_with_one_sentence_and_secrets_stay_out_of_the_database(
    orthanc_dicomweb: None, local: Local, receiver: tuple[StowServer, Local], tmp_path: Path
) -> None:
    server, node = receiver
    wrong = {"kind": "dicomweb", "url": server.url, "name": "node-web", "token": "not-it"}
    with OrthancServer(tmp_path / "orthanc", dicomweb=True) as pacs:
        lost = {"kind": "dicomweb", "url": f"http://127.0.0.1:{pacs.http_port}/no-such-root"}
        config = _config(tmp_path, dispatch={"destinations": [wrong, lost], "timeout": 5})
        local.result([wrong, lost])
        local.send(config)
        rows = dict(local.rows("SELECT label, state || ' ' || last_message FROM delivery"))
        assert rows == {
            "node-web": f"PENDING HTTP 401 Unauthorized from {server.url}/studies: "
            "the token or user name and password were refused",
            lost["url"]: f"PENDING HTTP 404 Not Found from {lost['url']}/studies: "
            "no STOW-RS service at that address (is url the DICOMweb root?)",
        }
    # The right token comes from the configuration at send time; the rows never held one.
    right = _config(tmp_path, dispatch={"destinations": [{**wrong, "token": TOKEN}, lost]})
    local.send(right)
    assert local.rows("SELECT state, attempts FROM delivery WHERE label = 'node-web'") == [
        ("DONE", 2)
    ]
    assert node.rows("SELECT count(*), min(calling_ae_title) FROM instance") == [(1, "DICOMWEB")]
    recorded = " ".join(str(d) for (d,) in local.rows("SELECT destination FROM delivery"))
    assert "not-it" not in recorded and TOKEN not in recorded


# -- STOW-RS in --------------------------------------------------------------------------------


@pytest.mark.peers
def test_orthanc_stows_a_study_into_the_node_and_it_is_routed(
    orthanc_dicomweb: None, node_factory, tmp_path: Path
) -> None:
    port = free_port()
    node = node_factory({"reception.dicomweb": {"enabled": True, "port": port, "token": TOKEN}})
    wait_listening(port)
    servers = {
        "node": {
            "Url": f"http://127.0.0.1:{port}/dicomweb/",
            "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"},
        }
    }
    files = nm_files(tmp_path / "in", 3)
    config = {"DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": servers}}
    with OrthancServer(tmp_path / "orthanc", dicomweb=True, config=config) as pacs:
        for path in files:
            request = urllib.request.Request(
                f"http://127.0.0.1:{pacs.http_port}/instances",
                data=path.read_bytes(),
                headers={"Content-Type": "application/dicom"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                study = json.loads(response.read())["ParentStudy"]
        answer = pacs.rest("/dicom-web/servers/node/stow", {"Resources": [study]}, timeout=30)
    assert answer["InstancesCount"] == "3"
    # Stored and recorded as a C-STORE's would be, then routed like a DIMSE study.
    rows = dict(node.query("SELECT sop_instance_uid, path FROM instance"))
    for path in files:
        sent = pydicom.dcmread(path)
        assert pydicom.dcmread(node.data_dir / "store" / rows[str(sent.SOPInstanceUID)]) == sent
    deadline = time.monotonic() + 20
    while node.query("SELECT state FROM study") != [("QUEUED",)]:
        assert time.monotonic() < deadline, node.query("SELECT state, state_reason FROM study")
        time.sleep(0.2)
    assert node.query("SELECT calling_ae_title, instance_count FROM study") == [("DICOMWEB", 3)]
    assert node.query("SELECT count(*) FROM job") == [(1,)]
    assert node.query(
        "SELECT outcome FROM audit_event WHERE kind = 'association' AND actor LIKE 'DICOMWEB@%'"
    ) == [("released",)]


def _part(body: bytes, content_type: str = "application/dicom") -> bytes:
    return f"--XYZ\r\nContent-Type: {content_type}\r\n\r\n".encode() + body + b"\r\n"


def _post(server: StowServer, body: bytes, path: str = "", **headers: str) -> requests.Response:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": MULTIPART, **headers}
    return requests.post(f"{server.url}/studies{path}", data=body, headers=headers, timeout=30)


def _reasons(response: requests.Response) -> tuple[list[str], list[tuple[str, int]]]:
    """The stored SOP Instance UIDs and the (UID or "", Failure Reason) of the failed."""
    assert response.headers["content-type"] == "application/dicom+json"
    ds = Dataset.from_json(response.json())
    stored = [str(i.ReferencedSOPInstanceUID) for i in ds.get("ReferencedSOPSequence", [])]
    failed = [
        (str(i.get("ReferencedSOPInstanceUID", "")), int(i.FailureReason))
        for i in ds.get("FailedSOPSequence", [])
    ]
    return stored, failed


def test_bad_parts_get_their_failure_reasons_and_nothing_half_written(
    receiver: tuple[StowServer, Local], tmp_path: Path
) -> None:
    server, node = receiver
    study = generate_uid()
    good = nm_dataset(study, seed=1)
    other_study = nm_dataset(seed=2)
    ct = nm_dataset(study, seed=3, sop_class_uid=CT_STORAGE)
    odd_syntax = nm_dataset(study, seed=4)
    odd_syntax.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"  # HTJ2K: not taken
    del odd_syntax.PixelData  # pydicom writes no native pixels in a compressed syntax
    short = nm_dataset(study, seed=5)
    short.PixelData = short.PixelData[:100]
    files = {
        name: write(ds, tmp_path / f"{name}.dcm").read_bytes()
        for name, ds in [("good", good), ("other", other_study), ("ct", ct), ("short", short)]
    }
    odd = BytesIO()
    pydicom.dcmwrite(odd, odd_syntax, enforce_file_format=True)
    body = b"".join(
        [
            _part(files["good"]),
            _part(b"not DICOM at all"),
            _part(files["good"], "text/plain"),
            _part(files["other"]),
            _part(files["ct"]),
            _part(odd.getvalue()),
            _part(files["short"]),
            b"--XYZ--\r\n",
        ]
    )
    response = _post(server, body, f"/{study}")
    assert response.status_code == 202
    stored, failed = _reasons(response)
    assert stored == [str(good.SOPInstanceUID)]
    assert failed == [
        ("", 0xC210),  # not a PS3.10 file
        ("", 0xC210),  # a part that is not application/dicom
        (str(other_study.SOPInstanceUID), 0xA900),  # not the study of the URL
        (str(ct.SOPInstanceUID), 0x0122),  # a SOP class reception does not take
        (str(odd_syntax.SOPInstanceUID), 0xC122),  # a transfer syntax it does not take
        (str(short.SOPInstanceUID), 0xC210),  # Pixel Data shorter than its dimensions
    ]
    # Only the good instance is in the database and the store; nothing is left half-written.
    assert node.rows("SELECT sop_instance_uid FROM instance") == [(str(good.SOPInstanceUID),)]
    assert len(list(node.config.store_dir.rglob("*.dcm"))) == 1
    assert not any((node.config.store_dir / ".incoming").iterdir())
    # Sent again: a duplicate, stored once, 200. Only failures: 409.
    again = _post(server, _part(files["good"]) + b"--XYZ--\r\n")
    assert again.status_code == 200 and _reasons(again)[0] == [str(good.SOPInstanceUID)]
    assert node.rows("SELECT instance_count FROM study") == [(1,)]
    refused = _post(server, _part(b"junk") + b"--XYZ--\r\n")
    assert refused.status_code == 409 and _reasons(refused) == ([], [("", 0xC210)])


def test_requests_refused_as_a_whole(receiver: tuple[StowServer, Local], tmp_path: Path) -> None:
    server, node = receiver
    part = _part(write(nm_dataset(), tmp_path / "a.dcm").read_bytes()) + b"--XYZ--\r\n"
    cases = [
        (_post(server, part, Authorization=""), 401),
        (_post(server, part, Authorization="Bearer wrong"), 401),
        (_post(server, part, **{"Content-Type": "application/dicom"}), 415),
        (
            _post(
                server,
                part,
                **{"Content-Type": 'multipart/related; type="application/dicom+xml"; boundary=XYZ'},
            ),
            415,
        ),
        (
            _post(server, part, **{"Content-Type": 'multipart/related; type="application/dicom"'}),
            400,
        ),
        (_post(server, part, "/not-a-uid"), 400),
        (_post(server, part, Accept="application/dicom+xml"), 406),
        (_post(server, b"--XYZ\r\nContent-Type: application/dicom\r\n\r\nab"), 400),
        (_post(server, b""), 400),
    ]
    for response, status in cases:
        assert response.status_code == status, (status, response.text)
        detail = response.json()["detail"]
        assert detail and "\n" not in detail and "Traceback" not in detail
    assert cases[0][0].headers["www-authenticate"].startswith("Bearer")
    # Nothing else is served: QIDO-RS, WADO-RS and other paths get a JSON refusal too.
    assert requests.get(f"{server.url}/studies", timeout=10).status_code == 405
    lost = requests.post(f"{server.url}/series", data=part, timeout=10)
    assert lost.status_code == 404 and "STOW-RS" in lost.json()["detail"]
    assert node.rows("SELECT count(*) FROM instance") == [(0,)]
    rejected = node.rows(
        "SELECT count(*) FROM audit_event WHERE kind = 'association' AND outcome = 'rejected'"
    )
    assert rejected == [(len(cases),)]


def test_size_limit_and_host_allow_list(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        reception={
            "dicomweb": {
                "enabled": True,
                "port": 0,
                "max_request_mb": 0.25,
                "allowed_hosts": ["127.0.0.0/8"],
            }
        },
    )
    database = open_database(config.database_url)
    node = Local(config, database)
    server = StowServer(config, node.store())
    server.start()
    try:
        small = write(nm_dataset(rows=32, columns=32, frames=1), tmp_path / "s.dcm")
        big = write(nm_dataset(rows=256, columns=256, frames=4), tmp_path / "b.dcm")
        client = DICOMwebClient(server.url)
        client.set_http_retry_params(retry=False)
        assert "ReferencedSOPSequence" in client.store_instances([pydicom.dcmread(small)])
        # Announced too large: refused before a byte is read. Streamed (chunked) past the
        # limit: cut there; the small instance before it stays stored, no partial file.
        body = _part(big.read_bytes()) + b"--XYZ--\r\n"
        assert _post(server, body).status_code == 413

        def chunks() -> Iterator[bytes]:
            yield _part(small.read_bytes())
            data = _part(big.read_bytes())
            for start in range(0, len(data), 65536):
                yield data[start : start + 65536]

        cut = _post(server, chunks())  # type: ignore[arg-type]
        assert cut.status_code == 413 and "max_request_mb" in cut.json()["detail"]
        assert node.rows("SELECT count(*) FROM instance") == [(1,)]
        assert not any((config.store_dir / ".incoming").iterdir())
    finally:
        server.stop()
    # A host outside allowed_hosts (this one is 127.0.0.1) is refused with 403.
    config = _config(
        tmp_path,
        reception={"dicomweb": {"enabled": True, "port": 0, "allowed_hosts": ["10.9.9.9"]}},
    )
    server = StowServer(config, node.store())
    server.start()
    try:
        response = _post(server, _part(small.read_bytes()) + b"--XYZ--\r\n")
        assert response.status_code == 403 and "allowed_hosts" in response.json()["detail"]
    finally:
        server.stop()
        database.dispose()


def test_https_with_client_certificates_node_to_node(
    pki: Path,  # noqa: F811 - the fixture imported above
    local: Local,
    tmp_path: Path,
) -> None:
    tls = {
        "enabled": True,
        "certificate": str(pki / "node.crt"),
        "private_key": str(pki / "node.key"),
        "ca_certificates": str(pki / "ca.crt"),
        "require_client_certificate": True,
    }
    config = _config(
        tmp_path / "receiver",
        reception={"dicomweb": {"enabled": True, "host": "127.0.0.1", "port": 0, "tls": tls}},
    )
    database = open_database(config.database_url)
    server = StowServer(config, InstanceStore(database, FileStore(config.store_dir)))
    server.start()
    try:
        assert server.url.startswith("https://127.0.0.1:")
        trusted = {"kind": "dicomweb", "url": server.url, "ca_certificates": str(pki / "ca.crt")}
        certified = {
            **trusted,
            "name": "with-certificate",
            "certificate": str(pki / "camera.crt"),
            "private_key": str(pki / "camera.key"),
        }
        local.result([trusted, certified])
        local.send()
        rows = dict(local.rows("SELECT label, state || ' ' || last_message FROM delivery"))
        assert rows["with-certificate"] == "DONE stored (HTTP 200)"
        # Without a client certificate the node is turned away: retried, in one sentence.
        address = server.url.removeprefix("https://").removesuffix("/dicomweb")
        assert rows[server.url] == (
            f"PENDING {address} closed the connection without a response "
            "(does it demand a client certificate?)"
        )
        with database.engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM instance")).scalar() == 1
    finally:
        server.stop()
        database.dispose()
