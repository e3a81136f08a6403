// The auditor's console: a single page whose views are #/ routes.
//   #/                         find a subject
//   #/s/ID[?as_of=T&time=AXIS]  its self-model (now, or as of T), projections, access log
//   #/s/ID/b/CONTEXT/ATTRIBUTE  one belief: timeline chart, history, full trace

import { ApiError, enc, get, paths, post } from "./api.js";
import { colorClass, drawTimeline, markClass, seriesOf } from "./chart.js";
import {
  ageOf, announce, badge, confidenceCell, fmtAge, fmtConf, fmtNum, fmtTime, h, staleness, table,
} from "./format.js";
import { watchSubject } from "./live.js";

const main = document.getElementById("main");
let me = null;            // /console/me
let cleanup = [];         // what the current view must stop when left

function leaveView() {
  for (const stop of cleanup) stop();
  cleanup = [];
}

function show(...nodes) {
  main.replaceChildren(...nodes);
}

function errorBox(err) {
  return h("div", { class: "alert", role: "alert" }, err instanceof ApiError ? `${err.status}: ${err.message}` : String(err));
}

function halfLife(context) {
  return (me.half_lives && me.half_lives[context]) || me.default_half_life_s;
}

// ---- session -------------------------------------------------------------------------

function renderSession() {
  const nav = document.getElementById("session");
  nav.replaceChildren();
  if (!me || !me.authenticated) return;
  const c = me.caller;
  nav.append(
    h("span", {}, "agent ", h("strong", {}, c.agent), c.admin ? " (admin)" : ""),
    h("span", {}, `reads ${c.read.join(", ") || "nothing"}`),
  );
  if (c.auth) {
    nav.append(h("button", { type: "button", onclick: logout }, "Log out"));
  }
}

async function logout() {
  try { await post("/console/logout"); } catch (_) { /* the cookie is cleared anyway */ }
  me = null;
  renderSession();
  location.hash = "#/";
  loginView();
}

function loginView(reason) {
  leaveView();
  main.dataset.view = "login";
  const input = h("input", { id: "key", name: "key", type: "password", autocomplete: "off", required: true, spellcheck: "false", placeholder: "bsk_…" });
  const out = h("div", { "aria-live": "polite" });
  const form = h("form", { class: "login", onsubmit: async (ev) => {
    ev.preventDefault();
    out.replaceChildren();
    try {
      await post("/console/session", { key: input.value.trim() });
      input.value = "";
      await start();
    } catch (err) {
      out.replaceChildren(errorBox(err));
    }
  } },
  h("div", {}, h("label", { for: "key" }, "API key")),
  h("p", {}, input),
  h("p", {}, h("button", { type: "submit" }, "Log in")));
  show(
    h("h1", {}, "Log in"),
    reason ? h("p", { class: "muted" }, reason) : null,
    h("p", {}, "Log in with an API key, or run ", h("code", {}, "beliefstore console"),
      " for a one-time link (it expires in 5 minutes and works once). The key is exchanged for an HTTP-only session cookie; it is never put in a URL."),
    form, out);
  input.focus();
}

// ---- find a subject ------------------------------------------------------------------

function searchView() {
  const input = h("input", { id: "prefix", type: "search", autocomplete: "off", placeholder: "customer-…" });
  const results = h("div", { id: "results", "aria-live": "polite" });
  let timer = null;
  const run = async () => {
    try {
      const found = await get(paths.subjects(), { prefix: input.value.trim(), limit: 50 });
      results.replaceChildren(found.length ? table(
        input.value.trim() ? `Subjects starting with “${input.value.trim()}”` : "Most recently observed subjects",
        [{ label: "subject" }, { label: "contexts" }, { label: "beliefs", num: true }, { label: "observations", num: true }, { label: "last observed", cls: "time" }, { label: "state" }],
        found.map((s) => ({ cells: [
          { node: h("a", { href: `#/s/${enc(s.subject_id)}` }, s.subject_id) },
          { text: s.contexts.join(", ") },
          { text: s.beliefs },
          { text: s.observations },
          { text: fmtTime(s.last_observed_at) },
          { node: s.erased ? badge("erased", "bad") : badge("live", "good") },
        ] })),
        { id: "subjects" }) : h("p", { class: "muted" }, "No subject with observations you may read matches."));
    } catch (err) {
      results.replaceChildren(errorBox(err));
    }
  };
  const form = h("form", { class: "inline", role: "search", onsubmit: (ev) => { ev.preventDefault(); run(); } },
    h("div", {}, h("label", { for: "prefix" }, "Subject id (or its beginning)"), input),
    h("button", { type: "submit" }, "Find"));
  input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(run, 250); });
  show(h("h1", {}, "Find a subject"), form, results);
  run();
  input.focus();
}

