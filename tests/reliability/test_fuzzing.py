"""Fuzzing: hypothesis-made data sets sent with a pynetdicom SCU, raw malformed PDUs and
truncated associations over a socket, and mutated files given to the imaging reader and to
``mibi-node predict``. Every one gets a failure status, an abort or a readable error; the
node keeps serving, and nothing half-written is stored."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import time
import warnings
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from harness import Study, node_config, send_with_storescu, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pdus import (
    NM_STORAGE,
    RawPeer,
    associate_rq,
    c_store_rq,
    element,
    established,
    p_data,
)
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE, _config

from mibi_node.errors import UnusableStudyError
from node import NodeProcess

pytestmark = [pytest.mark.reliability, pytest.mark.peers, pytest.mark.timeout(420)]

SETTINGS = settings(
    deadline=None,
    database=None,  # the same examples on every run: derandomised below
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)

# -- data sets made of raw elements --------------------------------------------------------

_VRS = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB",
    b"OD", b"OF", b"OL", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"TM", b"UC", b"UI",
    b"UL", b"UN", b"UR", b"US", b"UT", b"XX",
]  # fmt: skip
#: Tags the node and its reader look at, so that the fuzzing reaches past the parser.
_INTERESTING = [
    0x00080060, 0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00081030, 0x0008103E,
    0x00280010, 0x00280011, 0x00280008, 0x00280100, 0x00280002, 0x00280004, 0x00280030,
    0x00540016, 0x00540012, 0x00540022, 0x00540400, 0x00080008, 0x00080005, 0x00100010,
    0x00100020, 0x7FE00010, 0x00280009, 0x00540081, 0x00200013, 0x00180050,
]  # fmt: skip


def _item(body: bytes) -> bytes:
    return b"\xfe\xff\x00\xe0" + struct.pack("<L", len(body)) + body


@st.composite
def _elements(draw: st.DrawFn, explicit: bool, depth: int = 0) -> list[tuple[int, bytes]]:
    elements = []
    for _ in range(draw(st.integers(0, 6 if depth else 12))):
        tag = draw(
            st.one_of(
                st.sampled_from(_INTERESTING),
                st.integers(0x00080000, 0x7FE0FFFF).filter(lambda t: t >> 16 != 0xFFFE),
            )
        )
        vr = draw(st.sampled_from(_VRS))
        if vr == b"SQ" and depth < 2:
            items = [
                b"".join(e for _, e in draw(_elements(explicit, depth + 1)))
                for _ in range(draw(st.integers(0, 2)))
            ]
            value = b"".join(_item(body) for body in items)
        else:
            value = draw(st.binary(max_size=96))
        declared = draw(st.one_of(st.none(), st.none(), st.integers(0, 0xFFFFFFFF)))
        elements.append((tag, element(tag, vr, value, explicit, declared)))
    return elements


@st.composite
def fuzzed_instances(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(transfer syntax claimed, SOP Instance UID, data set bytes) of one hostile instance."""
    explicit = draw(st.booleans())
    uid = generate_uid()
    base = {
        0x00080016: (b"UI", NM_STORAGE.encode() + b"\0"),
        0x00080018: (b"UI", uid.encode() + (b"\0" if len(uid) % 2 else b"")),
        # A few studies, each with many series: routing reads one header per series.
        0x0020000D: (b"UI", b"1.2.3.4.5.6.%d" % draw(st.integers(1, 4))),
        0x0020000E: (b"UI", generate_uid().encode().ljust(64, b"\0")[:64]),
        0x00080060: (b"CS", b"NM"),
        0x00081030: (b"LO", b"PARATHYROID MIBI"),
    }
    elements = [
        (tag, element(tag, vr, value, explicit, None))
        for tag, (vr, value) in base.items()
        if draw(st.integers(0, 9))  # each identifying element is sometimes missing
    ]
    if draw(st.booleans()):  # pixel data that may or may not match rows, columns, frames
        rows, columns, frames = (draw(st.integers(0, 64)) for _ in range(3))
        for tag, number in ((0x00280010, rows), (0x00280011, columns)):
            elements.append((tag, element(tag, b"US", struct.pack("<H", number), explicit, None)))
        frames_text = str(frames).encode().ljust(2, b" ")
        elements.append((0x00280008, element(0x00280008, b"IS", frames_text, explicit, None)))
        elements.append((0x00280100, element(0x00280100, b"US", b"\x10\x00", explicit, None)))
        pixels = bytes(draw(st.integers(0, 3 * 64 * 64)))
        elements.append((0x7FE00010, element(0x7FE00010, b"OW", pixels, explicit, None)))
    elements += draw(_elements(explicit))
    if draw(st.booleans()):
        elements.sort(key=lambda pair: pair[0])
    body = b"".join(encoded for _, encoded in elements)
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    # The syntax claimed: usually the one used, sometimes another (a lying modality).
    claimed = draw(
        st.sampled_from(
            [ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian] * 4
            + [
                ImplicitVRLittleEndian if explicit else ExplicitVRLittleEndian,
                ExplicitVRBigEndian,
                DeflatedExplicitVRLittleEndian,
                JPEGBaseline8Bit,
            ]
        )
    )
    return str(claimed), uid, body


