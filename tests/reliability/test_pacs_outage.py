"""PACS outage: the destination is down for several retry periods while 20 studies are
analysed; every SR arrives once it is back, and none arrives twice."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from harness import Sink, Study, free_port, node_config, send_with_storescu, wait_for

pytestmark = [pytest.mark.reliability, pytest.mark.peers, pytest.mark.timeout(300)]

STUDIES = 20
#: Backoff 0.5 s doubling to 2 s: the outage below spans several retry periods.
INITIAL_BACKOFF, MAX_BACKOFF = 0.5, 2.0
OUTAGE_AFTER_ANALYSIS = 8.0


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
