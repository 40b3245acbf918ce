// The raftwasm dashboard. It talks only to the node that served it: it
// polls GET /cluster (every member's /status, gathered by that node),
// computes rates from the counters' differences between two polls, and
// sends writes with the forward header so that a follower passes them on
// to the leader.
"use strict";

const POLL_MS = 1000;
const GUEST_POLL_MS = 3000;
const HISTORY = 120; // points per chart: two minutes at one poll a second
const FORWARD = { "X-Raft-Forward": "true" };

const $ = (selector) => document.querySelector(selector);

/** The counters of the previous poll, per member id, and when it was. */
let previous = { at: 0, counters: new Map() };
/** Each chart's points, oldest first. */
const series = { writes: [], reads: [], batch: [], apply: [] };
let lastGuestHash = null;

/** Headers with the token, when the user gave one. */
function authorized(headers = {}) {
  const token = sessionStorage.getItem("raftwasm-token");
  return token ? { ...headers, Authorization: `Bearer ${token}` } : headers;
}

/** fetch with a deadline, so that a hung node cannot stall the page. */
async function call(url, options = {}, timeoutMs = 5000) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  try {
    return await fetch(url, { cache: "no-store", ...options, signal: abort.signal });
  } finally {
    clearTimeout(timer);
  }
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text === undefined || text === null ? "–" : String(text);
  if (className) td.className = className;
  return td;
}

/** The member that leads: a leader with the highest term, if any answers. */
function findLeader(members) {
  let leader = null;
  for (const m of members) {
    if (m.status && m.status.role === "leader" && (!leader || m.status.term > leader.status.term)) {
      leader = m;
    }
  }
  return leader;
}

function renderMembers(view) {
  const leader = findLeader(view.members);
  const head = leader ? leader.status.last_log_index ?? 0 : null;
  const body = $("#members tbody");
  body.replaceChildren();
  for (const m of view.members) {
    const row = body.insertRow();
    const s = m.status;
    row.dataset.id = m.id;
    row.dataset.state = s ? "up" : "down";
    row.classList.toggle("down", !s);
    row.classList.toggle("leader", leader !== null && leader.id === m.id);
    cell(row, m.id);
    cell(row, m.http);
    const role = cell(row, s ? s.role : "down", s ? `role-${s.role}` : "");
    if (s && !m.voter) role.textContent += " (learner)";
    cell(row, s?.term, "num");
    cell(row, s?.applied ?? (s ? 0 : null), "num");
    cell(row, s?.committed ?? (s ? 0 : null), "num");
    cell(row, s && head !== null ? Math.max(0, head - (s.applied ?? 0)) : null, "num");
    const notes = [];
    if (m.id === view.node) notes.push("serves this page");
    if (m.error) notes.push(m.error);
    cell(row, notes.join("; "), "note");
  }
  const pill = $("#leader");
  if (leader) {
    pill.textContent = `leader: node ${leader.id} (${leader.http}), term ${leader.status.term}`;
    pill.dataset.leaderId = leader.id;
    pill.className = "pill good";
  } else {
    pill.textContent = "no leader";
    pill.dataset.leaderId = "";
    pill.className = "pill bad";
  }
  $("#served-by").textContent = `served by node ${view.node}`;

  // Rebuilt only when the membership changes, so an open list stays open.
  const select = $("#remove-id");
  const ids = view.members.map((m) => `${m.id}@${m.http}`).join(",");
  if (select.dataset.members !== ids) {
    const chosen = select.value;
    select.replaceChildren(...view.members.map((m) => new Option(`node ${m.id} (${m.http})`, m.id)));
    if (chosen) select.value = chosen;
    select.dataset.members = ids;
  }
}

/** Adds one point per chart from the counters' growth since the last poll. */
function updateRates(view, now) {
  const seconds = (now - previous.at) / 1000;
  const sum = { writes: 0, reads: 0, batches: 0, batch_ops: 0, apply_calls: 0, apply_nanos: 0 };
  let compared = 0;
  const counters = new Map();
  for (const m of view.members) {
    const c = m.status?.counters;
    if (!c) continue;
    counters.set(m.id, c);
    const before = previous.counters.get(m.id);
    if (!before) continue;
    compared += 1;
    for (const key of Object.keys(sum)) {
      // A counter that went down belongs to a restarted node: count from zero.
      const grown = c[key] >= before[key] ? c[key] - before[key] : c[key];
      sum[key] += grown;
    }
  }
  const first = previous.at === 0;
  previous = { at: now, counters };
  if (first || compared === 0 || seconds <= 0) return;
  push("writes", sum.writes / seconds, 1);
  push("reads", sum.reads / seconds, 1);
  push("batch", sum.batches ? sum.batch_ops / sum.batches : 0, 1);
  push("apply", sum.apply_calls ? sum.apply_nanos / sum.apply_calls / 1e6 : 0, 3);
}

