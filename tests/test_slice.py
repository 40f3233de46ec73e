from __future__ import annotations

import numpy as np
import pytest

from geomstore import InvalidSliceError, Slice


def test_box_lift_project_roundtrip() -> None:
    s = Slice.box((-1, -2), (3, 4))
    assert s.area == 24.0
    u = np.array([[0.5, -1.5], [2.0, 3.0]])
    x = s.lift(u)
    back, dist = s.project(x)
    np.testing.assert_allclose(back, u, atol=1e-15)
    np.testing.assert_allclose(dist, 0.0, atol=1e-15)


def test_through_three_images_is_orthonormal_and_contains_points() -> None:
    rng = np.random.default_rng(0)
    a, b, c = (rng.random((1, 8, 8)) for _ in range(3))
    s = Slice.through(a, b, c, margin=0.0, domain="triangle")
    np.testing.assert_allclose(s.basis @ s.basis.T, np.eye(2), atol=1e-12)
    u, dist = s.project(np.stack([a, b, c]))
    np.testing.assert_allclose(dist, 0.0, atol=1e-12)
    np.testing.assert_allclose(u, s.domain, atol=1e-12)
    assert s.lift(u, shaped=True).shape == (3, 1, 8, 8)
    np.testing.assert_allclose(s.lift(u, shaped=True)[2], c, atol=1e-12)


def test_project_measures_distance_off_plane() -> None:
    s = Slice.through([0, 0, 0], [1, 0, 0], [0, 1, 0])
    u, d = s.project([[0.25, 0.5, 2.0]])
    np.testing.assert_allclose(u, [[0.25, 0.5]])
    np.testing.assert_allclose(d, [2.0])


def test_hash_is_stable_and_ignores_name() -> None:
    a = Slice.box((-1, -1), (1, 1), name="a")
    b = Slice.box((-1, -1), (1, 1), name="b")
    assert a.content_hash == b.content_hash == Slice.from_dict(a.to_dict()).content_hash
    assert a.content_hash != Slice.box((-1, -1), (1, 2)).content_hash
    assert len(a.content_hash) == 64


def test_dict_roundtrip_keeps_everything() -> None:
    rng = np.random.default_rng(1)
    s = Slice.through(*(rng.random((2, 3)) for _ in range(3)), name="img")
    t = Slice.from_dict(s.to_dict())
    assert t == s and t.name == "img" and t.input_shape == (2, 3)


def test_clockwise_domain_is_reoriented() -> None:
    s = Slice(np.zeros(2), np.eye(2), [[0, 0], [0, 1], [1, 1], [1, 0]])
    assert s.area == 1.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: Slice.through([0, 0], [1, 1], [2, 2]), "collinear"),
        (lambda: Slice.through([0, 0], [0, 0], [1, 2]), "identical"),
        (lambda: Slice.through([0, 0], [1, 0], [0, 1, 2]), "same shape"),
        (lambda: Slice.box((0, 0), (float("nan"), 1)), "NaN or inf"),
        (lambda: Slice.box((0, 0), (0, 1)), "must exceed"),
        (lambda: Slice(np.zeros(2), np.eye(2), [[0, 0], [2, 0], [1, 0.2], [1, 2]]), "not convex"),
        (lambda: Slice(np.zeros(2), np.eye(2), [[0, 0], [1, 1], [2, 2]]), "zero area"),
        (lambda: Slice(np.zeros(3), np.eye(2), [[0, 0], [1, 0], [0, 1]]), "entries"),
        (lambda: Slice(np.zeros(2), [[1, 0], [2, 0]], [[0, 0], [1, 0], [0, 1]]), "parallel"),
        (lambda: Slice.through([0, 0], [1, 0], [0, 1], domain="disk"), "'box', 'triangle'"),
    ],
)
def test_bad_slices_name_the_problem(call: object, message: str) -> None:
    with pytest.raises(InvalidSliceError, match=message):
        call()  # type: ignore[operator]


def test_small_or_far_domains_keep_every_vertex() -> None:
    """Tolerances follow the domain's own size, not numpy's absolute defaults."""
    tiny = Slice.box((0.1, 0.1), (0.100001, 0.100001))
    assert len(tiny.domain) == 4
    assert tiny.area == pytest.approx(1e-12, rel=1e-6)
    assert len(Slice.box((0, 0), (1e-9, 1e-9)).domain) == 4
    far = Slice([0, 0], [[1, 0], [0, 1]], [[1e6, 1e6], [1e6 + 0.5, 1e6], [1e6, 1e6 + 0.5]])
    assert far.area == pytest.approx(0.125)
    with pytest.raises(InvalidSliceError, match="zero area"):
        Slice([0, 0], [[1, 0], [0, 1]], [[1e6, 1e6], [1e6 + 0.5, 1e6], [1e6 + 1.0, 1e6]])
