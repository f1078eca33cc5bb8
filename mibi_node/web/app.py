"""The FastAPI application: server-rendered pages, their JSON twins under ``/api/``, health.

Pages (``docs/web.md``): studies, one study (with the focus picture and the requeue and
resend buttons), workers, deliveries, configuration and the audit trail. Each page has a JSON
twin under ``/api/`` built from the same :mod:`~mibi_node.web.summaries`. URLs name studies
by their database id, never by anything about the patient.

The buttons act through :func:`mibi_node.jobs.queue.requeue_study` and
:func:`mibi_node.dispatch.deliveries.resend_study`, which write the audit trail (actor
``web``); a refusal (a study being analysed, a study without result) is shown as the
sentence the function gives. The verdict forms of the study page and the performance page
(local validation) are built by :mod:`~mibi_node.web.validation`.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import OperationalError
from starlette.middleware.base import RequestResponseEndpoint

from mibi_node import __version__
from mibi_node.config import Config
from mibi_node.dispatch.deliveries import resend_study
from mibi_node.errors import MibiNodeError
from mibi_node.jobs.queue import requeue_study
from mibi_node.storage.database import Database, Outage, database_problem
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.models import DeliveryState, Study, utcnow
from mibi_node.web import auth, summaries
from mibi_node.web import validation as validation_views
from mibi_node.web.focus import render_focus
from mibi_node.web.health import Readiness
from mibi_node.web.reader import Reader

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_TEMPLATES = Path(__file__).parent / "templates"
_MAX_FORM_BYTES = 4096
_NOTICES = {
    "requeued": "Queued again as job #{job}: a worker analyses it shortly.",
    "resent": "{count} delivery(ies) due now: the node sends them within seconds.",
    "verdict": "Verdict on job #{job} recorded.",
    "imported": "{count} final diagnosis(es) imported.",
}


def _timestamp(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def _label(key: str) -> str:
    return key.replace("_", " ").capitalize()


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(_TEMPLATES))
    templates.env.filters.update(ts=_timestamp, secs=_seconds, pct=_percent, label=_label)
    return templates


def create_app(config: Config, database: Database, is_listening: Callable[[], bool]) -> FastAPI:
    """Build the web application of one node.

    Parameters
    ----------
    config
        The node's resolved configuration (``web`` section: token, stale worker limit).
    database
        The node's database (shared with the parent process's scheduler).
    is_listening
        A callable that says whether the DICOM listener accepts associations.

    The application keeps its ``/readyz`` checks in ``app.state.readiness`` and its
    read-only sessions in ``app.state.reader``; whoever serves it closes both at the end.
    """
    app = FastAPI(
        title="mibi-node",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    templates = _templates()
    files = FileStore(config.store_dir)
    reader = Reader(database)
    ready = Readiness(config, database, is_listening, reader=reader)
    token = config.web.token.get_secret_value()
    app.state.readiness = ready
    app.state.reader = reader

    def page(
        request: Request, name: str, nav: str, status_code: int = 200, **context: Any
    ) -> Response:
        context.update(
            nav=nav,
            version=__version__,
            ae_title=config.node.ae_title,
            now=_timestamp(utcnow()),
        )
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    # -- access -------------------------------------------------------------------------

    @app.middleware("http")
    async def guard(request: Request, call_next: RequestResponseEndpoint) -> Response:
        path = request.url.path
        if path in auth.PUBLIC_PATHS:
            return await call_next(request)
        if token:
            how = auth.presented_token(request, token)
            if how is None:
                return _unauthorised(request)
            if how == "query" and request.method == "GET" and not path.startswith("/api/"):
                query = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                target = path + (f"?{urlencode(query)}" if query else "")
                return _signed_in(request, RedirectResponse(target, status_code=303), token)
            return await call_next(request)
        if not auth.is_loopback_name(request.headers.get("host", "")):
            return _refuse(
                request, "Without web.token this page answers only on localhost / 127.0.0.1."
            )
        if request.method not in ("GET", "HEAD") and not auth.same_loopback_origin(request):
            return _refuse(request, "This form was sent from another site; it was not run.")
        return await call_next(request)

    def _unauthorised(request: Request) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse(
                {"error": "this needs the node's web token (Authorization: Bearer <token>)"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        query = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        target = request.url.path + (f"?{urlencode(query)}" if query else "")
        return page(request, "login.html", "", status_code=401, target=target, title="Sign in")

    def _refuse(request: Request, why: str) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": why}, status_code=403)
        return PlainTextResponse(why + "\n", status_code=403)

    def _signed_in(request: Request, response: Response, value: str) -> Response:
        response.set_cookie(
            auth.COOKIE_NAME,
            auth.cookie_value(value),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    @app.post("/login")
    async def login(request: Request) -> Response:
        body = await request.body()
        form = parse_qs(body[:_MAX_FORM_BYTES].decode("utf-8", "replace"))
        target = (form.get("target") or ["/studies"])[0]
        if not target.startswith("/") or target.startswith("//"):
            target = "/studies"
        if not token:
            return RedirectResponse(target, status_code=303)
        if not auth.token_matches(token, (form.get("token") or [""])[0]):
            return page(
                request,
                "login.html",
                "",
                status_code=401,
                target=target,
                title="Sign in",
                error="That is not the node's web token.",
            )
        return _signed_in(request, RedirectResponse(target, status_code=303), token)

    # Only a throttle here: a request that works does not end it, so each later outage is
    # logged when its first request fails, at most once a minute (no "works again").
    outage = Outage()

    @app.exception_handler(OperationalError)
    async def database_unavailable(request: Request, exc: OperationalError) -> Response:
        """PostgreSQL stopped, the network to it cut: 503 with the reason, not a traceback.

        The page, the REST API and ``/metrics`` (a Prometheus scrape then fails: ``up`` is 0)
        all answer so; the log says it once a minute at most, not once per request.
        """
        problem = database_problem(exc)
        if outage.failed():
            logger.error("status page: database error, answering 503: %s", problem)
        why = f"The node's database cannot be reached: {problem}"
        headers = {"Retry-After": "10"}
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": why}, status_code=503, headers=headers)
        if request.url.path == "/metrics":
            return PlainTextResponse(why + "\n", status_code=503, headers=headers)
        response = page(request, "message.html", "", 503, title="Database unavailable", error=why)
        response.headers.update(headers)
        return response

    # -- health -------------------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "alive", "version": __version__}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        checks = ready.checks()
        failed = [c.name for c in checks if not c.ok]
        body = {
            "ready": not failed,
            "failed": failed,
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
        }
        return JSONResponse(body, status_code=503 if failed else 200)

    @app.get("/metrics")
    def metrics() -> Response:
        try:
            module = importlib.import_module("mibi_node.metrics")
        except ImportError:
            return PlainTextResponse("metrics are not available in this version\n", 501)
        body, content_type = module.render_metrics(database, config)
        return Response(body, media_type=content_type)

    # -- pages ----------------------------------------------------------------------------

    @app.get("/")
    def index() -> RedirectResponse:
        return RedirectResponse("/studies", status_code=303)

    @app.get("/studies")
    def studies_page(request: Request) -> Response:
        rows = summaries.study_rows(reader, files)
        return page(request, "studies.html", "studies", title="Studies", studies=rows, refresh=30)

    def _study_page(
        request: Request,
        study_id: int,
        status_code: int = 200,
        error: str | None = None,
        reader_name: str | None = None,
    ) -> Response:
        detail = summaries.study_detail(reader, files, study_id)
        if detail is None:
            return _missing(request, f"There is no study #{study_id}.")
        notice = None
        template = _NOTICES.get(request.query_params.get("notice", ""))
        if template is not None and error is None:
            values = {k: request.query_params.get(k, "?") for k in ("job", "count")}
            notice = template.format(**{k: v if v.isdigit() else "?" for k, v in values.items()})
        return page(
            request,
            "study.html",
            "studies",
            status_code=status_code,
            title=f"Study #{study_id}",
            detail=detail,
            notice=notice,
            error=error,
            findings=validation_views.study_findings(reader, study_id),
            reader_name=validation_views.remembered_reader(request)
            if reader_name is None
            else reader_name,
        )

    @app.get("/studies/{study_id}")
    def study_page(request: Request, study_id: int) -> Response:
        return _study_page(request, study_id)

    @app.get("/studies/{study_id}/focus.png")
    def focus_png(study_id: int) -> Response:
        sources = summaries.image_files(reader, files, study_id)
        if not sources:
            return PlainTextResponse(f"study #{study_id} has no stored images\n", 404)
        try:
            png = render_focus(sources, summaries.latest_result(reader, study_id))
        except MibiNodeError as exc:
            return PlainTextResponse(f"{exc}\n", 404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})

    def _uid(study_id: int) -> str | None:
        with reader.session() as session:
            study = session.get(Study, study_id)
            return None if study is None else study.study_instance_uid

    def _requeue(study_id: int) -> int:
        uid = _uid(study_id)
        if uid is None:
            raise LookupError(f"There is no study #{study_id}.")
        return requeue_study(database, uid, actor="web", config=config)

    def _resend(study_id: int) -> int:
        uid = _uid(study_id)
        if uid is None:
            raise LookupError(f"There is no study #{study_id}.")
        return resend_study(database, uid, (), actor="web")

    def _missing(request: Request, why: str) -> Response:
        return page(request, "message.html", "studies", 404, title="No such study", error=why)

    @app.post("/studies/{study_id}/requeue")
    def requeue_button(request: Request, study_id: int) -> Response:
        try:
            job = _requeue(study_id)
        except LookupError as exc:
            return _missing(request, str(exc))
        except MibiNodeError as exc:
            return _study_page(request, study_id, 409, f"Not queued again: {exc}")
        return RedirectResponse(f"/studies/{study_id}?notice=requeued&job={job}", 303)

    @app.post("/studies/{study_id}/resend")
    def resend_button(request: Request, study_id: int) -> Response:
        try:
            count = _resend(study_id)
        except LookupError as exc:
            return _missing(request, str(exc))
        except MibiNodeError as exc:
            return _study_page(request, study_id, 409, f"Not sent again: {exc}")
        return RedirectResponse(f"/studies/{study_id}?notice=resent&count={count}", 303)

    @app.post("/studies/{study_id}/verdicts")
    def verdict_button(
        request: Request,
        study_id: int,
        form: Annotated[validation_views.PostedForm, Depends(validation_views.verdict_form)],
    ) -> Response:
        named = form.get("reader").strip()
        try:
            if form.problem is not None:
                raise MibiNodeError(form.problem)
            recorded = validation_views.record_from_form(database, reader, study_id, form.fields)
        except MibiNodeError as exc:
            why = f"Verdict not recorded: {exc}"
            return _study_page(request, study_id, 422, why, reader_name=named)
        if config.validation.send_assessment:
            sent = _send_assessment(recorded.job, f"{recorded.reader} (web)")
            if "error" in sent:
                why = f"Verdict recorded; its assessment SR was not queued: {sent['error']}"
                return _study_page(request, study_id, 200, why, reader_name=named)
        target = f"/studies/{study_id}?notice=verdict&job={recorded.job}#job-{recorded.job}"
        response = RedirectResponse(target, 303)
        validation_views.remember_reader(request, response, recorded.reader)
        return response

    @app.get("/workers")
    def workers_page(request: Request) -> Response:
        rows = summaries.worker_rows(reader, config.web.worker_stale_seconds)
        return page(
            request,
            "workers.html",
            "workers",
            title="Workers",
            workers=rows,
            expected=config.workers.count,
            stale_seconds=config.web.worker_stale_seconds,
            refresh=30,
        )

    @app.get("/deliveries")
    def deliveries_page(request: Request) -> Response:
        return page(
            request,
            "deliveries.html",
            "deliveries",
            title="Deliveries",
            open=summaries.delivery_rows(reader),
            delivered=_delivered(),
            destinations=[d.label for d in config.dispatch.destinations],
            refresh=30,
        )

    def _delivered() -> list[summaries.DeliveryRow]:
        return summaries.delivery_rows(reader, (DeliveryState.DONE,), limit=20, newest_first=True)

    @app.get("/config")
    def config_page(request: Request) -> Response:
        return page(
            request, "config.html", "config", title="Configuration", sections=config.masked()
        )

    @app.get("/audit")
    def audit_page(request: Request) -> Response:
        rows = summaries.audit_rows(reader)
        return page(request, "audit.html", "audit", title="Audit trail", events=rows, refresh=30)

    def _performance_page(
        request: Request,
        status_code: int = 200,
        error: str | None = None,
        problems: list[str] | None = None,
        csv_text: str = "",
    ) -> Response:
        from mibi_node.validation.performance import performance

        analysis = request.query_params.get("analysis") or None
        text = request.query_params.get("resamples", "200")
        resamples = min(int(text), 2000) if text.isdigit() else 200
        known = validation_views.analysis_names()
        if analysis is not None and analysis not in known:
            why = f"unknown analysis {analysis!r} (known: {', '.join(known)})"
            return page(
                request, "message.html", "performance", 404, title="No such analysis", error=why
            )
        from mibi_node.validation.drift import drift_report
        from mibi_node.validation.shadow import shadow_comparisons

        groups = performance(database, files, analysis, resamples)
        drift = [r.as_dict() for r in drift_report(database, config, analysis)]
        shadow = [
            c.to_dict()
            for c in shadow_comparisons(database, config, analysis, min(resamples, 200))
            if c.candidate_folder or c.compared or sum(c.shadow_jobs.values())
        ]
        count = request.query_params.get("count", "?")
        notice = None
        if request.query_params.get("notice") == "imported" and error is None:
            notice = _NOTICES["imported"].format(count=count if count.isdigit() else "?")
        return page(
            request,
            "performance.html",
            "performance",
            status_code=status_code,
            title="Performance",
            sections=validation_views.performance_sections(groups),
            figures=validation_views.FIGURES,
            drift=drift,
            shadow=shadow,
            analysis=analysis,
            resamples=resamples,
            notice=notice,
            error=error,
            problems=problems or [],
            csv_text=csv_text,
        )

    @app.get("/performance")
    def performance_page(request: Request) -> Response:
        return _performance_page(request)

    @app.get("/performance/reliability.png")
    def reliability_png(analysis: str = "") -> Response:
        from mibi_node.validation.performance import performance

        known = validation_views.analysis_names()
        if analysis not in known:
            why = f"unknown analysis {analysis!r} (known: {', '.join(known)})"
            return PlainTextResponse(why + "\n", 404)
        groups = performance(database, None, analysis, resamples=0)
        png = validation_views.reliability_png(
            known[analysis], groups[0].classification if groups else None
        )
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})

    @app.post("/performance/truth")
    def truth_upload(
        request: Request,
        form: Annotated[validation_views.PostedForm, Depends(validation_views.truth_form)],
    ) -> Response:
        from mibi_node.validation.truth import TruthImportError

        try:
            count = validation_views.truth_from_form(database, files, form)
        except TruthImportError as exc:
            why = f"Nothing imported: {len(exc.problems)} problem(s)."
            return _performance_page(request, 422, why, exc.problems, form.get("csv"))
        except MibiNodeError as exc:
            return _performance_page(request, 422, str(exc), None, form.get("csv"))
        return RedirectResponse(f"/performance?notice=imported&count={count}", 303)

    # -- JSON ---------------------------------------------------------------------------

    @app.get("/api/studies")
    def api_studies(limit: int = 200) -> Any:
        limit = min(max(limit, 1), 1000)
        return summaries.to_json(summaries.study_rows(reader, files, limit))

    @app.get("/api/studies/{study_id}")
    def api_study(study_id: int) -> Any:
        detail = summaries.study_detail(reader, files, study_id)
        if detail is None:
            return JSONResponse({"error": f"there is no study #{study_id}"}, 404)
        data = summaries.to_json(detail)
        data["links"] = {"page": f"/studies/{study_id}", "focus": f"/studies/{study_id}/focus.png"}
        return data

    @app.post("/api/studies/{study_id}/requeue")
    def api_requeue(study_id: int) -> Any:
        try:
            return {"job": _requeue(study_id)}
        except LookupError as exc:
            return JSONResponse({"error": str(exc)}, 404)
        except MibiNodeError as exc:
            return JSONResponse({"error": str(exc)}, 409)

    @app.post("/api/studies/{study_id}/resend")
    def api_resend(study_id: int) -> Any:
        try:
            return {"deliveries": _resend(study_id)}
        except LookupError as exc:
            return JSONResponse({"error": str(exc)}, 404)
        except MibiNodeError as exc:
            return JSONResponse({"error": str(exc)}, 409)

    # -- local validation (docs/validation.md) ---------------------------------------------

    def _send_assessment(job_id: int, actor: str) -> dict[str, Any]:
        """Queue job ``job_id``'s assessment SR (``validation.send_assessment``): what was
        queued, or ``{"error"}`` (the verdict stays recorded either way)."""
        from mibi_node.validation.verdicts import AssessmentError, queue_assessment

        try:
            queued = queue_assessment(config, database, job_id, actor=actor)
        except AssessmentError as exc:
            return {"error": str(exc)}
        return {**asdict(queued), "deliveries": list(queued.deliveries)}

    @app.post("/api/jobs/{job_id}/verdicts")
    async def api_verdict(request: Request, job_id: int) -> Any:
        from mibi_node.validation.verdicts import VerdictError, record_verdict

        body = await _json_body(request)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body should be a JSON object"}, 400)
        try:
            recorded = record_verdict(
                database,
                job_id,
                str(body.get("finding") or ""),
                str(body.get("decision") or ""),
                reader=str(body.get("reader") or ""),
                value=None if body.get("value") is None else str(body["value"]),
                comment=None if body.get("comment") is None else str(body["comment"]),
                actor="web",
            )
        except VerdictError as exc:
            status = 404 if str(exc).startswith("there is no job") else 422
            return JSONResponse({"error": str(exc)}, status)
        answer = asdict(recorded)
        if config.validation.send_assessment:
            answer["assessment"] = _send_assessment(recorded.job, f"{recorded.reader} (web)")
        return JSONResponse(answer, 201)

    @app.get("/api/studies/{study_id}/findings")
    def api_findings(study_id: int) -> Any:
        if _uid(study_id) is None:
            return JSONResponse({"error": f"there is no study #{study_id}"}, 404)
        return summaries.to_json(validation_views.study_findings(reader, study_id))

    @app.post("/api/truth")
    async def api_truth(request: Request) -> Any:
        from mibi_node.validation.truth import TruthImportError, import_truth

        content_type = request.headers.get("content-type", "")
        rows: Any
        if "json" in content_type:
            body = await _json_body(request)
            rows = body.get("rows") if isinstance(body, dict) else body
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                return JSONResponse({"error": "the body should be a list of row objects"}, 400)
        else:
            raw = await request.body()
            try:
                rows = raw.decode("utf-8-sig")
            except UnicodeDecodeError:
                return JSONResponse({"error": "the CSV should be UTF-8"}, 400)
        try:
            count = import_truth(database, files, rows, imported_by="web")
        except TruthImportError as exc:
            return JSONResponse({"error": "nothing imported", "problems": exc.problems}, 422)
        return JSONResponse({"imported": count}, 201)

    @app.get("/api/performance")
    def api_performance(analysis: str | None = None, resamples: int = 200) -> Any:
        from mibi_node.validation.performance import performance

        resamples = min(max(resamples, 0), 2000)
        return [g.to_dict() for g in performance(database, files, analysis, resamples)]

    @app.get("/api/shadow")
    def api_shadow(analysis: str | None = None, resamples: int = 200) -> Any:
        from mibi_node.analyses.registry import available_analyses
        from mibi_node.validation.shadow import shadow_comparisons

        if analysis is not None and analysis not in available_analyses():
            return JSONResponse({"error": f"unknown analysis {analysis!r}"}, 404)
        resamples = min(max(resamples, 0), 2000)
        return [c.to_dict() for c in shadow_comparisons(database, config, analysis, resamples)]

    @app.get("/api/drift")
    def api_drift(analysis: str | None = None, window: int | None = None) -> Any:
        from mibi_node.analyses.registry import available_analyses
        from mibi_node.validation.drift import drift_report

        if analysis is not None and analysis not in available_analyses():
            return JSONResponse({"error": f"unknown analysis {analysis!r}"}, 404)
        if window is not None and not 1 <= window <= 10_000:
            return JSONResponse({"error": "window should be between 1 and 10000"}, 422)
        return [r.as_dict() for r in drift_report(database, config, analysis, window=window)]

    async def _json_body(request: Request) -> Any:
        try:
            return json.loads(await request.body() or b"null")
        except ValueError:
            return None

    @app.get("/api/workers")
    def api_workers() -> Any:
        return summaries.to_json(summaries.worker_rows(reader, config.web.worker_stale_seconds))

    @app.get("/api/deliveries")
    def api_deliveries() -> Any:
        return {
            "open": summaries.to_json(summaries.delivery_rows(reader)),
            "delivered": summaries.to_json(_delivered()),
        }

    @app.get("/api/config")
    def api_config() -> Any:
        return config.masked()

    @app.get("/api/audit")
    def api_audit(limit: int = 200) -> Any:
        limit = min(max(limit, 1), 1000)
        return summaries.to_json(summaries.audit_rows(reader, limit))

    return app
