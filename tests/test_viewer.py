"""The viewer at / in a real headless Chromium, from a real server over a real store."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely

import geomstore
from tests.servers import Server, make_store, serve

CHROMEDRIVER = "/usr/bin/chromedriver"
HAVE_BROWSER = bool(shutil.which("chromium")) and Path(CHROMEDRIVER).exists()
if not HAVE_BROWSER and os.environ.get("CI") != "true":
    pytest.skip(
        "no chromium / chromedriver here (apt-get install chromium chromium-driver); "
        "under CI=true this test runs",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

PIXELS = """
const c = document.getElementById(arguments[0]);
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
const colours = new Set();
let painted = 0, hash = 0;
for (let i = 0; i < d.length; i += 4 * 7) {
  const rgb = (d[i] << 16) | (d[i + 1] << 8) | d[i + 2];
  if (d[i + 3] > 0 && rgb !== 0xffffff) { painted++; colours.add(rgb); }
  hash = (hash * 31 + rgb + d[i + 3]) >>> 0;
}
return [painted, colours.size, hash, d.length / (4 * 7)];
"""


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_store(tmp_path_factory.mktemp("viewer") / "store")


@pytest.fixture(scope="module")
def server(store_path: str) -> Iterator[Server]:
    with serve(store_path) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    opts = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,860",
        "--disable-gpu",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, script: str, timeout: float = 60.0) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: d.execute_script(script)
    )


def _shown(driver: Any) -> str:
    return str(
        driver.execute_script(
            "const s = window.geomstoreViewer;return s.current ? s.current.pid : '';"
        )
    )


def test_viewer_draws_slides_hovers_and_samples(
    browser: Any, server: Server, store_path: str, tmp_path: Path
) -> None:
    browser.get(server.url + "/")
    _wait(browser, "const s = window.geomstoreViewer; return s.ready && s.drawn > 0;")
    assert browser.execute_script("return window.geomstoreViewer.error") is None
    with geomstore.open(store_path, read_only=True) as local:
        parts = local.partitions(model="net").to_pylist()
        last = local.load_partition(parts[-1]["partition_id"])
        first = local.load_partition(parts[0]["partition_id"])
    # the last checkpoint is drawn: every region, in many colours
    assert _shown(browser) == parts[-1]["partition_id"]
    assert browser.execute_script("return window.geomstoreViewer.drawn") == last.n_regions
    painted, colours, before, total = browser.execute_script(PIXELS, "map")
    assert painted > 0.3 * total and colours > 20
    # the LC trajectory beside it has one point per checkpoint
    _wait(browser, "return window.geomstoreViewer.trajectory != null")
    rows = browser.execute_script("return window.geomstoreViewer.trajectory.res.rows.length")
    assert rows == len(parts)
    assert browser.execute_script(PIXELS, "trajectory")[0] > 0

    # the slider redraws another checkpoint
    browser.execute_script(
        "const el = document.getElementById('checkpoint'); el.value = '0';"
        "el.dispatchEvent(new Event('input'));"
    )
    _wait(
        browser,
        f"const s = window.geomstoreViewer; return s.current && "
        f"s.current.pid === '{parts[0]['partition_id']}' && s.drawn > 0;",
    )
    assert browser.execute_script("return window.geomstoreViewer.drawn") == first.n_regions
    after = browser.execute_script(PIXELS, "map")[2]
    assert after != before
    assert "step0" in browser.find_element(By.ID, "checkpoint-label").text

    # hovering shows the id of the region under the mouse, its map and pattern hash
    canvas = browser.find_element(By.ID, "map")
    size = canvas.size
    for dx, dy in ((40, -30), (-120, 80), (150, 120)):
        ActionChains(browser).move_to_element_with_offset(canvas, dx, dy).perform()
        u = browser.execute_script(
            "return toSlice(arguments[0], arguments[1])",
            size["width"] / 2 + dx,
            size["height"] / 2 + dy,
        )
        inside = shapely.contains_xy(first.polygons(), u[0], u[1])
        want = first.regions.column("region_id").to_numpy()[inside]
        _wait(browser, "return document.getElementById('hover-id').textContent !== '-'", 10)
        assert int(browser.find_element(By.ID, "hover-id").text) in want.tolist()
        assert len(browser.find_element(By.ID, "hover-hash").text) == 32
        assert browser.find_element(By.ID, "hover-map").text.startswith("f0 = ")

    # a click near the decision boundary samples boundary points near it
    b = first.boundary
    mid = np.array(
        [
            (b.column("u0_a")[0].as_py() + b.column("u0_b")[0].as_py()) / 2,
            (b.column("u1_a")[0].as_py() + b.column("u1_b")[0].as_py()) / 2,
        ]
    )
    sx, sy = browser.execute_script("return toScreen(arguments[0], arguments[1])", *mid)
    ActionChains(browser).move_to_element_with_offset(
        canvas, int(sx - size["width"] / 2), int(sy - size["height"] / 2)
    ).click().perform()
    _wait(browser, "return window.geomstoreViewer.samples.length > 0", 30)
    assert "samples within" in browser.find_element(By.ID, "samples").text

    # colour by class, then by local complexity
    Select(browser.find_element(By.ID, "color")).select_by_value("class")
    by_class = browser.execute_script(PIXELS, "map")
    assert by_class[2] != after and by_class[1] > 1
    Select(browser.find_element(By.ID, "color")).select_by_value("lc")
    _wait(browser, "const s = window.geomstoreViewer; return s.lc.has(s.current.pid);", 30)
    assert browser.execute_script(PIXELS, "map")[2] != by_class[2]

    # a data set's points on top
    Select(browser.find_element(By.ID, "dataset")).select_by_value("pts")
    _wait(browser, "const s = window.geomstoreViewer; return s.points && s.points.length === 40")
    shot = tmp_path / "viewer.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
    if os.environ.get("GEOMSTORE_SCREENSHOT"):
        shutil.copy(shot, os.environ["GEOMSTORE_SCREENSHOT"])
    logs = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert not logs, logs


def test_viewer_pans_and_zooms(browser: Any, server: Server) -> None:
    browser.get(server.url + "/")
    _wait(browser, "const s = window.geomstoreViewer; return s.ready && s.drawn > 0;")
    view = browser.execute_script("return {...window.geomstoreViewer.view}")
    canvas = browser.find_element(By.ID, "map")
    ActionChains(browser).move_to_element(canvas).click_and_hold().move_by_offset(
        60, 0
    ).release().perform()
    moved = browser.execute_script("return {...window.geomstoreViewer.view}")
    assert moved["cx"] < view["cx"] and moved["scale"] == view["scale"]
    browser.execute_script(
        "document.getElementById('map').dispatchEvent(new WheelEvent('wheel', "
        "{deltaY: -300, clientX: 300, clientY: 300, bubbles: true, cancelable: true}))"
    )
    zoomed = browser.execute_script("return {...window.geomstoreViewer.view}")
    assert zoomed["scale"] > moved["scale"]


def test_openapi_page_renders_offline(browser: Any, server: Server) -> None:
    """/docs draws Swagger UI's operations from files this server holds (no CDN here)."""
    browser.get(server.url + "/docs")
    n = _wait(browser, "const ops = document.querySelectorAll('.opblock'); return ops.length;")
    assert n >= 10
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "/api/points/regions" in text and "/api/sql" in text
