// HTTP helpers: the key (sessionStorage only, sent as a Bearer header), JSON calls, SSE parsing.

const KEY_SLOT = "llmserve.key";

export function getKey() {
  return sessionStorage.getItem(KEY_SLOT) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_SLOT, key);
  else sessionStorage.removeItem(KEY_SLOT);
}

/** An error answer of the server: HTTP status plus the message of its error body. */
export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(extra = {}) {
  const key = getKey();
  const all = { ...extra };
  if (key) all.Authorization = `Bearer ${key}`;
  return all;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    const error = body.error || body.detail || body;
    if (typeof error === "string") message = error;
    else if (error && error.message) { message = error.message; code = error.code || null; }
  } catch (_) { /* not JSON: keep the status line */ }
  return new ApiError(response.status, message, code);
}

/** fetch with the key; a non-2xx answer throws ApiError. */
export async function call(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, headers: headers() };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response;
}

export async function getJSON(path) {
  return (await call(path)).json();
}

export async function postJSON(path, body) {
  return (await call(path, { method: "POST", body })).json();
}

/** The `data:` payloads of an SSE response, as they arrive ("[DONE]" ends the stream). */
export async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue; // comments and pings
      if (data === "[DONE]") return;
      yield data;
    }
  }
}

/** Text of the Prometheus exposition format as {name: [{labels, value}]}. */
export function parsePrometheus(text) {
  const samples = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[3] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[pair[1]] = pair[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    (samples[match[1]] ||= []).push({ labels, value: Number(match[4]) });
  }
  return samples;
}

/** Sum of a metric's samples whose labels include `where`. */
export function total(samples, name, where = {}) {
  return (samples[name] || [])
    .filter((s) => Object.entries(where).every(([k, v]) => s.labels[k] === v))
    .reduce((sum, s) => sum + s.value, 0);
}
