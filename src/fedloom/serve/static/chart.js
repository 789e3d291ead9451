// fedloom's small canvas charts for the dashboard: line charts and bar charts (grouped or
// stacked) of (x, y) series over integer rounds, with axes, "nice" ticks, a legend and a hover
// read-out. Written for the dashboard; no library. Each call redraws the canvas at its
// displayed size (sharp on high-DPI screens).
"use strict";

const FedChart = (() => {
  const COLORS = ["#2563eb", "#f97316", "#16a34a", "#9333ea", "#dc2626", "#0891b2"];
  const PAD = { left: 48, right: 12, top: 12, bottom: 22 };
  const FONT = "11px system-ui, -apple-system, 'Segoe UI', sans-serif";

  function setup(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
      canvas.width = Math.round(w * ratio);
      canvas.height = Math.round(h * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, w, h);
    return { ctx, w, h };
  }

  // "nice" ticks covering [lo, hi] in about n steps: {values, step}
  function ticks(lo, hi, n, integer) {
    if (!(hi > lo)) hi = lo + 1;
    let raw = (hi - lo) / Math.max(1, n);
    if (integer) raw = Math.max(1, raw);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw * (1 - 1e-9) && (!integer || Number.isInteger(s))) || 10 * mag;
    const values = [];
    for (let v = Math.floor(lo / step) * step; v <= hi + step * 1e-9; v += step) values.push(+v.toPrecision(12));
    if (values[values.length - 1] < hi) values.push(+(values[values.length - 1] + step).toPrecision(12));
    return { values, step };
  }

  // a tick label with as many decimals as the step needs (1.5k / 2.1M for large values)
  function label(v, step) {
    const a = Math.abs(v);
    if (a >= 1e6) return +(v / 1e6).toPrecision(3) + "M";
    if (a >= 1e4) return +(v / 1e3).toPrecision(3) + "k";
    if (a !== 0 && a < 1e-4) return v.toExponential(1);
    let decimals = 0; // as many as the step has: 0.25 -> 2, 0.5 -> 1, 20 -> 0
    while (decimals < 6 && Math.abs(step * 10 ** decimals - Math.round(step * 10 ** decimals)) > 1e-6) decimals++;
    return v.toFixed(decimals);
  }

  function value(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    return Math.abs(v) >= 1e4 || Number.isInteger(v) ? v.toLocaleString("en-US", { maximumFractionDigits: 1 }) : (+v.toPrecision(4)).toString();
  }

  // axes and grid for x in [xmin, xmax] (rounds), y in [ymin, ymax]; returns the scales
  function frame(ctx, w, h, xr, yr, opts) {
    const x0 = PAD.left, x1 = w - PAD.right, y0 = h - PAD.bottom, y1 = PAD.top;
    let [xmin, xmax] = xr, [ymin, ymax] = yr;
    if (xmin === xmax) { xmin -= 1; xmax += 1; }
    if (ymin === ymax) { const d = Math.abs(ymin) * 0.1 || 1; ymin = ymin - d; ymax = ymax + d; if (opts.zero) ymin = Math.max(0, ymin); }
    const yt = ticks(ymin, ymax, Math.max(2, Math.floor((y0 - y1) / 40)), opts.integer);
    ymin = yt.values[0]; ymax = yt.values[yt.values.length - 1];
    const sx = (x) => x0 + ((x - xmin) / (xmax - xmin)) * (x1 - x0);
    const sy = (y) => y0 - ((y - ymin) / (ymax - ymin)) * (y0 - y1);
    ctx.font = FONT; ctx.lineWidth = 1;
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    for (const t of yt.values) {
      ctx.strokeStyle = "#eef0f3"; ctx.beginPath(); ctx.moveTo(x0, Math.round(sy(t)) + 0.5); ctx.lineTo(x1, Math.round(sy(t)) + 0.5); ctx.stroke();
      ctx.fillStyle = "#6b7280"; ctx.fillText(label(t, yt.step), x0 - 6, sy(t));
    }
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    const lo = Math.ceil(xr[0]), hi = Math.floor(xr[1]);
    const xt = ticks(lo, Math.max(hi, lo + 1), Math.max(1, Math.floor((x1 - x0) / 56)), true);
    for (const t of xt.values) if (t >= xmin && t <= xmax) ctx.fillText(String(t), sx(t), y0 + 5);
    ctx.strokeStyle = "#9ca3af";
    ctx.beginPath(); ctx.moveTo(x0 + 0.5, y1); ctx.lineTo(x0 + 0.5, y0 + 0.5); ctx.lineTo(x1, y0 + 0.5); ctx.stroke();
    return { sx, sy, x0, x1, y0, y1, xmin, xmax };
  }

  const finite = (p) => p[1] !== null && p[1] !== undefined && isFinite(p[1]);

  function drawLine(canvas, series, opts, hover) {
    const { ctx, w, h } = setup(canvas);
    const pts = series.flatMap((s) => s.points).filter(finite);
    if (!pts.length) return empty(ctx, w, h);
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const f = frame(ctx, w, h, [Math.min(...xs), Math.max(...xs)], [opts.zero ? Math.min(0, ...ys) : Math.min(...ys), Math.max(...ys)], opts);
    series.forEach((s, i) => {
      const good = s.points.filter(finite);
      ctx.strokeStyle = ctx.fillStyle = s.color || COLORS[i % COLORS.length];
      ctx.lineWidth = 2; ctx.lineJoin = "round"; ctx.setLineDash(s.dash || []);
      ctx.beginPath();
      good.forEach((p, j) => (j ? ctx.lineTo(f.sx(p[0]), f.sy(p[1])) : ctx.moveTo(f.sx(p[0]), f.sy(p[1]))));
      ctx.stroke(); ctx.setLineDash([]);
      if (good.length <= 30) good.forEach((p) => { ctx.beginPath(); ctx.arc(f.sx(p[0]), f.sy(p[1]), 2.5, 0, 7); ctx.fill(); });
    });
    if (series.length > 1 && opts.legend !== false) legend(ctx, w, series);
    if (hover !== null) readout(ctx, f, series, hover);
    return f;
  }

  function drawBars(canvas, series, opts, hover) {
    const { ctx, w, h } = setup(canvas);
    const pts = series.flatMap((s) => s.points).filter(finite);
    if (!pts.length) return empty(ctx, w, h);
    const xs = [...new Set(pts.map((p) => p[0]))];
    const tops = opts.stacked ? xs.map((x) => series.reduce((a, s) => a + (s.points.find((p) => p[0] === x)?.[1] || 0), 0)) : pts.map((p) => p[1]);
    const f = frame(ctx, w, h, [Math.min(...xs) - 0.5, Math.max(...xs) + 0.5], [0, Math.max(...tops)], { ...opts, zero: true });
    const slot = Math.max(1, (f.sx(1) - f.sx(0)) * 0.8), each = opts.stacked ? slot : slot / series.length;
    const base = new Map();
    series.forEach((s, i) => {
      ctx.fillStyle = s.color || COLORS[i % COLORS.length];
      for (const [x, y] of s.points.filter(finite)) {
        const b = opts.stacked ? base.get(x) || 0 : 0;
        const left = f.sx(x) - slot / 2 + (opts.stacked ? 0 : i * each);
        ctx.fillRect(left, f.sy(b + y), Math.max(1, each - (slot > 6 ? 1 : 0)), f.sy(b) - f.sy(b + y));
        if (opts.stacked) base.set(x, b + y);
      }
    });
    if (series.length > 1 && opts.legend !== false) legend(ctx, w, series);
    if (hover !== null) readout(ctx, f, series, hover);
    return f;
  }

  function legend(ctx, w, series) {
    ctx.font = FONT; ctx.textAlign = "right"; ctx.textBaseline = "top";
    let x = w - PAD.right;
    for (let i = series.length - 1; i >= 0; i--) {
      const name = series[i].name, tw = ctx.measureText(name).width;
      ctx.fillStyle = "#374151"; ctx.fillText(name, x, 1);
      ctx.fillStyle = series[i].color || COLORS[i % COLORS.length]; ctx.fillRect(x - tw - 12, 3, 8, 8);
      x -= tw + 24;
    }
  }

  // a vertical guide at round x and the series' values there
  function readout(ctx, f, series, x) {
    const px = f.sx(x);
    ctx.strokeStyle = "rgba(17,24,39,.35)"; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(Math.round(px) + 0.5, f.y1); ctx.lineTo(Math.round(px) + 0.5, f.y0); ctx.stroke();
    const lines = ["round " + x, ...series.map((s) => s.name + ": " + value(s.points.find((p) => p[0] === x)?.[1]))];
    ctx.font = FONT;
    const bw = Math.max(...lines.map((l) => ctx.measureText(l).width)) + 12, bh = lines.length * 14 + 6;
    const bx = px + 8 + bw > f.x1 ? px - 8 - bw : px + 8, by = f.y1 + 4;
    ctx.fillStyle = "rgba(17,24,39,.88)"; ctx.fillRect(bx, by, bw, bh);
    ctx.fillStyle = "#ffffff"; ctx.textAlign = "left"; ctx.textBaseline = "top";
    lines.forEach((l, i) => ctx.fillText(l, bx + 6, by + 4 + i * 14));
  }

  function empty(ctx, w, h) {
    ctx.fillStyle = "#9ca3af"; ctx.font = "12px system-ui, sans-serif"; ctx.textAlign = "center"; ctx.textBaseline = "middle";
    ctx.fillText("no data yet", w / 2, h / 2);
    return null;
  }

  // draw now, and keep what is needed to redraw with a read-out under the pointer
  function chart(draw) {
    return (canvas, series, opts = {}) => {
      const state = (canvas._fedchart = canvas._fedchart || { hover: null });
      Object.assign(state, { draw, series, opts });
      state.frame = draw(canvas, series, opts, state.hover);
      if (!state.bound) {
        state.bound = true;
        canvas.addEventListener("mousemove", (e) => {
          const f = state.frame;
          if (!f) return;
          const xs = [...new Set(state.series.flatMap((s) => s.points.map((p) => p[0])))];
          const at = (e.offsetX - f.x0) / (f.x1 - f.x0) * (f.xmax - f.xmin) + f.xmin;
          const near = xs.reduce((a, b) => (Math.abs(b - at) < Math.abs(a - at) ? b : a), xs[0]);
          if (near !== state.hover) { state.hover = near; state.frame = state.draw(canvas, state.series, state.opts, near); }
        });
        canvas.addEventListener("mouseleave", () => { state.hover = null; state.frame = state.draw(canvas, state.series, state.opts, null); });
      }
    };
  }

  return { line: chart(drawLine), bars: chart(drawBars), ticks, label };
})();
