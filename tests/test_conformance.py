"""docs/conformance.md against the real thing: every statement of the conformance statement.

The tables of the statement marked ``<!-- table: NAME -->`` (and its SR content tree) are
parsed here and compared with what a running ``mibi-node serve`` negotiates and answers to
pynetdicom SCUs on loopback, what the dispatch SCU proposes to a recording pynetdicom SCP,
and what the report package and the worker write, read back with pydicom. The statement
cannot drift from the code without a test here failing. Its Appendix B names the test of
every statement; :func:`test_appendix_b_names_existing_tests` checks that those exist and
that every test here is named there.
"""

from __future__ import annotations

import math
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom
import pydicom
import pynetdicom
import pytest
from pydantic import BaseModel
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, _config, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from sqlalchemy import select, update

import mibi_node
from cases import CLASSES, SC_STORAGE, make_case
from factory import CT_STORAGE, NM_STORAGE, nm_dataset, write
from mibi_node.config import Config, DispatchConfig
from mibi_node.dispatch import Destination, DestinationTLS, send_files
from mibi_node.dispatch.deliveries import deliver, resend_study
from mibi_node.dispatch.scu import _ssl_context as _dispatch_ssl_context
from mibi_node.inference.result import Focus, StudyResult
from mibi_node.inference.worker import Worker
from mibi_node.jobs.queue import CompletedJob, claim_jobs, complete_job
from mibi_node.reception.scp import StorageSCP
from mibi_node.report import build_key_image, build_sr
from mibi_node.storage import (
    Database,
    FileStore,
    InstanceMeta,
    InstanceStore,
    Study,
    StudyState,
    open_database,
)
from mibi_node.storage.models import Delivery, DeliveryState, Job, utcnow
from node import NodeProcess
from ports import free_port

DOC = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"
VERIFICATION = "1.2.840.10008.1.1"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
#: Transfer syntaxes the statement does not list: HTJ2K lossless, JPEG 2000 Part 2
#: multi-component, encapsulated uncompressed explicit VR LE, MPEG2 MP@ML, JPEG XL lossless.
UNLISTED_SYNTAXES = (
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.92",
    "1.2.840.10008.1.2.1.98",
    "1.2.840.10008.1.2.4.100",
    "1.2.840.10008.1.2.4.110",
)
#: Non-storage services a PACS or camera might ask for: Study Root FIND and MOVE, Modality
#: Worklist FIND, Storage Commitment Push, MPPS, Instance Availability Notification.
OTHER_SERVICES = (
    "1.2.840.10008.5.1.4.1.2.2.1",
    "1.2.840.10008.5.1.4.1.2.2.2",
    "1.2.840.10008.5.1.4.31",
    "1.2.840.10008.1.20.1",
    "1.2.840.10008.3.1.2.3.3",
    "1.2.840.10008.5.1.4.33",
)
DEVICE_UID = "1.2.826.0.1.3680043.8.498.7"


# --- reading the statement -----------------------------------------------------------------


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def doc_table(name: str) -> list[dict[str, str]]:
    """The rows of the table after ``<!-- table: name -->``, as header -> cell text."""
    lines = _doc().splitlines()
    start = lines.index(f"<!-- table: {name} -->") + 1
    rows: list[list[str]] = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, body = rows[0], rows[2:]
    return [dict(zip(header, row, strict=True)) for row in body]


def literal(cell: str) -> str:
    """The text inside the backticks of a cell (the whole cell when it has none)."""
    match = re.fullmatch(r"`([^`]*)`", cell.strip())
    return match.group(1) if match else cell.strip()


def doc_value(name: str) -> str:
    """The text following ``<!-- value: name -->`` on its line, or the next line's text."""
    text = _doc()
    marker = f"<!-- value: {name} -->"
    after = text[text.index(marker) + len(marker) :]
    line = after.split("\n", 1)[0].strip()
    if not line:
        line = after.split("\n", 2)[1].strip()
    return line.removeprefix("> ").rstrip("|").strip()


def doc_uids(cell: str) -> list[str]:
    """The UIDs in a cell, in order."""
    return re.findall(r"\b\d+(?:\.\d+)+\b", cell)


def hex_status(cell: str) -> int:
    return int(re.match(r"0x([0-9A-F]{4})", cell.strip()).group(1), 16)  # type: ignore[union-attr]


def leading_int(cell: str) -> int:
    return int(cell.split()[0])


_TREE_LINE = re.compile(
    r"^(?P<indent> *)"
    r"(?:(?P<rel>CONTAINS|HAS CONCEPT MOD|HAS OBS CONTEXT|HAS ACQ CONTEXT|SELECTED FROM) )?"
    r"(?P<vt>CONTAINER|CODE|TEXT|NUM|UIDREF|IMAGE|SCOORD) "
    r"(?P<meaning>.+?) \((?P<scheme>[A-Z0-9]+) (?P<value>[^)\s]+)\)"
    r"(?: \[(?P<tid>TID \d+)\])?(?: .*)?$"
)

Node = tuple[str | None, str, str, str, str, str | None]


def _node_key(rel: str | None, vt: str, scheme: str, value: str, meaning: str, tid: str | None):
    # Only the two kinds of Measurement Group need their template to be told apart.
    return (rel, vt, scheme, value, meaning, tid if (scheme, value) == ("DCM", "125007") else None)


def doc_tree_paths(name: str) -> set[tuple[Node, ...]]:
    """Every root-to-item path of the content tree after ``<!-- tree: name -->``."""
    text = _doc()
    block = text[text.index(f"<!-- tree: {name} -->") :].split("```")[1]
    paths: set[tuple[Node, ...]] = set()
    stack: list[Node] = []
    for line in block.splitlines()[1:]:
        if not line.strip():
            continue
        match = _TREE_LINE.match(line)
        assert match, f"content tree line not understood: {line!r}"
        depth = len(match["indent"]) // 2
        node = _node_key(
            match["rel"],
            match["vt"],
            match["scheme"],
            match["value"],
            match["meaning"],
            match["tid"],
        )
        stack = [*stack[:depth], node]
        paths.add(tuple(stack))
    return paths


# --- the node and its peers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., NodeProcess]]:
    """Start ``mibi-node serve`` once per configuration name for the whole module."""
    started: dict[str, NodeProcess] = {}

    def _get(name: str, config: dict[str, dict[str, Any]] | None = None) -> NodeProcess:
        if name not in started:
            folder = tmp_path_factory.mktemp(name) / "var"
            folder.mkdir()
            sections = {"web": {"enabled": False}, **(config or {})}
            node = NodeProcess(folder, free_port(), sections).start()
            # The start-up probe (a TCP connection that sends nothing) holds a place until
            # the ACSE timeout (section 4.2.1.2); tests with a tight limit wait it out.
            acse = (config or {}).get("reception", {}).get("acse_timeout")
            if acse is not None:
                time.sleep(acse + 0.5)
            started[name] = node
        return started[name]

    yield _get
    for node in started.values():  # SIGTERM them all, then wait: they stop in parallel
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
    for node in started.values():
        if node.process is not None:
            try:
                node.process.wait(20)
            except subprocess.TimeoutExpired:
                node.kill()


@pytest.fixture(scope="module")
def default_node(nodes) -> NodeProcess:
    """The shipped defaults (bound to loopback, no disk margin, no workers)."""
    return nodes("default")


