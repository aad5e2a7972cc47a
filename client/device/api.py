"""The device's local HTTP API (FastAPI), for the app running on the same device.

Built by :func:`create_app` over any :class:`~client.device.daemon.DeviceBackend` (the
:class:`~client.device.daemon.Daemon`) and served by uvicorn on 127.0.0.1 by default.

Authentication
    Every request needs ``Authorization: Bearer <token>`` with the token from
    ``STATE_DIR/identity/api.token``, checked by an ASGI middleware *before* anything else
    (body parsing included) with a constant-time comparison of SHA-256 digests; a missing,
    malformed or wrong token is a 401 naming the problem. The one exception is
    ``GET /openapi.json``: the schema is static and holds no data. There are no CORS headers,
    so a web page in the device's browser cannot read responses.

Endpoints
    ``POST /events`` (a batch of view/click/rating events with raw item ids),
    ``GET /recommendations?k=`` (1..100), ``POST /feedback`` (shown/clicked for items a
    recommendation returned), ``GET /status``, ``DELETE /data`` (204).

Time
    Events and reports may carry the app's ``timestamp``; the history is ordered by it, so a
    late event takes its place. Without one the daemon stamps "now", or the newest stored
    event's time if that is later (after the device's clock was set back), so such events
    stay in the order they arrived (:mod:`client.device.store`, "Order of events").

Retries
    An event may carry the app's ``event_id`` and a feedback report its ``feedback_id``
    (both optional): one already stored is skipped, so a batch whose reply was lost can be
    sent again as it was. ``POST /feedback`` answers how many reports it stored and how many
    it skipped as ``duplicates``.

Errors (always JSON ``{"detail": "<one line: the problem and the fix>", ...}``)
    401 token; 413 body over ``max_body_bytes`` or batch over ``max_batch``; 422 malformed
    JSON, wrong types, unknown fields, unknown items (listed in ``unknown_items``; nothing of
    the batch stored), feedback for items never recommended (listed in ``unknown_pairs``;
    nothing stored); 503 no model (recommendations) or no catalog (events) yet, or the local
    store busy or its disk full (nothing changed; retry), or a file of the device that a full
    disk keeps from being written (free space, retry); 500 the device's own state (a damaged
    local store: ``DELETE /data`` erases it; a file it cannot read or write, named).
    Request bodies are strict: no type coercion (``"1"`` is not a number, ``1`` is not an
    item id), no extra fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NoReturn

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.device.config import MAX_K, MIN_BODY_BYTES
from client.device.daemon import (
    DaemonConfig,
    DeviceBackend,
    DeviceStatus,
    NoCatalogError,
    NoModelError,
    Recommendation,
)
from client.device.store import (
    MAX_EVENT_ID_LENGTH,
    MAX_FEEDBACK_IDS,
    MAX_TIMESTAMP,
    Event,
    Feedback,
    UnknownImpressionError,
    UnknownItemsError,
    future_timestamp_problem,
    is_corruption,
)
from shared.errors import ConfigError, DataError, FedRecError
from shared.io import disk_full
from shared.ondevice.runtime import MAX_ITEM_ID_LENGTH

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"
RATING_MIN, RATING_MAX = 0.0, 10.0
PUBLIC_PATHS = frozenset({"/openapi.json"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class ApiConfig:
    """Request limits: events/feedback per request and request body bytes (413 beyond)."""

    max_batch: int = 1000
    max_body_bytes: int = 1_048_576

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_body_bytes < MIN_BODY_BYTES:
            raise ConfigError(
                f"max-batch must be >= 1 and max-body-bytes >= {MIN_BODY_BYTES}, got "
                f"{self.max_batch}, {self.max_body_bytes}"
            )

    @classmethod
    def from_daemon(cls, config: DaemonConfig) -> ApiConfig:
        return cls(max_batch=config.max_batch, max_body_bytes=config.max_body_bytes)


# --------------------------------------------------------------------------- schemas

ItemId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ITEM_ID_LENGTH),
    Field(description="The dataset's raw item id (as in the catalog), e.g. '242'."),
]


def _not_ahead(ts: float) -> float:
    problem = future_timestamp_problem(ts)
    if problem:
        raise ValueError(problem)
    return ts


#: The app's own id of a record (see "Retries" above).
ClientId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_EVENT_ID_LENGTH)]

Timestamp = Annotated[
    float,
    Field(
        ge=0,
        le=MAX_TIMESTAMP,
        allow_inf_nan=False,
        description="Seconds since the Unix epoch (not milliseconds), at most a day ahead "
        "of the device's clock; the history is ordered by it. Default: now, or the newest "
        "stored event's time if later (the device's clock was set back), so events sent "
        "without a time stay in the order they arrived.",
    ),
    AfterValidator(_not_ahead),
]


class _Strict(BaseModel):
    """Request bodies: no coercion, no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid")


