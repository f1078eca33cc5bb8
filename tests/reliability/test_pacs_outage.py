"""PACS outage: the destination is down for several retry periods while 20 studies are
analysed; every SR arrives once it is back, and none arrives twice. And a storage commitment
whose report was lost while the node went down completes after the restart."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from harness import (
    Sink,
    Study,
    free_port,
    node_config,
    send_with_storescu,
    wait_for,
    wait_for_port_closed,
)

from orthanc import OrthancServer, find_orthanc

pytestmark = [pytest.mark.reliability, pytest.mark.peers, pytest.mark.timeout(300)]

STUDIES = 20
#: Backoff 0.5 s doubling to 2 s: the outage below spans several retry periods.
INITIAL_BACKOFF, MAX_BACKOFF = 0.5, 2.0
OUTAGE_AFTER_ANALYSIS = 8.0
#: Seconds the node waits for a commitment report before it sends the N-ACTION again.
COMMITMENT_TIMEOUT = 3.0


def test_every_sr_arrives_once_after_the_pacs_comes_back(
    node_factory, dcmtk, bundle: Path, phantoms: list[Study], tmp_path: Path
) -> None:
    studies = phantoms[:STUDIES]
    pacs_port = free_port()  # nothing listens here yet: the PACS is down
    node = node_factory(
        node_config(
            bundle,
            pacs_port,
            dispatch={
                "initial_backoff_seconds": INITIAL_BACKOFF,
                "max_backoff_seconds": MAX_BACKOFF,
            },
        )
    )
    down_since = time.monotonic()
    for study in studies:
        code, acknowledged = send_with_storescu(node.port, study.files)
        assert code == 0 and len(acknowledged) == 2
    # Every study is analysed although its SR cannot go anywhere.
    wait_for(
        lambda: node.query("SELECT count(*) FROM job WHERE state = 'DONE'") == [(STUDIES,)],
        180,
        f"{STUDIES} studies analysed during the outage",
        node,
    )
    time.sleep(OUTAGE_AFTER_ANALYSIS)  # several retry periods with every delivery due
    [(pending, least, most)] = node.query(
        "SELECT count(*), min(attempts), max(attempts) FROM delivery WHERE state != 'DONE'"
    )
    assert pending == STUDIES and least >= 3, (pending, least, most)
    messages = {m for (m,) in node.query("SELECT DISTINCT last_message FROM delivery")}
    assert messages == {f"connection refused by 127.0.0.1:{pacs_port}"}, messages
    outage = time.monotonic() - down_since
    sink = Sink(tmp_path / "pacs", pacs_port).start()
    back = time.monotonic()
    try:
        wait_for(
            lambda: (
                node.query("SELECT count(*) FROM delivery WHERE state = 'DONE'") == [(STUDIES,)]
            ),
            60,
            "every delivery done after the PACS came back",
            node,
        )
        drained = time.monotonic() - back
        time.sleep(3 * MAX_BACKOFF)  # a late retry would show up here as a second copy
    finally:
        sink.stop()
    received = [ds for ds in sink.received() if ds.Modality == "SR"]
    copies = Counter(str(ds.SOPInstanceUID) for ds in received)
    assert len(copies) == STUDIES and set(copies.values()) == {1}, copies
    assert {str(ds.StudyInstanceUID) for ds in received} == {s.uid for s in studies}
    recorded = {uid for (uid,) in node.query("SELECT sr_sop_instance_uid FROM job")}
    assert recorded == set(copies)
    assert node.query("SELECT count(*) FROM delivery WHERE last_status != 0") == [(0,)]
    print(
        f"\nFIGURES outage: {STUDIES} studies, PACS down {outage:.0f} s, attempts per SR "
        f"during the outage {least}-{most}, all {STUDIES} SRs delivered {drained:.1f} s after "
        f"it came back, copies per SR {sorted(set(copies.values()))}"
    )


def test_a_commitment_lost_with_the_node_completes_after_a_restart(
    node_factory, dcmtk, bundle: Path, phantoms: list[Study], tmp_path: Path
) -> None:
    if find_orthanc() is None:
        pytest.skip("Orthanc is not installed: run scripts/install-peers.sh")
    study = phantoms[0]
    port = free_port()
    # Orthanc (AE PACS) sends its N-EVENT-REPORT on a new association to the node's port.
    pacs = OrthancServer(
        tmp_path / "orthanc", ae_title="PACS", modalities={"node": ["MIBI_NODE", "127.0.0.1", port]}
    )
    dispatch = {
        "destinations": [
            {
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.dicom_port,
                "commitment": "storage-commitment",
            }
        ],
        "commitment_timeout": COMMITMENT_TIMEOUT,
        "commitment_attempts": 10,
    }
    camera = {"ae_title": "GAMMA_CAM1"}
    with pacs:
        # First the node admits only the camera: Orthanc's report is turned away, as if the
        # node were down when it came. Then a power cut, with the N-ACTION sent and no report.
        node = node_factory(
            node_config(
                bundle, pacs.dicom_port, dispatch=dispatch, reception={"allowed_peers": [camera]}
            ),
            data_dir=tmp_path / "var",
            port=port,
        )
        code, acknowledged = send_with_storescu(node.port, study.files)
        assert code == 0 and len(acknowledged) == 2
        wait_for(
            lambda: node.query(
                "SELECT 1 FROM audit_event WHERE kind = 'association' "
                "AND outcome = 'rejected' AND actor LIKE 'PACS@%'"
            ),
            120,
            "Orthanc's commitment report, refused",
            node,
        )
        [(state, commitment, asked, transaction)] = node.query(
            "SELECT state, commitment, commit_attempts, commit_transaction_uid FROM delivery"
        )
        assert (state, commitment, asked) == ("DONE", "PENDING", 1) and transaction
        node.kill()
        wait_for_port_closed(port, 10)
        node = node_factory(
            node_config(
                bundle,
                pacs.dicom_port,
                dispatch=dispatch,
                reception={"allowed_peers": [camera, {"ae_title": "PACS"}]},
            ),
            data_dir=tmp_path / "var",
            port=port,
        )
        wait_for(
            lambda: node.query("SELECT commitment FROM delivery") == [("COMMITTED",)],
            60,
            "the commitment completed after the restart",
            node,
        )
        [(asked, again, message)] = node.query(
            "SELECT commit_attempts, commit_transaction_uid, commit_message FROM delivery"
        )
        srs = [i for i in pacs.instances_of_study(study.uid) if i.get("Modality") == "SR"]
    # Asked again after the timeout, with the same Transaction UID; the SR is there once.
    assert asked >= 2 and again == transaction, (asked, again)
    assert message == "the PACS committed all 2 instance(s)"  # the SR and its key image
    assert len(srs) == 1
