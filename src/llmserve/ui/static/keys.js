// The "Keys & usage" tab: the key list (GET /v1/keys), creating a key (POST /v1/keys, the key
// shown once), revoking one (DELETE /v1/keys/NAME) and usage sums (GET /v1/usage).

import { call, getJSON, postJSON } from "./api.js";
import { button, el } from "./dom.js";

const $ = (id) => document.getElementById(id);

// Who owns a key the database does not: revoking it is refused (409), so the button says why.
const OWNERS = {
  file: "Owned by api_tokens.yml: remove it there.",
  cli: "Given with --api-key: restart without it.",
  builtin: "Built into the server.",
};

const LIMIT_FIELDS = [
  ["rpm", "new-rpm", "rpm"],
  ["tpm", "new-tpm", "tpm"],
  ["max_concurrent", "new-max-concurrent", "concurrent"],
  ["quota_tokens", "new-quota-tokens", "quota"],
];

const USAGE_COLUMNS = [
  ["requests", "Requests"],
  ["prompt_tokens", "Prompt"],
  ["cached_tokens", "Cached"],
  ["completion_tokens", "Completion"],
  ["total_tokens", "Total tokens"],
  ["errors", "Errors"],
  ["cancelled", "Cancelled"],
  ["duration_ms", "ms"],
];

function when(value) {
  return value ? new Date(value).toLocaleString() : "never";
}

function limitsText(limits) {
  const parts = LIMIT_FIELDS.filter(([field]) => limits[field] != null)
    .map(([field, , label]) => `${label} ${limits[field]}${field === "quota_tokens" ? `/${limits.quota_period}` : ""}`);
  return parts.length ? parts.join(", ") : "none";
}

function describe(error) {
  return error.status ? `${error.status}: ${error.message}` : error.message;
}

