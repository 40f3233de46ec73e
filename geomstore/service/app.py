"""The FastAPI application: routes, the access gate, error answers, metrics, the viewer.

Every error is JSON, ``{"error": {"type": ..., "message": ..., "status": ...}}``, with
fields of typed errors (``kind`` and ``name`` of a :class:`~geomstore.errors.NotFoundError`,
``reason`` of a refused statement, ``timeout``); messages never carry tracebacks or file
paths (the server log has the details of unexpected errors, under the ``id`` the answer
gives).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import duckdb
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from geomstore.errors import (
    DataUnavailableError,
    GeomstoreError,
    NotFoundError,
    QueryTimeoutError,
    SQLRefusedError,
)
from geomstore.service.auth import AccessError
from geomstore.service.routes import router
from geomstore.service.state import ServiceConfig, ServiceState

__all__ = ["create_app"]

log = logging.getLogger("geomstore.service")
STATIC = Path(__file__).parent / "static"
PUBLIC = ("/", "/healthz", "/docs", "/openapi.json", "/favicon.ico", "/docs/oauth2-redirect")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: A URL's scheme and the rest of it (file:///..., s3://bucket/..., https://host/...).
_URL = re.compile(r"(?<![\w+.-])([A-Za-z][\w+.-]*)://[^\s'\"`<>]*")
#: The longest error message an answer carries (messages echo the user's names and values).
MAX_MESSAGE_CHARS = 1000
#: An absolute path of two parts or more (``/docs`` and the API's own paths stay).
_PATH = re.compile(r"(?<![\w<>])/(?!api/|static/)(?:[^\s/'\"`<>]+/)+[^\s/'\"`<>]*")


class BodyTooLarge(StarletteHTTPException):
    """The request body passed the server's --max-body (an HTTP error, so that FastAPI's
    body parsing passes it on instead of answering 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")
        self.limit = limit


def scrub(message: str, store: str) -> str:
    """One line without the store's path, any other absolute file path or any URL's path.

    Examples
    --------
    >>> scrub("cannot open /srv/data/x.parquet\\nmore", "/srv/data")
    'cannot open <store>/x.parquet'
    >>> scrub("no file /etc/passwd here", "/srv")
    'no file <path> here'
    >>> scrub("cannot read 'file:///etc/passwd' or s3://b/etc/x", "/srv")
    "cannot read 'file://<path>' or s3://<path>"
    """
    line = message.strip().splitlines()[0] if message.strip() else "error"
    for root in {store, str(Path(store).resolve())}:
        if len(root) > 1:
            line = line.replace(root.rstrip("/"), "<store>")
    if len(line) > MAX_MESSAGE_CHARS:  # before the patterns, which then run on little
        line = line[:MAX_MESSAGE_CHARS] + "... (cut)"
    line = _URL.sub(lambda m: f"{m.group(1)}://<path>", line)
    return _PATH.sub("<path>", line)


def _status(exc: GeomstoreError) -> int:
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, QueryTimeoutError):
        return 408
    if isinstance(exc, SQLRefusedError):
        return 403
    if isinstance(exc, DataUnavailableError):
        return 503  # the store's backend, not the request
    return 400


def _error(status: int, error_type: str, message: str, /, **fields: Any) -> JSONResponse:
    body = {"error": {"type": error_type, "message": message, "status": status, **fields}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _loopback_host(scope: Scope, host: str | None) -> bool:
    """Whether a request that reached a loopback address names a host it may (against
    DNS rebinding: a hostile page's domain resolved to 127.0.0.1): localhost, an address,
    a bare name. Requests that reached another address (a server bound beyond loopback,
    with --insecure) pass."""
    from geomstore.service.auth import is_loopback

    server = scope.get("server")
    if not server or not is_loopback(str(server[0])):
        return True
    if not host:
        return True  # HTTP/1.0 without Host: no browser sends it
    if host.startswith("["):  # [::1]:8765
        name = host[: host.find("]") + 1] if "]" in host else host
    elif host.count(":") == 1:  # name:port
        name = host.split(":", 1)[0]
    else:
        name = host
    name = name.strip().rstrip(".").lower()
    if is_loopback(name) or name.endswith(".localhost"):
        return True
    # a rebinding page's name is a domain (dots) that is no address; a bare label or an
    # address literal cannot be rebound
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name.strip("[]"))
        return True
    return "." not in name


