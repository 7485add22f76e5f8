// The admin console: models with load/unload progress, LoRA, presets, templates, live metrics
// from /metrics and the recent requests ring.

import { call, getJSON, parsePrometheus, postJSON, sseData, total } from "./api.js";
import { button, el } from "./dom.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 1000;
const HISTORY = 60; // points per chart

// name, how to read it from two scrapes `dt` seconds apart, unit
const CHARTS = [
  // Output deltas as they are sent (one per token here): the token counters move only when a
  // request ends, which would draw bursts instead of the live rate.
  ["tokens/s", (now, before, dt) => rate(now, before, dt, "llmserve_inter_token_latency_seconds_count"), ""],
  ["running", (now) => total(now, "llmserve_running_sequences"), ""],
  ["queued", (now) => total(now, "llmserve_queue_depth"), ""],
  ["KV cache use", (now) => 100 * maxOf(now, "llmserve_kv_cache_usage_ratio"), "%"],
  ["TTFT", (now, before) => meanMs(now, before, "llmserve_time_to_first_token_seconds"), " ms"],
  ["ITL", (now, before) => meanMs(now, before, "llmserve_inter_token_latency_seconds"), " ms"],
];

function rate(now, before, dt, name, where = {}) {
  if (!before || dt <= 0) return null;
  return Math.max(0, total(now, name, where) - total(before, name, where)) / dt;
}

function maxOf(samples, name) {
  return Math.max(0, ...(samples[name] || []).map((s) => s.value));
}

// The mean of a histogram over the last interval (null when nothing was observed in it).
function meanMs(now, before, name) {
  if (!before) return null;
  const count = total(now, `${name}_count`) - total(before, `${name}_count`);
  if (count <= 0) return null;
  return (1000 * (total(now, `${name}_sum`) - total(before, `${name}_sum`))) / count;
}

class Chart {
  constructor(title, unit) {
    this.unit = unit;
    this.points = [];
    this.node = el("div", "chart");
    const label = el("div", "label");
    this.value = el("span", "value", "–");
    label.append(el("span", null, title), this.value);
    this.canvas = el("canvas");
    this.node.append(label, this.canvas);
    this.node.dataset.chart = title;
  }

  push(value) {
    this.points.push(value);
    if (this.points.length > HISTORY) this.points.shift();
    this.value.textContent = value === null ? "–" : `${value.toFixed(value < 10 ? 2 : 0)}${this.unit}`;
    this.draw();
  }

  draw() {
    const c = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    c.width = c.clientWidth * ratio;
    c.height = c.clientHeight * ratio;
    const g = c.getContext("2d");
    g.clearRect(0, 0, c.width, c.height);
    const values = this.points.map((v) => v ?? 0);
    const top = Math.max(1e-9, ...values);
    g.strokeStyle = "#2b5cab";
    g.fillStyle = "rgba(43, 92, 171, .12)";
    g.lineWidth = 1.5 * ratio;
    g.beginPath();
    values.forEach((v, i) => {
      const x = (i / (HISTORY - 1)) * c.width;
      const y = c.height - (v / top) * (c.height - 4 * ratio) - 2 * ratio;
      if (i) g.lineTo(x, y); else g.moveTo(x, y);
    });
    g.stroke();
    if (values.length > 1) {
      g.lineTo(((values.length - 1) / (HISTORY - 1)) * c.width, c.height);
      g.lineTo(0, c.height);
      g.fill();
    }
  }
}

export class Console {
  constructor() {
    this.timer = null;
    this.previous = null;
    this.charts = CHARTS.map(([title, , unit]) => new Chart(title, unit));
    this.busy = false;
  }

  init() {
    $("charts").replaceChildren(...this.charts.map((c) => c.node));
    $("lora-unload").addEventListener("click", () => this.act(() => postJSON("/v1/lora/unload", {})));
    $("preset-switch").addEventListener("click", () =>
      this.act(() => postJSON("/v1/sampling/override/switch", { preset: $("preset-select").value })));
    $("preset-unload").addEventListener("click", () => this.act(() => postJSON("/v1/sampling/override/unload", {})));
    $("template-switch").addEventListener("click", () =>
      this.act(() => postJSON("/v1/template/switch", { name: $("template-select").value })));
    $("template-unload").addEventListener("click", () => this.act(() => postJSON("/v1/template/unload", {})));
  }

  start() {
    if (this.timer) return;
    this.refresh();
    this.timer = setInterval(() => this.tick(), POLL_MS);
  }

  stopPolling() {
    clearInterval(this.timer);
    this.timer = null;
  }

  async refresh() {
    await Promise.all([this.models(), this.loras(), this.presets(), this.templates(), this.tick()]);
  }

  async tick() {
    await Promise.all([this.metrics(), this.recent(), this.busy ? null : this.models()]);
  }

  status(text, good = true) {
    $("admin-status").textContent = text;
    $("admin-status").className = `status ${good ? "good" : "bad"}`;
  }