function numberOrNull(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

/** The POST /v1/keys body of the create form. */
function createBody() {
  const body = { name: $("new-name").value.trim(), admin: $("new-admin").checked };
  const owner = $("new-owner").value.trim();
  if (owner) body.owner = owner;
  const at = $("new-expires-at").value;
  const expiresIn = $("new-expires-in").value.trim();
  if (at) body.expires_at = new Date(at).toISOString(); // the field is local time
  else if (expiresIn) body.expires_in = expiresIn;
  const models = $("new-models").value.split(",").map((m) => m.trim()).filter(Boolean);
  if (models.length) body.models = models;
  const limits = {};
  for (const [field, id] of LIMIT_FIELDS) {
    const value = numberOrNull(id);
    if (value !== null) limits[field] = value;
  }
  if (limits.quota_tokens != null) limits.quota_period = $("new-quota-period").value;
  body.limits = limits;
  return body;
}

export class KeysTab {
  constructor() {
    this.started = false;
  }

  init() {
    $("key-create").addEventListener("submit", (event) => {
      event.preventDefault();
      this.create();
    });
    $("usage-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.usage();
    });
    $("keys-refresh").addEventListener("click", () => this.keys());
    $("new-key-copy").addEventListener("click", () => this.copy());
    $("new-key-done").addEventListener("click", () => this.forgetNewKey());
  }

  /** Refresh both tables (when the tab is shown; nothing here polls). */
  async start() {
    await Promise.all([this.keys(), this.usage()]);
  }

  status(text, good = true) {
    $("keys-status").textContent = text;
    $("keys-status").className = `status ${good ? "good" : "bad"}`;
  }

  // ---- the key list ----

  async keys() {
    try {
      const { data } = await getJSON("/v1/keys");
      $("key-table").tBodies[0].replaceChildren(...data.map((key) => this.row(key)));
    } catch (error) {
      this.status(`Listing keys failed: ${describe(error)}`, false);
    }
  }

  row(key) {
    const row = el("tr");
    row.dataset.key = key.name;
    row.dataset.source = key.source;
    row.dataset.status = key.status;
    const cells = [key.name, key.owner || "", key.role, key.source, key.status, key.prefix ? `${key.prefix}…` : "",
      key.models ? key.models.join(", ") : "all", limitsText(key.limits), when(key.created_at), when(key.expires_at)];
    row.append(...cells.map((text, i) => el("td", i === 4 ? `key-${key.status}` : null, String(text))));
    const actions = el("td", "actions");
    actions.append(this.revokeButton(key, actions));
    row.append(actions);
    return row;
  }

  revokeButton(key, cell) {
    const revoke = button("Revoke", () => this.confirmRevoke(key, cell));
    revoke.className = "revoke";
    const reason = OWNERS[key.source] || (key.status === "revoked" ? "Already revoked." : "");
    if (reason) {
      revoke.disabled = true;
      revoke.title = reason;
      const why = el("span", "why", reason);
      const box = el("span");
      box.append(revoke, why);
      return box;
    }
    return revoke;
  }

  // Revoking cannot be undone: ask in the row itself (no window.confirm, which tests and
  // some kiosks block).
  confirmRevoke(key, cell) {
    const question = el("span", "confirm", `Revoke ${key.name}? Clients using it get 401 at once. `);
    const yes = button("Yes, revoke", () => this.revoke(key.name));
    yes.className = "danger confirm-revoke";
    const no = button("Cancel", () => cell.replaceChildren(this.revokeButton(key, cell)));
    no.className = "ghost";
    question.append(yes, no);
    cell.replaceChildren(question);
  }

  async revoke(name) {
    try {
      await call(`/v1/keys/${encodeURIComponent(name)}`, { method: "DELETE" });
      this.status(`Revoked ${name}.`);
    } catch (error) {
      this.status(`Revoking ${name} failed: ${describe(error)}`, false);
    }
    await this.keys();
  }

  // ---- creating a key ----

  async create() {
    this.forgetNewKey();
    let created;
    try {
      created = await postJSON("/v1/keys", createBody());
    } catch (error) {
      return this.status(`Creating the key failed: ${describe(error)}`, false);
    }
    this.status(`Created ${created.name} (${created.role} key).`);
    $("new-key-value").value = created.key;
    $("new-key").dataset.name = created.name;
    $("new-key").hidden = false;
    $("key-create").reset();
    await this.keys();
  }

  async copy() {
    const field = $("new-key-value");
    try {
      await navigator.clipboard.writeText(field.value);
      $("new-key-copied").textContent = "Copied to the clipboard.";
    } catch (_) {
      // No clipboard access (permissions, an http origin other than loopback): select it instead.
      field.select();
      $("new-key-copied").textContent = "Selected: press Ctrl+C (or ⌘C) to copy.";
    }
  }

  // The key is never kept: it leaves the page when dismissed or when another key is created.
  forgetNewKey() {
    $("new-key-value").value = "";
    $("new-key-copied").textContent = "";
    $("new-key").hidden = true;
  }

  // ---- usage ----

  usageQuery() {
    const groups = ["group-key", "group-model", "group-day"].filter((id) => $(id).checked).map((id) => $(id).value);
    const query = new URLSearchParams({ group_by: groups.join(",") });
    const key = $("usage-key").value.trim();
    if (key) query.set("key", key);
    if ($("usage-from").value) query.set("from", $("usage-from").value);
    if ($("usage-to").value) query.set("to", $("usage-to").value);
    return { groups, query };
  }

  async usage() {
    const { groups, query } = this.usageQuery();
    let answer;
    try {
      answer = await getJSON(`/v1/usage?${query}`);
    } catch (error) {
      $("usage-status").textContent = `Reading usage failed: ${describe(error)}`;
      $("usage-status").className = "status bad";
      return;
    }
    $("usage-status").textContent = answer.data.length ? "" : "No usage recorded for this selection.";
    $("usage-status").className = "status";
    this.drawUsage(answer.group_by || groups, answer.data);
  }

  drawUsage(groups, rows) {
    const table = $("usage-table");
    const head = el("tr");
    head.append(...groups.map((g) => el("th", null, g)), ...USAGE_COLUMNS.map(([, title]) => el("th", "num", title)));
    table.tHead.replaceChildren(head);
    table.tBodies[0].replaceChildren(...rows.map((r) => {
      const row = el("tr");
      row.dataset.group = groups.map((g) => r[g] ?? "").join("|");
      row.append(...groups.map((g) => el("td", r[g] == null ? "none" : null, r[g] ?? "(none)")), ...USAGE_COLUMNS.map(([f]) => el("td", "num", fmt(f, r[f]))));
      return row;
    }));
    const totals = el("tr", "totals");
    totals.append(el("th", null, "Total"), ...groups.slice(1).map(() => el("td")));
    for (const [field] of USAGE_COLUMNS) {
      const sum = rows.reduce((acc, r) => acc + (r[field] || 0), 0);
      const cell = el("td", "num", fmt(field, sum));
      cell.dataset.total = field;
      totals.append(cell);
    }
    if (!groups.length) totals.firstChild.remove(); // no group column to put the label in
    table.tFoot.replaceChildren(totals);
  }
}

function fmt(field, value) {
  if (value == null) return "";
  return field === "duration_ms" ? String(Math.round(value)) : String(value);
}
