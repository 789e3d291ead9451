// The fedloom dashboard: the runs of the store, one run's live progress (server-sent events).
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("access_token");
const withToken = (url) => (token ? url + (url.includes("?") ? "&" : "?") + "access_token=" + encodeURIComponent(token) : url);
const $ = (id) => document.getElementById(id);
const state = { run: null, rounds: [], versions: [], source: null, total: null };

// metric order: test metrics first, then training loss, ε and sparsity
function metricNames(rounds) {
  const names = new Set();
  rounds.forEach((r) => Object.keys(r.metrics).forEach((k) => names.add(k)));
  const rank = (n) => (n.startsWith("test_") ? 0 : n === "train_loss" ? 1 : n === "dp_epsilon" ? 2 : n === "sparsity" ? 3 : n.startsWith("fed_") ? 4 : 5);
  return [...names].filter((n) => rank(n) < 5).sort((a, b) => rank(a) - rank(b));
}

async function getJSON(url) {
  const r = await fetch(withToken(url));
  if (!r.ok) throw new Error(url + ": " + r.status);
  return r.json();
}

async function loadRuns() {
  const runs = await getJSON("api/runs");
  const list = $("run-list");
  list.innerHTML = "";
  $("empty").hidden = runs.length > 0;
  for (const r of runs) {
    const li = document.createElement("li");
    li.dataset.run = r.name;
    li.innerHTML = `<span></span><span class="badge ${r.status}">${r.status}</span>`;
    li.firstChild.textContent = r.name;
    li.onclick = () => selectRun(r.name);
    list.appendChild(li);
  }
  const wanted = params.get("run");
  if (!state.run && runs.length) selectRun(runs.some((r) => r.name === wanted) ? wanted : runs[runs.length - 1].name);
}

async function selectRun(name) {
  if (state.source) state.source.close();
  state.run = name;
  document.querySelectorAll("#run-list li").forEach((li) => li.classList.toggle("active", li.dataset.run === name));
  const snap = await getJSON("api/runs/" + encodeURIComponent(name));
  state.rounds = snap.rounds;
  state.versions = snap.versions;
  state.total = snap.total_rounds;
  $("run").hidden = false;
  $("run-name").textContent = name;
  setStatus(snap.status);
  render();
  const last = state.rounds.length ? state.rounds[state.rounds.length - 1].round : 0;
  const es = new EventSource(withToken(`api/runs/${encodeURIComponent(name)}/events?after=${last}`));
  state.source = es;
  es.onopen = () => setConn("live");
  es.onerror = () => setConn("lost");
  es.addEventListener("round", (e) => {
    const rec = JSON.parse(e.data);
    if (!state.rounds.length || rec.round > state.rounds[state.rounds.length - 1].round) state.rounds.push(rec);
    render();
  });
  es.addEventListener("versions", (e) => { state.versions = JSON.parse(e.data); renderVersions(); });
  es.addEventListener("status", (e) => setStatus(JSON.parse(e.data).status));
}

function setConn(s) { const b = $("conn"); b.dataset.state = s; b.textContent = s === "live" ? "live" : s === "lost" ? "reconnecting" : s; }
function setStatus(s) {
  const b = $("run-status"); b.textContent = s; b.className = "badge " + s;
  const li = document.querySelector(`#run-list li[data-run="${CSS.escape(state.run)}"] .badge`);
  if (li) { li.textContent = s; li.className = "badge " + s; }
}

function headline() {
  const names = metricNames(state.rounds);
  return names.find((n) => n.startsWith("test_")) || names[0];
}

function render() {
  const rounds = state.rounds;
  const last = rounds.length ? rounds[rounds.length - 1] : null;
  const el = $("round");
  el.textContent = last ? last.round : 0;
  el.dataset.round = last ? last.round : 0;
  $("round-total").textContent = state.total ? ` of ${state.total}` : "";
  const eps = last && last.metrics.dp_epsilon;
  $("epsilon").hidden = !(eps > 0);
  if (eps > 0) $("epsilon").textContent = "ε = " + eps.toFixed(3);
  const charts = $("charts");
  const names = metricNames(rounds);
  for (const name of names) {
    let fig = charts.querySelector(`figure[data-metric="${name}"]`);
    if (!fig) {
      fig = document.createElement("figure");
      fig.dataset.metric = name;
      fig.innerHTML = `<figcaption></figcaption><canvas width="480" height="200"></canvas>`;
      fig.firstChild.textContent = name;
      charts.appendChild(fig);
    }
    FedChart.line(fig.querySelector("canvas"), [{ name, points: rounds.map((r) => [r.round, r.metrics[name] ?? null]) }]);
  }
  FedChart.bars($("chart-clients"), [{ name: "clients", points: rounds.map((r) => [r.round, r.num_clients]) }]);
  FedChart.line($("chart-bytes"), [
    { name: "down", points: rounds.map((r) => [r.round, r.bytes_down / 1e6]) },
    { name: "up", points: rounds.map((r) => [r.round, r.bytes_up / 1e6]) },
  ]);
  renderRejected();
  renderVersions();
}

function renderRejected() {
  const body = $("rejected").tBodies[0];
  body.innerHTML = "";
  const rows = [];
  for (const r of state.rounds) for (const [cid, why] of Object.entries(r.rejected)) rows.push([r.round, cid, why]);
  $("no-rejections").hidden = rows.length > 0;
  for (const [rnd, cid, why] of rows.slice(-20).reverse()) {
    const tr = body.insertRow();
    tr.insertCell().textContent = rnd;
    tr.insertCell().textContent = cid;
    const td = tr.insertCell(); td.textContent = why; td.className = "reason";
  }
}

function renderVersions() {
  const body = $("versions").tBodies[0];
  body.innerHTML = "";
  const name = headline();
  for (const v of [...state.versions].reverse()) {
    const tr = body.insertRow();
    tr.insertCell().textContent = v.version;
    const m = name && v.metrics[name];
    tr.insertCell().textContent = m === undefined || m === null ? "" : `${name} ${Number(m).toFixed(4)}`;
    tr.insertCell().textContent = v.created ? new Date(v.created * 1000).toLocaleTimeString() : "";
  }
}

window.addEventListener("resize", () => state.run && render());
loadRuns().catch((e) => { setConn("lost"); console.warn(e); });
setInterval(() => loadRuns().catch(() => {}), 10000);