class Gate:
    """ASGI middleware: bearer tokens, the body limit, and request metrics."""

    def __init__(self, app: Callable[..., Awaitable[None]], state: ServiceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        s = self.state
        t0 = time.perf_counter()
        s.metrics.start()
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refuse(scope)
            if refusal is not None:
                s.metrics.error(scope["path"] if scope["path"] in PUBLIC else "other", "access")
                await refusal(scope, receive, sending)
                return
            await self.app(scope, self._counting(receive, scope), sending)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            s.metrics.request(endpoint, scope["method"], status[0], time.perf_counter() - t0)

    def _refuse(self, scope: Scope) -> Response | None:
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        limit = self.state.limits.max_body
        if path == "/api/jobs":
            limit = max(limit, self.state.limits.max_upload * 4 // 3 + 4096)
        if length is not None and length.isdigit() and int(length) > limit:
            return _error(
                413,
                "LimitError",
                f"the request body has {length} bytes, more than this server allows ({limit}); "
                "send less, or start the server with a larger --max-body.",
            )
        if self._preflight(scope, headers):
            return None
        tokens = self.state.config.tokens
        if tokens is None and not _loopback_host(scope, headers.get("host")):
            return _error(
                403,
                "AccessError",
                "this server has no tokens and answers requests for localhost or 127.0.0.1 "
                "only (a page elsewhere could reach it through a DNS name bound to this "
                "machine); open it at http://127.0.0.1:PORT, or serve with --token-file.",
            )
        public = path in PUBLIC or path.startswith("/static/")
        access = None
        if tokens is not None and not public:
            found = tokens.check(headers.get("authorization"))
            if found is None:
                return _error(
                    401,
                    "AccessError",
                    "this server needs a token: send 'Authorization: Bearer <token>' "
                    "(Python: geomstore.connect(url, token=...); CLI: set GEOMSTORE_TOKEN).",
                )
            access = found[0]
        if path.startswith("/api/jobs") and scope["method"] != "GET" and access != "rw":
            return _error(
                403,
                "AccessError",
                "submitting jobs needs a read-write token (a 'rw' line of the server's "
                "--token-file).",
            )
        return None

    def _preflight(self, scope: Scope, headers: dict[str, str]) -> bool:
        """A CORS preflight from a configured origin: browsers send it without credentials,
        and CORSMiddleware answers it without running any endpoint."""
        origins = self.state.config.cors_origins
        return (
            scope["method"] == "OPTIONS"
            and "access-control-request-method" in headers
            and "origin" in headers
            and (headers["origin"] in origins or "*" in origins)
        )

    def _counting(self, receive: Receive, scope: Scope) -> Receive:
        limit = self.state.limits.max_body
        if scope["path"] == "/api/jobs":
            limit = max(limit, self.state.limits.max_upload * 4 // 3 + 4096)
        seen = [0]

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise BodyTooLarge(limit)
            return message

        return counted


def _handlers(app: FastAPI, state: ServiceState) -> None:
    store = state.config.store

    def named(request: Request) -> str:
        route = request.scope.get("route")
        return getattr(route, "path", None) or "other"

    @app.exception_handler(GeomstoreError)
    async def geomstore_error(request: Request, exc: GeomstoreError) -> JSONResponse:
        fields = {
            k: v
            for k, v in vars(exc).items()
            if k in ("kind", "name", "reason", "timeout") and isinstance(v, str | int | float)
        }
        state.metrics.error(named(request), type(exc).__name__)
        return _error(_status(exc), type(exc).__name__, scrub(str(exc), store), **fields)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        state.metrics.error(named(request), "LimitError")
        return _error(
            413,
            "LimitError",
            f"the request body is larger than this server allows ({exc.limit} bytes); send "
            "less, or start the server with a larger --max-body.",
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        state.metrics.error(named(request), "ValidationError")
        if first.get("type") == "json_invalid":
            return _error(400, "ValidationError", "the body is not valid JSON; send a JSON object.")
        msg = scrub(str(first.get("msg", "invalid request")), store)
        return _error(
            422,
            "ValidationError",
            f"{where}: {msg} (see /docs for this endpoint's parameters).",
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        state.metrics.error(named(request), "HTTPError")
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            detail = f"no endpoint {request.url.path!r}; see /docs for the API."
        return _error(exc.status_code, "HTTPError", scrub(detail, store))

    @app.exception_handler(duckdb.InterruptException)
    async def interrupted(request: Request, exc: duckdb.InterruptException) -> JSONResponse:
        state.metrics.error(named(request), "QueryTimeoutError")
        return _error(408, "QueryTimeoutError", "the query was interrupted; ask for less.")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        ident = uuid.uuid4().hex[:12]
        log.exception("error %s answering %s %s", ident, request.method, request.url.path)
        state.metrics.error(named(request), "InternalError")
        return _error(
            500,
            "InternalError",
            f"the server failed to answer; its log has the details under id {ident}.",
            id=ident,
        )


def create_app(config: ServiceConfig) -> FastAPI:
    """The service over one store (``geomstore serve`` runs it on uvicorn).

    Examples
    --------
    >>> import tempfile, geomstore
    >>> from fastapi.testclient import TestClient
    >>> from geomstore.service import ServiceConfig, create_app
    >>> path = tempfile.mkdtemp()
    >>> geomstore.open(path).close()
    >>> with TestClient(create_app(ServiceConfig(path))) as client:
    ...     client.get("/api/models").json()["num_rows"]
    0
    """
    state = ServiceState(config)
    app = FastAPI(
        title="geomstore",
        summary="Exact linear regions of piecewise-linear networks on 2-D slices, over HTTP.",
        description=(
            "Tables answer JSON by default; Arrow IPC, Parquet, CSV and GeoJSON by `?format=` "
            'or the Accept header. Errors are JSON `{"error": {type, message, status}}`. '
            "With a token file every request needs `Authorization: Bearer <token>`."
        ),
        version=_version(),
        docs_url=None,  # served below from the swagger-ui-bundle package, not a CDN
    )
    app.state.geomstore = state
    app.include_router(router)
    _handlers(app, state)

    @app.get("/healthz", tags=["service"], summary="Liveness and store readability")
    def healthz(request: Request) -> dict[str, Any]:
        """Open to probes without a token, which learn only that the store reads."""
        from geomstore.queries.catalog import partitions

        with state.reading("/healthz") as st:
            n = partitions(st).num_rows  # kept per catalog version: one metadata read
        tokens = state.config.tokens
        if tokens is not None and tokens.check(request.headers.get("authorization")) is None:
            return {"status": "ok"}
        return {"status": "ok", "store_kind": st.kind, "partitions": n}

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics (text format 0.0.4)")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/", include_in_schema=False)
    def viewer() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    _swagger(app)  # before /static, which would take /static/swagger/... too
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
            expose_headers=["X-Geomstore-Truncated"],
        )
    app.add_middleware(Gate, state=state)  # outermost: every request passes the gate
    app.router.add_event_handler("startup", state.pool.warm)
    app.router.add_event_handler("shutdown", state.close)
    return app


def _swagger(app: FastAPI) -> None:
    """``/docs``: the OpenAPI page with Swagger UI 5 (OpenAPI 3.1) from the files of the
    ``fastapi-swagger`` package (MIT), so that it works where no CDN can be reached."""
    from importlib.resources import files

    from fastapi.openapi.docs import get_swagger_ui_html

    assets = str(files("fastapi_swagger") / "resources")
    app.mount("/static/swagger", StaticFiles(directory=assets), name="swagger")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="geomstore API",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="/static/swagger/favicon-32x32.png",
        )


def _version() -> str:
    from geomstore import __version__

    return __version__


def check_bind(host: str, config: ServiceConfig, *, insecure: bool) -> None:
    """Refuse to listen beyond loopback without tokens (unless ``insecure``)."""
    from geomstore.service.auth import is_loopback

    if config.tokens is None and not insecure and not is_loopback(host):
        raise AccessError(
            f"refusing to serve on {host} without tokens: anyone who can reach it could read "
            "the store. Give --token-file FILE, bind 127.0.0.1, or pass --insecure."
        )