def _file(folder: Path, syntax: str, uid: str, body: bytes) -> Path:
    """The data set behind a File Meta header, as pynetdicom's chunked sender wants it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = NM_STORAGE
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    path = folder / f"{uid}.dcm"
    path.write_bytes(buffer.getvalue() + body)
    return path


class _Sender:
    """One pynetdicom association at a time, renewed when the node aborts one."""

    SYNTAXES = [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
        JPEGBaseline8Bit,
    ]

    def __init__(self, port: int) -> None:
        self.port = port
        self.ae = AE(ae_title="FUZZER")
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 20
        for syntax in self.SYNTAXES:  # one context per syntax: the file's claim picks one
            self.ae.add_requested_context(NM_STORAGE, syntax)
        self.assoc = None
        self.associations = 0

    def send(self, path: Path) -> int | None:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title="MIBI_NODE")
            self.associations += 1
            assert self.assoc.is_established, "the node refused a well-formed association"
        status = self.assoc.send_c_store(path)
        return int(status.Status) if "Status" in status else None

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def _stored_consistently(node: NodeProcess) -> int:
    """Every row's file parses and every stored file has its row; returns the row count."""
    rows = dict(node.query("SELECT path, sop_instance_uid FROM instance"))
    store = node.data_dir / "store"
    on_disk = {
        str(p.relative_to(store))
        for p in store.rglob("*")
        if p.is_file() and ".incoming" not in p.parts
    }
    assert on_disk == set(rows), "files without rows or rows without files"
    for path, uid in rows.items():
        header = pydicom.dcmread(store / path, stop_before_pixels=True, force=True)
        assert str(header.file_meta.MediaStorageSOPInstanceUID) == uid
    return len(rows)