function push(name, value, digits) {
  const points = series[name];
  points.push(value);
  if (points.length > HISTORY) points.shift();
  draw(name, digits);
}

/** Draws a chart's points as a polyline scaled to its largest value. */
function draw(name, digits) {
  const points = series[name];
  const figure = $(`#chart-${name}`);
  const max = Math.max(...points, 0);
  const top = max > 0 ? max * 1.1 : 1;
  // The points fill the width; a single one is drawn as a flat line.
  const shown = points.length === 1 ? [points[0], points[0]] : points;
  const step = 240 / (shown.length - 1);
  const line = shown
    .map((v, i) => `${(i * step).toFixed(1)},${(60 - (v / top) * 58 - 1).toFixed(1)}`)
    .join(" ");
  figure.querySelector("polyline").setAttribute("points", line);
  const last = points[points.length - 1];
  figure.querySelector(".value").textContent = last.toFixed(digits);
  figure.dataset.last = String(last);
  figure.dataset.max = String(max);
  figure.dataset.points = String(points.length);
}

async function poll() {
  const conn = $("#conn");
  try {
    const answer = await call("/cluster", {}, 4000);
    if (!answer.ok) throw new Error(`${answer.status} ${await answer.text()}`);
    const view = await answer.json();
    renderMembers(view);
    updateRates(view, performance.now());
    conn.textContent = `updated ${new Date().toLocaleTimeString()}`;
    conn.className = "pill";
    const served = view.members.find((m) => m.id === view.node);
    const hash = served?.status?.guest?.hash ?? null;
    if (hash !== lastGuestHash) {
      lastGuestHash = hash;
      loadGuest();
    }
  } catch (error) {
    conn.textContent = `this node does not answer: ${error.message}`;
    conn.className = "pill bad";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

async function loadGuest() {
  try {
    const answer = await call("/guest");
    if (!answer.ok) throw new Error(`${answer.status} ${await answer.text()}`);
    const guest = await answer.json();
    const active = $("#guest-active");
    active.replaceChildren();
    if (guest.active) {
      const a = guest.active;
      const name = document.createElement("b");
      name.textContent = `${a.name} ${a.version}`;
      const code = document.createElement("code");
      code.textContent = a.hash.slice(0, 16);
      active.append(name, ` since index ${a.since}, hash `, code);
    } else {
      active.textContent = "no guest active yet";
    }
    const body = $("#guest-history tbody");
    body.replaceChildren();
    for (const swap of [...guest.history].reverse()) {
      const row = body.insertRow();
      cell(row, swap.index, "num");
      cell(row, swap.name);
      cell(row, swap.version + (swap.forced ? " (forced)" : ""));
      cell(row, swap.hash.slice(0, 16));
    }
  } catch (error) {
    $("#guest-active").textContent = `cannot read the guest: ${error.message}`;
  }
}

function show(selector, text, failed) {
  const out = $(selector);
  out.textContent = text;
  out.classList.toggle("error", Boolean(failed));
}

/** Describes an answer: its status and body (or a friendlier line). */
async function describe(answer) {
  const text = await answer.text();
  if (answer.status === 401) return "401: the cluster token is missing or wrong (set it under Admin)";
  if (answer.status === 404 && !text) return "404: not found";
  return `${answer.status}: ${text}`;
}

function keyParam() {
  const key = $("#kv-key").value;
  if (!key) throw new Error("enter a key");
  return `key=${encodeURIComponent(key)}`;
}

async function kv(action) {
  try {
    let answer;
    if (action === "get") {
      answer = await call(`/get?${keyParam()}`);
    } else if (action === "set") {
      answer = await call(`/set?${keyParam()}`, {
        method: "POST",
        headers: FORWARD,
        body: $("#kv-value").value,
      });
    } else {
      answer = await call(`/delete?${keyParam()}`, { method: "POST", headers: FORWARD });
    }
    if (answer.ok) {
      show("#kv-result", action === "get" ? await answer.text() : `${action}: ${await answer.text()}`);
    } else {
      show("#kv-result", `${action}: ${await describe(answer)}`, true);
    }
  } catch (error) {
    show("#kv-result", `${action}: ${error.message}`, true);
  }
}

let watch = null;
let watched = { prefix: null, lastIndex: null };

/** Text from a watch event's key or value (base64 when `base64` is set). */
function decoded(text, base64) {
  if (text === null || text === undefined) return null;
  if (!base64) return text;
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  return new TextDecoder("utf-8", { fatal: false }).decode(bytes);
}

function addEvent(kind, text) {
  const list = $("#watch-events");
  const item = document.createElement("li");
  item.className = kind;
  item.textContent = text;
  list.prepend(item);
  while (list.children.length > 200) list.lastChild.remove();
}

function startWatch() {
  stopWatch();
  const prefix = $("#watch-prefix").value;
  // Watching the same prefix again resumes after the last event seen.
  const resume = watched.prefix === prefix && watched.lastIndex !== null;
  let url = `/watch?prefix=${encodeURIComponent(prefix)}`;
  if (resume) url += `&from=${watched.lastIndex + 1}`;
  watched = { prefix, lastIndex: resume ? watched.lastIndex : null };
  const source = new EventSource(url);
  watch = source;
  $("#watch-state").textContent = `connecting to ${url}…`;
  $("#watch-start").disabled = true;
  $("#watch-stop").disabled = false;
  source.onopen = () => {
    $("#watch-state").textContent = `watching "${prefix}"`;
  };
  const onChange = (event) => {
    try {
      const change = JSON.parse(event.data);
      watched.lastIndex = change.index;
      const key = decoded(change.key, change.base64);
      const value = decoded(change.value, change.base64);
      addEvent(event.type, `#${change.index} ${event.type} ${key}${value === null ? "" : ` = ${value}`}`);
    } catch (error) {
      addEvent("dropped", `unreadable event: ${error.message}`);
    }
  };
  source.addEventListener("put", onChange);
  source.addEventListener("delete", onChange);
  source.addEventListener("dropped", (event) => {
    let reason = event.data;
    try {
      reason = JSON.parse(event.data).reason;
    } catch (_) {
      // Shown as it came.
    }
    addEvent("dropped", `dropped: ${reason}`);
    stopWatch(`dropped by the node: ${reason}; press watch to resume`);
  });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      stopWatch(`the watch failed: ${url} could not be opened on this node; press watch to retry`);
    } else {
      $("#watch-state").textContent = "connection lost; reconnecting…";
    }
  };
}

