"""Commands that compute: compute, submit, worker, watch, jobs."""

from __future__ import annotations

import glob
import re
import time
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from geomstore.cli.common import (
    BOX,
    MARGIN,
    NAMED,
    NEW_STORE,
    STORE,
    THROUGH,
    app,
    as_arg,
    emit,
    err,
    open_store,
    out,
    progress,
    shown,
    store_with_slices,
)
from geomstore.errors import GeomstoreError
from geomstore.loading import ModelLoadError, ModelSpec

CHECKPOINTS = typer.Argument(
    ...,
    metavar="CHECKPOINTS...",
    help="Checkpoint files or glob patterns (quote them: 'runs/ckpt/*.pt2').",
)
MODEL = typer.Option(..., "--model", "-m", metavar="NAME", help="The model's name in the store.")
FACTORY = typer.Option(
    None,
    "--factory",
    help="package.module:function building the module, when the files hold weights "
    "(state dicts or .safetensors).",
)
TRUST = typer.Option(
    False, "--trust-pickle", help="Load pickled whole modules: this RUNS CODE from the file."
)
LEVELS = typer.Option(
    [], "--level", help="Trace this level set of output 0 instead of a decision boundary."
)


def _files(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        if not hits:
            raise GeomstoreError(f"no checkpoint file matches {pat!r}.")
        files += [Path(h) for h in hits]
    for f in files:
        if not f.is_file():
            raise GeomstoreError(f"checkpoint file {f} does not exist.")
    return files


class _OptionalRayValue(TyperCommand):
    """``--ray`` with or without an ADDRESS: a bare ``--ray`` becomes ``--ray=`` (no address).

    The next word is taken as the address only when it looks like one (``ray://...``,
    ``host:port`` or ``auto``), so ``--ray 'ckpt/*.pt2'`` still reads the checkpoints.
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        out = list(args)
        for i, word in enumerate(out):
            if word == "--":
                break
            if word == "--ray":
                nxt = out[i + 1] if i + 1 < len(out) else ""
                if not re.match(r"^(ray://|auto$|[A-Za-z0-9.-]+:\d+$)", nxt):
                    out[i] = "--ray="
        return super().parse_args(ctx, out)


def _options(levels: list[float], threshold: float | None) -> dict[str, object]:
    opts: dict[str, object] = {}
    if levels:
        opts["levels"] = list(levels)
    if threshold is not None:
        opts["threshold"] = threshold
    return opts


REPLACE = typer.Option(
    False,
    "--replace",
    help="A checkpoint name stored already with other weights (a new training run under "
    "the same --model) is replaced, with all its partitions; without it such jobs fail.",
)


@app.command(cls=_OptionalRayValue)
def compute(
    store: str = NEW_STORE,
    checkpoints: list[str] = CHECKPOINTS,
    model: str = MODEL,
    factory: str | None = FACTORY,
    trust_pickle: bool = TRUST,
    box: list[str] = BOX,
    through: list[Path] = THROUGH,
    slice_name: list[str] = NAMED,
    margin: float = MARGIN,
    verify: bool = typer.Option(False, help="Check each partition against the model."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    level: list[float] = LEVELS,
    threshold: float | None = typer.Option(None, help="Single-output decision threshold."),
    ray: str | None = typer.Option(
        None,
        "--ray",
        metavar="[ADDRESS]",
        help="Run one Ray task per checkpoint x slice: on the cluster at ADDRESS "
        "(--ray=head:6379, or --ray=ray://head:10001 through Ray Client, installed with "
        "geomstore[ray]); a bare --ray joins $RAY_ADDRESS, else the cluster `ray start` left "
        "on this machine, else a new local one. "
        "The store must be reachable from the workers (postgres: catalog + "
        "GEOMSTORE_DATA_PATH=s3://..., or a shared directory).",
    ),
    replace: bool = REPLACE,
) -> None:
    """Partition checkpoints on slices and store them: in this process, or on Ray (--ray).

    Name, step and metrics come from each file (step-0300.pt2 -> step 300; a step-0300.json
    beside it may hold {"step": ..., "metrics": {...}}). A checkpoint that fails (a bad
    file, an unsupported layer) is reported and the others go on; the exit code is 1 then.

    Example: geomstore compute runs/moons 'ckpt/*.pt2' --model moons-mlp --box=-2,-1.5,3,2

    Example: geomstore compute postgres:host=db 'ckpt/*.pt2' -m resnet --slice s1 --ray
    """
    from geomstore.jobs import JobResult
    from geomstore.jobs import compute as compute_all

    files = _files(checkpoints)
    if ray is not None:  # refused before anything is made
        from geomstore.distributed import refuse_duckdb

        refuse_duckdb(store)
    with (
        store_with_slices(store, box, through, slice_name, margin) as (st, sls),
        progress() as bar,
    ):
        where = "partitioning" if ray is None else "partitioning on Ray"
        task = bar.add_task(where, total=len(files) * len(sls))

        single = len(files) * len(sls) == 1

        regions = bar.add_task("regions", total=None, visible=ray is None)

        def partial_regions(p: Any) -> None:
            bar.update(
                regions,
                completed=p.regions,
                description=f"regions ({sum(p.pending):,} cells pending)",
            )

        def show(result: JobResult) -> None:
            if result.ok or not single:  # one job's failure is the error line itself
                bar.console.print(result.line())
            bar.advance(task)

        summary = compute_all(
            st,
            files,
            sls,
            model=model,
            factory=factory,
            trust_pickle=trust_pickle,
            verify=verify,
            device=device,
            options=_options(level, threshold)
            | ({"progress": partial_regions} if ray is None else {}),
            executor="local" if ray is None else "ray",
            address=ray or None,
            on_result=show,
            replace=replace,
        )
    if single and summary.failed:
        raise GeomstoreError(summary.failed[0].error or "the job failed.")
    err.print(str(summary))
    if summary.failed:
        raise GeomstoreError(f"{len(summary.failed)} job(s) failed; see above.")
    bad = sum(r.verified is False for r in summary.results)
    if bad:
        raise GeomstoreError(f"{bad} partition(s) failed verification; see above.")


@app.command()
def submit(
    store: str = NEW_STORE,
    checkpoints: list[str] = CHECKPOINTS,
    model: str = MODEL,
    factory: str | None = FACTORY,
    trust_pickle: bool = TRUST,
    box: list[str] = BOX,
    through: list[Path] = THROUGH,
    slice_name: list[str] = NAMED,
    margin: float = MARGIN,
    verify: bool = typer.Option(False, help="Workers check each partition against the model."),
    level: list[float] = LEVELS,
    threshold: float | None = typer.Option(None, help="Single-output decision threshold."),
    replace: bool = REPLACE,
) -> None:
    """Queue checkpoints x slices as jobs for `geomstore worker` processes.

    Submitting the same file content and slice again does not add a second job.

    Example: geomstore submit runs/moons 'ckpt/*.pt2' --model moons-mlp --box=-2,-1.5,3,2
    """
    from geomstore.jobs import job_table
    from geomstore.jobs import submit as submit_one

    files = _files(checkpoints)
    with store_with_slices(store, box, through, slice_name, margin) as (st, sls):
        ids = set()
        known = set(job_table(st).column("job_id").to_pylist())
        with progress() as bar:
            task = bar.add_task("submitting", total=len(files) * len(sls))
            for f in files:
                spec = ModelSpec(str(f.resolve()), factory, trust_pickle)
                for sl in sls:
                    ids.add(
                        submit_one(
                            st,
                            spec,
                            sl,
                            model=model,
                            verify=verify,
                            options=_options(level, threshold),
                            replace=replace,
                        )
                    )
                    bar.advance(task)
    new = len(ids - known)
    out.print(
        f"{len(ids)} job(s) in the queue of {shown(store)} ({new} new, {len(ids) - new} "
        f"submitted before); run: geomstore worker {as_arg(store)}"
    )


@app.command()
def worker(
    store: str = STORE,
    once: bool = typer.Option(False, "--once", help="Exit when the queue is empty."),
    max_jobs: int | None = typer.Option(None, help="Exit after this many jobs."),
    device: str = typer.Option("auto", help="auto (CUDA when there is one), cpu or cuda."),
    heartbeat: float = typer.Option(5.0, help="Seconds between heartbeats."),
    stale_after: float = typer.Option(
        60.0, help="Reclaim running jobs whose heartbeat is older than this (seconds)."
    ),
    max_attempts: int = typer.Option(3, help="Claims before a failing job is marked failed."),
    poll: float = typer.Option(2.0, help="Seconds between looks at an empty queue."),
    name: str | None = typer.Option(None, help="Worker name (default host:pid)."),
) -> None:
    """Run the store's queued jobs until stopped (SIGTERM / Ctrl-C release the current job).

    Several workers may share one store directory.

    Example: geomstore worker runs/moons --once
    """
    from geomstore.engine.partition import resolve_device
    from geomstore.worker import Job, Worker

    resolve_device(device)  # refuse an impossible device before claiming (and failing) jobs
    with open_store(store) as st:
        w = Worker(
            st,
            device=device,
            heartbeat=heartbeat,
            stale_after=stale_after,
            max_attempts=max_attempts,
            **({"name": name} if name else {}),
        )
        err.print(f"worker {w.name} on {shown(store)} ({device}); Ctrl-C to stop")

        def log(job: Job, outcome: str) -> None:
            what = f": {w.last}" if outcome == "done" else ""
            err.print(f"{outcome:>8}  {job.model} {job.checkpoint}{what}  (job {job.job_id})")

        told: dict[str, float] = {}

        def running(job: Job, p: Any) -> None:  # a long partition is never silent
            if p.elapsed - told.get(job.job_id, 0.0) >= 10.0:
                told[job.job_id] = p.elapsed
                err.print(
                    f"{'running':>8}  {job.model} {job.checkpoint}: {p.regions:,} regions, "
                    f"{sum(p.pending):,} cells pending, {p.elapsed:.0f} s  (job {job.job_id})"
                )

        w.on_progress = running
        counts = w.run(once=once, max_jobs=max_jobs, poll=poll, on_event=log)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    err.print(f"worker {w.name} stopped: {summary or 'no jobs'}")


@app.command()
def watch(
    store: str = NEW_STORE,
    folder: Path = typer.Argument(..., help="The folder a training run writes checkpoints to."),
    model: str = MODEL,
    pattern: str = typer.Option("*.pt2", help="Which files are checkpoints."),
    factory: str | None = FACTORY,
    trust_pickle: bool = TRUST,
    box: list[str] = BOX,
    through: list[Path] = THROUGH,
    slice_name: list[str] = NAMED,
    margin: float = MARGIN,
    interval: float = typer.Option(5.0, help="Seconds between looks at the folder."),
    once: bool = typer.Option(False, "--once", help="Submit what is there now, then exit."),
) -> None:
    """Submit every new checkpoint that appears in a folder (once its size stops changing).

    Example: geomstore watch runs/moons ckpt/ --model moons-mlp --box=-2,-1.5,3,2
    """
    from geomstore.jobs import submit as submit_one
    from geomstore.worker import stable_files

    if not folder.is_dir():
        raise GeomstoreError(f"{folder} is not a folder.")
    with store_with_slices(store, box, through, slice_name, margin) as (st, sls):
        sizes: dict[Path, tuple[int, float]] = {}
        done: set[Path] = set()
        stable_files(folder, pattern, sizes)
        if once:
            err.print(f"submitting what is in {folder}/{pattern} for {model}")
        else:
            err.print(f"watching {folder}/{pattern} for {model}; Ctrl-C to stop")
        while True:
            time.sleep(min(interval, 1.0) if once else interval)
            for f in stable_files(folder, pattern, sizes):
                if f in done:
                    continue
                done.add(f)
                spec = ModelSpec(str(f.resolve()), factory, trust_pickle)
                try:
                    for sl in sls:
                        submit_one(st, spec, sl, model=model)
                except ModelLoadError as exc:  # this file, not the watch, is what is wrong
                    err.print(f"skipped {f.name}: {exc}")
                    continue
                err.print(f"submitted {f.name}")
            if once:
                if not done:
                    err.print(f"no file in {folder} matches {pattern!r} (see --pattern)")
                break


@app.command()
def jobs(
    store: str = STORE,
    retry_failed: bool = typer.Option(False, help="Put failed jobs back in the queue."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv, json or parquet."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write to this file."),
) -> None:
    """List the store's jobs with status, attempts, worker and error.

    Example: geomstore jobs runs/moons --retry-failed
    """
    from geomstore.jobs import job_table
    from geomstore.jobs import retry_failed as retry

    with open_store(store) as st:
        if retry_failed:
            err.print(f"{retry(st)} failed job(s) queued again")
        table = job_table(st)
    counts = {s: table.column("status").to_pylist().count(s) for s in ("queued", "running")}
    emit(table, fmt, output, title=f"jobs: {counts['queued']} queued, {counts['running']} running")
