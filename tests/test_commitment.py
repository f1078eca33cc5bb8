"""Storage commitment against real peers: Orthanc's Storage Commitment SCP, C-FIND read-back
from Orthanc and DCMTK dcmqrscp, and DCMTK storescp, which supports neither.

Each test delivers a real SR with the node's own functions (job, delivery, C-STORE), runs
the commitment sweep, and reads the outcome from the database rows, the status command and
the metrics. The node's SCP runs in this process on a free port: that is where Orthanc sends
its N-EVENT-REPORT, on an association of its own.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, build_role, evt
from sqlalchemy import select
from typer.testing import CliRunner

from factory import nm_dataset, write
from mibi_node.cli import app
from mibi_node.config import Config
from mibi_node.dispatch.commitment import (
    STORAGE_COMMITMENT_PUSH_MODEL,
    CommitmentOutcome,
    commit_deliveries,
)
from mibi_node.dispatch.deliveries import deliver
from mibi_node.dispatch.destinations import Destination
from mibi_node.jobs.queue import CompletedJob, claim_jobs, complete_job
from mibi_node.metrics import render_metrics
from mibi_node.reception.scp import StorageSCP
from mibi_node.storage.database import Database, open_database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import InstanceStore
from mibi_node.storage.models import (
    AuditEvent,
    CommitmentState,
    Delivery,
    DeliveryState,
    Job,
    Study,
    StudyState,
)
from mibi_node.web.reader import Reader
from mibi_node.web.summaries import delivery_rows
from node import dcmtk_env
from orthanc import OrthancServer, find_orthanc
from ports import free_port
from test_dispatch_scu import sr_for, wait_listening

pytestmark = pytest.mark.peers

NODE_AE = "MIBI_NODE"


@dataclass
class LocalNode:
    """The parts of a node a commitment needs: database, results, SCP, configuration."""

    config: Config
    database: Database
    scp: StorageSCP | None

    @property
    def port(self) -> int:
        return self.config.node.port

    @property
    def results(self) -> Path:
        return self.config.results_dir

    def deliver(self, destination: Destination) -> tuple[int, Dataset]:
        """Make a result for a new study and send it to ``destination``; its delivery id."""
        study_uid = generate_uid()
        sr = sr_for([nm_dataset(study_uid, seed=i) for i in range(2)])
        name = f"sr-{sr.SOPInstanceUID}.dcm"
        write(sr, self.results / name)
        with self.database.session() as session, session.begin():
            study = Study(study_instance_uid=study_uid, state=StudyState.QUEUED)
            session.add(study)
            session.flush()
            session.add(Job(study_id=study.id, version=1))
        [job] = claim_jobs(self.database, "w", 60, 1)
        done = CompletedJob(
            {}, {}, "b 1", name, str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID), (name,),
            (destination.model_dump(mode="json"),),
        )  # fmt: skip
        [delivery_id] = complete_job(self.database, "w", job.id, done)
        [sent] = deliver(
            self.database,
            self.results,
            self.config.dispatch,
            calling_ae_title=NODE_AE,
            owner="w",
            delivery_ids=[delivery_id],
        )
        assert sent.state is DeliveryState.DONE, sent.message
        return delivery_id, sr

    def sweep(self) -> list[CommitmentOutcome]:
        return commit_deliveries(
            self.database, self.results, self.config.dispatch, calling_ae_title=NODE_AE
        )

    def row(self, delivery_id: int) -> dict[str, Any]:
        with self.database.session() as session:
            row = session.get_one(Delivery, delivery_id)
            names = ("state", "commitment", "commit_attempts", "commit_transaction_uid")
            names += ("commit_message", "committed_at", "commit_resends", "attempts")
            return {name: getattr(row, name) for name in names}

    def wait_for(self, delivery_id: int, state: CommitmentState, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while self.row(delivery_id)["commitment"] is not state:
            assert time.monotonic() < deadline, (state, self.row(delivery_id))
            time.sleep(0.05)

    def audit(self) -> list[tuple[str, str]]:
        with self.database.session() as session:
            rows = session.scalars(
                select(AuditEvent).where(AuditEvent.kind == "commitment").order_by(AuditEvent.id)
            )
            return [(row.outcome, row.message) for row in rows]

    def metric(self, name: str, **labels: str) -> float:
        body, _ = render_metrics(self.database, self.config)
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        raise KeyError(name)


@pytest.fixture
def local_node(tmp_path: Path) -> Iterator[Callable[..., LocalNode]]:
    """Make the node of one test, sending to the given destinations; ``scp=True`` also
    listens on ``port`` (for reports on new associations)."""
    saved = (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET)
    made: list[LocalNode] = []

    def _make(
        *destinations: Destination,
        scp: bool = True,
        database_url: str = "",
        port: int = 0,
        **dispatch: Any,
    ) -> LocalNode:
        data_dir = tmp_path / "var"
        data_dir.mkdir(exist_ok=True)
        node = {"ae_title": NODE_AE, "host": "127.0.0.1", "port": port or free_port()}
        config = Config.model_validate(
            {
                "node": {**node, "data_dir": str(data_dir)},
                "storage": {"min_free_mb": 0},
                "database": {"url": database_url},
                # The SCP takes reports only while a destination asks for them.
                "dispatch": {"timeout": 5, "destinations": destinations, **dispatch},
            }
        )
        config.results_dir.mkdir(parents=True, exist_ok=True)
        database = open_database(config.database_url)
        server = None
        if scp:
            server = StorageSCP(config, InstanceStore(database, FileStore(config.store_dir)))
            server.start()
        made.append(LocalNode(config, database, server))
        return made[-1]

    yield _make
    for node in made:
        if node.scp is not None:
            node.scp.stop(timeout=5)
        node.database.dispose()
    tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET = saved


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    """Start Orthanc (its Storage Commitment SCP is always on) knowing the given modalities."""
    if find_orthanc() is None:
        pytest.skip("Orthanc is not installed: run scripts/install-peers.sh")
    started: list[OrthancServer] = []

    def _start(modalities: dict[str, Any]) -> OrthancServer:
        server = OrthancServer(tmp_path / f"orthanc-{len(started)}", modalities=modalities)
        started.append(server)
        return server.start()

    yield _start
    for server in started:
        server.stop(grace=0.2)


def _to(pacs: OrthancServer, commitment: str) -> Destination:
    """Orthanc as a destination that asks for ``commitment``."""
    return Destination.model_validate(
        {
            "ae_title": pacs.ae_title,
            "host": "127.0.0.1",
            "port": pacs.dicom_port,
            "commitment": commitment,
        }
    )


# --- Storage Commitment Push Model ---------------------------------------------------------


def test_orthanc_commits_what_it_stored(database_url: str, local_node, orthanc) -> None:
    port = free_port()
    pacs = orthanc({"node": [NODE_AE, "127.0.0.1", port]})
    node = local_node(_to(pacs, "storage-commitment"), database_url=database_url, port=port)
    delivery_id, sr = node.deliver(node.config.dispatch.destinations[0])
    row = node.row(delivery_id)
    assert (row["state"], row["commitment"]) == (DeliveryState.DONE, CommitmentState.PENDING)
    assert row["commit_transaction_uid"] is None and row["commit_attempts"] == 0

    node.sweep()  # N-ACTION; Orthanc reports on a new association to the node's SCP
    node.wait_for(delivery_id, CommitmentState.COMMITTED)
    row = node.row(delivery_id)
    assert row["state"] is DeliveryState.DONE and row["committed_at"] is not None
    assert row["commit_attempts"] == 1 and row["commit_transaction_uid"]
    assert row["commit_message"] == "the PACS committed all 1 instance(s)"
    [stored] = pacs.instances_of_study(str(sr.StudyInstanceUID))
    assert stored["SOPInstanceUID"] == str(sr.SOPInstanceUID)
    assert node.audit() == [("committed", "")]
    assert node.metric("mibi_node_delivery_commitments", state="COMMITTED") == 1
    assert node.metric("mibi_node_deliveries_uncommitted") == 0
    assert node.sweep() == []  # settled: nothing is asked again


def test_no_report_asks_again_with_the_same_transaction_then_fails_with_an_alert(
    local_node, orthanc
) -> None:
    # Orthanc accepts the N-ACTION but reports to an address where nothing listens.
    pacs = orthanc({"node": [NODE_AE, "127.0.0.1", free_port()]})
    destination = _to(pacs, "storage-commitment")
    node = local_node(destination, commitment_timeout=0.5, commitment_attempts=2)
    delivery_id, _ = node.deliver(destination)

    [first] = node.sweep()
    assert first.commitment is CommitmentState.PENDING
    assert first.message == "N-ACTION accepted; waiting up to 0.5 s for the PACS's report"
    transaction = node.row(delivery_id)["commit_transaction_uid"]
    assert node.sweep() == []  # not due yet
    time.sleep(0.6)
    [second] = node.sweep()
    assert second.commitment is CommitmentState.PENDING
    row = node.row(delivery_id)
    assert row["commit_attempts"] == 2 and row["commit_transaction_uid"] == transaction
    time.sleep(0.6)
    [last] = node.sweep()
    assert last.commitment is CommitmentState.FAILED
    assert last.message == (
        "not committed after 2 request(s), 0.5 s each: "
        "the PACS accepted the N-ACTION but sent no report"
    )
    row = node.row(delivery_id)
    assert (row["state"], row["commitment"]) == (DeliveryState.DONE, CommitmentState.FAILED)
    assert node.metric("mibi_node_deliveries_uncommitted") == 1
    assert node.audit() == [("failed", last.message)]
    # The alert is where people look: the deliveries data and `mibi-node status`.
    reader = Reader(node.database)
    [shown] = delivery_rows(reader)
    reader.dispose()
    assert (shown.id, shown.state, shown.commitment) == (delivery_id, "DONE", "FAILED")
    status = CliRunner().invoke(
        app, ["status", "--data-dir", str(node.config.node.data_dir), "--json"]
    )
    assert status.exit_code == 0, status.output
    [listed] = json.loads(status.output)["deliveries"]
    assert listed["commitment"] == "FAILED" and listed["commitment_message"] == last.message


def test_reported_failures_send_the_files_again_once_then_fail(local_node, orthanc) -> None:
    port = free_port()
    pacs = orthanc({"node": [NODE_AE, "127.0.0.1", port]})
    destination = _to(pacs, "storage-commitment")
    node = local_node(destination, port=port)
    delivery_id, sr = node.deliver(destination)
    uid = str(sr.SOPInstanceUID)
    pacs.delete_instance(uid)  # the PACS acknowledged the C-STORE, then lost the file

    node.sweep()
    deadline = time.monotonic() + 15
    while node.row(delivery_id)["state"] is not DeliveryState.PENDING:
        assert time.monotonic() < deadline, node.row(delivery_id)
        time.sleep(0.05)
    row = node.row(delivery_id)
    assert row["commit_resends"] == 1 and row["commit_transaction_uid"] is None
    assert row["commit_message"] == (
        "the PACS could not commit 1 of 1 instance(s): 0x0112 (no such object instance); "
        "sending the files again"
    )
    [again] = deliver(
        node.database, node.results, node.config.dispatch, calling_ae_title=NODE_AE, owner="w"
    )
    assert again.state is DeliveryState.DONE and pacs.instances_of_study(str(sr.StudyInstanceUID))
    assert node.row(delivery_id)["commitment"] is CommitmentState.PENDING
    pacs.delete_instance(uid)  # lost again: this time the failure stands
    node.sweep()
    node.wait_for(delivery_id, CommitmentState.FAILED)
    row = node.row(delivery_id)
    assert row["state"] is DeliveryState.DONE and row["commit_resends"] == 1
    assert row["commit_message"].endswith("(no such object instance), after sending them again")
    assert [outcome for outcome, _ in node.audit()] == ["resend", "failed"]


def test_reports_are_answered_with_precise_statuses(local_node) -> None:
    node = local_node(Destination(ae_title="PACS", host="127.0.0.1", port=104, commitment="auto"))
    # A delivery waiting for the report of one transaction, as the sweep leaves it.
    with node.database.session() as session, session.begin():
        study = Study(study_instance_uid=generate_uid(), state=StudyState.DONE)
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, version=1)
        session.add(job)
        session.flush()
        delivery = Delivery(
            job_id=job.id,
            destination={"ae_title": "PACS", "host": "127.0.0.1", "port": 104, "files": ["a"]},
            label="PACS",
            state=DeliveryState.DONE,
            commitment=CommitmentState.PENDING,
            commit_transaction_uid="1.2.3.4",
            commit_attempts=1,
        )
        session.add(delivery)
        session.flush()
        delivery_id = delivery.id

    def report(event_type: int, transaction_uid: str | None) -> int:
        information = Dataset()
        if transaction_uid is not None:
            information.TransactionUID = transaction_uid
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
        item.ReferencedSOPInstanceUID = "1.2.3.5"
        information.ReferencedSOPSequence = [item]
        ae = AE(ae_title="PACS")
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
        # As Orthanc does: the PACS is the SCP of Storage Commitment on its own association.
        role = build_role(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=False, scp_role=True)
        association = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE, ext_neg=[role])
        assert association.is_established
        status, _ = association.send_n_event_report(
            information, event_type, STORAGE_COMMITMENT_PUSH_MODEL, "1.2.840.10008.1.20.1.1"
        )
        association.release()
        return int(status.Status)

    assert report(3, "1.2.3.4") == 0x0113  # no such event type
    assert report(1, None) == 0x0115  # no Transaction UID
    assert report(1, "9.9.9") == 0x0115  # a transaction this node never asked
    assert node.row(delivery_id)["commitment"] is CommitmentState.PENDING
    assert report(1, "1.2.3.4") == 0x0000
    committed = node.row(delivery_id)
    assert committed["commitment"] is CommitmentState.COMMITTED
    assert report(1, "1.2.3.4") == 0x0000  # a repeated report changes nothing
    assert node.row(delivery_id)["committed_at"] == committed["committed_at"]


def test_a_report_over_the_n_actions_association_is_taken(local_node) -> None:
    # A pynetdicom PACS that answers the N-ACTION, then reports over the same association.
    pacs = AE(ae_title="SAME_ASSOC")
    pacs.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL)
    pacs.add_supported_context("1.2.840.10008.5.1.4.1.1.88.34")
    answers: list[int] = []

    def report_later(assoc: Any, information: Dataset) -> None:
        time.sleep(0.1)  # after the N-ACTION response
        reply = Dataset()
        reply.TransactionUID = information.TransactionUID
        reply.ReferencedSOPSequence = information.ReferencedSOPSequence
        status, _ = assoc.send_n_event_report(
            reply, 1, STORAGE_COMMITMENT_PUSH_MODEL, "1.2.840.10008.1.20.1.1"
        )
        answers.append(int(status.Status))

    def on_action(event: Any) -> tuple[int, None]:
        information = event.action_information
        threading.Thread(target=report_later, args=(event.assoc, information)).start()
        return 0x0000, None

    port = free_port()
    server = pacs.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_N_ACTION, on_action), (evt.EVT_C_STORE, lambda event: 0x0000)],
    )
    try:
        destination = Destination(
            ae_title="SAME_ASSOC", host="127.0.0.1", port=port, commitment="storage-commitment"
        )
        node = local_node(destination, scp=False)  # nothing listens for a new association
        delivery_id, _ = node.deliver(destination)
        assert node.sweep() == []  # settled by the report before the sweep recorded a wait
    finally:
        server.shutdown()
    row = node.row(delivery_id)
    assert row["commitment"] is CommitmentState.COMMITTED and row["commit_attempts"] == 1
    assert answers == [0x0000]


# --- C-FIND read-back and "auto" -------------------------------------------------------------


def test_c_find_reads_every_instance_back(local_node, orthanc) -> None:
    pacs = orthanc({"node": [NODE_AE, "127.0.0.1", free_port()]})  # C-FIND: known AEs only
    node = local_node(scp=False)
    kept, _ = node.deliver(_to(pacs, "find"))
    lost, lost_sr = node.deliver(_to(pacs, "find"))
    pacs.delete_instance(str(lost_sr.SOPInstanceUID))

    outcomes = {outcome.delivery_id: outcome for outcome in node.sweep()}
    assert outcomes[kept].commitment is CommitmentState.COMMITTED
    assert outcomes[kept].message == "C-FIND found all 1 instance(s) at the PACS"
    assert outcomes[lost].commitment is CommitmentState.PENDING  # asked again after the timeout
    assert outcomes[lost].message == "C-FIND found 0 of 1 instance(s) at the PACS"
    assert node.row(lost)["commit_attempts"] == 1


def _wait_for_echo(port: int, ae_title: str, process: subprocess.Popen[bytes]) -> None:
    """Wait until a DICOM peer answers an association (C-ECHO's context)."""
    ae = AE(ae_title=NODE_AE)
    ae.add_requested_context("1.2.840.10008.1.1")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the peer exited with status {process.returncode}"
        association = ae.associate("127.0.0.1", port, ae_title=ae_title)
        if association.is_established:
            association.release()
            return
        time.sleep(0.1)
    raise AssertionError(f"no DICOM peer on port {port}")


def test_auto_reads_back_where_storage_commitment_is_refused(
    local_node, require_tool, tmp_path: Path
) -> None:
    # DCMTK's dcmqrscp: an archive with C-STORE and C-FIND, no Storage Commitment.
    dcmqrscp = require_tool("dcmqrscp")
    port = free_port()
    (tmp_path / "archive").mkdir()
    config = tmp_path / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 4\n"
        "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nARCHIVE {tmp_path / 'archive'} RW (10, 64mb) ANY\nAETable END\n"
    )
    with open(tmp_path / "dcmqrscp.log", "wb") as log:
        process = subprocess.Popen(
            [dcmqrscp, "-c", str(config), str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dcmtk_env(),
        )
    try:
        _wait_for_echo(port, "ARCHIVE", process)
        node = local_node(scp=False)
        destination = Destination(
            ae_title="ARCHIVE", host="127.0.0.1", port=port, commitment="auto"
        )
        delivery_id, _ = node.deliver(destination)
        [outcome] = node.sweep()
    finally:
        process.terminate()
        process.wait(10)
    assert outcome.commitment is CommitmentState.COMMITTED, outcome.message
    assert outcome.message == "C-FIND found all 1 instance(s) at the PACS"
    assert node.row(delivery_id)["commit_attempts"] == 1


def test_auto_against_a_pacs_with_neither_is_unconfirmed(
    local_node, require_tool, tmp_path: Path
) -> None:
    storescp = require_tool("storescp")
    port = free_port()
    (tmp_path / "pacs").mkdir()
    process = subprocess.Popen(
        [storescp, "-aet", "PACS", "-od", str(tmp_path / "pacs"), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dcmtk_env(),
    )
    try:
        wait_listening(port, process)
        node = local_node(scp=False)
        asked, _ = node.deliver(
            Destination(ae_title="PACS", host="127.0.0.1", port=port, commitment="auto")
        )
        # The default asks nothing: the C-STORE response stays the last word.
        silent, _ = node.deliver(Destination(ae_title="PACS", host="127.0.0.1", port=port))
        outcomes = node.sweep()
    finally:
        process.terminate()
        process.wait(10)
    assert [(o.delivery_id, o.commitment) for o in outcomes] == [
        (asked, CommitmentState.UNCONFIRMED)
    ]
    assert outcomes[0].message.startswith("the PACS supports neither Storage Commitment nor")
    assert node.row(asked)["state"] is DeliveryState.DONE
    row = node.row(silent)
    assert (row["state"], row["commitment"]) == (DeliveryState.DONE, CommitmentState.NONE)
    assert len(list((tmp_path / "pacs").iterdir())) == 2
    assert node.metric("mibi_node_delivery_commitments", state="UNCONFIRMED") == 1
