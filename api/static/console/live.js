// Live updates of one subject. The API's watch stream (GET /v1/subjects/{id}/watch,
// Server-Sent Events, one event per belief change) is used when the API has it: the
// console looks for it in /openapi.json, so a missing stream never shows as a failed
// request. Without it (or once the stream fails for good), the console polls the
// subject's summary (GET /v1/subjects?prefix=ID&exact=true: counts and the last change,
// no values) every 2 s and re-reads the self-model only when it changed.

import { get, paths } from "./api.js";

export const POLL_MS = 2000;
const WATCH_PATH = "/v1/subjects/{subject_id}/watch";
let watchAvailable = null;

async function hasWatchStream() {
  if (watchAvailable === null) {
    try {
      const doc = await get("/openapi.json");
      watchAvailable = Boolean(doc.paths && doc.paths[WATCH_PATH] && doc.paths[WATCH_PATH].get);
    } catch (_) {
      watchAvailable = false;
    }
  }
  return watchAvailable;
}

function fingerprint(summary) {
  if (!summary) return "none";
  return [summary.observations, summary.beliefs, summary.changed_at, summary.erased].join("|");
}

/**
 * Call onChange(change) whenever the subject's beliefs change; change is the stream's
 * JSON event (context, attribute, ...) or null when polling. onMode(text) tells how.
 * Returns a function that stops watching.
 */
export function watchSubject(subjectId, onChange, onMode) {
  let stopped = false;
  let source = null;
  let timer = null;

  const poll = (initial) => {
    onMode("polling every 2 s");
    let last = initial;
    const tick = async () => {
      if (stopped) return;
      try {
        const found = await get(paths.subjects(), { prefix: subjectId, exact: "true", limit: 1 });
        const now = fingerprint(found[0]);
        if (last !== undefined && now !== last) onChange(null);
        last = now;
      } catch (_) {
        // A transient failure: try again at the next tick.
      }
      if (!stopped) timer = setTimeout(tick, POLL_MS);
    };
    tick();
  };

  (async () => {
    const initial = fingerprint((await get(paths.subjects(), { prefix: subjectId, exact: "true", limit: 1 }).catch(() => []))[0]);
    if (stopped) return;
    if (!(await hasWatchStream()) || typeof EventSource === "undefined") {
      poll(initial);
      return;
    }
    onMode("watch stream");
    source = new EventSource(paths.watch(subjectId), { withCredentials: true });
    const handle = (message) => {
      let change = null;
      try { change = JSON.parse(message.data); } catch (_) { change = null; }
      onChange(change);
    };
    for (const name of ["message", "belief", "change", "belief_changed"]) source.addEventListener(name, handle);
    source.onerror = () => {
      // EventSource reconnects by itself; once it gives up (CLOSED), fall back to polling.
      if (source && source.readyState === EventSource.CLOSED && !stopped) {
        source = null;
        poll(undefined);
      }
    };
  })();

  return () => {
    stopped = true;
    if (source) source.close();
    if (timer) clearTimeout(timer);
  };
}
