// The fedloom dashboard: the runs of the store, and one run's live progress over server-sent
// events (round, versions, status, end, reset). No framework; charts from chart.js.
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("access_token");
const withToken = (url) => (token ? url + (url.includes("?") ? "&" : "?") + "access_token=" + encodeURIComponent(token) : url);
const $ = (id) => document.getElementById(id);
const FINAL = new Set(["completed", "failed", "interrupted", "budget_exhausted"]);
const state = { run: null, rounds: [], versions: [], total: null, status: null, source: null, ended: false, gen: 0 };

// which metrics get a chart, in this order: test metrics, training loss, ε, sparsity, federated evaluation
function rank(n) {
  return n.startsWith("test_") ? 0 : n === "train_loss" ? 1 : n === "dp_epsilon" ? 2 : n === "sparsity" ? 3 : n.startsWith("fed_") ? 4 : 9;
}
function metricNames(rounds) {
  const names = new Set();
  rounds.forEach((r) => Object.keys(r.metrics).forEach((k) => names.add(k)));
  return [...names].filter((n) => rank(n) < 9).sort((a, b) => rank(a) - rank(b));
}
const headline = () => metricNames(state.rounds)[0];
const lowerIsBetter = (n) => /loss|mae|mse|rmse|error|epsilon/.test(n);

function fmt(v, digits = 4) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  return Math.abs(v) >= 1000 ? Math.round(v).toLocaleString("en-US") : (+v.toPrecision(digits)).toString();
}
function units(max) {
  return max >= 1e9 ? [1e9, "GB"] : max >= 1e6 ? [1e6, "MB"] : max >= 1e3 ? [1e3, "kB"] : [1, "B"];
}
function bytes(n) { const [d, u] = units(n); return fmt(n / d, 3) + " " + u; }

async function getJSON(url) {
  const r = await fetch(withToken(url));
  if (!r.ok) {
    let why = r.statusText;
    try { why = (await r.json()).detail || why; } catch (_) { /* not JSON */ }
    throw new Error(`${url}: ${r.status} ${why}`);
  }
  return r.json();
}

function badge(el, status) { el.textContent = status.replace("_", " "); el.className = "badge " + status; }

async function loadRuns() {
  const runs = await getJSON("api/runs");
  const list = $("run-list");
  $("empty").hidden = runs.length > 0;
  const seen = new Set();
  for (const r of runs) {
    seen.add(r.name);
    let li = list.querySelector(`li[data-run="${CSS.escape(r.name)}"]`);
    if (!li) {
      li = document.createElement("li");
      li.dataset.run = r.name;
      li.tabIndex = 0;
      li.innerHTML = `<span class="name"></span><span class="badge"></span><small></small>`;
      li.querySelector(".name").textContent = r.name;
      li.onclick = () => selectRun(r.name);
      li.onkeydown = (e) => { if (e.key === "Enter") selectRun(r.name); };
      list.appendChild(li);
    }
    if (r.name !== state.run) {
      badge(li.querySelector(".badge"), r.status);
      li.querySelector("small").textContent = `${r.rounds_done} round${r.rounds_done === 1 ? "" : "s"}`;
    }
    // a finished run that was started again: follow it again
    if (r.name === state.run && state.ended && !FINAL.has(r.status)) selectRun(r.name);
  }
  list.querySelectorAll("li").forEach((li) => { if (!seen.has(li.dataset.run)) li.remove(); });
  const wanted = params.get("run");
  if (!state.run && runs.length) selectRun(runs.some((r) => r.name === wanted) ? wanted : runs[runs.length - 1].name);
}