class EventIn(_Strict):
    """One behavior event. ``rating`` is required for ``kind='rating'`` and forbidden else."""

    item_id: ItemId
    kind: Literal["view", "click", "rating"]
    timestamp: Timestamp | None = None
    rating: Annotated[float, Field(ge=RATING_MIN, le=RATING_MAX, allow_inf_nan=False)] | None = None
    event_id: ClientId | None = Field(
        None,
        description="The app's own id of the event (optional): an event whose id is already "
        "stored is skipped, so a batch can be retried safely after a lost reply.",
    )

    @model_validator(mode="after")
    def _rating_matches_kind(self) -> EventIn:
        if self.kind == "rating" and self.rating is None:
            raise ValueError(f"a 'rating' event needs a rating in [{RATING_MIN}, {RATING_MAX}]")
        if self.kind != "rating" and self.rating is not None:
            raise ValueError(f"only 'rating' events carry a rating (this one is {self.kind!r})")
        return self


class EventBatch(_Strict):
    events: list[EventIn] = Field(min_length=1, description="At most max_batch events.")


class EventsAccepted(BaseModel):
    stored: int = Field(
        description="Events stored: the whole batch, less any whose event_id was stored before."
    )


class FeedbackIn(_Strict):
    """What became of one recommended item: report it once, when the user has decided."""

    recommendation_id: Annotated[
        str,
        StringConstraints(pattern=r"^[0-9a-f]{32}$"),
        Field(description="The recommendation_id of the GET /recommendations response."),
    ]
    item_id: ItemId
    action: Annotated[
        Literal["shown", "clicked"],
        Field(
            description=(
                "'clicked': the user picked the item (reward 1); 'shown': the user saw it and "
                "did not pick it (reward 0). The exploration policy learns from the first "
                "report of each (recommendation_id, item_id); later ones are stored only. "
                "A click is also stored as a 'click' event of the history (unless one for "
                "that item is stored already): do not POST it to /events afterwards."
            )
        ),
    ]
    timestamp: Timestamp | None = None
    feedback_id: ClientId | None = Field(
        None,
        description="The app's own id of this report (optional; unique per report, e.g. a "
        "UUID): a report whose id is already stored is skipped, so a batch can be sent again "
        f"after a lost reply without being stored (or counted) twice. The newest "
        f"{MAX_FEEDBACK_IDS} ids are remembered.",
    )


class FeedbackBatch(_Strict):
    feedback: list[FeedbackIn] = Field(min_length=1, description="At most max_batch entries.")


class FeedbackAccepted(BaseModel):
    stored: int = Field(description="Reports stored: the batch less its duplicates.")
    duplicates: int = Field(
        description="Reports skipped because their feedback_id was stored before (or given "
        "twice in the batch): a retried batch answers stored=0 and duplicates=its size.",
    )


class RecommendedItemOut(BaseModel):
    item_id: str
    rank: int = Field(
        ge=1, description="Display position, 1 first (the exploration policy's order)."
    )
    score: float = Field(
        description="The model's own score of the item; the exploration policy re-orders the "
        "model's top items, so scores need not fall with rank."
    )


