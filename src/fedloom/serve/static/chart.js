// fedloom's small canvas charts: line charts of (x, y) series and bar charts. Written for
// the dashboard; no library. Each call redraws the whole canvas at its displayed size.
"use strict";

const FedChart = (() => {
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];
  const PAD = { left: 52, right: 10, top: 10, bottom: 24 };

  function setup(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
      canvas.width = Math.round(w * ratio);
      canvas.height = Math.round(h * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, w, h);
    return { ctx, w, h };
  }

  // "nice" tick values covering [lo, hi]
  function ticks(lo, hi, n) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  function label(v) {
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
    return a >= 100 ? v.toFixed(0) : a >= 1 ? v.toFixed(2) : v.toFixed(3);
  }

  function frame(ctx, w, h, xs, ys) {
    const x0 = PAD.left, x1 = w - PAD.right, y0 = h - PAD.bottom, y1 = PAD.top;
    let [xmin, xmax] = [Math.min(...xs), Math.max(...xs)];
    let [ymin, ymax] = [Math.min(...ys), Math.max(...ys)];
    if (xmin === xmax) { xmin -= 1; xmax += 1; }
    if (ymin === ymax) { const d = Math.abs(ymin) * 0.1 || 1; ymin -= d; ymax += d; }
    const yt = ticks(ymin, ymax, 4);
    ymin = Math.min(ymin, yt[0]); ymax = Math.max(ymax, yt[yt.length - 1]);
    const sx = (x) => x0 + ((x - xmin) / (xmax - xmin)) * (x1 - x0);
    const sy = (y) => y0 - ((y - ymin) / (ymax - ymin)) * (y0 - y1);
    ctx.strokeStyle = "#e5e7eb"; ctx.fillStyle = "#6b7280"; ctx.lineWidth = 1;
    ctx.font = "11px system-ui, sans-serif"; ctx.textAlign = "right"; ctx.textBaseline = "middle";
    for (const t of yt) {
      ctx.beginPath(); ctx.moveTo(x0, sy(t)); ctx.lineTo(x1, sy(t)); ctx.stroke();
      ctx.fillText(label(t), x0 - 6, sy(t));
    }
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    for (const t of ticks(xmin, xmax, Math.max(2, Math.floor((x1 - x0) / 70)))) {
      if (Number.isInteger(t)) ctx.fillText(String(t), sx(t), y0 + 6);
    }
    ctx.strokeStyle = "#9ca3af";
    ctx.beginPath(); ctx.moveTo(x0, y1); ctx.lineTo(x0, y0); ctx.lineTo(x1, y0); ctx.stroke();
    return { sx, sy };
  }

  // series: [{name, points: [[x, y], ...]}]
  function line(canvas, series) {
    const { ctx, w, h } = setup(canvas);
    const pts = series.flatMap((s) => s.points).filter((p) => p[1] !== null && isFinite(p[1]));
    if (!pts.length) { empty(ctx, w, h); return; }
    const { sx, sy } = frame(ctx, w, h, pts.map((p) => p[0]), pts.map((p) => p[1]));
    series.forEach((s, i) => {
      const good = s.points.filter((p) => p[1] !== null && isFinite(p[1]));
      ctx.strokeStyle = COLORS[i % COLORS.length]; ctx.fillStyle = ctx.strokeStyle; ctx.lineWidth = 2;
      ctx.beginPath();
      good.forEach((p, j) => (j ? ctx.lineTo(sx(p[0]), sy(p[1])) : ctx.moveTo(sx(p[0]), sy(p[1]))));
      ctx.stroke();
      if (good.length < 40) good.forEach((p) => { ctx.beginPath(); ctx.arc(sx(p[0]), sy(p[1]), 2.5, 0, 7); ctx.fill(); });
    });
    legend(ctx, w, series.map((s) => s.name));
  }

  // bars: [{name, points: [[x, y], ...]}] drawn side by side per x
  function bars(canvas, series) {
    const { ctx, w, h } = setup(canvas);
    const pts = series.flatMap((s) => s.points);
    if (!pts.length) { empty(ctx, w, h); return; }
    const xs = pts.map((p) => p[0]);
    const { sx, sy } = frame(ctx, w, h, [Math.min(...xs) - 0.5, Math.max(...xs) + 0.5], [0, ...pts.map((p) => p[1])]);
    const slot = Math.max(1, (sx(1) - sx(0)) * 0.8), each = slot / series.length;
    series.forEach((s, i) => {
      ctx.fillStyle = COLORS[i % COLORS.length];
      for (const [x, y] of s.points) ctx.fillRect(sx(x) - slot / 2 + i * each, sy(y), Math.max(1, each - 1), sy(0) - sy(y));
    });
    if (series.length > 1) legend(ctx, w, series.map((s) => s.name));
  }

  function legend(ctx, w, names) {
    ctx.font = "11px system-ui, sans-serif"; ctx.textAlign = "right"; ctx.textBaseline = "top";
    let y = PAD.top + 2;
    names.forEach((n, i) => {
      ctx.fillStyle = COLORS[i % COLORS.length];
      ctx.fillRect(w - PAD.right - 10, y + 2, 8, 8);
      ctx.fillStyle = "#374151";
      ctx.fillText(n, w - PAD.right - 14, y);
      y += 14;
    });
  }

  function empty(ctx, w, h) {
    ctx.fillStyle = "#9ca3af"; ctx.font = "12px system-ui, sans-serif"; ctx.textAlign = "center";
    ctx.fillText("no data yet", w / 2, h / 2);
  }

  return { line, bars };
})();
