"""The operators' web dashboard (`/ops/ui`): server-rendered HTML, plain forms, one CSS file, no JavaScript.

Sign-in posts an operator token, kept in an HttpOnly SameSite=Strict cookie (so another site cannot
make the browser act); every POST also checks the Origin header when the browser sends one. Labels
are French by default, English with `?lang=en` (remembered in a cookie).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from services.core.errors import TransientError
from services.dlq.logic import DlqFilter
from services.dlq.store import AlreadyHandled, NotDeadLettered, parse_time
from services.ops import auth
from services.ops.api import search_identifier, set_paused, transfer_filter
from services.ops.auth import COOKIE, SESSION_TTL, Operator, Role, close_session, open_session
from services.ops.context import OpsContext
from services.ops.i18n import LANGS, labels
from services.tracker import logic, queries

router = APIRouter(include_in_schema=False)
LANG_COOKIE = "relais_lang"
_env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                   autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
_env.filters["pct"] = lambda v: "—" if v is None else f"{v * 100:.1f} %"
_env.filters["ms"] = lambda v: ("—" if not isinstance(v, int | float) else
                                (f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.0f} ms"))
_env.filters["short"] = lambda v: "" if v is None else str(v)[:19].replace("T", " ")
DLQ_STAGES = ("validator", "router", "delivery", "tracker")
STATUSES = (logic.ACCEPTED, logic.VALIDATED, logic.ROUTED, logic.DELIVERING, logic.DELIVERED, logic.REJECTED,
            logic.DEAD_LETTERED)


def _lang(request: Request) -> str:
    asked = request.query_params.get("lang")
    if asked in LANGS:
        return asked
    kept = request.cookies.get(LANG_COOKIE)
    return kept if kept in LANGS else "fr"


def _ctx(request: Request) -> OpsContext:
    return request.app.state.ops  # type: ignore[no-any-return]


def _page(request: Request, template: str, who: Operator | None, status: int = 200, **values: Any) -> HTMLResponse:
    lang = _lang(request)
    other = "en" if lang == "fr" else "fr"
    query = {k: v for k, v in request.query_params.items() if k not in ("lang", "msg")}
    html = _env.get_template(template).render(
        t=labels(lang), lang=lang, who=who, can_act=bool(who and who.may("operator")),
        lang_url=f"{request.url.path}?{urlencode({**query, 'lang': other})}",
        msg=request.query_params.get("msg"), css_version=_css_version(), **values)
    response = HTMLResponse(html, status_code=status)
    if request.query_params.get("lang") in LANGS:
        response.set_cookie(LANG_COOKIE, lang, max_age=365 * 86400, samesite="strict")
    return response


def _error(request: Request, who: Operator | None, status: int, error: str) -> HTMLResponse:
    """The page that says what went wrong: the base page, the error as its content."""
    return _page(request, "base.html", who, status, error=error)


def _css_version() -> str:
    css = Path(__file__).parent / "static" / "ops.css"
    return hashlib.sha256(css.read_bytes()).hexdigest()[:8]


async def _who(request: Request) -> Operator | None:
    return await auth.identify(request)


def _login_redirect(request: Request) -> RedirectResponse:
    return RedirectResponse(f"/ops/ui/login?{urlencode({'next': request.url.path})}", status_code=303)


def _back(path: str, msg: str) -> RedirectResponse:
    sep = "&" if "?" in path else "?"
    return RedirectResponse(f"{path}{sep}msg={msg}", status_code=303)


async def _form(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", errors="replace")
    return {k: v[0] for k, v in parse_qs(body).items()}


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("Host", urlsplit(str(request.base_url)).netloc)


async def _acting(request: Request, role: Role = "operator") -> Operator | Response:
    """The operator for a POST, or the response refusing it."""
    who = await _who(request)
    if who is None:
        return _login_redirect(request)
    if not _same_origin(request):
        return _error(request, who, 403, "cross-site request refused")
    if not who.may(role):
        return _error(request, who, 403, labels(_lang(request))["forbidden"])
    return who


# --- sign-in -------------------------------------------------------------------------------
@router.get("/login")
async def login_page(request: Request) -> Response:
    return _page(request, "login.html", None, next=request.query_params.get("next", "/ops/ui"), error=False)


@router.post("/login")
async def login(request: Request) -> Response:
    form = await _form(request)
    token = form.get("token", "").strip()
    target = form.get("next", "/ops/ui")
    if not target.startswith("/ops/ui"):
        target = "/ops/ui"
    directory: auth.OperatorDirectory = request.app.state.operators
    operator = directory.authenticate(token) if token else None
    if operator is None or operator is auth.ANONYMOUS:
        return _page(request, "login.html", None, 401, next=target, error=True)
    session_id = await open_session(_ctx(request).ledger, operator.id)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, session_id, httponly=True, samesite="strict", path="/ops",
                        secure=request.url.scheme == "https", max_age=int(SESSION_TTL.total_seconds()))
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    session_id = request.cookies.get(COOKIE)
    if session_id:
        await close_session(_ctx(request).ledger, session_id)
    response = RedirectResponse("/ops/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ops")
    return response


# --- pages ---------------------------------------------------------------------------------
@router.get("")
@router.get("/")
async def overview_page(request: Request) -> Response:
    who = await _who(request)
    if who is None:
        return _login_redirect(request)
    context = _ctx(request)
    over = await queries.overview(context.ledger)
    try:
        lags = await context.lag.read()
        lag_error = None
    except Exception as exc:  # noqa: BLE001 - Kafka being unreachable must not take the dashboard down
        lags, lag_error = [], str(exc)
    return _page(request, "overview.html", who, over=over, lags=lags, lag_error=lag_error,
                 targets=await context.targets_view(), refresh=15)


@router.get("/targets")
async def targets_page(request: Request) -> Response:
    who = await _who(request)
    if who is None:
        return _login_redirect(request)
    return _page(request, "targets.html", who, targets=await _ctx(request).targets_view())


@router.get("/targets/{target}")
async def target_page(request: Request, target: str) -> Response:
    who = await _who(request)
    if who is None:
        return _login_redirect(request)
    context = _ctx(request)
    found = [t for t in await context.targets_view() if t["target"] == target]
    if not found:
        return _error(request, who, 404, f"no target {target}")
    letters = await context.dlq.list(DlqFilter(target=target), limit=50)
    waiting = await queries.list_transfers(context.ledger, queries.TransferFilter(status=logic.DELIVERING,
                                                                                  target=target), limit=20)
    return _page(request, "target.html", who, target=found[0], letters=letters, waiting=waiting.items,
                 policy=context.target_policy(target))


@router.post("/targets/{target}/{action}")
async def target_action(request: Request, target: str, action: str) -> Response:
    who = await _acting(request)
    if isinstance(who, Response):
        return who
    if action not in ("pause", "resume"):
        return _error(request, who, 404, f"no action {action}")
    form = await _form(request)
    await set_paused(_ctx(request), target, action == "pause", who, form.get("reason"))
    return _back(f"/ops/ui/targets/{target}", "paused_ok" if action == "pause" else "resumed_ok")


@router.get("/transfers")
async def transfers_page(request: Request) -> Response:
    who = await _who(request)
    if who is None:
        return _login_redirect(request)
    q = request.query_params
    context = _ctx(request)
    form = {k: q.get(k, "") for k in ("status", "producer", "target", "finess", "since", "until")}
    error = None
    try:
        flt = transfer_filter(context, **{k: v or None for k, v in form.items()})
        page = await queries.list_transfers(context.ledger, flt, cursor=q.get("cursor") or None, limit=50)
    except Exception as exc:  # noqa: BLE001 - a bad filter or cursor is shown to the operator, not a 500
        error, page = getattr(exc, "detail", str(exc)), queries.Page([], None)
    next_url = None
    if page.next_cursor:
        next_url = "/ops/ui/transfers?" + urlencode({**{k: v for k, v in form.items() if v},
                                                     "cursor": page.next_cursor})
    return _page(request, "transfers.html", who, form=form, page=page, next_url=next_url, error=error,
                 statuses=STATUSES, target_ids=context.target_ids())


@router.get("/search")
async def search_page(request: Request) -> Response:
    who = await _who(request)
    if who is None:
        return _login_redirect(request)
    identifier = request.query_params.get("identifier", "").strip()
    items = await search_identifier(_ctx(request), who, identifier) if identifier else []
    return _page(request, "search.html", who, identifier=identifier, items=items, searched=bool(identifier))


@router.get("/transfers/{transfer_id}")
async def transfer_page(request: Request, transfer_id: str) -> Response:
    who = await _who(request)
    if who is None:
        return _login_redirect(request)
    context = _ctx(request)
    found = await queries.timeline(context.ledger, transfer_id)
    if found is None:
        return _error(request, who, 404, f"no transfer {transfer_id}")
    letters = await context.dlq.list(DlqFilter(transfer_id=transfer_id), limit=50)
    return _page(request, "transfer.html", who, tl=found, letters=letters)


@router.get("/dlq")
async def dlq_page(request: Request) -> Response:
    who = await _who(request)
    if who is None:
        return _login_redirect(request)
    q = request.query_params
    form = {k: q.get(k, "") for k in ("target", "stage", "producer", "reason", "since", "until")}
    error = None
    try:
        flt = DlqFilter(form["target"] or None, form["producer"] or None, form["reason"] or None,
                        parse_time(form["since"]), parse_time(form["until"]), form["stage"] or None)
        letters = await _ctx(request).dlq.list(flt, limit=200)
    except ValueError as exc:
        error, letters = str(exc), []
    return _page(request, "dlq.html", who, form=form, letters=letters, error=error,
                 target_ids=_ctx(request).target_ids(), filtered=any(form.values()), stages=DLQ_STAGES)


@router.post("/dlq/{action}")
async def dlq_action(request: Request, action: str) -> Response:
    who = await _acting(request)
    if isinstance(who, Response):
        return who
    form = await _form(request)
    service = _ctx(request).dlq
    back = form.get("back") or "/ops/ui/dlq"
    if not back.startswith("/ops/ui/") or "//" in back:
        back = "/ops/ui/dlq"  # never redirect off the dashboard
    try:
        if action == "replay-all":
            flt = DlqFilter(form.get("target") or None, form.get("producer") or None, form.get("reason") or None,
                            parse_time(form.get("since")), parse_time(form.get("until")), form.get("stage") or None)
            if flt == DlqFilter():
                return _back(back, "nothing")
            done, skipped = await service.replay_all(flt, who.id, form.get("note") or None)
            if skipped:
                return _error(request, who, 409, f"{len(done)} replayed; not replayed: " +
                              "; ".join(f"{k}: {v}" for k, v in skipped.items()))
            return _back(back, "replayed" if done else "nothing")
        dl = await service.get(form.get("id", ""))
        if dl is None:
            return _back(back, "nothing")
        if action == "replay":
            await service.replay(dl, who.id)
            return _back(back, "replayed")
        if action == "discard":
            await service.discard(dl, who.id, form.get("reason") or "")
            return _back(back, "discarded")
    except AlreadyHandled:
        return _back(back, "already")  # a second submit of the same form: the first one did it
    except (NotDeadLettered, ValueError, TransientError) as exc:
        return _error(request, who, 409, str(exc))
    return _error(request, who, 404, f"no action {action}")
