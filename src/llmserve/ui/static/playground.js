// The chat playground: streamed chat completions, Stop, samplers, structured output, tools.

import { ApiError, call, getJSON, sseData } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { ConversationStore } from "./store.js";

// Samplers offered when the server's request schema lists them (all of them if it cannot be read).
const SAMPLERS = [
  { name: "temperature", step: "0.05", min: "0", placeholder: "1.0" },
  { name: "top_p", step: "0.01", min: "0", max: "1", placeholder: "1.0" },
  { name: "top_k", step: "1", min: "0", placeholder: "off" },
  { name: "min_p", step: "0.01", min: "0", max: "1", placeholder: "0" },
  { name: "max_tokens", step: "1", min: "1", placeholder: "256", value: "256" },
  { name: "seed", step: "1", placeholder: "random" },
  { name: "repetition_penalty", step: "0.01", min: "0", placeholder: "1.0" },
  { name: "presence_penalty", step: "0.1", placeholder: "0" },
  { name: "frequency_penalty", step: "0.1", placeholder: "0" },
  { name: "typical_p", step: "0.01", min: "0", max: "1", placeholder: "1.0" },
];
const INTEGERS = new Set(["top_k", "max_tokens", "seed"]);

const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function parseJSONField(id, what) {
  const text = $(id).value.trim();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`${what} is not valid JSON: ${error.message}`);
  }
}

export class Playground {
  constructor() {
    this.store = new ConversationStore();
    this.conversation = this.store.items[0] || this.store.create();
    this.controller = null;
  }

  async init() {
    await this.buildSamplers();
    $("chat-form").addEventListener("submit", (e) => { e.preventDefault(); this.send(); });
    $("chat-input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); this.send(); }
    });
    $("stop").addEventListener("click", () => this.stop());
    $("conv-new").addEventListener("click", () => this.open(this.store.create()));
    $("conv-export").addEventListener("click", () => this.store.exportFile());
    $("system-prompt").addEventListener("change", () => {
      this.conversation.system = $("system-prompt").value;
      this.store.save();
    });
    this.open(this.conversation);
  }

  async buildSamplers() {
    let accepted = null;
    try {
      const schema = await (await fetch("/openapi.json")).json();
      accepted = new Set(Object.keys(schema.components.schemas.ChatCompletionRequest.properties));
    } catch (_) { /* no schema: offer every sampler */ }
    const box = $("sampler-fields");
    box.replaceChildren();
    for (const spec of SAMPLERS) {
      if (accepted && !accepted.has(spec.name)) continue;
      const label = el("label", null, spec.name);
      const input = el("input");
      Object.assign(input, { type: "number", id: `sampler-${spec.name}`, step: spec.step, placeholder: spec.placeholder });
      if (spec.min) input.min = spec.min;
      if (spec.max) input.max = spec.max;
      if (spec.value) input.value = spec.value;
      input.dataset.sampler = spec.name;
      label.append(input);
      box.append(label);
    }
  }

  async loadModels() {
    const select = $("model-select");
    const previous = select.value;
    const list = await getJSON("/v1/models");
    select.replaceChildren();
    for (const card of list.data) {
      const option = el("option", null, card.loaded === false ? `${card.id} (not loaded)` : card.id);
      option.value = card.id;
      select.append(option);
    }
    if (previous && [...select.options].some((o) => o.value === previous)) select.value = previous;
  }

  // ---- conversations ----

  open(conversation) {
    this.conversation = conversation;
    $("system-prompt").value = conversation.system || "";
    this.renderList();
    this.renderMessages();
  }

  renderList() {
    const list = $("conv-list");
    list.replaceChildren();
    for (const c of this.store.items) {
      const item = el("li", c.id === this.conversation.id ? "current" : "");
      const title = el("span", null, c.title);
      title.addEventListener("click", () => this.open(c));
      const remove = el("button", "ghost", "×");
      remove.title = "Delete this chat";
      remove.addEventListener("click", () => {
        this.store.remove(c.id);
        this.open(this.store.items[0] || this.store.create());
      });
      item.append(title, remove);
      list.append(item);
    }
  }

  renderMessages() {
    const box = $("messages");
    box.replaceChildren();
    this.conversation.messages.forEach((m, i) => box.append(this.messageNode(m, i)));
    box.scrollTop = box.scrollHeight;
  }

  messageNode(message, index) {
    const node = el("li", `msg ${message.role}`);
    node.dataset.state = message.state || "done";
    node.append(el("div", "role", message.role));
    const content = el("div", "content");
    content.append(renderMarkdown(message.content || ""));
    node.append(content);
    for (const call of message.tool_calls || []) node.append(toolCallNode(call));
    if (message.error) node.append(el("div", "error", message.error));
    if (message.stats) node.append(el("div", "meta", statsLine(message.stats)));
    node.append(this.actions(message, index));
    return node;
  }

  actions(message, index) {
    const bar = el("div", "actions");
    const last = index === this.conversation.messages.length - 1;
    if (message.role === "user") {
      const edit = el("button", "ghost", "Edit");
      edit.addEventListener("click", () => this.edit(index));
      bar.append(edit);
    } else if (last) {
      const again = el("button", "ghost regenerate", "Regenerate");
      again.addEventListener("click", () => this.regenerate());
      bar.append(again);
    }
    return bar;
  }

  // ---- generation ----

  send() {
    const text = $("chat-input").value.trim();
    if (!text || this.controller) return;
    $("chat-input").value = "";
    const messages = this.conversation.messages;
    if (!messages.length) this.conversation.title = text.slice(0, 40);
    messages.push({ role: "user", content: text });
    this.store.save();
    this.renderList();
    this.generate();
  }

  edit(index) {
    if (this.controller) return;
    $("chat-input").value = this.conversation.messages[index].content;
    this.conversation.messages.splice(index);
    this.store.save();
    this.renderMessages();
    $("chat-input").focus();
  }

  regenerate() {
    if (this.controller) return;
    const messages = this.conversation.messages;
    if (messages.length && messages[messages.length - 1].role === "assistant") messages.pop();
    this.generate();
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  requestBody() {
    const body = {
      model: $("model-select").value || undefined,
      messages: [],
      stream: true,
      stream_options: { include_usage: true },
    };
    const system = $("system-prompt").value.trim();
    if (system) body.messages.push({ role: "system", content: system });
    for (const m of this.conversation.messages) {
      const wire = { role: m.role, content: m.content || "" };
      if (m.tool_calls && m.tool_calls.length) wire.tool_calls = m.tool_calls;
      body.messages.push(wire);
    }
    for (const input of document.querySelectorAll("[data-sampler]")) {
      if (input.value === "") continue;
      body[input.dataset.sampler] = INTEGERS.has(input.dataset.sampler) ? parseInt(input.value, 10) : Number(input.value);
    }
    const schema = parseJSONField("json-schema", "The JSON schema");
    if (schema) body.response_format = { type: "json_schema", json_schema: { name: "playground", schema, strict: true } };
    const tools = parseJSONField("tools-json", "Tools");
    if (tools) body.tools = tools;
    Object.assign(body, parseJSONField("extra-json", "Extra fields") || {});
    return body;
  }

  async generate() {
    $("chat-error").hidden = true;
    let body;
    try {
      body = this.requestBody();
    } catch (error) {
      return this.showError(error.message);
    }
    const reply = { role: "assistant", content: "", state: "streaming", tool_calls: [] };
    this.conversation.messages.push(reply);
    const index = this.conversation.messages.length - 1;
    this.renderMessages(); // the new user turn, or the history without the regenerated reply
    let node = $("messages").lastElementChild;
    this.controller = new AbortController();
    this.setBusy(true);
    const started = performance.now();
    let firstToken = null;
    const redraw = () => {
      const fresh = this.messageNode(reply, index);
      node.replaceWith(fresh);
      node = fresh;
      $("messages").scrollTop = $("messages").scrollHeight;
    };
    try {
      const response = await call("/v1/chat/completions", { method: "POST", body, signal: this.controller.signal });
      for await (const data of sseData(response)) {
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(0, chunk.error.message || "the stream failed", chunk.error.code);
        if (chunk.model) reply.model = chunk.model;
        const choice = (chunk.choices || [])[0];
        if (choice && choice.delta) {
          if (choice.delta.content) {
            firstToken ??= performance.now();
            reply.content += choice.delta.content;
          }
          mergeToolCalls(reply.tool_calls, choice.delta.tool_calls || []);
          if (choice.delta.tool_calls) firstToken ??= performance.now();
          if (choice.finish_reason) reply.finish_reason = choice.finish_reason;
          redraw();
        }
        if (chunk.usage) reply.stats = stats(chunk.usage, started, firstToken, performance.now(), reply);
      }
      reply.state = "done";
    } catch (error) {
      if (error.name === "AbortError") reply.state = "stopped";
      else {
        reply.state = "error";
        reply.error = error.message;
        this.showError(error.message);
      }
    } finally {
      if (!reply.stats) reply.stats = stats(null, started, firstToken, performance.now(), reply);
      this.controller = null;
      this.setBusy(false);
      this.store.save();
      redraw();
    }
  }

  setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
  }

  showError(message) {
    $("chat-error").textContent = message;
    $("chat-error").hidden = false;
  }
}