async function selectRun(name) {
  const gen = ++state.gen;
  if (state.source) { state.source.close(); state.source = null; }
  state.run = name;
  document.querySelectorAll("#run-list li").forEach((li) => li.classList.toggle("active", li.dataset.run === name));
  let snap;
  try { snap = await getJSON("api/runs/" + encodeURIComponent(name)); } catch (e) { problem(e); return; }
  if (gen !== state.gen) return; // another run was picked meanwhile
  Object.assign(state, { rounds: snap.rounds, versions: snap.versions, total: snap.total_rounds, ended: false });
  $("charts").querySelectorAll("figure[data-metric]").forEach((f) => f.remove());
  $("run").hidden = false;
  $("run-name").textContent = name;
  setStatus(snap.status);
  render();
  const last = state.rounds.length ? state.rounds[state.rounds.length - 1].round : 0;
  const es = new EventSource(withToken(`api/runs/${encodeURIComponent(name)}/events?after=${last}`));
  state.source = es;
  setConn("connecting");
  es.onopen = () => { if (state.source === es) setConn("live"); };
  es.onerror = () => { if (state.source === es && !state.ended) setConn(es.readyState === EventSource.CLOSED ? "lost" : "reconnecting"); };
  es.addEventListener("round", (e) => {
    const rec = JSON.parse(e.data);
    const tail = state.rounds[state.rounds.length - 1];
    if (!tail || rec.round > tail.round) { state.rounds.push(rec); render(); }
  });
  es.addEventListener("versions", (e) => { state.versions = JSON.parse(e.data); renderVersions(); });
  es.addEventListener("status", (e) => setStatus(JSON.parse(e.data).status));
  es.addEventListener("end", (e) => { // the run is finished: nothing more will come
    state.ended = true; es.close(); setStatus(JSON.parse(e.data).status); setConn("final");
  });
  es.addEventListener("reset", () => { es.close(); selectRun(name); }); // started over: load it again
  es.addEventListener("gone", (e) => { // the run left the store
    es.close(); state.ended = true; setConn("lost"); console.warn("dashboard:", JSON.parse(e.data).detail);
  });
}

function setConn(s) {
  const b = $("conn");
  b.dataset.state = s;
  b.textContent = { live: "live", reconnecting: "reconnecting", lost: "disconnected", final: "up to date", connecting: "connecting" }[s] || s;
}

function setStatus(s) {
  state.status = s;
  badge($("run-status"), s);
  const li = document.querySelector(`#run-list li[data-run="${CSS.escape(state.run)}"]`);
  if (li) badge(li.querySelector(".badge"), s);
}

function render() {
  const rounds = state.rounds;
  const last = rounds.length ? rounds[rounds.length - 1] : null;
  const k = last ? last.round : 0;
  $("round").textContent = k;
  $("round").dataset.round = k;
  $("round-total").textContent = state.total ? ` of ${state.total}` : "";
  $("progress-bar").hidden = !state.total;
  if (state.total) $("progress-bar").firstElementChild.style.width = Math.min(100, (100 * k) / state.total) + "%";
  const li = document.querySelector(`#run-list li[data-run="${CSS.escape(state.run)}"] small`);
  if (li) li.textContent = `${k} round${k === 1 ? "" : "s"}`;
  renderTiles(last);
  renderCharts();
  renderRejected();
  renderVersions();
}

function renderTiles(last) {
  const rounds = state.rounds, name = headline();
  $("tile-metric-name").textContent = name || "metric";
  $("tile-metric").textContent = last && name ? fmt(last.metrics[name]) : "–";
  const vals = rounds.filter((r) => r.metrics[name] !== null && r.metrics[name] !== undefined);
  if (name && vals.length > 1) {
    const best = vals.reduce((a, r) => ((lowerIsBetter(name) ? r.metrics[name] < a.metrics[name] : r.metrics[name] > a.metrics[name]) ? r : a));
    $("tile-metric-best").textContent = `best ${fmt(best.metrics[name])} (round ${best.round})`;
  } else $("tile-metric-best").textContent = "";
  const nrej = last ? Object.keys(last.rejected).length : 0;
  $("tile-clients").textContent = last ? `${last.num_clients}${nrej ? " / " + (last.num_clients + nrej) : ""}` : "–";
  $("tile-clients-note").textContent = last ? (nrej ? `${nrej} rejected` : `${last.num_examples.toLocaleString("en-US")} examples`) : "";
  const down = rounds.reduce((a, r) => a + r.bytes_down, 0), up = rounds.reduce((a, r) => a + r.bytes_up, 0);
  $("tile-traffic").textContent = rounds.length ? bytes(down + up) : "–";
  $("tile-traffic-note").textContent = rounds.length ? `${bytes(down)} down · ${bytes(up)} up` : "";
  const secs = rounds.map((r) => r.seconds).filter((s) => s !== null);
  $("tile-time").textContent = last && last.seconds !== null ? fmt(last.seconds, 3) + " s" : "–";
  $("tile-time-note").textContent = secs.length > 1 ? `mean ${fmt(secs.reduce((a, b) => a + b, 0) / secs.length, 3)} s` : "";
  const eps = last ? last.metrics.dp_epsilon : null;
  const dp = eps !== null && eps !== undefined;
  $("tile-eps-box").hidden = !dp;
  $("epsilon").hidden = !dp;
  if (dp) { $("tile-eps").textContent = fmt(eps, 3); $("epsilon").textContent = "ε = " + fmt(eps, 3); }
}