class RecommendationsOut(BaseModel):
    recommendation_id: str = Field(description="Send it back with POST /feedback.")
    model_version: str
    sealed_version: int
    policy: str = Field(description="The exploration policy that ordered the list.")
    items: list[RecommendedItemOut]


class PrivacyOut(BaseModel):
    epsilon_spent: float | None = Field(description="Cumulative, from the privacy ledger.")
    rounds_without_dp: int = Field(
        0,
        description="Rounds joined without DP (allowed by `--allow-no-dp`): epsilon_spent "
        "does not count them, and no privacy bound holds for what they released.",
    )
    epsilon_budget: float
    delta: float
    error: str | None = None


class ProcessOut(BaseModel):
    name: str = Field(description="The managed process, e.g. 'supernode'.")
    running: bool
    restarts: int
    last_exit_code: int | None
    last_error: str | None = Field(
        description="Why it last exited: the last error line of its log, and what it means."
    )
    notice: str | None = Field(
        None,
        description="What its log says is wrong now, while it runs, and what it means: e.g. "
        "the SuperNode's server does not answer (null when nothing is).",
    )


class StatusOut(BaseModel):
    device_id: str | None
    model_version: str | None
    sealed_version: int | None
    model_error: str | None
    catalog_items: int | None
    rounds_joined: int
    privacy: PrivacyOut
    events: int
    feedback: int
    adaptation_pending: int
    policy: str
    processes: list[ProcessOut] = Field(
        default_factory=list,
        description="Processes run next to the API (the SuperNode under `fedrec client start`).",
    )
    refresh_error: str | None = Field(
        None,
        description="Why refreshing the served model (a personal refit to new events, or a "
        "newly received global model) keeps failing; the last good model serves meanwhile "
        "(null when the last refresh succeeded).",
    )


class ErrorOut(BaseModel):
    """Every error: ``detail`` says what is wrong and how to fix it."""

    detail: str
    errors: list[dict[str, Any]] | None = None
    unknown_items: list[str] | None = None
    unknown_pairs: list[list[str]] | None = None


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        401: "Missing or wrong bearer token.",
        413: "Request body or batch too large.",
        422: "Invalid request (malformed JSON, wrong types, unknown items or impressions).",
        503: "Not ready: no model or no (readable) catalog installed yet.",
    }
    return {c: {"model": ErrorOut, "description": text[c]} for c in codes}


# --------------------------------------------------------------------------- middleware


def _json_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(status_code=status, content=body, headers=headers)