def test_fuzzed_data_sets_get_failure_statuses_and_nothing_half_written(
    node_factory, dcmtk, bundle: Path, phantoms: list[Study], tmp_path: Path
) -> None:
    node = node_factory(
        node_config(
            bundle,
            1,  # no PACS: the results stay on the node
            dispatch={"destinations": []},
            jobs={"max_attempts": 2},
            reception={"acse_timeout": 2, "network_timeout": 5, "dimse_timeout": 5},
        )
    )
    folder = tmp_path / "fuzz"
    folder.mkdir()
    sender = _Sender(node.port)
    outcomes: dict[str, int] = {}
    accepted: set[str] = set()

    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are, unparsed

    @settings(SETTINGS, max_examples=200)
    @given(fuzzed_instances())
    def send_one(instance: tuple[str, str, bytes]) -> None:
        syntax, uid, body = instance
        status = sender.send(_file(folder, syntax, uid, body))
        key = "abort" if status is None else f"0x{status:04X}"
        outcomes[key] = outcomes.get(key, 0) + 1
        assert status in (None, 0x0000, 0xC210, 0xA900), f"status {key}"
        if status == 0x0000:
            accepted.add(uid)

    try:
        send_one()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        sender.close()
    # Nothing half-written: exactly the accepted instances are stored, each readable.
    stored = {uid for (uid,) in node.query("SELECT sop_instance_uid FROM instance")}
    assert stored == accepted
    assert _stored_consistently(node) == len(accepted)
    # The node still takes a well-formed study, and routes and analyses everything it kept:
    # a hostile instance that was stored must not stop the sweep or crash the worker.
    study = phantoms[0]
    code, acknowledged = send_with_storescu(node.port, study.files)
    assert code == 0 and len(acknowledged) == 2
    wait_for(
        lambda: (
            not node.query(
                "SELECT 1 FROM study WHERE state IN ('RECEIVING', 'STABLE', 'QUEUED', 'RUNNING')"
            )
        ),
        120,
        "every study routed and analysed",
        node,
    )
    [(state,)] = node.query(f"SELECT state FROM study WHERE study_instance_uid = '{study.uid}'")
    assert state == "DONE"
    failed = node.query("SELECT error FROM job WHERE state = 'FAILED' AND traceback IS NOT NULL")
    assert failed == [], f"jobs that failed with a traceback, not a readable error: {failed}"
    log = node.log()
    assert "assembly sweep failed" not in log
    assert "unexpected error while storing" not in log
    assert not list((node.data_dir / "store" / ".incoming").iterdir())
    print(
        f"\nFIGURES fuzz-datasets: {sum(outcomes.values())} data sets in "
        f"{sender.associations} associations, outcomes {dict(sorted(outcomes.items()))}, "
        f"{len(accepted)} stored; studies {dict(node.query('SELECT state, count(*) FROM study GROUP BY state'))}"
    )


# -- raw PDUs over a socket ------------------------------------------------------------------


#: Malformed PDUs sent on a fresh connection, each expected to end it.
BEFORE_ASSOCIATION = {
    "unknown PDU type": struct.pack(">BBL", 0x09, 0, 4) + b"abcd",
    "P-DATA before any association": p_data([(1, 0x03, b"\0" * 8)]),
    "A-ASSOCIATE-RQ, wrong protocol version": associate_rq()[:6] + b"\x00\x07" + associate_rq()[8:],
    "A-ASSOCIATE-RQ, item lengths past the PDU": associate_rq()[:-8] + b"\x51\x00\xff\xff" + bytes(4),
    "A-ASSOCIATE-RQ, PDU length too short": struct.pack(">BBL", 0x01, 0, 10) + associate_rq()[6:],
    "A-ASSOCIATE-RQ, no presentation context": struct.pack(">BBL", 0x01, 0, 68) + associate_rq()[6:74],
    "A-RELEASE-RQ before any association": struct.pack(">BBL", 0x05, 0, 4) + bytes(4),
    "zero bytes": bytes(64),
}  # fmt: skip


def _after_association(uid: str) -> dict[str, bytes]:
    command = c_store_rq(uid)
    return {
        "PDV longer than its PDU": struct.pack(">BBL", 0x04, 0, 12)
        + struct.pack(">LBB", 4000, 1, 0x03)
        + bytes(6),
        "PDV on a context never proposed": p_data([(7, 0x03, command)]),
        "command that is not a DIMSE message": p_data([(1, 0x03, bytes(range(200)))]),
        "data set before its command": p_data([(1, 0x02, b"\x08\x00\x60\x00CS\x02\x00NM")]),
        "A-ASSOCIATE-RQ again": associate_rq(),
        "A-RELEASE-RP nobody asked for": struct.pack(">BBL", 0x06, 0, 4) + bytes(4),
        "unknown PDU type": struct.pack(">BBL", 0x0A, 0, 2) + b"zz",
    }


