// Small DOM and formatting helpers. Data from the API is only ever set as text, never
// as HTML.

/** h("td", {class: "num", "data-label": "x"}, "text", node, ...) → an element. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** A table with a caption; rows are arrays of cells ({text|node, class}); cells are
 * labelled with their column for the stacked phone layout. */
export function table(caption, columns, rows, { id, cards = true } = {}) {
  const head = h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.num ? "num" : null }, c.label))));
  const body = h("tbody", {}, rows.map((row) => {
    const tr = h("tr", row.attrs || {});
    row.cells.forEach((cell, i) => {
      const col = columns[i];
      const td = h("td", { "data-label": col.label, class: [col.num ? "num" : "", col.cls || "", cell.cls || ""].join(" ").trim() || null });
      if (cell.node) td.append(cell.node); else td.textContent = cell.text === undefined || cell.text === null ? "—" : String(cell.text);
      tr.append(td);
    });
    return tr;
  }));
  const t = h("table", { class: cards ? "cards" : null, id }, h("caption", {}, caption), head, body);
  return h("div", { class: cards ? "scroll cards-wrap" : "scroll", tabindex: "0", role: "region", "aria-label": caption }, t);
}

export function fmtTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z").replace(/Z$/, " UTC");
}

export function fmtConf(x) {
  return x === null || x === undefined ? "—" : Number(x).toFixed(3);
}

export function fmtNum(x, digits = 3) {
  return x === null || x === undefined ? "—" : (x >= 0 ? "+" : "") + Number(x).toFixed(digits);
}

/** Seconds → "42 s", "5 min", "3 h", "2.5 d". */
export function fmtAge(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  const s = Math.max(0, seconds);
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(s < 36000 ? 1 : 0)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

/** A belief's age in seconds: the API's age_s when it sends one, else from
 * last_observed_at to `at` (now, or the as-of instant). */
export function ageOf(belief, at) {
  if (typeof belief.age_s === "number") return belief.age_s;
  return (at.getTime() - new Date(belief.last_observed_at).getTime()) / 1000;
}

/** Staleness from the context's half-life H: the weight left, 2^(-age/H) (the fold's
 * recency factor); fresh ≥ 0.9 > aging ≥ 0.5 > stale. */
export function staleness(ageS, halfLifeS) {
  const left = Math.pow(2, -Math.max(0, ageS) / halfLifeS);
  const label = left >= 0.9 ? "fresh" : left >= 0.5 ? "aging" : "stale";
  const cls = left >= 0.9 ? "good" : left >= 0.5 ? "warn" : "bad";
  return { left, label, cls };
}

export function confidenceCell(value) {
  return h("span", { class: "conf" },
    h("meter", { min: "0", max: "1", low: "0.5", high: "0.8", optimum: "1", value: String(value), "aria-label": `confidence ${fmtConf(value)}` }),
    h("span", { class: "mono" }, fmtConf(value)));
}

export function badge(text, cls) {
  return h("span", { class: `badge ${cls}` }, text);
}

export function announce(text) {
  const status = document.getElementById("status");
  if (status) status.textContent = text;
}