// ---- a subject's self-model ------------------------------------------------------------

function parseQuery(q) {
  return Object.fromEntries(new URLSearchParams(q || ""));
}

function toLocalInput(iso) {
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** Links to the trace of every observed key without a current belief (retracted, or
 * erased): an auditor can still follow what happened, values stay hidden. */
function otherKeys(subject, summary, model) {
  const believed = new Set();
  for (const [context, beliefs] of Object.entries((model && model.contexts) || {})) {
    for (const b of beliefs) believed.add(`${context}/${b.attribute}`);
  }
  const rest = summary.keys.filter((k) => !believed.has(k));
  if (!rest.length) return null;
  return h("section", { "aria-labelledby": "other-keys-h" },
    h("h3", { id: "other-keys-h" }, "Observed, with no current belief"),
    h("ul", { id: "other-keys" }, rest.map((k) => {
      const [context, ...attr] = k.split("/");
      const attribute = attr.join("/");
      return h("li", {}, h("a", { href: `#/s/${enc(subject)}/b/${enc(context)}/${enc(attribute)}` }, k), " — trace and history");
    })));
}

function beliefRows(subject, model, at, flashKey) {
  const sections = [];
  const contexts = Object.keys(model.contexts).sort();
  for (const context of contexts) {
    const beliefs = model.contexts[context];
    sections.push(h("section", { "aria-labelledby": `ctx-${context}` },
      h("h3", { id: `ctx-${context}` }, context, h("span", { class: "muted" }, ` · half-life ${fmtAge(halfLife(context))}`)),
      table(`Beliefs in ${context}`,
        [{ label: "attribute" }, { label: "value", cls: "value" }, { label: "confidence" }, { label: "alternatives" }, { label: "sources" }, { label: "age", num: true }, { label: "staleness" }],
        beliefs.map((b) => {
          const age = ageOf(b, at);
          const st = staleness(age, halfLife(context));
          const alts = Object.entries(b.alternatives || {}).sort((x, y) => y[1] - x[1]);
          const key = `${context}/${b.attribute}`;
          return {
            attrs: { "data-key": key, class: flashKey && flashKey === key ? "flash" : null },
            cells: [
              { node: h("a", { href: `#/s/${enc(subject)}/b/${enc(context)}/${enc(b.attribute)}`, title: "timeline and trace" }, b.attribute) },
              { text: b.value },
              { node: confidenceCell(b.confidence) },
              { text: alts.length ? alts.map(([v, c]) => `${v} ${fmtConf(c)}`).join(", ") : "—" },
              { text: b.sources.join(", ") },
              { text: fmtAge(age) },
              { node: h("span", { title: `${Math.round(st.left * 100)}% of the evidence's weight is left after decay (half-life ${fmtAge(halfLife(context))})` }, badge(st.label, st.cls), ` ${Math.round(st.left * 100)}%`) },
            ],
          };
        }),
        { id: `beliefs-${context}` })));
  }
  return sections;
}

async function projectionsPanel() {
  const box = h("section", { "aria-labelledby": "proj-h" }, h("h2", { id: "proj-h" }, "Read models (projections)"));
  try {
    const list = await get(paths.projections());
    box.append(table("Projections; the API serves the active one",
      [{ label: "name" }, { label: "schema" }, { label: "status" }, { label: "served" }, { label: "created", cls: "time" }, { label: "switched", cls: "time" }],
      list.map((p) => ({ cells: [
        { text: p.name }, { text: p.schema_name, cls: "mono" }, { text: p.status },
        { node: p.active ? badge("served", "good") : h("span", { class: "muted" }, "no") },
        { text: fmtTime(p.created_at) }, { text: fmtTime(p.switched_at) },
      ] })), { id: "projections" }));
  } catch (err) {
    box.append(errorBox(err));
  }
  return box;
}

function accessLogPanel(subject) {
  const out = h("div", { "aria-live": "polite" });
  const button = h("button", { type: "button", class: "secondary", onclick: async () => {
    button.disabled = true;
    out.replaceChildren(h("p", { class: "muted" }, "Reading the access topic…"));
    try {
      const log = await get(paths.accessLog(subject));
      out.replaceChildren(log.records.length ? table(`Reads of ${subject} (topic ${log.topic})`,
        [{ label: "at", cls: "time" }, { label: "agent" }, { label: "key" }, { label: "endpoint" }, { label: "contexts" }, { label: "attribute" }, { label: "as of" }, { label: "count", num: true }, { label: "kafka" }],
        log.records.map((r) => ({ cells: [
          { text: fmtTime(r.at) }, { text: r.agent }, { text: r.key_id, cls: "mono" }, { text: r.endpoint },
          { text: r.contexts.join(", ") }, { text: r.attribute }, { text: r.as_of }, { text: r.count },
          { text: `p${r.partition}@${r.offset}`, cls: "mono" },
        ] })), { id: "access-log" }) : h("p", { class: "muted" }, "No read of this subject is recorded yet."));
    } catch (err) {
      out.replaceChildren(errorBox(err));
    }
    button.disabled = false;
  } }, "Load the access log");
  return h("section", { "aria-labelledby": "acc-h" }, h("h2", { id: "acc-h" }, "Access log"),
    h("p", { class: "muted" }, "Which agents read this person's beliefs (admin keys only)."), button, out);
}

async function subjectView(subject, query) {
  const q = parseQuery(query);
  const asOf = q.as_of || null;
  const axis = q.time === "occurred" ? "occurred" : "recorded";
  const liveText = h("span", { id: "live-mode" }, asOf ? "paused (as-of view)" : "connecting…");
  const heading = h("h1", {}, subject);
  const summaryBox = h("div");
  const modelBox = h("div", { id: "self-model", "aria-live": "polite" });
  const asOfInput = h("input", { id: "as-of", type: "datetime-local", step: "1", value: asOf ? toLocalInput(asOf) : "" });
  const axisSelect = h("select", { id: "axis" },
    h("option", { value: "recorded", selected: axis === "recorded" }, "recorded: what the system believed then"),
    h("option", { value: "occurred", selected: axis === "occurred" }, "occurred: what we now know was true then"));
  const asOfForm = h("form", { class: "inline", id: "as-of-form", onsubmit: (ev) => {
    ev.preventDefault();
    if (!asOfInput.value) { location.hash = `#/s/${enc(subject)}`; return; }
    const t = new Date(asOfInput.value).toISOString();
    location.hash = `#/s/${enc(subject)}?as_of=${enc(t)}&time=${axisSelect.value}`;
  } },
  h("div", {}, h("label", { for: "as-of" }, "As of (your local time)"), asOfInput),
  h("div", {}, h("label", { for: "axis" }, "Time axis"), axisSelect),
  h("button", { type: "submit" }, "Show then"),
  asOf ? h("a", { href: `#/s/${enc(subject)}`, class: "nowlink" }, "Back to now") : null);

  show(h("p", { class: "crumbs" }, h("a", { href: "#/" }, "Subjects"), " / ", subject),
    heading, summaryBox,
    h("p", { class: "muted" }, "Live updates: ", liveText),
    asOfForm, modelBox);

  const load = async (flashKey) => {
    let summary;
    try {
      summary = (await get(paths.subjects(), { prefix: subject, exact: "true", limit: 1 }))[0];
    } catch (err) {
      modelBox.replaceChildren(errorBox(err));
      return;
    }
    if (!summary) {
      summaryBox.replaceChildren();
      modelBox.replaceChildren(h("p", { class: "note" }, `No observations about ${subject} in the contexts your key may read.`));
      return;
    }
    summaryBox.replaceChildren(h("p", { class: "muted" },
      summary.erased ? badge("erased", "bad") : badge("live", "good"),
      ` ${summary.beliefs} beliefs, ${summary.observations} observations in ${summary.contexts.join(", ")}; last observed ${fmtTime(summary.last_observed_at)}`));
    if (summary.erased && summary.beliefs === 0) {
      asOfForm.hidden = true;
      modelBox.replaceChildren(h("p", { class: "note", id: "erased-note" },
        "This subject was erased: its data keys were destroyed (crypto-shredding), so no value is shown. Traces still list that events existed."),
        otherKeys(subject, summary, null) || "");
      return;
    }
    if (summary.beliefs === 0 && !asOf) {
      modelBox.replaceChildren(h("p", { class: "note" }, "No current belief (every observation was retracted)."),
        otherKeys(subject, summary, null) || "");
      return;
    }
    try {
      const model = await get(paths.selfModel(subject), asOf ? { as_of: asOf, time: axis } : {});
      const at = asOf ? new Date(asOf) : new Date();
      modelBox.replaceChildren(
        h("h2", {}, asOf ? `Self-model as of ${fmtTime(asOf)} (${axis})` : "Self-model now"),
        ...(model.belief_count ? beliefRows(subject, model, at, flashKey) : [h("p", { class: "note" }, "No belief at that instant.")]),
        (!asOf && otherKeys(subject, summary, model)) || "");
      announce(`self-model of ${subject}: ${model.belief_count} beliefs`);
    } catch (err) {
      modelBox.replaceChildren(errorBox(err));
    }
  };
  await load();
  main.append(await projectionsPanel());
  if (me.caller.admin) main.append(accessLogPanel(subject));
  if (!asOf) {
    cleanup.push(watchSubject(subject, (change) => {
      const key = change && change.context && change.attribute ? `${change.context}/${change.attribute}` : null;
      load(key);
    }, (mode) => { liveText.textContent = mode; }));
  }
}

// ---- one belief: timeline and trace ------------------------------------------------------

function traceTable(trace) {
  const rows = trace.events.map((e) => ({
    attrs: { id: `ev-${e.event_id}`, tabindex: "-1" },
    cells: [
      { text: fmtTime(e.occurred_at) }, { text: fmtTime(e.recorded_at) }, { text: e.source }, { text: e.type },
      { text: e.value }, { text: fmtConf(e.confidence) },
      { node: h("span", {}, h("span", { class: `swatch ${markClass(e.status)}`, "aria-hidden": "true" }), e.status) },
      { node: reasonNode(e.reason) },
      { text: e.weight === null ? null : fmtNum(e.weight) }, { text: e.decay === null ? null : Number(e.decay).toFixed(3) },
      { text: e.trust === null || e.trust === undefined ? null : e.trust },
      { text: `p${e.kafka.partition}@${e.kafka.offset}`, cls: "mono" },
      { text: e.writer_fingerprint, cls: "mono" }, { text: e.event_id.slice(0, 8), cls: "mono" },
    ],
  }));
  return table(`Trace: every event of the key (half-life ${fmtAge(trace.half_life_s)})`,
    [{ label: "occurred", cls: "time" }, { label: "recorded", cls: "time" }, { label: "source" }, { label: "type" }, { label: "value", cls: "value" }, { label: "conf", num: true },
      { label: "status" }, { label: "why" }, { label: "weight", num: true }, { label: "decay", num: true }, { label: "trust", num: true },
      { label: "kafka" }, { label: "schema fingerprint" }, { label: "event" }],
    rows, { id: "trace" });
}

/** A reason naming another event ("superseded by 1234abcd-…") links to its row. */
function reasonNode(reason) {
  if (!reason) return document.createTextNode("—");
  const m = reason.match(/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/);
  if (!m) return document.createTextNode(reason);
  const [before, after] = [reason.slice(0, m.index), reason.slice(m.index + m[0].length)];
  const jump = h("button", { type: "button", class: "linkish", onclick: () => {
    const row = document.getElementById(`ev-${m[0]}`);
    if (!row) return;
    document.querySelectorAll("tr.target").forEach((r) => r.classList.remove("target"));
    row.classList.add("target");
    row.scrollIntoView({ block: "center" });
    row.focus();
  } }, m[0].slice(0, 8));
  return h("span", {}, before, jump, after);
}

function historyTable(history) {
  return table("History: the belief after each event that changed it",
    [{ label: "recorded", cls: "time" }, { label: "value", cls: "value" }, { label: "confidence", num: true }, { label: "alternatives" }, { label: "event" }, { label: "source" }, { label: "kafka" }],
    history.changes.map((c) => ({ cells: [
      { text: fmtTime(c.recorded_at) }, { text: c.value === null ? "(no belief)" : c.value }, { text: fmtConf(c.confidence) },
      { text: Object.entries(c.alternatives || {}).map(([v, x]) => `${v} ${fmtConf(x)}`).join(", ") || "—" },
      { text: c.event_type }, { text: c.source }, { text: `p${c.kafka_partition}@${c.kafka_offset}`, cls: "mono" },
    ] })), { id: "history" });
}

async function beliefView(subject, context, attribute) {
  const body = h("div", { "aria-live": "polite" });
  const liveText = h("span", { id: "live-mode" }, "connecting…");
  show(h("p", { class: "crumbs" }, h("a", { href: "#/" }, "Subjects"), " / ", h("a", { href: `#/s/${enc(subject)}` }, subject), ` / ${context}`),
    h("h1", {}, `${context} / ${attribute}`),
    h("p", { class: "muted" }, "Live updates: ", liveText), body);
  let chart = null;
  cleanup.push(() => chart && chart.destroy());
  const load = async () => {
    try {
      const [history, trace] = await Promise.all([
        get(paths.history(subject, context, attribute)), get(paths.trace(subject, context, attribute))]);
      if (chart) chart.destroy();
      const b = trace.belief;
      const facts = h("dl", { class: "facts" },
        h("dt", {}, "value"), h("dd", { id: "belief-value", class: "value" }, b ? b.value : "(no belief: nothing counts)"),
        h("dt", {}, "confidence"), h("dd", {}, b ? confidenceCell(b.confidence) : "—"),
        h("dt", {}, "alternatives"), h("dd", {}, b && Object.keys(b.alternatives).length ? Object.entries(b.alternatives).map(([v, x]) => `${v} ${fmtConf(x)}`).join(", ") : "—"),
        h("dt", {}, "sources"), h("dd", {}, b ? b.sources.join(", ") : "—"),
        h("dt", {}, "half-life"), h("dd", {}, fmtAge(trace.half_life_s)),
        h("dt", {}, "scores"), h("dd", { class: "mono" }, Object.entries(trace.scores).map(([v, s]) => `${v} ${fmtNum(s)}`).join(", ") || "—"));
      const { values } = seriesOf(history);
      const chartBox = h("div", { class: "chart", id: "timeline", role: "img", "aria-label": `Confidence of each value of ${context}/${attribute} over time; the history table below has the same data` });
      const statuses = [...new Set(trace.events.map((e) => e.status))];
      const legend = h("div", { class: "legend" },
        h("span", { class: "muted" }, "values:"),
        values.map((v, i) => h("span", {}, h("span", { class: `swatch ${colorClass(i)}`, "aria-hidden": "true" }), v)),
        h("span", { class: "muted" }, "· events (ticks on the time axis):"),
        statuses.map((s) => h("span", {}, h("span", { class: `swatch ${markClass(s)}`, "aria-hidden": "true" }), s)));
      body.replaceChildren(
        h("section", { class: "panel", "aria-label": "current belief" }, facts),
        h("h2", {}, "Timeline"),
        h("p", { class: "muted" }, "Confidence of each value after every event that changed the belief, by the time the event was appended to the log (drag across the chart to zoom; double-click for the whole range up to now)."),
        legend, chartBox,
        historyTable(history),
        h("h2", {}, "Trace"), traceTable(trace));
      chart = drawTimeline(chartBox, history, trace.events, new Date());
      announce(`trace of ${context}/${attribute}: ${trace.events.length} events`);
    } catch (err) {
      body.replaceChildren(errorBox(err));
    }
  };
  await load();
  cleanup.push(watchSubject(subject, (change) => {
    if (!change || (change.context === context && change.attribute === attribute)) load();
  }, (mode) => { liveText.textContent = mode; }));
}

// ---- router ----------------------------------------------------------------------------

async function route() {
  if (!me || !me.authenticated) return;
  leaveView();
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "s" && parts.length === 2) await subjectView(parts[1], query);
  else if (parts[0] === "s" && parts[2] === "b" && parts.length === 5) await beliefView(parts[1], parts[3], parts[4]);
  else searchView();
  main.dataset.view = parts[0] === "s" ? (parts.length === 5 ? "belief" : "subject") : "search";
  main.dataset.ready = "1";
}

async function start() {
  try {
    me = await get(paths.me());
  } catch (err) {
    show(errorBox(err));
    return;
  }
  renderSession();
  if (!me.authenticated) {
    loginView();
    return;
  }
  await route();
  if (document.activeElement === document.body) main.focus({ preventScroll: true });
}

window.addEventListener("hashchange", async () => {
  main.dataset.ready = "";
  await route();
  window.scrollTo(0, 0);
  main.focus({ preventScroll: true });
});
start();
