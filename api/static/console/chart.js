// The timeline chart of one belief (uPlot, vendored): each value's confidence over time
// from the history (a step per change), and every event of the trace marked on the time
// axis, coloured by its status.

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];
const MARKS = { counting: "#1a7f37", superseded: "#8c959f", retracted: "#b42318", retraction: "#8250df", erased: "#000000", retraction_ignored: "#9a6700" };

export const colorClass = (i) => `sw${i % COLORS.length}`;
export const markClass = (status) => `mk-${status}`;

/** The values in order of first appearance, and per change the confidence of each. */
export function seriesOf(history) {
  const values = [];
  for (const c of history.changes) {
    for (const v of [c.value, ...Object.keys(c.alternatives || {})]) {
      if (v !== null && v !== undefined && !values.includes(v)) values.push(v);
    }
  }
  const xs = history.changes.map((c) => new Date(c.recorded_at).getTime() / 1000);
  const ys = values.map((v) => history.changes.map((c) => {
    if (c.value === v) return c.confidence;
    if (c.alternatives && v in c.alternatives) return c.alternatives[v];
    return c.value === null ? null : 0;
  }));
  return { values, xs, ys };
}

/**
 * Draw into `container`; returns {destroy}. `events` are the trace's events
 * ({recorded_at|occurred_at, status}) drawn as ticks along the bottom.
 */
export function drawTimeline(container, history, events, until) {
  const { values, xs, ys } = seriesOf(history);
  if (!xs.length || typeof uPlot === "undefined") return { destroy() {} };
  // A last point at `until` (now) keeps the final step visible up to the present.
  const times = events.map((e) => new Date(e.recorded_at || e.occurred_at).getTime() / 1000);
  const end = Math.max(xs[xs.length - 1] + 1, ...times, until.getTime() / 1000);
  const data = [[...xs, end], ...ys.map((y) => [...y, y[y.length - 1]])];
  const stepped = uPlot.paths && uPlot.paths.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined;
  const width = () => Math.max(280, Math.floor(container.getBoundingClientRect().width) - 4);
  const marks = events.map((e, i) => ({ t: times[i], color: MARKS[e.status] || "#57606a" }));
  const opts = {
    width: width(),
    height: 260,
    scales: { x: { time: true }, y: { range: [0, 1] } },
    axes: [{}, { label: "confidence", values: (u, splits) => splits.map((v) => v.toFixed(1)) }],
    series: [{ label: "time" }, ...values.map((v, i) => ({
      label: v, stroke: COLORS[i % COLORS.length], width: 2, paths: stepped,
      points: { show: true, size: 6 }, value: (u, y) => (y === null || y === undefined ? "—" : y.toFixed(3)),
    }))],
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx;
        const { top, height } = u.bbox;
        ctx.save();
        const tick = 14 * devicePixelRatio;
        for (const m of marks) {
          const x = Math.round(u.valToPos(m.t, "x", true));
          ctx.fillStyle = m.color;
          ctx.globalAlpha = 0.25;
          ctx.fillRect(x, top, Math.max(1, devicePixelRatio), height);
          ctx.globalAlpha = 1;
          ctx.fillRect(x - 2 * devicePixelRatio, top + height - tick, 4 * devicePixelRatio, tick);
        }
        ctx.restore();
      }],
    },
  };
  // When the events are bunched far before now (all appended within seconds, viewed
  // minutes later), open on the events' span; a double-click shows the range up to now.
  const first = Math.min(xs[0], ...times);
  const last = Math.max(xs[xs.length - 1], ...times);
  const span = last - first;
  const plot = new uPlot(opts, data, container);
  if (end - last > 2 * span) {
    const pad = span > 0 ? span * 0.1 : 1;
    requestAnimationFrame(() => plot.setScale("x", { min: first - pad, max: last + pad * 3 }));
  }
  const resize = () => plot.setSize({ width: width(), height: 260 });
  window.addEventListener("resize", resize);
  return { destroy() { window.removeEventListener("resize", resize); plot.destroy(); } };
}