function renderCharts() {
  const rounds = state.rounds, charts = $("charts");
  for (const name of metricNames(rounds)) {
    let fig = charts.querySelector(`figure[data-metric="${CSS.escape(name)}"]`);
    if (!fig) {
      fig = document.createElement("figure");
      fig.dataset.metric = name;
      fig.innerHTML = `<figcaption></figcaption><canvas></canvas>`;
      fig.firstChild.textContent = name === "dp_epsilon" ? "dp_epsilon (ε spent)" : name;
      charts.insertBefore(fig, $("fig-clients"));
    }
    FedChart.line(fig.querySelector("canvas"), [{ name, points: rounds.map((r) => [r.round, r.metrics[name] ?? null]) }], { zero: name === "dp_epsilon" });
  }
  FedChart.bars($("chart-clients"), [
    { name: "accepted", points: rounds.map((r) => [r.round, r.num_clients]) },
    { name: "rejected", points: rounds.map((r) => [r.round, Object.keys(r.rejected).length]), color: "#dc2626" },
  ], { stacked: true, integer: true, legend: false });
  const [div, unit] = units(Math.max(1, ...rounds.map((r) => Math.max(r.bytes_down, r.bytes_up))));
  $("bytes-caption").textContent = `traffic per round (${unit})`;
  FedChart.bars($("chart-bytes"), [
    { name: "down", points: rounds.map((r) => [r.round, r.bytes_down / div]) },
    { name: "up", points: rounds.map((r) => [r.round, r.bytes_up / div]) },
  ]);
}

function renderRejected() {
  const body = $("rejected").tBodies[0];
  const rows = [];
  for (const r of state.rounds) for (const [cid, why] of Object.entries(r.rejected)) rows.push([r.round, cid, why]);
  $("no-rejections").hidden = rows.length > 0;
  $("rejected-count").textContent = rows.length ? `(${rows.length}${rows.length > 20 ? ", the latest 20" : ""})` : "";
  body.innerHTML = "";
  for (const [rnd, cid, why] of rows.slice(-20).reverse()) {
    const tr = body.insertRow();
    tr.insertCell().textContent = rnd;
    tr.insertCell().textContent = cid;
    const td = tr.insertCell(); td.textContent = why; td.className = "reason";
  }
}

function renderVersions() {
  const body = $("versions").tBodies[0];
  const name = headline();
  $("versions-metric").textContent = name || "metric";
  body.innerHTML = "";
  for (const v of [...state.versions].reverse()) {
    const tr = body.insertRow();
    tr.insertCell().textContent = v.version;
    const m = name ? v.metrics[name] : undefined;
    tr.insertCell().textContent = m === undefined ? "" : fmt(m);
    tr.insertCell().textContent = v.created ? new Date(v.created * 1000).toLocaleTimeString() : "";
  }
}

// a request the service refused (a missing token: open the page as /?access_token=...), shown on the page
function problem(e) {
  const p = $("problem");
  p.hidden = !e;
  if (!e) return;
  p.textContent = e.message + (/\b401\b/.test(e.message) ? " (open this page as /?access_token=YOUR_TOKEN)" : "");
  console.warn("dashboard:", e.message);
}
const refresh = () => loadRuns().then(() => problem(null), problem);

let resizing = null;
window.addEventListener("resize", () => { clearTimeout(resizing); resizing = setTimeout(() => state.run && renderCharts(), 100); });
refresh().then(() => { if (!$("problem").hidden) setConn("lost"); });
setInterval(refresh, 5000);