def associate(
    port: int,
    contexts: Iterable[tuple[str, list[str]]],
    *,
    calling: str = "CONFORMANCE",
    called: str = "MIBI_NODE",
    host: str = "127.0.0.1",
    tls: ssl.SSLContext | None = None,
    ext_neg: list[Any] | None = None,
    timeout: float = 10,
) -> Association:
    """Request an association with pynetdicom (at most 128 contexts)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    return ae.associate(
        host,
        port,
        ae_title=called,
        tls_args=None if tls is None else (tls, host),
        ext_neg=ext_neg,
    )


def rejection(assoc: Association) -> tuple[int, int, int]:
    """(result, source, reason) of an A-ASSOCIATE-RJ."""
    assert assoc.is_rejected, "the association was not rejected"
    answer = assoc.acceptor.primitive
    return int(answer.result), int(answer.result_source), int(answer.diagnostic)


def negotiate(port: int, contexts: list[tuple[str, list[str]]]) -> list[tuple[str, int, str]]:
    """(abstract syntax, result, accepted transfer syntax or "") of every proposed context."""
    outcome = []
    for start in range(0, len(contexts), 128):
        assoc = associate(port, contexts[start : start + 128])
        answered = assoc.accepted_contexts + assoc.rejected_contexts
        by_id = {cx.context_id: cx for cx in answered}
        for cx in sorted(by_id.values(), key=lambda c: c.context_id):
            syntax = str(cx.transfer_syntax[0]) if cx.result == 0 and cx.transfer_syntax else ""
            outcome.append((str(cx.abstract_syntax), int(cx.result), syntax))
        if assoc.is_established:
            assoc.release()
    return outcome


# --- section 0: the statement itself -------------------------------------------------------


def test_statement_names_the_versions_it_describes() -> None:
    assert literal(doc_value("product-version")) == mibi_node.__version__
    versions = dict(re.findall(r"(\w+) `([^`]+)`", doc_value("pynetdicom-version")))
    assert versions == {
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "highdicom": highdicom.__version__,
    }


def _test_functions(path: Path) -> set[str]:
    """Names of the module-level test functions of a test file."""
    return set(re.findall(r"^def (test_\w+)\(", path.read_text(encoding="utf-8"), re.MULTILINE))


def test_appendix_b_names_existing_tests() -> None:
    named: set[tuple[str, str]] = set()
    for row in doc_table("claims"):
        references = re.findall(r"`([\w/]+\.py)::(\w+)`", row["Test(s)"])
        assert references, f"no test named for: {row['Statement (section)']}"
        named.update(references)
    here = Path(__file__).parent
    functions = {file: _test_functions(here / file) for file, _ in named}
    for file, function in sorted(named):
        assert function in functions[file], f"{file}::{function} does not exist"
    mine = _test_functions(Path(__file__))
    assert mine <= {f for file, f in named if file == Path(__file__).name}, (
        "tests of this file that Appendix B does not name: "
        f"{sorted(mine - {f for file, f in named if file == Path(__file__).name})}"
    )


def test_overview_is_the_union_of_the_role_tables() -> None:
    overview = {row["SOP Class UID"]: row for row in doc_table("overview")}
    scp = {row["SOP Class UID"] for row in doc_table("scp-sop-classes") if row["SCP"] == "Yes"}
    scu = {doc_uids(row["SOP Class UID"])[0] for row in doc_table("scu-sop-classes")}
    scu.add(doc_uids(doc_table("echo-contexts")[0]["Abstract Syntax"])[0])
    assert {
        uid for uid, row in overview.items() if row["Provider of Service (SCP)"] == "Yes"
    } == scp
    assert {uid for uid, row in overview.items() if row["User of Service (SCU)"] == "Yes"} == scu


def _field_default(model: type[BaseModel], name: str) -> Any:
    info = model.model_fields[name]
    return "(required)" if info.is_required() else info.get_default(call_default_factory=True)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def test_parameters_table_matches_the_configuration_defaults() -> None:
    rows = doc_table("parameters")
    assert len(rows) > 30
    for row in rows:
        key, default = literal(row["Key"]), row["Default"]
        if key.startswith("dispatch.destinations[]."):
            parts = key.removeprefix("dispatch.destinations[].").split(".")
            model: type[BaseModel] = Destination
            if parts[0] == "tls":
                model, parts = DestinationTLS, parts[1:]
            actual = _field_default(model, parts[0])
        else:
            section, *rest = key.split(".")
            value: Any = getattr(Config(), section)
            for part in rest:
                value = getattr(value, part)
            actual = value
        if default in ("(none)", "(required)"):
            assert actual == (None if default == "(none)" else "(required)"), key
        else:
            expected = tomllib.loads(f"x = {literal(default)}")["x"]
            assert _plain(actual) == expected, key


# --- 4.2.1 RECEPTION: presentation contexts ------------------------------------------------


def _every_storage_class() -> list[str]:
    return [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]


def _accepted_classes(port: int) -> tuple[set[str], dict[str, int]]:
    proposed = [VERIFICATION, *_every_storage_class(), *OTHER_SERVICES]
    outcome = negotiate(port, [(uid, [EXPLICIT_LE, IMPLICIT_LE]) for uid in proposed])
    assert len(outcome) == len(proposed)
    accepted = {uid for uid, result, _ in outcome if result == 0}
    refused = {uid: result for uid, result, _ in outcome if result != 0}
    return accepted, refused


def test_scp_accepts_exactly_the_listed_sop_classes(default_node) -> None:
    listed = {row["SOP Class UID"] for row in doc_table("scp-sop-classes")}
    accepted, refused = _accepted_classes(default_node.port)
    assert accepted == listed
    assert all(uid.startswith("1.2.840.10008.") for uid in listed)  # standard SOP classes
    assert set(refused.values()) == {3}  # abstract-syntax-not-supported
    assert set(OTHER_SERVICES) <= set(refused)


def test_accept_all_storage_accepts_appendix_a_too(nodes) -> None:
    node = nodes(
        "all-storage",
        {"reception": {"accept_all_storage": True, "require_called_ae_title": False}},
    )
    appendix = [row["SOP Class UID"] for row in doc_table("all-storage")]
    listed = {row["SOP Class UID"] for row in doc_table("scp-sop-classes")}
    assert len(appendix) == len(set(appendix)) and not set(appendix) & listed
    accepted, refused = _accepted_classes(node.port)
    assert accepted == listed | set(appendix)
    assert set(refused) == set(OTHER_SERVICES)
    syntaxes = [row["UID"] for row in doc_table("scp-transfer-syntaxes")]
    for uid in (appendix[0], appendix[-1]):
        _syntax_checks(node.port, uid, syntaxes)
    # ... and the statement's count of them.
    assert f"adds the {len(appendix)} storage SOP classes" in " ".join(_doc().split())
    assert f"{len(appendix) + len(listed) - 1} in all" in " ".join(_doc().split())


def _syntax_checks(port: int, sop_class: str, listed: list[str]) -> None:
    """Each listed syntax alone is accepted, others are refused, and the first listed wins."""
    alone = [(sop_class, [ts]) for ts in (*listed, *UNLISTED_SYNTAXES)]
    preference = [(sop_class, list(reversed(listed[i:]))) for i in range(len(listed))]
    outcome = negotiate(port, alone + preference)
    singles, preferred = outcome[: len(alone)], outcome[len(alone) :]
    assert [(r, ts) for _, r, ts in singles[: len(listed)]] == [(0, ts) for ts in listed]
    assert [r for _, r, _ in singles[len(listed) :]] == [4] * len(UNLISTED_SYNTAXES)
    assert [ts for _, _, ts in preferred] == listed


def test_storage_transfer_syntaxes_and_their_order(default_node) -> None:
    listed = [row["UID"] for row in doc_table("scp-transfer-syntaxes")]
    for row in doc_table("scp-sop-classes"):
        if row["SOP Class UID"] != VERIFICATION:
            _syntax_checks(default_node.port, row["SOP Class UID"], listed)


def test_verification_transfer_syntaxes_and_their_order(default_node) -> None:
    listed = [row["UID"] for row in doc_table("verification-transfer-syntaxes")]
    _syntax_checks(default_node.port, VERIFICATION, listed)


def test_association_parameters_and_extended_negotiation(default_node) -> None:
    async_ops = AsynchronousOperationsWindowNegotiation()
    async_ops.maximum_number_operations_invoked = 4
    async_ops.maximum_number_operations_performed = 4
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 1
    identity.primary_field = b"radiographer"
    identity.positive_response_requested = True
    extended = SOPClassExtendedNegotiation()
    extended.sop_class_uid = NM_STORAGE
    extended.service_class_application_information = b"\x01"
    role = build_role(NM_STORAGE, scu_role=True, scp_role=True)
    assoc = associate(
        default_node.port,
        [(NM_STORAGE, [EXPLICIT_LE]), (VERIFICATION, [IMPLICIT_LE])],
        ext_neg=[async_ops, identity, extended, role],
    )
    assert assoc.is_established
    try:
        acceptor = assoc.acceptor
        assert str(acceptor.primitive.application_context_name) == "1.2.840.10008.3.1.1.1"
        default_pdu = next(
            r["Default"] for r in doc_table("parameters") if "max_pdu_size" in r["Key"]
        )
        assert acceptor.maximum_length == int(literal(default_pdu))
        implementation = {row[""]: row["Value"] for row in doc_table("implementation")}
        assert acceptor.implementation_class_uid == implementation["Implementation Class UID"]
        assert acceptor.implementation_version_name == implementation["Implementation Version Name"]
        # No Asynchronous Operations Window, User Identity or SOP Class Extended item back.
        assert acceptor.extended_negotiation == []
        assert acceptor.user_identity is None
        assert acceptor.sop_class_extended == {}
        # The node acts as SCP only: the requestor may not take the SCP role for NM.
        nm = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == NM_STORAGE)
        assert (nm.as_scu, nm.as_scp) == (True, False)
        assert int(assoc.send_c_echo().Status) == 0x0000
    finally:
        assoc.release()


# --- 4.2.1.4.1 who may associate -----------------------------------------------------------

GUARDED = {
    "reception": {
        "max_pdu_size": 0,
        "allowed_peers": [
            {"ae_title": "GAMMA1"},
            {"ae_title": "FARAWAY", "hosts": ["192.0.2.7"]},
            {"ae_title": "LOCAL", "hosts": ["127.0.0.1"]},
            {"ae_title": "BYNAME", "hosts": ["localhost"]},
        ],
    }
}
LIMITED = {
    "reception": {
        "acceptors": 2,
        "max_associations": 2,
        "acse_timeout": 1,
        "network_timeout": 2,
        "max_pdu_size": 65536,
    }
}
ECHO = [(VERIFICATION, [IMPLICIT_LE])]


def _held(port: int, **kwargs: Any) -> Association:
    assoc = associate(port, ECHO, **kwargs)
    assert assoc.is_established
    return assoc


def scp_here(folder: Path, sections: dict[str, dict[str, Any]]) -> StorageSCP:
    """A Storage SCP object in this process, with its data folder in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    node = {"host": "127.0.0.1", "port": free_port(), "data_dir": str(folder)}
    config = Config.model_validate({**sections, "node": {**node, **sections.get("node", {})}})
    store = InstanceStore(
        open_database(f"sqlite:///{folder / 'db.sqlite3'}"), FileStore(folder / "store")
    )
    return StorageSCP(config, store)


