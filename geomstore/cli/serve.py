"""The serve command: the store as an HTTP query service with a map viewer."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import typer

from geomstore.cli.common import STORE, app, err, require_store, shown


@app.command()
def serve(
    store: str = STORE,
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8765, help="Port to listen on (0: any free port)."),
    token_file: Path | None = typer.Option(
        None,
        "--token-file",
        help="Bearer tokens, one per line: '<token> ro|rw [name]' (rw may submit jobs).",
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="Allow a non-loopback --host without tokens."
    ),
    cors_origin: list[str] = typer.Option(
        [], "--cors-origin", help="Allow browser pages from this origin (repeatable; off)."
    ),
    timeout: float = typer.Option(30.0, help="Seconds before a query is interrupted."),
    max_rows: int = typer.Option(100_000, help="Rows of a SQL answer (more are cut)."),
    max_partition_rows: int = typer.Option(
        2_000_000, help="Rows of one partition's regions, edges or boundary (more are cut)."
    ),
    max_body: int = typer.Option(8 * 2**20, help="Request body size in bytes."),
    max_points: int = typer.Option(10_000, help="Points in one per-point request."),
    max_samples: int = typer.Option(100_000, help="Boundary samples per checkpoint."),
    pool: int = typer.Option(4, help="Read connections shared by the request threads."),
    max_memory: str = typer.Option(
        "auto",
        help="Memory the server process may take, e.g. 8GiB (auto: half the RAM, at least "
        "4GiB; 0: no limit). A query that needs more fails with a 4xx error instead of the "
        "kernel killing the server: DuckDB's own limit misses some values (range(10^9)).",
    ),
    log_level: str = typer.Option("warning", help="uvicorn's log level (info logs requests)."),
) -> None:
    """Serve the store over HTTP: JSON/Arrow/Parquet/CSV/GeoJSON API, viewer at /, docs at /docs.

    Example: geomstore serve runs/moons --port 8765   (then open http://127.0.0.1:8765/)

    With --token-file every request needs 'Authorization: Bearer <token>'; the file holds
    lines '<token> ro|rw [name]' (make a token with python -c "import secrets;
    print(secrets.token_urlsafe(32))"). Without tokens only loopback hosts are allowed
    unless --insecure.
    """
    import uvicorn

    from geomstore.service import Limits, ServiceConfig, check_bind, create_app, load_tokens
    from geomstore.store.store import Store

    require_store(store)
    data_path = os.environ.get("GEOMSTORE_DATA_PATH")
    Store(store, read_only=True, data_path=data_path).close()  # fail now, not per request
    config = ServiceConfig(
        store=store,
        tokens=load_tokens(token_file) if token_file is not None else None,
        cors_origins=tuple(cors_origin),
        limits=Limits(
            max_body=max_body,
            max_rows=max_rows,
            max_partition_rows=max_partition_rows,
            max_points=max_points,
            max_samples=max_samples,
        ),
        timeout=timeout,
        pool_size=pool,
        data_path=data_path,
    )
    check_bind(host, config, insecure=insecure)
    limit = _limit_memory(max_memory)
    cap = f", memory capped at {limit / 2**30:.1f} GiB" if limit else ""
    # listening before the app warms up: early requests wait in the backlog, not refused,
    # and the banner names the port really taken (--port 0) or says why there is none
    sock = _listen(host, port)
    at = f"[{host}]" if ":" in host else host
    url = f"http://{at}:{sock.getsockname()[1]}/"
    app_ = create_app(config)
    banner = f"geomstore serving {shown(store)} on {url} (docs at /docs{cap})"
    app_.router.add_event_handler("startup", lambda: err.print(banner))
    server = uvicorn.Server(
        uvicorn.Config(
            app_,
            log_level=log_level,
            access_log=log_level in ("debug", "trace", "info"),
            timeout_graceful_shutdown=5,
        )
    )
    server.run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port``, or one clear error (port in use, bad host)."""
    from geomstore.errors import GeomstoreError

    if not 0 <= port <= 65535:
        raise GeomstoreError(f"--port must lie in 0..65535 (0: any free port); got {port}.")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise GeomstoreError(f"cannot listen on --host {host!r}: {exc}.") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise GeomstoreError(
                f"port {port} on {host} is in use; pick another with --port "
                "(--port 0 takes any free one)."
            ) from None
        raise GeomstoreError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --host or --port."
        ) from None
    return sock


def _limit_memory(spec: str) -> int:
    """Cap the process's data segment (``RLIMIT_DATA``: heap and private writable maps)
    so that an allocation past it fails, as DuckDB reports an out-of-memory query, rather
    than the kernel's OOM killer stopping the server; returns the cap (0: none)."""
    import resource

    from geomstore.engine.partition import parse_memory
    from geomstore.errors import GeomstoreError

    spec = spec.strip().lower()
    if spec in ("0", "none", "off"):
        return 0
    if spec == "auto":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        cap = max(4 << 30, ram // 2)
    else:
        try:
            cap = parse_memory(spec)
        except GeomstoreError as exc:
            raise GeomstoreError(f"--max-memory: {exc} (or 'auto', or 0 for no limit)") from None
    _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    return cap