function stopWatch(message) {
  if (watch) watch.close();
  watch = null;
  $("#watch-start").disabled = false;
  $("#watch-stop").disabled = true;
  $("#watch-state").textContent = message || "not watching";
  $("#watch-state").classList.toggle("error", Boolean(message));
}

async function deploy() {
  const file = $("#guest-file").files[0];
  if (!file) {
    show("#admin-result", "choose a .wasm file first", true);
    return;
  }
  show("#admin-result", `deploying ${file.name} (${file.size} bytes)…`);
  try {
    const force = $("#guest-force").checked ? "?force=true" : "";
    const answer = await call(
      `/guest${force}`,
      { method: "POST", headers: authorized({ "Content-Type": "application/wasm" }), body: await file.arrayBuffer() },
      120000,
    );
    if (!answer.ok) {
      show("#admin-result", `deploy: ${await describe(answer)}`, true);
      return;
    }
    const swap = await answer.json();
    show("#admin-result", `deployed ${swap.name} ${swap.version} from index ${swap.index}`);
    loadGuest();
  } catch (error) {
    show("#admin-result", `deploy: ${error.message}`, true);
  }
}

async function removeMember() {
  const id = $("#remove-id").value;
  if (!id || !confirm(`Remove node ${id} from the cluster?`)) return;
  try {
    const answer = await call(`/remove?id=${encodeURIComponent(id)}`, {
      method: "POST",
      headers: authorized(FORWARD),
    }, 30000);
    show("#admin-result", answer.ok ? `node ${id} removed` : `remove: ${await describe(answer)}`, !answer.ok);
  } catch (error) {
    show("#admin-result", `remove: ${error.message}`, true);
  }
}

function start() {
  $("#token").value = sessionStorage.getItem("raftwasm-token") || "";
  $("#token-save").addEventListener("click", () => {
    const token = $("#token").value.trim();
    if (token) sessionStorage.setItem("raftwasm-token", token);
    else sessionStorage.removeItem("raftwasm-token");
    show("#admin-result", token ? "token set for this tab" : "token cleared");
  });
  $("#kv-get").addEventListener("click", () => kv("get"));
  $("#kv-set").addEventListener("click", () => kv("set"));
  $("#kv-delete").addEventListener("click", () => kv("delete"));
  $("#watch-start").addEventListener("click", startWatch);
  $("#watch-stop").addEventListener("click", () => stopWatch());
  $("#deploy").addEventListener("click", deploy);
  $("#remove").addEventListener("click", removeMember);
  for (const form of document.querySelectorAll("form")) {
    form.addEventListener("submit", (event) => event.preventDefault());
  }
  poll();
}

start();