@pytest.fixture
def scp_in_process(tmp_path: Path) -> Iterator[StorageSCP]:
    """The Storage SCP in this process, so that a test can fill its disk or break its store."""
    saved = (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET)
    scp = scp_here(tmp_path / "in-process", {"storage": {"min_free_mb": 1}})
    scp.start()
    try:
        yield scp
    finally:
        scp.stop(timeout=5)
        tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET = saved


def _reject_called_ae(nodes, default_node) -> list[tuple[int, int, int]]:
    codes = [
        rejection(associate(default_node.port, ECHO, called=called))
        for called in ("SOMEONE_ELSE", "mibi_node")
    ]
    _held(default_node.port, calling="ANY_CALLER").release()  # no allow-list: anyone
    relaxed = nodes("all-storage", {"reception": {"accept_all_storage": True,
                                                  "require_called_ae_title": False}})  # fmt: skip
    _held(relaxed.port, called="ANYTHING").release()
    return codes


def _reject_calling_ae(nodes, default_node) -> list[tuple[int, int, int]]:
    node = nodes("guarded", GUARDED)
    _held(node.port, calling="GAMMA1").release()
    # The called AE title is checked first.
    assert rejection(associate(node.port, ECHO, calling="INTRUDER", called="X")) == (1, 1, 7)
    return [rejection(associate(node.port, ECHO, calling="INTRUDER"))]


def _reject_calling_host(nodes, default_node) -> list[tuple[int, int, int]]:
    node = nodes("guarded", GUARDED)
    _held(node.port, calling="LOCAL").release()
    codes = [rejection(associate(node.port, ECHO, calling=c)) for c in ("FARAWAY", "BYNAME")]
    sql = (
        "SELECT outcome, message FROM audit_event WHERE kind = 'association' "
        "AND actor = 'FARAWAY@127.0.0.1'"
    )
    deadline = time.monotonic() + 5  # the node records it just after it answers
    while not node.query(sql) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.query(sql) == [("rejected", "calling AE title not allowed from this host")]
    return codes


def _reject_disk(nodes, default_node) -> list[tuple[int, int, int]]:
    node = nodes("full-disk", {"storage": {"min_free_mb": 1 << 40}})
    return [rejection(associate(node.port, ECHO))]


def _reject_error(nodes, default_node, scp: StorageSCP) -> list[tuple[int, int, int]]:
    def broken() -> float:
        raise OSError("the disk went away")

    scp.store.files.free_mb = broken  # type: ignore[method-assign]
    return [rejection(associate(scp.config.node.port, ECHO))]


def _reject_limit(nodes, default_node) -> list[tuple[int, int, int]]:
    node = nodes("limited", LIMITED)
    held = [_held(node.port), _held(node.port)]
    try:
        return [rejection(associate(node.port, ECHO))]
    finally:
        for assoc in held:
            assoc.release()


REJECTIONS: dict[str, Callable[..., list[tuple[int, int, int]]]] = {
    "called-ae": _reject_called_ae,
    "calling-ae": _reject_calling_ae,
    "calling-host": _reject_calling_host,
    "disk": _reject_disk,
    "limit": _reject_limit,
    "error": _reject_error,
}


def test_every_rejection_case_of_the_statement_is_tested() -> None:
    assert [literal(row["Case"]) for row in doc_table("association-rejections")] == list(REJECTIONS)


@pytest.mark.parametrize("row", doc_table("association-rejections"), ids=lambda r: r["Case"])
def test_association_rejections(row: dict[str, str], nodes, default_node, request) -> None:
    case = literal(row["Case"])
    scenario = REJECTIONS[case]
    if case == "error":
        codes = scenario(nodes, default_node, request.getfixturevalue("scp_in_process"))
    else:
        codes = scenario(nodes, default_node)
    expected = (leading_int(row["Result"]), leading_int(row["Source"]), leading_int(row["Reason"]))
    assert codes and all(code == expected for code in codes), codes


def test_host_binding_on_a_dual_stack_listener(nodes) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 here: {exc}")
    node = nodes(
        "dual-stack",
        {
            "node": {"host": "::"},
            "reception": {
                "allowed_peers": [
                    {"ae_title": "CAM4", "hosts": ["127.0.0.1"]},
                    {"ae_title": "CAM6", "hosts": ["::ffff:127.0.0.1", "::1"]},
                    {"ae_title": "ELSEWHERE", "hosts": ["10.9.9.9"]},
                ]
            },
        },
    )
    # An IPv4 peer is seen as ::ffff:127.0.0.1 and matches an entry in either form.
    _held(node.port, calling="CAM4").release()
    _held(node.port, calling="CAM6").release()
    _held(node.port, calling="CAM6", host="::1").release()
    assert rejection(associate(node.port, ECHO, calling="CAM4", host="::1")) == (1, 1, 3)
    assert rejection(associate(node.port, ECHO, calling="ELSEWHERE")) == (1, 1, 3)