def test_raw_malformed_pdus_and_truncated_associations(
    node_factory, dcmtk, phantoms: list[Study], tmp_path: Path
) -> None:
    timeouts = {"acse_timeout": 2, "network_timeout": 2, "dimse_timeout": 2}
    node = node_factory({"reception": {"acceptors": 2, **timeouts}})
    ended: dict[str, float] = {}
    for name, data in BEFORE_ASSOCIATION.items():
        peer = RawPeer(node.port)
        started = time.monotonic()
        peer.send(data)
        assert peer.closed_by_node(), f"{name}: the node kept the connection open"
        ended[name] = time.monotonic() - started
        peer.close()
    for name, data in _after_association(generate_uid()).items():
        peer = established(node.port)
        started = time.monotonic()
        peer.send(data)
        assert peer.closed_by_node(), f"{name}: the node kept the association open"
        ended[name] = time.monotonic() - started
        peer.close()
    # Truncated associations: the peer vanishes in the middle of a C-STORE.
    good = pydicom.dcmread(phantoms[1].files[0])
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False  # as the context says
    pydicom.filewriter.write_dataset(body, good)
    cut_points = [0, 1, 100, len(body.getvalue()) // 2, len(body.getvalue()) - 1]
    for cut in cut_points:
        peer = established(node.port)
        peer.send(p_data([(1, 0x03, c_store_rq(str(good.SOPInstanceUID)))]))
        peer.send(p_data([(1, 0x00, body.getvalue()[: max(cut, 1)])]))
        peer.close()  # gone, without A-ABORT
    # A peer that sends a complete data set and vanishes before the answer still gets it
    # stored (the bytes were all there); one that never completes gets nothing stored.
    hypothesis_examples = _fuzz_raw_after_association(node.port)
    time.sleep(1.0)
    assert node.query(
        f"SELECT count(*) FROM instance WHERE sop_instance_uid = '{good.SOPInstanceUID}'"
    ) == [(0,)]
    assert node.query("SELECT count(*) FROM instance") == [(0,)]
    wait_for(  # removed when the association ends, or at most 2 x 2 s + 5 s later
        lambda: not list((node.data_dir / "store" / ".incoming").iterdir()),
        20,
        "no partial file left in .incoming",
        node,
    )
    # Still serving, with both acceptors alive.
    code, acknowledged = send_with_storescu(node.port, phantoms[2].files)
    assert code == 0 and len(acknowledged) == 2
    assert node.query("SELECT count(*) FROM instance") == [(2,)]
    log = node.log()
    assert "exited with status" not in log
    print(
        f"\nFIGURES fuzz-pdus: {len(BEFORE_ASSOCIATION)} malformed PDUs before and "
        f"{len(_after_association('1'))} after association, {len(cut_points)} associations "
        f"cut mid-C-STORE, {hypothesis_examples} random PDUs; slowest close "
        f"{max(ended.values()):.1f} s ({max(ended, key=ended.__getitem__)})"
    )


def _fuzz_raw_after_association(port: int) -> int:
    """Random PDUs (random type, length and body) on an established association."""
    count = 0

    @settings(SETTINGS, max_examples=40)
    @given(
        kind=st.integers(0, 255),
        declared=st.one_of(st.none(), st.integers(0, 1 << 16)),
        body=st.binary(max_size=512),
        then_close=st.booleans(),
    )
    def one(kind: int, declared: int | None, body: bytes, then_close: bool) -> None:
        nonlocal count
        count += 1
        peer = established(port)
        try:
            length = len(body) if declared is None else min(declared, len(body))
            peer.send(struct.pack(">BBL", kind, 0, length) + body[:length])
            if then_close:
                return  # a truncated association
            # Whatever that was, the association ends at once: an A-ABORT or a closed
            # connection for garbage, an A-RELEASE-RP for the release that follows.
            peer.send(struct.pack(">BBL", 0x05, 0, 4) + bytes(4))
            while (answer := peer.read_pdu()) is not None:
                if answer[0] in (0x06, 0x07):
                    break
            else:
                return  # closed by the node
        finally:
            peer.close()

    one()
    return count


# -- the imaging reader and `mibi-node predict` on mutated files -----------------------------


@st.composite
def _mutation(draw: st.DrawFn, size: int) -> tuple[str, int, bytes]:
    how = draw(st.sampled_from(["truncate", "flip", "overwrite", "splice"]))
    # Most of the header is in the first ~2 kB; the pixels follow.
    offset = draw(st.one_of(st.integers(128, min(size - 1, 2048)), st.integers(0, size - 1)))
    data = draw(st.binary(min_size=1, max_size=16))
    return how, offset, data


def _mutate(original: bytes, how: str, offset: int, data: bytes) -> bytes:
    if how == "truncate":
        return original[:offset]
    if how == "flip":
        return original[:offset] + bytes([original[offset] ^ 0xFF]) + original[offset + 1 :]
    if how == "overwrite":
        return original[:offset] + data + original[offset + len(data) :]
    return original[:offset] + data + original[offset:]


def test_reader_gives_readable_errors_on_mutated_files(
    phantoms: list[Study], tmp_path: Path
) -> None:
    from mibi_node.imaging.nm import read_study

    early, delayed = (path.read_bytes() for path in phantoms[3].files)
    outcomes = {"read": 0, "unusable": 0}

    @settings(SETTINGS, max_examples=300)
    @given(
        which=st.sampled_from(["early", "delayed", "both"]),
        mutation=_mutation(len(early)),
        second=_mutation(len(delayed)),
    )
    def read_one(which: str, mutation: tuple[str, int, bytes], second: tuple[str, int, bytes]):
        folder = tmp_path / "mutated"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        first = _mutate(early, *mutation) if which in ("early", "both") else early
        other = _mutate(delayed, *second) if which in ("delayed", "both") else delayed
        (folder / "early.dcm").write_bytes(first)
        (folder / "delayed.dcm").write_bytes(other)
        try:
            with warnings.catch_warnings():  # pydicom warns about every damaged value
                warnings.simplefilter("ignore")
                read_study([folder / "early.dcm", folder / "delayed.dcm"])
            outcomes["read"] += 1
        except UnusableStudyError as exc:
            assert str(exc) and "Traceback" not in str(exc)
            outcomes["unusable"] += 1

    read_one()
    print(f"\nFIGURES fuzz-reader: 300 mutated studies, outcomes {outcomes}")


def _zero_rows(data: bytes) -> bytes:
    """Rows (0028,0010) set to 0 in place: the pixels no longer fit the image."""
    at = data.index(b"\x28\x00\x10\x00US\x02\x00") + 8
    return data[:at] + b"\x00\x00" + data[at + 2 :]


def test_predict_on_mutated_files_prints_sentences_not_tracebacks(
    bundle: Path, phantoms: list[Study], tmp_path: Path
) -> None:
    folder = tmp_path / "studies"
    cases = {
        "intact": lambda b: b,
        "truncated-in-header": lambda b: b[:400],
        "truncated-in-pixels": lambda b: b[: len(b) - 5000],
        "garbage-after-preamble": lambda b: b[:132] + bytes(range(256)) * 8,
        "flipped-transfer-syntax": lambda b: b.replace(b"1.2.840.10008.1.2.1", b"1.2.840.10008.1.2.5"),
        "rows-zeroed": _zero_rows,
        "file-meta-shifted": lambda b: b[:133] + b"\0" + b[133:],
    }  # fmt: skip
    for index, (name, mutate) in enumerate(cases.items()):
        study = phantoms[10 + index]
        target = folder / name
        target.mkdir(parents=True)
        for path in study.files:
            data = path.read_bytes()
            if "delayed" in path.name or name == "rows-zeroed":
                data = mutate(data)
            (target / path.name).write_bytes(data)
    run = subprocess.run(
        [sys.executable, "-m", "mibi_node.cli", "predict", str(folder)]
        + ["--bundle", str(bundle), "--device", "cpu", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in run.stdout + run.stderr, run.stderr[-3000:]
    assert run.returncode == 1, run.stderr[-3000:]  # some studies cannot be read
    import json

    document = json.loads(run.stdout)
    assert len(document["studies"]) >= 1  # the intact study is classified
    for error in document["errors"]:
        assert error["error"] and "\n" not in error["error"].strip()
    print(
        f"\nFIGURES fuzz-predict: {len(cases)} studies, {len(document['studies'])} classified, "
        f"{len(document['errors'])} readable errors, {len(document['skipped'])} files skipped"
    )