class BearerAuth:
    """Pure ASGI middleware: every HTTP request but :data:`PUBLIC_PATHS` needs the token.

    Runs before routing and body parsing, so an unauthenticated caller learns nothing (not
    even whether its JSON was valid).
    """

    def __init__(self, app: ASGIApp, token: str, token_hint: str) -> None:
        if len(token) < 16:
            raise ConfigError("the API token must be at least 16 characters")
        self.app = app
        self._digest = hashlib.sha256(token.encode()).digest()
        self._hint = token_hint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        problem = self._check(scope)
        if problem is not None:
            response = _json_response(401, {"detail": problem}, {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> str | None:
        values = [v for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
        if not values:
            return (
                f"missing bearer token: send the header 'Authorization: Bearer <token>' with the "
                f"token from {self._hint}"
            )
        scheme, _, given = values[0].decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return "malformed Authorization header: it must be 'Bearer <token>'"
        digest = hashlib.sha256(given.strip().encode("latin-1", "replace")).digest()
        if not hmac.compare_digest(digest, self._digest):
            return (
                f"invalid bearer token: use the token from {self._hint} (it changes when the "
                f"identity is re-created with `fedrec client init --force`)"
            )
        return None


class BodyLimit:
    """Pure ASGI middleware: 413 for a body over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: int | None) -> str:
        got = f" of {size} bytes" if size is not None else ""
        return (
            f"request body too large: the body{got} exceeds the limit of {self.max_bytes} "
            f"bytes; split the batch into smaller requests"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    response = _json_response(400, {"detail": "Content-Length is not a number"})
                    await response(scope, receive, send)
                    return
                if declared > self.max_bytes:
                    response = _json_response(413, {"detail": self._message(declared)})
                    await response(scope, receive, send)
                    return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._message(None))
            return message

        await self.app(scope, limited, send)


# --------------------------------------------------------------------------- errors


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _hint(error: dict[str, Any]) -> str:
    """What to do about a validation error whose cause is a common slip."""
    loc = tuple(error.get("loc", ()))
    if loc and loc[-1] == "timestamp" and error.get("type") == "less_than_equal":
        return " (seconds since the Unix epoch: a value this large looks like milliseconds)"
    return ""


def _validation_detail(errors: list[dict[str, Any]], content_type: str = "") -> str:
    first = errors[0] if errors else {}
    if tuple(first.get("loc", ())) == ("body",) and "json" not in content_type.lower():
        # e.g. `curl -d`, which sends form-urlencoded: FastAPI then does not parse JSON at all
        got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        return (
            f"request body must be a JSON object sent with Content-Type: application/json ({got})"
        )
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return (
            f"request body is not valid JSON ({ctx.get('error', first.get('msg'))}); send a JSON "
            f"object with Content-Type: application/json"
        )
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return "request body is missing; send a JSON object with Content-Type: application/json"
    parts = [f"{_loc(e.get('loc', ()))}: {e.get('msg')}{_hint(e)}" for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        cause = exc.__cause__
        if exc.status_code == 400 and cause is not None:
            # FastAPI's "There was an error parsing the body" (e.g. JSON that is not UTF-8)
            return _json_response(
                422,
                {
                    "detail": f"request body could not be decoded ({type(cause).__name__}: "
                    f"{str(cause)[:120]}); send UTF-8 JSON with Content-Type: application/json"
                },
            )
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return _json_response(
            422,
            {
                "detail": _validation_detail(
                    list(exc.errors()), request.headers.get("content-type", "")
                ),
                "errors": jsonable_encoder(errors),
            },
        )

    @app.exception_handler(UnknownItemsError)
    async def _unknown_items(request: Request, exc: UnknownItemsError) -> JSONResponse:
        return _json_response(422, {"detail": str(exc), "unknown_items": exc.items[:1000]})

    @app.exception_handler(UnknownImpressionError)
    async def _unknown_pairs(request: Request, exc: UnknownImpressionError) -> JSONResponse:
        pairs = [list(p) for p in exc.pairs[:1000]]
        return _json_response(422, {"detail": str(exc), "unknown_pairs": pairs})

    @app.exception_handler(NoModelError)
    @app.exception_handler(NoCatalogError)
    async def _not_ready(request: Request, exc: FedRecError) -> JSONResponse:
        return _json_response(503, {"detail": str(exc)}, {"Retry-After": "60"})

    @app.exception_handler(sqlite3.OperationalError)
    async def _store_unavailable(request: Request, exc: sqlite3.OperationalError) -> JSONResponse:
        # busy past the timeout (another process writing), disk full, I/O error: nothing
        # was changed (each write is one transaction), so the app may retry
        logger.error("%s %s: local store error: %s", request.method, request.url.path, exc)
        return _json_response(
            503,
            {"detail": f"the local store is unavailable ({exc}); nothing was changed, retry"},
            {"Retry-After": "5"},
        )

    @app.exception_handler(sqlite3.DatabaseError)
    async def _store_failed(request: Request, exc: sqlite3.DatabaseError) -> JSONResponse:
        # not busy or full (those are OperationalError, above): a damaged file, or a bug
        logger.error("%s %s: local store error: %s", request.method, request.url.path, exc)
        if is_corruption(exc):
            detail = (
                f"the local store is damaged ({exc}) and its data cannot be read back: "
                "DELETE /data erases it (the daemon then starts an empty store), or stop the "
                "daemon and move STATE_DIR/store.db (and its -wal/-shm files) away or restore "
                "it from a backup"
            )
        else:
            detail = f"device error: the local store failed ({type(exc).__name__}: {exc})"
        return _json_response(500, {"detail": detail})

    @app.exception_handler(OSError)
    async def _file_failed(request: Request, exc: OSError) -> JSONResponse:
        # a file of the device (the erase's marker, a sealed model, a log) could not be
        # written, read or removed: a full disk can be retried once space is freed; anything
        # else is the device's own state
        logger.error("%s %s: file error: %s", request.method, request.url.path, exc)
        where = f": {exc.filename}" if exc.filename else ""
        problem = f"{exc.strerror or exc}{where}"
        if disk_full(exc):
            return _json_response(
                503,
                {"detail": f"the device's disk is full ({problem}); free space on it and retry"},
                {"Retry-After": "60"},
            )
        return _json_response(
            500,
            {"detail": f"device error: a file of the device cannot be written or read ({problem})"},
        )

    @app.exception_handler(FedRecError)
    async def _server_side(request: Request, exc: FedRecError) -> JSONResponse:
        # Request-level problems are caught above; what is left is the device's own state
        # (a tampered store row, an unreadable file): a 500 that says so, logged in full.
        logger.error("%s %s failed: %s", request.method, request.url.path, exc)
        return _json_response(500, {"detail": f"device error: {exc}"})


# --------------------------------------------------------------------------- app


def _declared_query_only(request: Request) -> None:
    """Refuse a query parameter the route does not take, or one given twice: either would
    otherwise be ignored (``?K=5`` or ``?k=3&k=5`` answering with another ``k`` than meant)."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    declared = sorted(p.alias for p in dependant.query_params) if dependant else []
    for name in dict.fromkeys(request.query_params.keys()):
        if name not in declared:
            takes = f"it takes {', '.join(declared)}" if declared else "it takes none"
            raise HTTPException(
                422, f"unknown query parameter {name!r} for {request.url.path}; {takes}"
            )
        given = len(request.query_params.getlist(name))
        if given > 1:
            raise HTTPException(
                422, f"query parameter {name!r} is given {given} times; give it once"
            )


def _now_or(ts: float | None) -> float:
    return time.time() if ts is None else ts


def create_app(
    backend: DeviceBackend,
    token: str,
    *,
    config: ApiConfig | None = None,
    token_hint: str = "STATE_DIR/identity/api.token",
) -> FastAPI:
    """The local API over ``backend``, guarded by ``token`` (see the module docstring).

    ``token_hint`` is where 401 messages tell the app to find the token.
    """
    cfg = config or ApiConfig()
    app = FastAPI(
        title="fedrec device API",
        version=API_VERSION,
        description=(__doc__ or "").strip(),
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        dependencies=[Depends(_declared_query_only)],
    )
    _install_error_handlers(app)

    def too_large(n: int, what: str) -> HTTPException:
        return HTTPException(
            413,
            f"batch of {n} {what} exceeds the limit of {cfg.max_batch} per request; split it "
            f"into batches of at most {cfg.max_batch}",
        )

    @app.post(
        "/events",
        response_model=EventsAccepted,
        responses=_errors(401, 413, 422, 503),
        summary="Store a batch of behavior events (all or nothing).",
    )
    def post_events(batch: EventBatch) -> EventsAccepted:
        if len(batch.events) > cfg.max_batch:
            raise too_large(len(batch.events), "events")
        try:
            events = [
                Event(
                    e.item_id,
                    e.kind,
                    _now_or(e.timestamp),
                    e.rating,
                    event_id=e.event_id,
                    stamped=e.timestamp is None,
                )
                for e in batch.events
            ]
        except DataError as exc:  # the schema already enforces this; belt and braces
            raise HTTPException(422, str(exc)) from exc
        return EventsAccepted(stored=backend.add_events(events))

    @app.get(
        "/recommendations",
        response_model=RecommendationsOut,
        responses=_errors(401, 422, 503),
        summary="Top-k items for the local history (history excluded).",
    )
    def get_recommendations(
        k: Annotated[
            int | None,
            Query(
                ge=1,
                le=MAX_K,
                description="How many items (1..100); default: the device's bandit-slate-size.",
            ),
        ] = None,
    ) -> RecommendationsOut:
        rec: Recommendation = backend.recommend(k)
        return RecommendationsOut(
            recommendation_id=rec.recommendation_id,
            model_version=rec.model_version,
            sealed_version=rec.sealed_version,
            policy=rec.policy,
            items=[
                RecommendedItemOut(item_id=i.item_id, rank=i.rank, score=i.score) for i in rec.items
            ],
        )

    @app.post(
        "/feedback",
        response_model=FeedbackAccepted,
        responses=_errors(401, 413, 422),
        summary="Report what became of recommended items (all or nothing).",
    )
    def post_feedback(batch: FeedbackBatch) -> FeedbackAccepted:
        if len(batch.feedback) > cfg.max_batch:
            raise too_large(len(batch.feedback), "feedback entries")
        try:
            items = [
                Feedback(
                    f.recommendation_id,
                    f.item_id,
                    f.action,
                    _now_or(f.timestamp),
                    feedback_id=f.feedback_id,
                    stamped=f.timestamp is None,
                )
                for f in batch.feedback
            ]
        except DataError as exc:  # the schema already enforces this; belt and braces
            raise HTTPException(422, str(exc)) from exc
        stored = backend.add_feedback(items)  # all or nothing, less the duplicates
        return FeedbackAccepted(stored=stored, duplicates=len(items) - stored)

    @app.get("/status", response_model=StatusOut, responses=_errors(401), summary="Device status.")
    def get_status() -> StatusOut:
        s: DeviceStatus = backend.status()
        return StatusOut(
            device_id=s.device_id,
            model_version=s.model_version,
            sealed_version=s.sealed_version,
            model_error=s.model_error,
            catalog_items=s.catalog_items,
            rounds_joined=s.rounds_joined,
            privacy=PrivacyOut(
                epsilon_spent=s.epsilon_spent,
                rounds_without_dp=s.rounds_without_dp,
                epsilon_budget=s.epsilon_budget,
                delta=s.delta,
                error=s.privacy_error,
            ),
            events=s.events,
            feedback=s.feedback,
            adaptation_pending=s.adaptation_pending,
            policy=s.policy,
            processes=[ProcessOut(**dataclasses.asdict(p)) for p in s.processes],
            refresh_error=s.refresh_error,
        )

    @app.delete(
        "/data",
        status_code=204,
        response_class=Response,
        responses=_errors(401),
        summary="Erase all local user data (the privacy ledger and identity are kept).",
    )
    def delete_data() -> Response:
        backend.erase()
        return Response(status_code=204)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
            schema["security"] = [{"bearer": []}]
            _set_batch_limits(schema, cfg.max_batch)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(BearerAuth, token=token, token_hint=token_hint)  # outermost
    return app


def _set_batch_limits(schema: dict[str, Any], max_batch: int) -> None:
    """Publish ``maxItems`` for the batch arrays (enforced in the handlers with a 413)."""
    comps = schema.get("components", {}).get("schemas", {})
    for name, prop in (("EventBatch", "events"), ("FeedbackBatch", "feedback")):
        target = comps.get(name, {}).get("properties", {}).get(prop)
        if target is not None:
            target["maxItems"] = max_batch


class _SchemaOnly:
    """A backend for rendering the schema only (``fedrec client openapi``)."""

    def _no(self) -> NoReturn:
        raise NoModelError("schema-only backend")

    def add_events(self, events: Any) -> int:
        self._no()

    def recommend(self, k: int | None = None) -> Recommendation:
        self._no()

    def add_feedback(self, feedback: Any) -> int:
        self._no()

    def status(self) -> DeviceStatus:
        self._no()

    def erase(self) -> None:
        self._no()


def openapi_schema(config: ApiConfig | None = None) -> dict[str, Any]:
    """The API's OpenAPI document (what ``GET /openapi.json`` serves)."""
    app = create_app(_SchemaOnly(), "x" * 32, config=config)
    return app.openapi()


def openapi_json(config: ApiConfig | None = None) -> str:
    return json.dumps(openapi_schema(config), indent=2) + "\n"