def test_association_limit_is_node_wide(nodes) -> None:
    node = nodes("limited", LIMITED)
    sql = (
        "SELECT count(*) FROM audit_event WHERE outcome = 'rejected' "
        "AND message LIKE '%reception.max_associations%'"
    )
    before = node.query(sql)[0][0]
    # Whichever acceptor process takes each connection, two fit and a third does not.
    for _ in range(5):
        held = [_held(node.port), _held(node.port)]
        try:
            assert rejection(associate(node.port, ECHO)) == (2, 3, 2)
        finally:
            for assoc in held:
                assoc.release()
        time.sleep(0.1)
    # An aborted association gives its place back too.
    held = [_held(node.port), _held(node.port)]
    held[0].abort()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        again = associate(node.port, ECHO)
        if again.is_established:
            break
        time.sleep(0.1)
    assert again.is_established
    for assoc in (held[1], again):
        assoc.release()
    deadline = time.monotonic() + 5  # each rejection is audited just after it is sent
    while node.query(sql)[0][0] < before + 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.query(sql)[0][0] == before + 5


def test_max_pdu_size_is_what_the_node_announces(nodes) -> None:
    for name, config, expected in (("limited", LIMITED, 65536), ("guarded", GUARDED, 0)):
        assoc = _held(nodes(name, config).port, calling="GAMMA1")
        try:
            assert assoc.acceptor.maximum_length == expected
        finally:
            assoc.release()


def test_reception_timeouts(nodes, tmp_path: Path) -> None:
    node = nodes("limited", LIMITED)
    # ACSE: a connection that never sends an A-ASSOCIATE-RQ takes no place (LIMITED has
    # two) and is closed.
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as silent:
        held = [_held(node.port), _held(node.port)]
        assert rejection(associate(node.port, ECHO)) == (2, 3, 2)
        for assoc in held:
            assoc.release()
        assert silent.recv(1) == b""
    assert 0.8 < time.monotonic() - started < 5
    time.sleep(0.3)  # the node's side of that connection winds down
    # Network: an idle association is aborted by the node.
    assoc = _held(node.port)
    started = time.monotonic()
    while assoc.is_established and time.monotonic() - started < 10:
        time.sleep(0.05)
    assert assoc.is_aborted and 1.8 < time.monotonic() - started < 6
    # DIMSE (and the others) are handed to pynetdicom as configured.
    timeouts = {"acse_timeout": 3, "dimse_timeout": 7, "network_timeout": 11}
    ae = scp_here(tmp_path, {"reception": timeouts}).ae
    assert (ae.acse_timeout, ae.dimse_timeout, ae.network_timeout) == (3, 7, 11)


# --- 4.2.1.4.4 C-STORE statuses ------------------------------------------------------------


def _body(ds: Dataset) -> bytes:
    """The data set of ``ds`` as explicit VR little endian bytes, without File Meta."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    # Preamble and "DICM" (132 bytes), then (0002,0000) UL: its value is at 140..144.
    return data[144 + int.from_bytes(data[140:144], "little") :]


def _raw_file(
    path: Path,
    body: bytes,
    *,
    sop_class: str = NM_STORAGE,
    sop_instance: str | None = None,
    transfer_syntax: str = EXPLICIT_LE,
) -> Path:
    """A file with a valid File Meta (which makes the C-STORE request) and any data set."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance or generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    path.write_bytes(buffer.getvalue() + body)
    return path


