// Entry point: asks for the key, learns what it may do (GET /v1/auth/permission), shows the
// playground and, for the admin key, the admin console and its keys & usage tab.

import { ApiError, getJSON, getKey, setKey } from "./api.js";
import { Console } from "./console.js";
import { KeysTab } from "./keys.js";
import { Playground } from "./playground.js";

const $ = (id) => document.getElementById(id);

const ui = { config: null, permission: null, playground: null, console: null, keys: null };
const VIEWS = ["chat", "admin", "keys"];

function keyStatus(text, kind = "") {
  $("key-status").textContent = text;
  $("key-status").className = `status ${kind}`;
}

async function checkKey() {
  try {
    const { permission } = await getJSON("/v1/auth/permission");
    return permission;
  } catch (error) {
    if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
      keyStatus(getKey()
        ? `The server refused this key (${error.status}): ${error.message}. Enter a valid API or admin key.`
        : "This server needs a key: enter your API key (or the admin key for the admin console).", "bad");
    } else {
      keyStatus(`Cannot reach the server: ${error.message}`, "bad");
    }
    return null;
  }
}

function showTab(name) {
  const tabs = [...document.querySelectorAll("nav a")].filter((a) => !a.hidden);
  const wanted = tabs.find((a) => a.dataset.tab === name) || tabs[0];
  if (!wanted) return;
  for (const a of tabs) a.classList.toggle("active", a === wanted);
  for (const view of VIEWS) $(view).hidden = wanted.dataset.tab !== view;
  if (ui.keys && wanted.dataset.tab === "keys") ui.keys.start();
  if (ui.console) {
    if (wanted.dataset.tab === "admin") ui.console.start();
    else ui.console.stopPolling();
  }
}

async function start() {
  const permission = await checkKey();
  ui.permission = permission;
  if (permission !== "admin") ui.keys?.forgetNewKey(); // a new key never outlives the admin key
  $("tabs").hidden = !permission;
  if (!permission) {
    for (const view of VIEWS) $(view).hidden = true;
    ui.console?.stopPolling();
    return;
  }
  const admin = permission === "admin" && ui.config.console;
  $("tab-chat").hidden = !ui.config.playground;
  $("tab-admin").hidden = !admin;
  $("tab-keys").hidden = !admin;
  const who = ui.config.auth ? `${permission} key accepted` : "keys are disabled on this server";
  keyStatus(`Connected: ${who}.${admin ? " The admin console is available." : ""}`, "good");
  // Before the playground's awaits: a tab clicked meanwhile finds its view ready.
  if (admin && !ui.console) {
    ui.console = new Console();
    ui.console.init();
  }
  if (admin && !ui.keys) {
    ui.keys = new KeysTab();
    ui.keys.init();
  }
  if (ui.config.playground) {
    ui.playground ||= new Playground();
    if (!ui.playground.started) {
      ui.playground.started = true;
      await ui.playground.init();
    }
    await ui.playground.loadModels().catch((error) => keyStatus(error.message, "bad"));
  }
  showTab(location.hash.slice(1));
}

async function main() {
  ui.config = await (await fetch("/ui/config.json")).json();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setKey($("key-input").value.trim());
    $("key-input").value = ""; // the key lives in sessionStorage only
    start();
  });
  $("key-forget").addEventListener("click", () => {
    setKey("");
    start();
  });
  window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
  await start();
}

main();
