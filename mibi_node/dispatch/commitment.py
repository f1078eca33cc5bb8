"""Storage commitment: asking a PACS whether it keeps what it acknowledged (PS3.4 J).

A DONE delivery means the PACS answered every C-STORE with success; it may still lose the
files before it archives them. Where a destination's ``commitment`` asks for it, the
commitment sweep (:func:`commit_deliveries`, run by the node like the dispatch sweep) asks:

* **Storage Commitment Push Model**: one N-ACTION (Action Type 1) per delivery, with a
  Transaction UID and the SOP class and instance of every file. The PACS answers with an
  N-EVENT-REPORT on the same association (the sweep keeps it open for a short while) or
  later on a new association to the node's SCP (:func:`answer_report`, bound in
  ``reception/scp.py``). The report is matched by Transaction UID.
* **C-FIND read-back** (Study Root, IMAGE level, by SOP Instance UID): for a PACS without
  Storage Commitment; every instance found counts as committed.

``"auto"`` tries Storage Commitment and falls back to C-FIND when the PACS refuses that SOP
class; where it refuses both, the commitment is UNCONFIRMED (the C-STORE response stays the
last word). No report within ``dispatch.commitment_timeout`` seconds: the N-ACTION is sent
again with the same Transaction UID (a late report of an earlier one still counts), up to
``dispatch.commitment_attempts`` times; then the commitment is FAILED, an alert shown by
``mibi-node status``, the deliveries page and ``mibi_node_deliveries_uncommitted``.

A report that names failed instances sends the files again once (the delivery goes back to
PENDING and is committed anew); failures after that resend are FAILED with their reasons.

Every step is one committed transaction: a node killed between the N-ACTION and the report
finds the commitment PENDING at restart and asks again once its timeout has passed.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from mibi_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, audit
from mibi_node.config import DispatchConfig
from mibi_node.dispatch.destinations import Destination
from mibi_node.dispatch.scu import _all_contexts_refused, _association_failure, _ssl_context
from mibi_node.storage.database import Database, database_problem
from mibi_node.storage.models import (
    CommitmentState,
    Delivery,
    DeliveryState,
    Job,
    utcnow,
)

__all__ = [
    "STORAGE_COMMITMENT_PUSH_MODEL",
    "CommitmentOutcome",
    "answer_report",
    "commit_deliveries",
]

logger = logging.getLogger(__name__)

#: Storage Commitment Push Model SOP Class and its well-known SOP Instance (PS3.4 J.3).
STORAGE_COMMITMENT_PUSH_MODEL = UID("1.2.840.10008.1.20.1")
_PUSH_MODEL_INSTANCE = UID("1.2.840.10008.1.20.1.1")
_STUDY_ROOT_FIND = UID("1.2.840.10008.5.1.4.1.2.2.1")
_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
#: N-ACTION Action Type ID "Request Storage Commitment"; N-EVENT-REPORT Event Type IDs.
_REQUEST_COMMITMENT = 1
_ALL_COMMITTED, _FAILURES_EXIST = 1, 2
#: How long the N-ACTION's association stays open for a report sent over it (seconds, at
#: most ``dispatch.commitment_timeout``); a later report comes on a new association.
_SAME_ASSOCIATION_WAIT = 2.0
#: Files sent again after a report of failures, before such a report is final.
_RESENDS = 1
_WAITING = "N-ACTION accepted"

# N-EVENT-REPORT response statuses (PS3.7 10.1.1.1.8, C).
_SUCCESS = 0x0000
_PROCESSING_FAILURE = 0x0110
_NO_SUCH_EVENT_TYPE = 0x0113
_INVALID_ARGUMENT_VALUE = 0x0115
_RESOURCE_LIMITATION = 0x0213

# Failure Reason (0008,1197) of a Failed SOP Sequence item (PS3.3 C.14.1.1).
_FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class/instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}
# N-ACTION failure statuses (PS3.7 10.1.4.1.10, C).
_ACTION_STATUSES = {
    0x0110: "processing failure",
    0x0112: "no such SOP instance",
    0x0114: "no such argument",
    0x0115: "invalid argument value",
    0x0117: "invalid object instance",
    0x0118: "no such SOP class",
    0x0119: "class-instance conflict",
    0x0123: "no such action",
    0x0124: "not authorised",
    0x0210: "duplicate invocation",
    0x0211: "unrecognised operation",
    0x0212: "mistyped argument",
    0x0213: "resource limitation",
}
_FIND_PENDING = frozenset({0xFF00, 0xFF01})


@dataclass(frozen=True)
class CommitmentOutcome:
    """What one pass of the commitment sweep did for one delivery."""

    delivery_id: int
    commitment: CommitmentState
    message: str


@dataclass(frozen=True)
class _Instance:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class _Asked:
    id: int
    destination: Destination
    files: tuple[str, ...]
    transaction_uid: str
    attempt: int


@dataclass(frozen=True)
class _Answer:
    """What asking the PACS gave: a final state, or a sentence while it stays PENDING."""

    #: ``waiting`` (the N-ACTION was accepted) and ``retry`` (it was not, or C-FIND missed)
    #: leave the commitment PENDING until its next due time.
    state: Literal["committed", "unconfirmed", "waiting", "retry"]
    message: str


# -- the sweep ------------------------------------------------------------------------------


def commit_deliveries(
    database: Database,
    results_dir: Path,
    config: DispatchConfig,
    *,
    calling_ae_title: str,
    limit: int = 32,
) -> list[CommitmentOutcome]:
    """Ask about every DONE delivery whose commitment is due, one association each.

    Never raises for a network or peer problem: each is recorded on its delivery.

    Parameters
    ----------
    database
        The node's database.
    results_dir
        Folder of the result files (the deliveries name files relative to it).
    config
        ``timeout`` bounds every network wait; ``commitment_timeout`` and
        ``commitment_attempts`` say when to ask again and when to give up.
    calling_ae_title
        The node's AE title in the request; the PACS sends its report to the node it knows
        by this title.
    limit
        Deliveries taken per call.

    Returns
    -------
    list[CommitmentOutcome]
        One per delivery asked about or given up on, in no particular order.
    """
    asked, outcomes = _claim(database, config, limit)
    for item in asked:
        answer = _ask(database, item, results_dir, calling_ae_title, config)
        outcome = _record(database, item, answer, config)
        if outcome is not None:
            outcomes.append(outcome)
    return outcomes


def _claim(
    database: Database, config: DispatchConfig, limit: int
) -> tuple[list[_Asked], list[CommitmentOutcome]]:
    """Take the due commitments: each gets its attempt and its next due time, committed
    before anything is sent (a sweep killed after this asks again once that time is due)."""
    now = utcnow()
    asked: list[_Asked] = []
    given_up: list[CommitmentOutcome] = []
    with database.write_lock(), database.session() as session, session.begin():
        rows = session.scalars(
            select(Delivery)
            .where(
                Delivery.state == DeliveryState.DONE,
                Delivery.commitment == CommitmentState.PENDING,
                Delivery.commit_due_at <= now,
            )
            .order_by(Delivery.commit_due_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            if row.commit_attempts >= config.commitment_attempts:
                last = row.commit_message or "no answer"
                if last.startswith(_WAITING):
                    last = "the PACS accepted the N-ACTION but sent no report"
                message = (
                    f"not committed after {row.commit_attempts} request(s), "
                    f"{config.commitment_timeout:g} s each: {last}"
                )
                given_up.append(_settle(session, row, CommitmentState.FAILED, message))
                continue
            data: dict[str, Any] = dict(row.destination)
            files = tuple(str(f) for f in data.pop("files", ()))
            try:
                destination = Destination.model_validate(data)
            except ValueError as exc:
                message = f"the recorded destination is not valid: {exc}"
                given_up.append(_settle(session, row, CommitmentState.FAILED, message))
                continue
            row.commit_attempts += 1
            row.commit_transaction_uid = row.commit_transaction_uid or generate_uid()
            row.commit_due_at = now + timedelta(seconds=config.commitment_timeout)
            asked.append(
                _Asked(row.id, destination, files, row.commit_transaction_uid, row.commit_attempts)
            )
    return asked, given_up


def _record(
    database: Database, asked: _Asked, answer: _Answer, config: DispatchConfig
) -> CommitmentOutcome | None:
    """Keep what asking gave, unless a report settled the commitment meanwhile.

    A commitment left PENDING is due again ``commitment_timeout`` after this answer (the
    claim's due time only covers a sweep that stopped before it got here).
    """
    with database.write_lock(), database.session() as session, session.begin():
        row = session.get_one(Delivery, asked.id, with_for_update=True)
        if (
            row.state is not DeliveryState.DONE
            or row.commitment is not CommitmentState.PENDING
            or row.commit_transaction_uid != asked.transaction_uid
            or row.commit_attempts != asked.attempt
        ):
            return None  # a report (on this association or another) came first
        if answer.state == "committed":
            return _settle(session, row, CommitmentState.COMMITTED, answer.message)
        if answer.state == "unconfirmed":
            return _settle(session, row, CommitmentState.UNCONFIRMED, answer.message)
        row.commit_message = answer.message
        row.commit_due_at = utcnow() + timedelta(seconds=config.commitment_timeout)
        logger.log(
            logging.INFO if answer.state == "waiting" else logging.WARNING,
            "commitment of delivery #%d to %s (request %d): %s",
            row.id,
            row.label,
            row.commit_attempts,
            answer.message,
        )
        return CommitmentOutcome(row.id, CommitmentState.PENDING, answer.message)


def _settle(session: Any, row: Delivery, state: CommitmentState, message: str) -> CommitmentOutcome:
    """Give ``row`` its final commitment state, with an audit row."""
    row.commitment = state
    row.commit_message = message
    row.commit_due_at = None
    if state is CommitmentState.COMMITTED:
        row.committed_at = utcnow()
    level = logging.ERROR if state is CommitmentState.FAILED else logging.INFO
    logger.log(level, "commitment of delivery #%d to %s: %s", row.id, row.label, message)
    audit.add(
        session,
        "commitment",
        state.value.lower(),
        actor=row.label,
        study_id=session.get_one(Job, row.job_id).study_id,
        message="" if state is CommitmentState.COMMITTED else message,
        detail={"delivery": row.id, "requests": row.commit_attempts},
    )
    return CommitmentOutcome(row.id, state, message)


# -- asking the PACS ------------------------------------------------------------------------


def _ask(
    database: Database,
    item: _Asked,
    results_dir: Path,
    calling_ae_title: str,
    config: DispatchConfig,
) -> _Answer:
    """Ask the PACS about one delivery, over an association of its own.

    One N-ACTION per association: pynetdicom takes the next message that arrives as the
    answer to a request, so a report sent over the association while a second N-ACTION
    awaits its response would be lost.
    """
    instances = _instances(results_dir, item.files)
    if isinstance(instances, str):
        return _Answer("retry", instances)
    reported = threading.Event()

    def on_report(event: Any) -> tuple[int, None]:
        """A report on this very association: recorded as one on a new association is."""
        status = answer_report(database, event)
        reported.set()
        return status, None

    association = _associate(item.destination, calling_ae_title, config.timeout, on_report)
    if isinstance(association, _Answer):
        return association
    try:
        accepted = {context.abstract_syntax for context in association.accepted_contexts}
        if STORAGE_COMMITMENT_PUSH_MODEL in accepted:
            answer = _request(association, item, instances, config)
            if answer.state == "waiting":
                wait = min(_SAME_ASSOCIATION_WAIT, config.commitment_timeout)
                _await_report(database, item, reported, association, wait)
            return answer
        if _STUDY_ROOT_FIND in accepted:
            return _read_back(association, instances, config.timeout)
        # The PACS took the association but refused what this destination asks.
        return _refused(item.destination.commitment)
    finally:
        if association.is_established:
            association.release()


def _await_report(
    database: Database,
    item: _Asked,
    reported: threading.Event,
    association: Association,
    seconds: float,
) -> None:
    """Keep the association open for a report over it, until one is recorded (over it, or
    on a new association to the node's SCP) or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while association.is_established and not reported.wait(0.1):
        if time.monotonic() >= deadline:
            return
        with database.session() as session:
            current = session.get_one(Delivery, item.id)
            if current.commitment is not CommitmentState.PENDING:
                return


def _associate(
    destination: Destination, calling_ae_title: str, timeout: float, on_report: Any
) -> Association | _Answer:
    """An established association with ``destination``, or why there is none.

    ``"auto"`` proposes Storage Commitment and C-FIND together: a PACS that refuses the
    first is read back over the same association.
    """
    started = time.monotonic()
    tls_context: ssl.SSLContext | None = None
    if destination.tls.enabled:
        try:
            tls_context = _ssl_context(destination.tls)
        except (OSError, ssl.SSLError) as exc:
            return _Answer("retry", f"cannot load the TLS certificates or key: {exc}")
    ae = AE(ae_title=calling_ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    if destination.commitment in ("auto", "storage-commitment"):
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL, _SYNTAXES)
    if destination.commitment in ("auto", "find"):
        ae.add_requested_context(_STUDY_ROOT_FIND, _SYNTAXES)
    connected = threading.Event()
    try:
        association = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            tls_args=None if tls_context is None else (tls_context, destination.host),
            evt_handlers=[
                (evt.EVT_CONN_OPEN, lambda event: connected.set()),
                (evt.EVT_N_EVENT_REPORT, on_report),
            ],
        )
    except OSError as exc:
        return _Answer("retry", f"cannot connect to {destination.address}: {exc}")
    if association.is_established:
        return association
    if _all_contexts_refused(association):
        return _refused(destination.commitment)
    elapsed = time.monotonic() - started
    return _Answer(
        "retry",
        _association_failure(
            association, destination, tls_context, connected.is_set(), elapsed, timeout
        ),
    )


def _refused(method: str) -> _Answer:
    """The PACS refused every SOP class that ``method`` asks with."""
    if method == "auto":
        return _Answer(
            "unconfirmed",
            "the PACS supports neither Storage Commitment nor C-FIND: "
            "only its C-STORE responses say that it holds the files",
        )
    if method == "find":
        return _Answer("retry", "the PACS does not take C-FIND (Study Root Query/Retrieve)")
    return _Answer("retry", "the PACS does not take the Storage Commitment Push Model SOP class")


def _instances(results_dir: Path, files: Sequence[str]) -> list[_Instance] | str:
    """The SOP class and instance (and their study and series) of each file."""
    found = []
    for name in files:
        path = results_dir / name
        try:
            header = dcmread(path, stop_before_pixels=True)
            found.append(
                _Instance(
                    str(header.SOPClassUID),
                    str(header.SOPInstanceUID),
                    str(header.StudyInstanceUID),
                    str(header.SeriesInstanceUID),
                )
            )
        except FileNotFoundError:
            return f"{path} does not exist: cannot ask the PACS about it"
        except Exception as exc:  # pydicom raises many kinds of errors on a damaged file
            return f"{path} cannot be read ({exc}): cannot ask the PACS about it"
    if not found:
        return "the delivery names no file"
    return found


def _request(
    association: Association, item: _Asked, instances: Sequence[_Instance], config: DispatchConfig
) -> _Answer:
    """One N-ACTION "Request Storage Commitment" (PS3.4 J.3.2) for one delivery's files."""
    timeout = config.timeout
    information = Dataset()
    information.TransactionUID = item.transaction_uid
    references = []
    for instance in instances:
        reference = Dataset()
        reference.ReferencedSOPClassUID = instance.sop_class_uid
        reference.ReferencedSOPInstanceUID = instance.sop_instance_uid
        references.append(reference)
    information.ReferencedSOPSequence = references
    started = time.monotonic()
    status, _reply = association.send_n_action(
        information,
        _REQUEST_COMMITMENT,
        STORAGE_COMMITMENT_PUSH_MODEL,
        _PUSH_MODEL_INSTANCE,
    )
    if "Status" not in status:
        if time.monotonic() - started >= 0.9 * timeout:
            return _Answer("retry", f"no N-ACTION response within {timeout:g} s")
        return _Answer("retry", "the PACS ended the association without an N-ACTION response")
    code = int(status.Status)
    if code != _SUCCESS:
        meaning = _ACTION_STATUSES.get(code, "failure")
        comment = str(status.get("ErrorComment", "")).strip()
        return _Answer(
            "retry",
            f"N-ACTION answered 0x{code:04X} ({meaning})" + (f": {comment}" if comment else ""),
        )
    return _Answer(
        "waiting",
        f"{_WAITING}; waiting up to {config.commitment_timeout:g} s for the PACS's report",
    )


def _read_back(association: Association, instances: Sequence[_Instance], timeout: float) -> _Answer:
    """C-FIND every instance at IMAGE level (Study Root: study and series UIDs as keys)."""
    found = 0
    for instance in instances:
        if not association.is_established:
            return _Answer("retry", "not read back: the association ended at an earlier C-FIND")
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = instance.study_instance_uid
        query.SeriesInstanceUID = instance.series_instance_uid
        query.SOPInstanceUID = instance.sop_instance_uid
        matched = False
        final: int | None = None
        for status, identifier in association.send_c_find(query, _STUDY_ROOT_FIND):
            if "Status" not in status:
                return _Answer("retry", f"no C-FIND response within {timeout:g} s")
            code = int(status.Status)
            if code in _FIND_PENDING:
                uid = "" if identifier is None else str(identifier.get("SOPInstanceUID", ""))
                matched = matched or uid == instance.sop_instance_uid
            else:
                final = code
        if final is None:
            return _Answer("retry", "the PACS ended the C-FIND without a final response")
        if final != _SUCCESS:
            return _Answer("retry", f"C-FIND answered 0x{final:04X}")
        found += matched
    if found == len(instances):
        return _Answer("committed", f"C-FIND found all {found} instance(s) at the PACS")
    return _Answer("retry", f"C-FIND found {found} of {len(instances)} instance(s) at the PACS")


# -- the report -----------------------------------------------------------------------------


def answer_report(database: Database, event: Any) -> int:
    """Record a Storage Commitment N-EVENT-REPORT (PS3.4 J.3.3); the status to answer.

    Bound to ``EVT_N_EVENT_REPORT`` by the node's SCP (a report on a new association) and by
    the sweep's own association. Never raises: a report that cannot be understood is
    answered with the status that says why, a database outage with 0x0213.
    """
    try:
        event_type = int(event.event_type)
        if event_type not in (_ALL_COMMITTED, _FAILURES_EXIST):
            logger.warning("refused a commitment report of unknown event type %d", event_type)
            return _NO_SUCH_EVENT_TYPE
        information = event.event_information
        transaction_uid = str(information.get("TransactionUID", "")).strip()
        if not transaction_uid:
            logger.warning("refused a commitment report without a Transaction UID")
            return _INVALID_ARGUMENT_VALUE
        committed = [
            str(item.get("ReferencedSOPInstanceUID", ""))
            for item in information.get("ReferencedSOPSequence", [])
        ]
        failed = [
            int(item.get("FailureReason", _PROCESSING_FAILURE))
            for item in information.get("FailedSOPSequence", [])
        ]
        return _record_report(database, transaction_uid, event_type, committed, failed)
    except OperationalError as exc:
        logger.error("commitment report not recorded (0x0213): %s", database_problem(exc))
        return _RESOURCE_LIMITATION
    except Exception:
        logger.exception("commitment report could not be read; answered 0x0110")
        return _PROCESSING_FAILURE


def _record_report(
    database: Database,
    transaction_uid: str,
    event_type: int,
    committed: Sequence[str],
    failed: Sequence[int],
) -> int:
    with database.write_lock(), database.session() as session, session.begin():
        row = session.scalars(
            select(Delivery)
            .where(Delivery.commit_transaction_uid == transaction_uid)
            .with_for_update()
        ).first()
        if row is None:
            logger.warning("refused a commitment report of a transaction this node never asked")
            return _INVALID_ARGUMENT_VALUE
        if row.state is not DeliveryState.DONE or row.commitment is not CommitmentState.PENDING:
            logger.info("commitment of delivery #%d was already settled: report ignored", row.id)
            return _SUCCESS
        files = row.destination.get("files")
        expected = len(files) if isinstance(files, list) else 1
        if event_type == _ALL_COMMITTED and not failed and len(committed) >= expected:
            _settle(
                session,
                row,
                CommitmentState.COMMITTED,
                f"the PACS committed all {len(committed)} instance(s)",
            )
            return _SUCCESS
        reasons = ", ".join(
            sorted({f"0x{code:04X} ({_FAILURE_REASONS.get(code, 'failure')})" for code in failed})
        )
        problem = (
            f"the PACS could not commit {len(failed) or expected - len(committed)} of "
            f"{expected} instance(s)" + (f": {reasons}" if reasons else "")
        )
        if row.commit_resends < _RESENDS:
            _resend(session, row, problem)
        else:
            _settle(session, row, CommitmentState.FAILED, f"{problem}, after sending them again")
        return _SUCCESS


def _resend(session: Any, row: Delivery, problem: str) -> None:
    """Store the files again: back to PENDING, due now; the commitment is asked anew."""
    row.commit_resends += 1
    row.transition(DeliveryState.PENDING)
    row.next_attempt_at = utcnow()
    row.attempts = 0
    row.commit_transaction_uid = None
    row.commit_due_at = None
    row.commit_message = f"{problem}; sending the files again"
    logger.warning("commitment of delivery #%d to %s: %s", row.id, row.label, row.commit_message)
    audit.add(
        session,
        "commitment",
        "resend",
        actor=row.label,
        study_id=session.get_one(Job, row.job_id).study_id,
        message=row.commit_message,
        detail={"delivery": row.id, "requests": row.commit_attempts},
    )