def _send_raw(port: int, paths: list[Path], transfer_syntax: str = EXPLICIT_LE) -> list[int]:
    """C-STORE each file's data set unparsed over one association; the statuses."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = associate(port, [(NM_STORAGE, [transfer_syntax])])
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(path).Status) for path in paths]
        assoc.release()
        return statuses
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def _stored_rows(node: NodeProcess, sop_instance_uid: str) -> list[tuple[Any, ...]]:
    return node.query(
        f"SELECT path, sha256 FROM instance WHERE sop_instance_uid = '{sop_instance_uid}'"
    )


def _case_stored(node, folder: Path) -> tuple[list[int], Callable[[], None]]:
    ds = nm_dataset(seed=11)
    path = write(ds, folder / "stored.dcm")

    def check() -> None:
        [(relative, _)] = _stored_rows(node, ds.SOPInstanceUID)
        stored = node.data_dir / "store" / relative
        assert stored.read_bytes().endswith(_body(ds))  # byte for byte after the File Meta

    return _send_raw(node.port, [path]), check


def _case_duplicate(node, folder: Path) -> tuple[list[int], Callable[[], None]]:
    path = write(nm_dataset(seed=12), folder / "dup.dcm")
    uid = pydicom.dcmread(path).SOPInstanceUID
    statuses = _send_raw(node.port, [path, path])
    return statuses, lambda: assert_equal(len(_stored_rows(node, uid)), 1)


def assert_equal(actual: object, expected: object) -> None:
    assert actual == expected


def _case_replaced(node, folder: Path) -> tuple[list[int], Callable[[], None]]:
    first = nm_dataset(seed=13)
    changed = nm_dataset(first.StudyInstanceUID, seed=14, sop_instance_uid=first.SOPInstanceUID)
    changed.SeriesInstanceUID = first.SeriesInstanceUID
    paths = [write(first, folder / "first.dcm"), write(changed, folder / "changed.dcm")]

    def check() -> None:
        [(relative, _)] = _stored_rows(node, first.SOPInstanceUID)
        assert (node.data_dir / "store" / relative).read_bytes().endswith(_body(changed))

    return _send_raw(node.port, paths), check


def _refused(node, paths: list[Path], transfer_syntax: str = EXPLICIT_LE):
    uids = [pydicom.filereader.read_file_meta_info(p).MediaStorageSOPInstanceUID for p in paths]

    def check() -> None:
        for uid in uids:
            assert _stored_rows(node, uid) == []

    return _send_raw(node.port, paths, transfer_syntax), check


def _case_unparsable(node, folder: Path):
    ds = nm_dataset(seed=15)
    truncated = _body(ds)[: len(_body(ds)) // 2]
    return _refused(
        node,
        [
            _raw_file(folder / "truncated.dcm", truncated, sop_instance=ds.SOPInstanceUID),
            _raw_file(folder / "garbage.dcm", bytes(range(256)) * 40),
        ],
    )


def _case_missing_uid(node, folder: Path):
    paths = []
    for keyword in ("SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID"):
        ds = nm_dataset(seed=16)
        delattr(ds, keyword)
        paths.append(
            _raw_file(folder / f"no-{keyword}.dcm", _body(ds), sop_instance=ds.SOPInstanceUID)
        )
    empty = nm_dataset(seed=17)
    empty.SOPInstanceUID = ""
    paths.append(_raw_file(folder / "empty.dcm", _body(empty)))
    return _refused(node, paths)


def _case_long_uid(node, folder: Path):
    ds = nm_dataset(seed=18)
    ds.StudyInstanceUID = "1.2." + "3" * 61  # 65 characters
    return _refused(
        node, [_raw_file(folder / "long.dcm", _body(ds), sop_instance=ds.SOPInstanceUID)]
    )


def _case_short_pixel_data(node, folder: Path):
    ds = nm_dataset(seed=19)
    ds.PixelData = ds.PixelData[:1000]
    return _refused(
        node, [_raw_file(folder / "short.dcm", _body(ds), sop_instance=ds.SOPInstanceUID)]
    )


def _case_bad_dimensions(node, folder: Path):
    ds = nm_dataset(seed=20)
    ds.Rows = 0
    return _refused(
        node, [_raw_file(folder / "zero.dcm", _body(ds), sop_instance=ds.SOPInstanceUID)]
    )


def _case_no_item(node, folder: Path):
    ds = nm_dataset(seed=21)
    del ds.PixelData
    # (7FE0,0010) OB of undefined length that ends at once: no item, not even the offset table.
    pixel_data = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    path = _raw_file(
        folder / "no-item.dcm",
        _body(ds) + pixel_data,
        sop_instance=ds.SOPInstanceUID,
        transfer_syntax=JPEG_LOSSLESS_SV1,
    )
    return _refused(node, [path], JPEG_LOSSLESS_SV1)


def _case_sop_class_mismatch(node, folder: Path):
    ct = nm_dataset(seed=22, sop_class_uid=CT_STORAGE)
    return _refused(node, [_raw_file(folder / "ct.dcm", _body(ct), sop_instance=ct.SOPInstanceUID)])


def _case_sop_instance_mismatch(node, folder: Path):
    ds = nm_dataset(seed=23)
    return _refused(node, [_raw_file(folder / "other.dcm", _body(ds), sop_instance=generate_uid())])


def _case_disk_low(scp: StorageSCP, folder: Path):
    answers = iter([10.0**6])  # room when the association is checked, none afterwards
    scp.store.files.free_mb = lambda: next(answers, 0.0)  # type: ignore[method-assign]
    path = write(nm_dataset(seed=24), folder / "late.dcm")
    return _send_raw(scp.config.node.port, [path]), lambda: _nothing_stored(scp)


def _case_error(scp: StorageSCP, folder: Path):
    def broken(*args: object) -> None:
        raise RuntimeError("the database went away")

    scp.store.store = broken  # type: ignore[method-assign]
    path = write(nm_dataset(seed=25), folder / "error.dcm")
    return _send_raw(scp.config.node.port, [path]), lambda: _nothing_stored(scp)


def _nothing_stored(scp: StorageSCP) -> None:
    assert [p for p in scp.store.files.root.rglob("*.dcm") if ".incoming" not in p.parts] == []


C_STORE_CASES: dict[str, Callable[..., tuple[list[int], Callable[[], None]]]] = {
    "stored": _case_stored,
    "duplicate": _case_duplicate,
    "replaced": _case_replaced,
    "unparsable": _case_unparsable,
    "missing-uid": _case_missing_uid,
    "long-uid": _case_long_uid,
    "short-pixel-data": _case_short_pixel_data,
    "bad-dimensions": _case_bad_dimensions,
    "no-item": _case_no_item,
    "sop-class-mismatch": _case_sop_class_mismatch,
    "sop-instance-mismatch": _case_sop_instance_mismatch,
    "disk-low": _case_disk_low,
    "error": _case_error,
}


def test_every_c_store_case_of_the_statement_is_tested() -> None:
    assert [literal(row["Case"]) for row in doc_table("c-store-statuses")] == list(C_STORE_CASES)


@pytest.mark.parametrize("row", doc_table("c-store-statuses"), ids=lambda r: r["Case"])
def test_c_store_statuses(row: dict[str, str], default_node, request, tmp_path: Path) -> None:
    case = literal(row["Case"])
    if case in ("disk-low", "error"):
        target = request.getfixturevalue("scp_in_process")
    else:
        target = default_node
    statuses, check = C_STORE_CASES[case](target, tmp_path)
    assert statuses and set(statuses) == {hex_status(row["Status"])}, [hex(s) for s in statuses]
    check()


def test_received_character_sets_are_kept_as_sent(default_node, tmp_path: Path) -> None:
    japanese = nm_dataset(seed=30)
    japanese.SpecificCharacterSet = ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    japanese.PatientName = "Yamada^Tarou=山田^太郎"
    unknown = nm_dataset(seed=31)
    unknown.SpecificCharacterSet = "ISO_IR 999"
    unknown.StudyDescription = "PARATHYROID MIBI"
    paths = [write(japanese, tmp_path / "jp.dcm"), write(unknown, tmp_path / "unknown.dcm")]
    assert _send_raw(default_node.port, paths) == [0x0000, 0x0000]
    for ds, path in zip((japanese, unknown), paths, strict=True):
        [(relative, _)] = _stored_rows(default_node, ds.SOPInstanceUID)
        sent = path.read_bytes()
        assert (
            (default_node.data_dir / "store" / relative)
            .read_bytes()
            .endswith(sent[split_dataset(path)[1] :])
        )


# --- 7 TLS on reception --------------------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EC keys: a CA, a rogue CA, the node, a camera, an intruder and a PACS (named
    pacs.example only)."""
    if subprocess.run(["which", "openssl"], capture_output=True, check=False).returncode:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "rogue"):
        _openssl("req", "-x509", *ec, "-days", "2", "-subj", f"/CN={ca}",
                 "-keyout", str(folder / f"{ca}.key"), "-out", str(folder / f"{ca}.crt"),
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    leaves = {
        "node": ("ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        "pacs": ("ca", "subjectAltName=DNS:pacs.example\nextendedKeyUsage=serverAuth\n"),
        "camera": ("ca", "extendedKeyUsage=clientAuth\n"),
        "intruder": ("rogue", "extendedKeyUsage=clientAuth\n"),
    }
    for name, (ca, extensions) in leaves.items():
        key, csr, cert, ext = (folder / f"{name}.{e}" for e in ("key", "csr", "crt", "ext"))
        ext.write_text(extensions)
        _openssl("req", "-new", *ec, "-subj", f"/CN={name}", "-keyout", str(key),
                 "-out", str(csr))  # fmt: skip
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(folder / f"{ca}.crt"),
                 "-CAkey", str(folder / f"{ca}.key"), "-CAcreateserial", "-days", "2",
                 "-out", str(cert), "-extfile", str(ext))  # fmt: skip
    return folder


def _tls_config(pki: Path, required: bool) -> dict[str, dict[str, Any]]:
    return {
        "reception": {"allowed_peers": [{"ae_title": "GAMMA1"}]},
        "reception.tls": {
            "enabled": True,
            "certificate": str(pki / "node.crt"),
            "private_key": str(pki / "node.key"),
            "ca_certificates": str(pki / "ca.crt"),
            "require_client_certificate": required,
        },
    }


def _client(pki: Path, who: str | None, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    context.check_hostname = False
    if who is not None:
        context.load_cert_chain(pki / f"{who}.crt", pki / f"{who}.key")
    if version is not None:
        context.minimum_version = context.maximum_version = version
    return context


def _tls_echo(port: int, context: ssl.SSLContext, calling: str = "GAMMA1") -> Association:
    return associate(port, ECHO, calling=calling, tls=context)


def test_tls_reception_with_client_certificates(nodes, pki: Path, tmp_path: Path) -> None:
    node = nodes("tls-required", _tls_config(pki, required=True))
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        assoc = _tls_echo(node.port, _client(pki, "camera", version))
        assert assoc.is_established, version
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
    assert not _tls_echo(node.port, _client(pki, None)).is_established
    assert not _tls_echo(node.port, _client(pki, "intruder")).is_established
    assert not associate(node.port, ECHO, calling="GAMMA1").is_established  # plain DICOM
    # A trusted certificate does not make any AE title welcome.
    assoc = _tls_echo(node.port, _client(pki, "camera"), calling="INTRUDER")
    assert rejection(assoc) == (1, 1, 3)
    # Nothing older than TLS 1.2 is offered.
    tls = _tls_config(pki, required=True)["reception.tls"]
    context = scp_here(tmp_path, {"reception": {"tls": tls}})._ssl_context()
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_tls_reception_without_required_client_certificates(nodes, pki: Path) -> None:
    node = nodes("tls-optional", _tls_config(pki, required=False))
    for who in (None, "intruder", "camera"):
        assoc = _tls_echo(node.port, _client(pki, who))
        assert assoc.is_established, who
        assoc.release()


def test_tls_misconfiguration_is_refused_at_start(pki: Path, tmp_path: Path) -> None:
    from node import write_config

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mibi_node.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    without_key = {"enabled": True, "certificate": str(pki / "node.crt")}
    without_ca = {
        **without_key,
        "private_key": str(pki / "node.key"),
        "require_client_certificate": True,
    }
    for tls, reason in (
        (without_key, "certificate and private_key are required"),
        (without_ca, "ca_certificates is required"),
    ):
        path = write_config(tmp_path / "bad.toml", {"reception.tls": tls})
        checked = run("check-config", str(path))
        assert checked.returncode != 0
        assert "reception.tls" in checked.stderr + checked.stdout
        assert reason in checked.stderr + checked.stdout
    # A file named but not there: serve stops before it listens, naming the problem.
    missing = {**without_key, "private_key": str(tmp_path / "no-such.key")}
    path = write_config(
        tmp_path / "missing.toml",
        {"reception.tls": missing, "web": {"enabled": False}, "workers": {"count": 0}},
    )
    port = free_port()
    served = run(
        "serve", "--config", str(path), "--port", str(port), "--data-dir", str(tmp_path / "v")
    )
    assert served.returncode != 0
    assert "cannot load certificates" in served.stderr + served.stdout
    assert "Traceback" not in served.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# --- 4.2.2 DISPATCH and 4.2.3 ECHO: a recording SCP ----------------------------------------


class RecordingSCP:
    """A pynetdicom SCP that records every association request and DIMSE request."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.port = free_port()
        self.status = 0x0000
        #: Status by SOP class, over ``status``.
        self.statuses: dict[str, int] = {}
        self.echo_status = 0x0000
        self.associations: list[dict[str, Any]] = []
        self.stores: list[dict[str, Any]] = []
        self.echoes = 0
        self.released = 0
        ae = AE(ae_title="RECORDER")
        for uid in (COMPREHENSIVE_3D_SR, SC_STORAGE, NM_STORAGE, VERIFICATION):
            ae.add_supported_context(uid, [EXPLICIT_LE, IMPLICIT_LE])
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            ssl_context=ssl_context,
            evt_handlers=[
                (evt.EVT_REQUESTED, self._requested),
                (evt.EVT_C_STORE, self._store),
                (evt.EVT_C_ECHO, self._echo),
                (evt.EVT_RELEASED, self._released),
            ],
        )

    def _requested(self, event: Any) -> None:
        requestor = event.assoc.requestor
        self.associations.append(
            {
                "calling": requestor.primitive.calling_ae_title.strip(),
                "called": requestor.primitive.called_ae_title.strip(),
                "contexts": [
                    (str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
                    for cx in requestor.requested_contexts
                ],
                "max_pdu": requestor.maximum_length,
                "implementation": (
                    requestor.implementation_class_uid,
                    requestor.implementation_version_name,
                ),
                "extended": list(requestor.extended_negotiation),
            }
        )

    def _store(self, event: Any) -> int:
        request = event.request
        self.stores.append(
            {
                "association": len(self.associations),
                "sop_class": str(event.context.abstract_syntax),
                "transfer_syntax": str(event.context.transfer_syntax),
                "priority": request.Priority,
                "move_originator": request.MoveOriginatorApplicationEntityTitle,
                "sop_instance": str(request.AffectedSOPInstanceUID),
            }
        )
        return self.statuses.get(str(event.context.abstract_syntax), self.status)

    def _released(self, event: Any) -> None:
        self.released += 1

    def _echo(self, event: Any) -> int:
        self.echoes += 1
        return self.echo_status

    def destination(self, **tls: Any) -> Destination:
        return Destination(
            ae_title="RECORDER",
            host="127.0.0.1",
            port=self.port,
            tls=DestinationTLS(**tls) if tls else DestinationTLS(),
        )

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def recorder() -> Iterator[RecordingSCP]:
    scp = RecordingSCP()
    yield scp
    scp.stop()


# --- results as the worker writes them -----------------------------------------------------


def read_back(ds: Dataset) -> Dataset:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _store_sources(store: InstanceStore, sources: list[Dataset], folder: Path) -> None:
    for ds in sources:
        path = write(ds, folder / f"{ds.SOPInstanceUID}.dcm")
        incoming = store.files.incoming / path.name
        incoming.write_bytes(path.read_bytes())
        meta = InstanceMeta(
            study_instance_uid=ds.StudyInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            sop_instance_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID,
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            modality=str(ds.Modality),
        )
        store.store(incoming, meta, "GAMMA1")


def _queue(database: Database, study_instance_uid: str, version: int) -> None:
    with database.session() as session, session.begin():
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == study_instance_uid)
        ).one_or_none()
        if study is None:
            study = Study(study_instance_uid=study_instance_uid, state=StudyState.QUEUED)
            session.add(study)
            session.flush()
        session.add(Job(study_id=study.id, version=version))


def _complete(
    database: Database, owner: str, files: list[str], destination: Destination
) -> list[int]:
    [job] = claim_jobs(database, owner, 60, 1)
    done = CompletedJob(
        result={"predicted": "adenoma"},
        timings={},
        bundle="mibi-demo 0.3.1",
        sr_path=files[0],
        sr_sop_instance_uid=generate_uid(),
        sr_series_instance_uid=generate_uid(),
        files=tuple(files),
        destinations=(destination.model_dump(mode="json"),),
    )
    return complete_job(database, owner, job.id, done)


def test_worker_documents_and_what_dispatch_proposes_and_sends(
    recorder: RecordingSCP, tmp_path: Path
) -> None:
    config = Config.model_validate(
        {
            "node": {"ae_title": "MIBI_TEST", "data_dir": str(tmp_path / "var")},
            "report": {
                "key_image": True,
                "series_number": 77,
                "institution_name": "Klinik Nord",
                "device_uid": DEVICE_UID,
            },
            "dispatch": {"destinations": [recorder.destination().model_dump(mode="json")]},
        }
    )
    assert config.calling_ae_title == "MIBI_TEST"  # dispatch.calling_ae_title is empty
    worker = Worker(config, device="cpu", name="conformance")
    store = InstanceStore(worker.database, worker.files)
    written: list[list[str]] = []
    for index in range(2):  # two results due for the same destination
        result, sources = make_case(seed=10 * index)
        _store_sources(store, sources, tmp_path / f"in{index}")
        _queue(worker.database, result.study_instance_uid, version=3)
        [job] = claim_jobs(worker.database, worker.name, 60, 1)
        names, _ = worker._write_documents(job, result)
        written.append(names)
        done = CompletedJob(
            result={"predicted": result.predicted},
            timings={},
            bundle="mibi-demo 0.3.1",
            sr_path=names[0],
            sr_sop_instance_uid=generate_uid(),
            sr_series_instance_uid=generate_uid(),
            files=tuple(names),
            destinations=(recorder.destination().model_dump(mode="json"),),
        )
        complete_job(worker.database, worker.name, job.id, done)

    # 8.1: what the worker wrote.
    for names in written:
        sr, key = (pydicom.dcmread(worker.results.absolute(n)) for n in names)
        assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and key.SOPClassUID == SC_STORAGE
        assert (sr.SeriesNumber, key.SeriesNumber) == (77, 78)
        assert (sr.InstanceNumber, key.InstanceNumber) == (3, 3)
        assert sr.InstitutionName == "Klinik Nord"
        assert key.SeriesInstanceUID != sr.SeriesInstanceUID
        assert key.StudyInstanceUID == sr.StudyInstanceUID
        observer = [
            item.UID
            for item in _walk(sr.ContentSequence)
            if _concept(item)[:2] == ("DCM", "121012")
        ]
        assert observer == [DEVICE_UID]
        for document in (sr, key):
            meta = document.file_meta
            assert meta.TransferSyntaxUID == EXPLICIT_LE
            implementation = {row[""]: row["Value"] for row in doc_table("implementation")}
            assert meta.ImplementationClassUID == implementation["Implementation Class UID"]
            assert meta.ImplementationVersionName == implementation["Implementation Version Name"]

    # 4.2.2: one association for both deliveries, SR then key image, as proposed in the table.
    outcomes = deliver(
        worker.database,
        config.results_dir,
        config.dispatch,
        calling_ae_title=config.calling_ae_title,
        owner="dispatch",
    )
    assert [o.state for o in outcomes] == [DeliveryState.DONE] * 2
    [association] = recorder.associations
    assert (association["calling"], association["called"]) == ("MIBI_TEST", "RECORDER")
    expected = [
        (doc_uids(row["Abstract Syntax"])[0], doc_uids(row["Transfer Syntaxes (in this order)"]))
        for row in doc_table("scu-contexts")
    ]
    assert association["contexts"] == expected
    assert association["max_pdu"] == 16382
    implementation = {row[""]: row["Value"] for row in doc_table("implementation")}
    assert association["implementation"] == (
        implementation["Implementation Class UID"],
        implementation["Implementation Version Name"],
    )
    assert not any(
        isinstance(item, AsynchronousOperationsWindowNegotiation)
        for item in association["extended"]
    )
    sent = [
        str(pydicom.dcmread(worker.results.absolute(n), stop_before_pixels=True).SOPInstanceUID)
        for names in written
        for n in names
    ]
    assert [store["sop_instance"] for store in recorder.stores] == sent
    assert [store["sop_class"] for store in recorder.stores] == [
        COMPREHENSIVE_3D_SR,
        SC_STORAGE,
    ] * 2
    assert {store["transfer_syntax"] for store in recorder.stores} == {EXPLICIT_LE}
    assert {store["priority"] for store in recorder.stores} == {0x0002}
    assert {store["move_originator"] for store in recorder.stores} == {None}
    assert recorder.echoes == 0
    deadline = time.monotonic() + 5
    while recorder.released < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert recorder.released == 1


@pytest.mark.parametrize("row", doc_table("scu-statuses"), ids=lambda r: r["Status"])
def test_c_store_responses_delivered_or_failed(
    row: dict[str, str], recorder: RecordingSCP, tmp_path: Path
) -> None:
    result, sources = make_case()
    sr = write(build_sr(result, sources, device_uid=DEVICE_UID), tmp_path / "sr.dcm")
    recorder.status = hex_status(row["Status"])
    [sent] = send_files([sr], recorder.destination(), calling_ae_title="MIBI_NODE")
    assert sent.status == recorder.status
    assert sent.success is (row["Outcome"] == "delivered")


def test_failed_delivery_backs_off_fails_and_resend_makes_it_due(
    recorder: RecordingSCP, tmp_path: Path
) -> None:
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    results = FileStore(tmp_path / "results")
    result, sources = make_case()
    files = []
    for name, document in (
        ("sr", build_sr(result, sources, device_uid=DEVICE_UID)),
        ("key", build_key_image(result, sources, size=64)),
    ):
        relative = results.relative_path(result.study_instance_uid, name)
        write(document, results.absolute(relative))
        files.append(relative)
    _queue(database, result.study_instance_uid, version=1)
    [delivery_id] = _complete(database, "w", files, recorder.destination())
    config = DispatchConfig(max_attempts=3, initial_backoff_seconds=30, max_backoff_seconds=45)

    def attempt() -> tuple[DeliveryState, int, float]:
        deliver(database, results.root, config, calling_ae_title="MIBI_NODE", owner="t")
        with database.session() as session:
            row = session.get_one(Delivery, delivery_id)
            wait = (row.next_attempt_at - utcnow()).total_seconds()
            return DeliveryState(row.state), row.attempts, wait

    def make_due() -> None:
        with database.session() as session, session.begin():
            session.execute(
                update(Delivery).values(next_attempt_at=utcnow() - timedelta(seconds=1))
            )

    # The SR is stored but the key image is refused: the delivery is not done.
    recorder.statuses = {SC_STORAGE: 0xA700}
    state, attempts, wait = attempt()
    assert (state, attempts) == (DeliveryState.PENDING, 1) and 25 < wait <= 30
    assert attempt()[:2] == (DeliveryState.PENDING, 1)  # not due yet: nothing sent
    make_due()
    state, attempts, wait = attempt()
    assert (state, attempts) == (DeliveryState.PENDING, 2) and 40 < wait <= 45  # 60, capped
    make_due()
    assert attempt()[:2] == (DeliveryState.FAILED, 3)
    make_due()
    assert attempt()[:2] == (DeliveryState.FAILED, 3)  # never tried again by itself
    assert len(recorder.stores) == 6
    resend_study(database, result.study_instance_uid)
    recorder.statuses = {}
    assert attempt()[:2] == (DeliveryState.DONE, 1)


def test_dispatch_tls_check_hostname(pki: Path, tmp_path: Path) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pki / "pacs.crt", pki / "pacs.key")
    scp = RecordingSCP(ssl_context=server)
    try:
        result, sources = make_case()
        sr = write(build_sr(result, sources, device_uid=DEVICE_UID), tmp_path / "sr.dcm")
        trusted = {"enabled": True, "ca_certificates": pki / "ca.crt"}
        [loose] = send_files([sr], scp.destination(**trusted), calling_ae_title="MIBI_NODE")
        assert loose.success, loose.message
        strict = scp.destination(**trusted, check_hostname=True)
        [checked] = send_files([sr], strict, calling_ae_title="MIBI_NODE")
        assert not checked.success and "TLS handshake" in checked.message
        # Without ca_certificates the system's CAs decide, and they do not know ours.
        [system] = send_files([sr], scp.destination(enabled=True), calling_ae_title="MIBI_NODE")
        assert not system.success and "PACS certificate not trusted" in system.message
        assert len(scp.stores) == 1
        assert _dispatch_ssl_context(DestinationTLS(enabled=True)).minimum_version == (
            ssl.TLSVersion.TLSv1_2
        )
    finally:
        scp.stop()


def test_echo_command(recorder: RecordingSCP) -> None:
    def echo() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mibi_node.cli", "echo", f"RECORDER@127.0.0.1:{recorder.port}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert echo().returncode == 0
    [association] = recorder.associations
    assert association["calling"] == "MIBI_NODE"
    implementation = {row[""]: row["Value"] for row in doc_table("implementation")}
    assert association["implementation"] == (
        implementation["Implementation Class UID"],
        implementation["Implementation Version Name"],
    )
    [row] = doc_table("echo-contexts")
    assert association["contexts"] == [
        (doc_uids(row["Abstract Syntax"])[0], doc_uids(row["Transfer Syntaxes (in this order)"]))
    ]
    recorder.echo_status = 0x0122
    assert echo().returncode == 1
    assert recorder.echoes == 2
    deadline = time.monotonic() + 5
    while recorder.released < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert recorder.released == 2


# --- 8 the SR and the key image ------------------------------------------------------------


def _walk(items: Iterable[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _concept(item: Dataset) -> tuple[str, str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodingSchemeDesignator), str(code.CodeValue), str(code.CodeMeaning)


def sr_paths(sr: Dataset) -> set[tuple[Node, ...]]:
    """Every root-to-item path of an SR's content tree, as :func:`doc_tree_paths` gives."""
    paths: set[tuple[Node, ...]] = set()

    def visit(item: Dataset, prefix: tuple[Node, ...], rel: str | None) -> None:
        scheme, value, meaning = _concept(item)
        children = item.get("ContentSequence", [])
        tid = "TID 1410" if any(c.ValueType == "SCOORD" for c in children) else "TID 1501"
        node = _node_key(rel, str(item.ValueType), scheme, value, meaning, tid)
        paths.add((*prefix, node))
        for child in children:
            visit(child, (*prefix, node), str(child.RelationshipType))

    visit(sr, (), None)
    return paths


def sr_variants() -> list[tuple[Dataset, StudyResult, list[Dataset]]]:
    """SRs covering every branch of the content tree."""
    variants = []
    for kwargs in (
        dict(predicted="adenoma"),
        dict(
            predicted="hyperplasia",
            focus=Focus(row=30.0, col=40.0, side="left", pole="ectopic"),
            frames=1,
            intended_use="clinical",
            secondary_capture=True,
            frame_of_reference=True,
        ),
        dict(predicted="carcinoma", focus=Focus(row=10.0, col=50.0, side="left", pole="upper")),
        dict(predicted="normal", focus=Focus(row=1.0, col=1.0, side="left", pole="upper")),
        dict(predicted="cyst", focus=None, warnings=()),
    ):
        result, sources = make_case(**kwargs)  # type: ignore[arg-type]
        first = build_sr(result, sources, device_uid=DEVICE_UID)
        sr = read_back(build_sr(result, sources, device_uid=DEVICE_UID, predecessor=first))
        variants.append((sr, result, sources))
    return variants


@pytest.fixture(scope="module")
def variants() -> list[tuple[Dataset, StudyResult, list[Dataset]]]:
    return sr_variants()


def test_sr_content_tree_is_the_statements(variants) -> None:
    written: set[tuple[Node, ...]] = set()
    for sr, result, sources in variants:
        written |= sr_paths(sr)
        items = list(_walk(sr.ContentSequence))
        assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        assert all(i.ContinuityOfContent == "SEPARATE" for i in items if i.ValueType == "CONTAINER")
        for item in (i for i in items if i.ValueType == "NUM"):
            measured = item.MeasuredValueSequence[0]
            if measured.MeasurementUnitsCodeSequence[0].CodeValue == "1":
                assert float(measured.NumericValue) == pytest.approx(measured.FloatingPointValue)
            else:
                assert "FloatingPointValue" not in measured
        groups = [i for i in items if _concept(i)[1] == "125007"]
        per_class = [
            g for g in groups if not any(c.ValueType == "SCOORD" for c in g.ContentSequence)
        ]
        assert [_tracking(g) for g in per_class] == [f"mibi-node {k} probability" for k in CLASSES]
        probabilities = [
            float(c.MeasuredValueSequence[0].FloatingPointValue)
            for g in per_class
            for c in g.ContentSequence
            if c.ValueType == "NUM" and _concept(c)[1] == "122157"
        ]
        assert math.fsum(probabilities) == pytest.approx(1.0, abs=1e-9)
        library_groups = [i for i in items if _concept(i)[1] == "126200"]
        kinds = {(ds.SOPClassUID, ds.get("FrameOfReferenceUID")) for ds in sources}
        assert len(library_groups) == len(kinds)
        focus = [g for g in groups if g not in per_class]
        has_focus = result.predicted != "normal" and result.focus is not None
        assert [_tracking(g) for g in focus] == (
            [f"mibi-node {result.predicted} focus"] if has_focus else []
        )
    assert written == doc_tree_paths("sr-content")


def _tracking(group: Dataset) -> str:
    return next(str(c.TextValue) for c in group.ContentSequence if _concept(c)[1] == "112039")


def _codes(ds: Dataset) -> set[tuple[str, str, str]]:
    found = set()
    for element in ds:
        if element.VR != "SQ":
            continue
        for item in element.value:
            if "CodeValue" in item and "CodingSchemeDesignator" in item:
                found.add(
                    (str(item.CodingSchemeDesignator), str(item.CodeValue), str(item.CodeMeaning))
                )
            found |= _codes(item)
    return found


def test_every_code_written_is_listed_and_every_listed_code_is_written(variants) -> None:
    written: set[tuple[str, str, str]] = set()
    for sr, _, _ in variants:
        written |= _codes(sr)
    result, sources = make_case()
    key_image_codes = _codes(read_back(build_key_image(result, sources, size=64)))
    assert key_image_codes == {
        ("DCM", "109102", "Processing Equipment"),
        ("99IHE", "Newcode1", "Processing Algorithm"),
    }
    listed = {(r["Scheme"], r["Value"], r["Meaning"]) for r in doc_table("codes")}
    assert written | key_image_codes == listed
    scheme, ihe = variants[0][0].CodingSchemeIdentificationSequence
    assert ihe.CodingSchemeDesignator == "99IHE"
    assert (
        scheme.CodingSchemeDesignator,
        scheme.CodingSchemeName,
        scheme.CodingSchemeResponsibleOrganization,
    ) == ("99MIBINODE", "mibi-node local codes", "mibi-node project")


def _fixed_values(ds: Dataset, table: str) -> None:
    for row in doc_table(table):
        value = ds.data_element(row["Keyword"]).value
        multiple = isinstance(value, list | tuple | pydicom.multival.MultiValue)
        text = "\\".join(str(v) for v in value) if multiple else str(value)
        assert text == literal(row["Value"]), row["Keyword"]


def _private_tags(ds: Dataset) -> list[str]:
    found = [str(element.tag) for element in ds if element.tag.is_private]
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                found += _private_tags(item)
    return found


def test_sr_header_is_the_statements(variants) -> None:
    sr, result, sources = variants[0]
    _fixed_values(sr, "sr-attributes")
    assert sr.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert "InstitutionName" not in sr and sr.SeriesNumber == 9901
    assert [
        str(c.PurposeOfReferenceCodeSequence[0].CodeValue) for c in sr.ContributingEquipmentSequence
    ] == ["Newcode1", "109102"]
    evidence = {
        str(item.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {str(ds.SOPInstanceUID) for ds in sources}
    assert _private_tags(sr) == []


def test_key_image_header_is_the_statements() -> None:
    result, sources = make_case()
    key = read_back(build_key_image(result, sources, size=64))
    _fixed_values(key, "key-image-attributes")
    assert key.SeriesNumber == 9902 and key.StudyInstanceUID == result.study_instance_uid
    assert key.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert _private_tags(key) == []


def test_key_image_panel_text() -> None:
    from mibi_node.report.keyimage import _caption

    result, _ = make_case("adenoma", focus=Focus(row=1.0, col=2.0, side="left", pole="upper"))
    lines = _caption(result, "delayed")
    assert lines[0] == "mibi-node mibi-demo 0.3.1"
    assert lines[1].startswith("Prediction: adenoma ") and "agreement 78%" in lines[1]
    assert all(key in lines[2] for key in CLASSES)
    assert lines[3] == "Focus (circle, delayed image): patient's left upper pole"
    assert lines[-1] == doc_value("disclaimer")
    no_focus, _ = make_case("normal", focus=None, intended_use="clinical")
    assert len(_caption(no_focus, "delayed")) == 4
    assert _caption(no_focus, "delayed")[-1] == doc_value("clinical-use")


def test_no_media_interchange() -> None:
    package = Path(mibi_node.__file__).parent
    for source in package.rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        assert "FileSet" not in text and "write_dicomdir" not in text, source


def test_intended_use_texts(variants) -> None:
    def intended_use(sr: Dataset) -> str:
        [text] = [str(i.TextValue) for i in _walk(sr.ContentSequence) if _concept(i)[1] == "MN0003"]
        return text

    demo = Path(__file__).resolve().parents[1] / "config" / "ensemble-demo.toml"
    assert tomllib.loads(demo.read_text(encoding="utf-8"))["intended_use"] == "demonstration"
    by_use = {result.intended_use: intended_use(sr) for sr, result, _ in variants}
    assert by_use == {
        "demonstration": doc_value("disclaimer"),
        "clinical": doc_value("clinical-use"),
    }


def _multi(cell: str) -> str | list[str] | None:
    text = literal(cell.split(" (")[0].strip())
    if text == "absent":
        return None
    return text.split("\\") if "\\" in text else text


_ADDED_TEXT = {
    "ASCII only": "mibi-node",
    'encodable in ISO_IR 100 (e.g. "Müller")': "Müller AG",
    'not encodable in it (e.g. "東芝")': "東芝",
    "not ASCII": "Müller AG",
}


@pytest.mark.parametrize("row", doc_table("character-sets"), ids=lambda r: r["Case"])
def test_written_character_sets(row: dict[str, str]) -> None:
    source = _multi(row["Source's Specific Character Set"])
    header = {} if source is None else {"SpecificCharacterSet": source}
    result, sources = make_case(PatientName="Gomez^Ines", **header)
    manufacturer = _ADDED_TEXT[row["Text the node adds"]]
    builders = (
        lambda: build_sr(result, sources, device_uid=DEVICE_UID, manufacturer=manufacturer),
        lambda: build_key_image(result, sources, manufacturer=manufacturer, size=64),
    )
    if row["Written Specific Character Set"].startswith("none"):
        for build in builders:
            with pytest.raises(ValueError):
                build()
        return
    expected = _multi(row["Written Specific Character Set"])
    for build in builders:
        back = read_back(build())
        written = back.get("SpecificCharacterSet")
        assert (list(written) if isinstance(written, pydicom.multival.MultiValue) else written) == (
            expected
        )
        assert str(back.PatientName) == "Gomez^Ines" and back.Manufacturer == manufacturer
