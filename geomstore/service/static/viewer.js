// geomstore viewer: one partition of a slice on a canvas, through training.
// Plain canvas 2D, no library. A token, when the server needs one, is read once from the
// page's #token=... fragment and kept for this tab (sessionStorage).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  model: null, slice: null, sliceRow: null, parts: [], index: 0, cache: new Map(),
  view: { cx: 0, cy: 0, scale: 100 }, current: null, samples: [], points: null,
  lc: new Map(), ready: false, drawn: 0, hover: null, playing: null, error: null,
};
window.geomstoreViewer = state; // for tests and the console

(function readToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("geomstore-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

async function api(path, body) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem("geomstore-token");
  if (token) headers.Authorization = "Bearer " + token;
  const init = { headers };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  const data = await resp.json();
  if (!resp.ok) throw new Error((data.error && data.error.message) || resp.statusText);
  return data;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
  if (isError) state.error = text;
}

function fill(select, values, keep) {
  select.innerHTML = "";
  for (const [value, label] of values) {
    const o = document.createElement("option");
    o.value = value; o.textContent = label;
    select.appendChild(o);
  }
  if (keep !== undefined && values.some(([v]) => v === keep)) select.value = keep;
}

// geometry ---------------------------------------------------------------------------------
function parseDomain(wkt) {
  const inner = wkt.slice(wkt.indexOf("((") + 2, wkt.indexOf("))"));
  return inner.split(",").map((p) => p.trim().split(/\s+/).map(Number));
}

function ringsOf(geom) {
  if (!geom) return [];
  if (geom.type === "Polygon") return [geom.coordinates[0]];
  if (geom.type === "MultiPolygon") return geom.coordinates.map((p) => p[0]);
  return [];
}

function bboxOf(rings) {
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const r of rings) for (const [x, y] of r) {
    if (x < x0) x0 = x; if (y < y0) y0 = y; if (x > x1) x1 = x; if (y > y1) y1 = y;
  }
  return [x0, y0, x1, y1];
}

function inside(ring, x, y) {
  let hit = false;
  for (let i = 0, j = ring.length - 1; i < ring.length; j = i++) {
    const [xi, yi] = ring[i], [xj, yj] = ring[j];
    if ((yi > y) !== (yj > y) && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) hit = !hit;
  }
  return hit;
}

// colours ----------------------------------------------------------------------------------
const CLASS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
  "#8c8c8c", "#ccb974", "#64b5cd"];
