"""Request bodies of the service's POST endpoints (pydantic models, shown at ``/docs``)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from geomstore.store.sandbox_rules import holds_non_unicode

__all__ = [
    "Body",
    "CompareRequest",
    "JobRequest",
    "PointsRequest",
    "SQLRequest",
    "SampleRequest",
    "Selection",
]


#: The largest magnitude of a coordinate or a distance a request may give (slice units):
#: far beyond any slice, and small enough that squares and areas stay finite.
BIG = 1e100


def _bounded(x: float) -> float:
    if not math.isfinite(x) or abs(x) > BIG:
        raise ValueError(f"give a finite number between -{BIG:g} and {BIG:g}, not {x!r}")
    return x


Coordinate = Annotated[float, AfterValidator(_bounded)]
Distance = Annotated[float, Field(gt=0), AfterValidator(_bounded)]


class Body(BaseModel):
    """A request body: no keys beyond the model's, text that is Unicode."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        if holds_non_unicode(data):
            raise ValueError(
                "text holds a character that is not valid Unicode (a lone surrogate such as "
                "\\ud800); send UTF-8 text"
            )
        return data


class Selection(Body):
    """Which partitions: a model by name, a slice (name or id), some checkpoints."""

    model: str = Field(description="The model's name.", examples=["moons-mlp"])
    slice: str | None = Field(None, description="A slice name or id; default: the only one.")
    checkpoints: list[str] | None = Field(None, description="Checkpoint names; default: all.")


class SQLRequest(Body):
    """One read-only SELECT, run in the store's SQL sandbox."""

    sql: str = Field(description="One SELECT statement.", examples=["SELECT * FROM gs_partitions"])
    params: list[Any] | dict[str, Any] | None = Field(
        None, description="Values for ? or $name placeholders."
    )
    max_rows: int | None = Field(None, ge=0, description="Row cap (at most the server's).")
    timeout: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Seconds (at most the server's)."
    )


class PointsRequest(Selection):
    """Points in slice coordinates, or a stored data set, for per-point queries."""

    points: list[tuple[Coordinate, Coordinate]] | None = Field(
        None, description="Slice coordinates [[u0, u1], ...].", examples=[[[0.1, 0.2]]]
    )
    dataset: str | None = Field(None, description="Instead of points: a stored data set.")
    radius: Distance | None = Field(None, description="LC: the neighbourhood radius.")
    shape: Literal["disk", "diamond"] = Field("disk", description="LC: the neighbourhood.")
    layers: Literal["hidden", "all"] = Field(
        "hidden", description="LC: hidden units only, or also the logits' decision lines."
    )


class SampleRequest(Selection):
    """Decision-boundary samples per checkpoint (uniform by length)."""

    n: int = Field(100, ge=0, description="Samples per checkpoint.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Random seed (>= 0).")
    pair: tuple[int, int] | None = Field(None, description="Only this class pair.")
    near: list[tuple[Coordinate, Coordinate]] | None = Field(
        None, description="Only boundary within `within` of these points (slice coordinates)."
    )
    within: Distance | None = None
    offset: Coordinate = Field(0.0, description="Push samples along the normal (towards class_b).")


class CompareRequest(Selection):
    """Consecutive checkpoints compared: agreement and boundary movement, or churn."""

    spacing: Distance | None = Field(None, description="Boundary distance sampling step.")
    points: list[tuple[Coordinate, Coordinate]] | None = Field(
        None, description="Churn: these points."
    )
    dataset: str | None = Field(None, description="Churn: this stored data set.")


class JobRequest(Body):
    """A checkpoint file (torch.export ``.pt2`` or TorchScript) queued for the workers."""

    model: str
    slice: dict[str, Any] = Field(description="A slice as Slice.to_dict() writes it.")
    file: str = Field(description="The checkpoint file's bytes, base64-encoded.")
    filename: str = Field("checkpoint.pt2", description="Its name (the suffix says its kind).")
    checkpoint: str | None = None
    step: int | None = None
    metrics: dict[str, float] | None = None
    options: dict[str, Any] | None = None
    verify: bool = False