function mergeToolCalls(calls, deltas) {
  for (const d of deltas) {
    const at = d.index ?? calls.length;
    const call = (calls[at] ||= { id: d.id, type: "function", function: { name: "", arguments: "" } });
    if (d.id) call.id = d.id;
    if (d.function?.name) call.function.name += d.function.name;
    if (d.function?.arguments) call.function.arguments += d.function.arguments;
  }
}

function toolCallNode(call) {
  const box = el("div", "tool-call");
  box.append(el("strong", null, `tool call: ${call.function.name}`));
  const pre = el("pre");
  let args = call.function.arguments;
  try { args = JSON.stringify(JSON.parse(args), null, 2); } catch (_) { /* partial while streaming */ }
  pre.textContent = args;
  box.append(pre);
  return box;
}

function stats(usage, started, firstToken, ended, reply) {
  const result = { ttft_ms: firstToken === null ? null : Math.round(firstToken - started), model: reply.model || null };
  if (usage) {
    result.prompt_tokens = usage.prompt_tokens;
    result.completion_tokens = usage.completion_tokens;
    const seconds = firstToken === null ? 0 : (ended - firstToken) / 1000;
    // Tokens after the first one, over the time after it: the decode rate the user saw.
    if (seconds > 0 && usage.completion_tokens > 1) result.tokens_per_second = (usage.completion_tokens - 1) / seconds;
  }
  result.finish = reply.state === "stopped" ? "stopped" : reply.finish_reason || null;
  return result;
}

function statsLine(s) {
  const parts = [];
  if (s.model) parts.push(s.model);
  if (s.ttft_ms !== null && s.ttft_ms !== undefined) parts.push(`TTFT ${s.ttft_ms} ms`);
  if (s.tokens_per_second) parts.push(`${s.tokens_per_second.toFixed(1)} tok/s`);
  if (s.prompt_tokens !== undefined) parts.push(`${s.prompt_tokens} prompt + ${s.completion_tokens} completion tokens`);
  if (s.finish) parts.push(s.finish);
  return parts.join(" · ");
}