const RAMPS = {
  slope: [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
  lc: [[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]],
};

function ramp(name, t) {
  const stops = RAMPS[name];
  const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2), f = x - i;
  const c = stops[i].map((v, k) => Math.round(v + f * (stops[i + 1][k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function quantile(values, q) {
  const s = values.filter(Number.isFinite).sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor(q * (s.length - 1)))] : 1;
}

function colours(part) {
  const mode = $("color").value;
  const feats = part.regions;
  if (mode === "class") return feats.map((f) => CLASS[(f.properties.label ?? 0) % CLASS.length]);
  let values;
  if (mode === "lc") {
    const lc = state.lc.get(part.pid);
    if (!lc) return feats.map(() => "#ddd");
    values = feats.map((f) => lc.get(f.properties.region_id) ?? 0);
  } else {
    values = feats.map((f) => f.properties.slope_norm);
  }
  const lo = Math.min(...values.filter(Number.isFinite)), hi = quantile(values, 0.99);
  return values.map((v) => ramp(mode === "lc" ? "lc" : "slope", (v - lo) / (hi - lo || 1)));
}

// loading ----------------------------------------------------------------------------------
async function loadPartition(pid) {
  if (state.cache.has(pid)) return state.cache.get(pid);
  const cols = "region_id,geometry,label,slope_norm,A,c,pattern_hash,centroid_u0,centroid_u1";
  const [regions, edges, boundary] = await Promise.all([
    api(`/api/partitions/${pid}/regions?format=geojson&columns=${cols}`),
    api(`/api/partitions/${pid}/edges?columns=u0_a,u1_a,u0_b,u1_b`),
    api(`/api/partitions/${pid}/boundary?columns=u0_a,u1_a,u0_b,u1_b`),
  ]);
  const feats = regions.features.map((f) => {
    const rings = ringsOf(f.geometry);
    return { properties: f.properties, rings, bbox: bboxOf(rings) };
  });
  const part = { pid, regions: feats, edges: edges.rows, boundary: boundary.rows };
  state.cache.set(pid, part);
  return part;
}

async function loadLC(part) {
  if (state.lc.has(part.pid) || $("color").value !== "lc") return;
  const row = state.parts[state.index];
  const d = state.sliceRow.diameter;
  const centroids = part.regions.map((f) => [f.properties.centroid_u0, f.properties.centroid_u1]);
  const lc = new Map();
  for (let i = 0; i < centroids.length; i += 5000) {
    const res = await api("/api/lc", {
      model: state.model, slice: state.slice, checkpoints: [row.checkpoint],
      points: centroids.slice(i, i + 5000), radius: 0.02 * d,
    });
    for (const r of res.rows) lc.set(part.regions[i + r.point_id].properties.region_id, r.n_neurons);
  }
  state.lc.set(part.pid, lc);
}

// drawing ----------------------------------------------------------------------------------
const map = $("map");
const ctx = map.getContext("2d");

function resize() {
  const r = map.getBoundingClientRect();
  const dpr = window.devicePixelRatio || 1;
  map.width = Math.max(1, Math.round(r.width * dpr));
  map.height = Math.max(1, Math.round(r.height * dpr));
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
}

function toScreen(x, y) {
  const r = map.getBoundingClientRect(), v = state.view;
  return [r.width / 2 + (x - v.cx) * v.scale, r.height / 2 - (y - v.cy) * v.scale];
}

function toSlice(px, py) {
  const r = map.getBoundingClientRect(), v = state.view;
  return [v.cx + (px - r.width / 2) / v.scale, v.cy - (py - r.height / 2) / v.scale];
}

function fit() {
  if (!state.sliceRow) return;
  const [x0, y0, x1, y1] = bboxOf([state.sliceRow.domain]);
  const r = map.getBoundingClientRect();
  state.view = {
    cx: (x0 + x1) / 2, cy: (y0 + y1) / 2,
    scale: 0.92 * Math.min(r.width / (x1 - x0 || 1), r.height / (y1 - y0 || 1)),
  };
}

function path(ring) {
  ring.forEach(([x, y], i) => {
    const [sx, sy] = toScreen(x, y);
    if (i) ctx.lineTo(sx, sy); else ctx.moveTo(sx, sy);
  });
  ctx.closePath();
}

function segments(rows, style, width) {
  ctx.strokeStyle = style; ctx.lineWidth = width;
  ctx.beginPath();
  for (const s of rows) {
    const [ax, ay] = toScreen(s.u0_a, s.u1_a), [bx, by] = toScreen(s.u0_b, s.u1_b);
    ctx.moveTo(ax, ay); ctx.lineTo(bx, by);
  }
  ctx.stroke();
}

function dots(pts, colour, radius) {
  for (const p of pts) {
    const [sx, sy] = toScreen(p[0], p[1]);
    ctx.fillStyle = colour(p);
    ctx.beginPath(); ctx.arc(sx, sy, radius, 0, 2 * Math.PI); ctx.fill();
    ctx.strokeStyle = "#000"; ctx.lineWidth = 0.6; ctx.stroke();
  }
}

function draw() {
  const r = map.getBoundingClientRect();
  ctx.clearRect(0, 0, r.width, r.height);
  const part = state.current;
  if (!part) return;
  const fills = colours(part);
  part.regions.forEach((f, i) => {
    ctx.beginPath();
    f.rings.forEach(path);
    ctx.fillStyle = fills[i];
    ctx.fill();
  });
  if ($("show-edges").checked) segments(part.edges, "rgba(255,255,255,0.55)", 0.6);
  if ($("show-boundary").checked) segments(part.boundary, "#e00", 2);
  if (state.points) dots(state.points, (p) => CLASS[(p[2] ?? 0) % CLASS.length], 3);
  if (state.samples.length) dots(state.samples, () => "#fff", 3.5);
  if (state.hover) {
    ctx.beginPath();
    state.hover.rings.forEach(path);
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 3.5; ctx.stroke();
    ctx.strokeStyle = "#000"; ctx.lineWidth = 1.5; ctx.stroke();
  }
  state.drawn = part.regions.length;
}

// trajectory -------------------------------------------------------------------------------
async function trajectory() {
  if (!state.parts.length) { state.trajectory = null; drawTrajectory(); return; }
  const body = { model: state.model, slice: state.slice, radius: 0.02 * state.sliceRow.diameter };
  const ds = $("dataset").value;
  if (ds) body.dataset = ds;
  else {
    const [x0, y0, x1, y1] = bboxOf([state.sliceRow.domain]), pts = [];
    for (let i = 0; i < 12; i++) for (let j = 0; j < 12; j++) {
      const x = x0 + ((i + 0.5) * (x1 - x0)) / 12, y = y0 + ((j + 0.5) * (y1 - y0)) / 12;
      if (inside(state.sliceRow.domain, x, y)) pts.push([x, y]);
    }
    body.points = pts;
  }
  try {
    const res = await api("/api/lc/trajectory", body);
    state.trajectory = { res, radius: body.radius, source: ds || "a grid" };
  } catch (e) {
    state.trajectory = null;
    $("trajectory-note").textContent = e.message;
  }
  drawTrajectory();
}

function drawTrajectory() {
  const canvas = $("trajectory"), c = canvas.getContext("2d");
  c.clearRect(0, 0, canvas.width, canvas.height);
  if (!state.trajectory || !state.trajectory.res.rows.length) return;
  const { res, radius, source } = state.trajectory;
  const rows = res.rows.filter((r) => r.split === res.rows[0].split);
  const ys = rows.map((r) => r.lc_mean), xs = rows.map((_, i) => i);
  const ymax = Math.max(...ys, 1), pad = 24, w = canvas.width - 2 * pad, h = canvas.height - 2 * pad;
  const X = (i) => pad + (xs.length > 1 ? (i / (xs.length - 1)) * w : w / 2);
  const Y = (v) => pad + h - (v / ymax) * h;
  c.strokeStyle = "#999"; c.lineWidth = 1; c.strokeRect(pad, pad, w, h);
  c.strokeStyle = "#1f77b4"; c.lineWidth = 2; c.beginPath();
  ys.forEach((v, i) => (i ? c.lineTo(X(i), Y(v)) : c.moveTo(X(i), Y(v))));
  c.stroke();
  const row = state.parts[state.index];
  const k = row ? rows.findIndex((r) => r.checkpoint === row.checkpoint) : -1;
  if (k >= 0) { c.fillStyle = "#d62728"; c.beginPath(); c.arc(X(k), Y(ys[k]), 4, 0, 7); c.fill(); }
  c.fillStyle = "#333"; c.font = "11px sans-serif";
  c.fillText(`max ${ymax.toFixed(2)} neurons`, pad, pad - 6);
  c.fillText(`step ${rows[0].step} .. ${rows[rows.length - 1].step}`, pad, canvas.height - 6);
  $("trajectory-note").textContent =
    `mean LC (r = ${radius.toPrecision(2)}) of ${source}; turning points: ` +
    JSON.stringify(res.turning_points[rows[0].split] || {});
}

// interaction ------------------------------------------------------------------------------
async function show(index) {
  state.index = index;
  const row = state.parts[index];
  if (!row) { state.current = null; draw(); return; }
  $("checkpoint").value = String(index);
  $("checkpoint-label").textContent = `${row.checkpoint} (step ${row.step}, ${row.n_regions} regions)`;
  status("loading " + row.checkpoint + " ...");
  try {
    const part = await loadPartition(row.partition_id);
    await loadLC(part);
    if (state.index !== index) return; // a later choice won
    state.current = part;
    state.hover = null;
    state.samples = [];
    draw();
    status(`${row.checkpoint}: ${part.regions.length} regions`);
    drawTrajectory();
  } catch (e) { status(e.message, true); }
}

function regionAt(x, y) {
  const part = state.current;
  if (!part) return null;
  for (const f of part.regions) {
    const [x0, y0, x1, y1] = f.bbox;
    if (x < x0 || x > x1 || y < y0 || y > y1) continue;
    if (f.rings.some((r) => inside(r, x, y))) return f;
  }
  return null;
}

function fmt(v) { return Number(v).toPrecision(4); }

function hoverAt(px, py) {
  const [x, y] = toSlice(px, py);
  const f = regionAt(x, y);
  state.hover = f;
  const p = f ? f.properties : null;
  $("hover-id").textContent = p ? String(p.region_id) : "-";
  $("hover-label").textContent = p ? String(p.label) : "-";
  $("hover-hash").textContent = p ? p.pattern_hash : "-";
  $("hover-at").textContent = `u = (${fmt(x)}, ${fmt(y)})`;
  if (p) {
    const k = p.c.length, lines = [];
    for (let i = 0; i < k; i++) {
      lines.push(`f${i} = ${fmt(p.A[2 * i])} u0 + ${fmt(p.A[2 * i + 1])} u1 + ${fmt(p.c[i])}`);
    }
    $("hover-map").textContent = lines.join("\n");
  } else $("hover-map").textContent = "-";
  draw();
}

async function sampleNear(px, py) {
  const [x, y] = toSlice(px, py);
  const row = state.parts[state.index];
  const within = 0.1 * state.sliceRow.diameter;
  try {
    const res = await api("/api/boundary/samples", {
      model: state.model, slice: state.slice, checkpoints: [row.checkpoint], n: 25,
      near: [[x, y]], within, seed: Date.now() % 100000,
    });
    state.samples = res.rows.map((r) => [r.u0, r.u1]);
    $("samples").textContent = `${res.rows.length} samples within ${fmt(within)} of ` +
      `(${fmt(x)}, ${fmt(y)}); class pairs: ` +
      [...new Set(res.rows.map((r) => `${r.class_a}|${r.class_b}`))].join(", ");
  } catch (e) {
    state.samples = [];
    $("samples").textContent = e.message;
  }
  draw();
}

let drag = null;
map.addEventListener("mousedown", (e) => { drag = { x: e.offsetX, y: e.offsetY, moved: false }; });
map.addEventListener("mousemove", (e) => {
  if (drag && (e.buttons & 1)) {
    const dx = e.offsetX - drag.x, dy = e.offsetY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 2) drag.moved = true;
    state.view.cx -= dx / state.view.scale; state.view.cy += dy / state.view.scale;
    drag.x = e.offsetX; drag.y = e.offsetY;
    draw();
  } else hoverAt(e.offsetX, e.offsetY);
});
map.addEventListener("mouseup", (e) => {
  if (drag && !drag.moved) sampleNear(e.offsetX, e.offsetY);
  drag = null;
});
map.addEventListener("wheel", (e) => {
  e.preventDefault();
  const [x, y] = toSlice(e.offsetX, e.offsetY);
  state.view.scale *= Math.exp(-e.deltaY * 0.0015);
  const [x2, y2] = toSlice(e.offsetX, e.offsetY);
  state.view.cx += x - x2; state.view.cy += y - y2;
  draw();
}, { passive: false });
map.addEventListener("dblclick", () => { fit(); draw(); });

$("checkpoint").addEventListener("input", (e) => show(Number(e.target.value)));
$("color").addEventListener("change", async () => {
  if (state.current) await loadLC(state.current);
  draw();
});
$("show-edges").addEventListener("change", draw);
$("show-boundary").addEventListener("change", draw);
$("play").addEventListener("click", () => {
  if (state.playing) { clearInterval(state.playing); state.playing = null; return; }
  state.playing = setInterval(() => {
    if (!state.parts.length) return;
    show((state.index + 1) % state.parts.length);
  }, 700);
});
$("dataset").addEventListener("change", async () => {
  const name = $("dataset").value;
  state.points = null;
  if (name) {
    try {
      const res = await api(`/api/datasets/${encodeURIComponent(name)}/points?slice=` +
        encodeURIComponent(state.slice));
      state.points = res.rows.map((r) => [r.u0, r.u1, r.label]);
    } catch (e) { status(e.message, true); }
  }
  draw();
  trajectory();
});
window.addEventListener("resize", () => { resize(); draw(); });

async function chooseSlice() {
  state.slice = $("slice").value;
  const slices = await api("/api/slices");
  const row = slices.rows.find((r) => r.slice_id === state.slice);
  const domain = parseDomain(row.domain);
  const [x0, y0, x1, y1] = bboxOf([domain]);
  state.sliceRow = { ...row, domain, diameter: Math.hypot(x1 - x0, y1 - y0) };
  const parts = await api(`/api/partitions?model=${encodeURIComponent(state.model)}` +
    `&slice=${encodeURIComponent(state.slice)}`);
  state.parts = parts.rows;
  state.cache.clear(); state.lc.clear();
  $("checkpoint").max = String(Math.max(0, state.parts.length - 1));
  const ds = await api(`/api/datasets?slice=${encodeURIComponent(state.slice)}`);
  fill($("dataset"), [["", "(none)"], ...ds.rows.map((r) => [r.dataset, r.dataset])]);
  state.points = null;
  fit();
  await show(state.parts.length - 1);
  trajectory();
}

async function chooseModel() {
  state.model = $("model").value;
  const parts = await api(`/api/partitions?model=${encodeURIComponent(state.model)}`);
  const seen = new Map();
  for (const r of parts.rows) seen.set(r.slice_id, r.slice || r.slice_id);
  fill($("slice"), [...seen.entries()]);
  await chooseSlice();
}

$("model").addEventListener("change", () => chooseModel().catch((e) => status(e.message, true)));
$("slice").addEventListener("change", () => chooseSlice().catch((e) => status(e.message, true)));

(async function start() {
  resize();
  try {
    const models = await api("/api/models");
    if (!models.rows.length) { status("this store holds no partitions yet"); state.ready = true; return; }
    fill($("model"), models.rows.map((r) => [r.model, r.model]));
    await chooseModel();
  } catch (e) { status(e.message, true); }
  state.ready = true;
})();