  async act(work) {
    try {
      const answer = await work();
      this.status(`${answer.status || "ok"}${answer.detail ? `: ${answer.detail}` : ""}`);
    } catch (error) {
      this.status(error.message, false);
    }
    await this.refresh();
  }

  // ---- models ----

  async models() {
    let list;
    try {
      list = await getJSON("/v1/console/models");
    } catch (error) {
      return this.status(error.message, false);
    }
    const rows = list.data.map((m) => {
      const row = el("tr");
      row.dataset.model = m.id;
      const state = el("td", `state-${m.state}`, m.state);
      const actions = el("td");
      if (m.state === "available") actions.append(button("Load", () => this.load(m.id)));
      else if (m.state === "loaded" || m.state === "failed") actions.append(button("Unload", () => this.unload()));
      row.append(el("td", null, [m.id, ...m.aliases].join(", ")), state, el("td", null, m.context_length ?? ""), actions);
      return row;
    });
    $("model-table").tBodies[0].replaceChildren(...rows);
  }

  setProgress(fraction, label) {
    $("load-progress").hidden = false;
    const percent = Math.round(100 * Math.min(1, Math.max(0, fraction)));
    $("load-bar").style.width = `${percent}%`;
    $("load-progress").dataset.percent = String(percent);
    $("load-label").textContent = `${percent}%${label ? ` · ${label}` : ""}`;
  }

  async load(name) {
    this.busy = true;
    this.setProgress(0, `loading ${name}`);
    try {
      const response = await call("/v1/model/load", { method: "POST", body: { model_name: name, stream: true } });
      for await (const data of sseData(response)) {
        const event = JSON.parse(data);
        if (event.status === "error") throw new Error(event.detail || "the load failed");
        this.setProgress(event.progress, event.stage);
      }
      this.setProgress(1, `${name} loaded`);
      this.status(`loaded ${name}`);
    } catch (error) {
      this.status(`loading ${name} failed: ${error.message}`, false);
    } finally {
      this.busy = false;
      await this.refresh();
    }
  }

  async unload() {
    await this.act(() => postJSON("/v1/model/unload", {}));
  }

  // ---- LoRA, presets, templates ----

  async loras() {
    const list = $("lora-list");
    try {
      const { data } = await getJSON("/v1/loras");
      list.replaceChildren(...data.map((lora) => {
        const item = el("li");
        const scale = el("input");
        Object.assign(scale, { type: "number", step: "0.1", value: String(lora.scaling ?? 1) });
        item.append(el("span", null, `${lora.id}${lora.active ? " (active)" : ""}`), scale,
          button("Apply", () => this.act(() => postJSON("/v1/lora/load", { loras: [{ name: lora.id, scaling: Number(scale.value) }] }))));
        return item;
      }));
      if (!data.length) list.replaceChildren(el("li", null, "No adapters in loras_dir."));
    } catch (error) {
      list.replaceChildren(el("li", "error", error.message));
    }
  }

  async presets() {
    await fillSelect("preset-select", "/v1/sampling/overrides", (d) => d.presets || [], (d) => d.selected_preset);
  }

  async templates() {
    // `active` names its origin (`file:plain.jinja`, `gguf`): match the file's stem.
    await fillSelect("template-select", "/v1/templates", (d) => d.data || [],
      (d) => (d.active || "").replace(/^file:/, "").replace(/\.jinja$/, ""));
  }

  // ---- metrics and requests ----

  async metrics() {
    try {
      const text = await (await call("/metrics")).text();
      const now = { samples: parsePrometheus(text), at: performance.now() };
      const before = this.previous;
      const dt = before ? (now.at - before.at) / 1000 : 0;
      CHARTS.forEach(([, read], i) => this.charts[i].push(read(now.samples, before?.samples, dt)));
      this.previous = now;
    } catch (_) { /* the next tick tries again */ }
  }

  async recent() {
    try {
      const { data } = await getJSON("/v1/requests/recent?limit=50");
      $("recent-table").tBodies[0].replaceChildren(...data.map((r) => {
        const row = el("tr");
        const cells = [new Date(r.time * 1000).toLocaleTimeString(), r.method, r.path || r.route, r.status,
          r.model || "", r.prompt_tokens, r.completion_tokens, r.ttft_ms ?? "", r.duration_ms];
        row.append(...cells.map((c) => el("td", null, String(c))));
        return row;
      }));
    } catch (_) { /* shown by the model table's status line */ }
  }
}

async function fillSelect(id, path, pick, current) {
  const select = $(id);
  try {
    const answer = await getJSON(path);
    const names = pick(answer).map((x) => (typeof x === "string" ? x : x.id || x.name));
    select.replaceChildren(...names.map((n) => Object.assign(el("option", null, n), { value: n })));
    if (names.includes(current(answer))) select.value = current(answer);
    if (!names.length) select.replaceChildren(Object.assign(el("option", null, "(none in the folder)"), { value: "" }));
  } catch (error) {
    select.replaceChildren(Object.assign(el("option", null, error.message), { value: "" }));
  }
}
