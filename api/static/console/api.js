// The console's calls to the JSON API. The session cookie (HTTP-only, SameSite=Strict)
// authenticates them; it is accepted on GET requests only.

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function detailOf(body, fallback) {
  if (!body || body.detail === undefined) return fallback;
  if (typeof body.detail === "string") return body.detail;
  return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
}

/** GET a JSON document of the API; throws ApiError with the API's message. */
export async function get(path, params = {}) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") query.set(k, v);
  }
  const url = query.toString() ? `${path}?${query}` : path;
  const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) throw new ApiError(response.status, detailOf(body, `${response.status} ${response.statusText}`));
  return body;
}

/** POST JSON (login with a key, logout); throws ApiError. */
export async function post(path, body) {
  const response = await fetch(path, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", Accept: "application/json", "X-Beliefstore-Console": "1" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let answer = null;
  try { answer = await response.json(); } catch (_) { answer = null; }
  if (!response.ok) throw new ApiError(response.status, detailOf(answer, `${response.status} ${response.statusText}`));
  return answer;
}

export const enc = encodeURIComponent;

export const paths = {
  me: () => "/console/me",
  subjects: () => "/v1/subjects",
  projections: () => "/v1/projections",
  selfModel: (s) => `/v1/subjects/${enc(s)}/self-model`,
  history: (s, c, a) => `/v1/subjects/${enc(s)}/beliefs/${enc(c)}/${enc(a)}/history`,
  trace: (s, c, a) => `/v1/subjects/${enc(s)}/beliefs/${enc(c)}/${enc(a)}/trace`,
  accessLog: (s) => `/v1/subjects/${enc(s)}/access-log`,
  watch: (s) => `/v1/subjects/${enc(s)}/watch`,
};
