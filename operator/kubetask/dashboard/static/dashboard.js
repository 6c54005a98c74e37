// kubetask dashboard: progressive enhancement of the server-rendered pages. No framework,
// no build step, no request to another origin: the pages work without it (links and forms),
// and this adds live updates, keyboard navigation, the logs viewer and the action buttons,
// which call the public API under <prefix>/api/v1 with the sign-in cookie.
"use strict";

const prefix = document.body.dataset.prefix || "/dashboard";
const CSRF = { "X-Kubetask-Dashboard": "1" };
const POLL_MS = 5000;

// ---- theme ------------------------------------------------------------------------------
const savedTheme = localStorage.getItem("kubetask-theme");
if (savedTheme) document.documentElement.dataset.theme = savedTheme;
function toggleTheme() {
  const dark = document.documentElement.dataset.theme
    ? document.documentElement.dataset.theme === "dark"
    : matchMedia("(prefers-color-scheme: dark)").matches;
  const next = dark ? "light" : "dark";
  document.documentElement.dataset.theme = next;
  localStorage.setItem("kubetask-theme", next);
}

// ---- the API ----------------------------------------------------------------------------
async function api(method, path, body) {
  const init = { method, headers: { ...CSRF }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(`${prefix}/api/v1${path}`, init);
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const err = data.error || { code: String(resp.status), message: resp.statusText };
    throw new Error(`${err.code}: ${err.message}`);
  }
  return data;
}

// ---- runs list: live updates and keyboard -----------------------------------------------
function rows() { return Array.from(document.querySelectorAll("#rows tr[data-href]")); }
let selected = -1;
function select(i) {
  const all = rows();
  if (!all.length) return;
  selected = Math.max(0, Math.min(i, all.length - 1));
  all.forEach((r, j) => r.classList.toggle("selected", j === selected));
  all[selected].scrollIntoView({ block: "nearest" });
}

function setupRuns() {
  const tbody = document.getElementById("rows");
  if (!tbody) return;
  tbody.addEventListener("click", (e) => {
    const tr = e.target.closest("tr[data-href]");
    if (tr && !e.target.closest("a")) location.href = tr.dataset.href;
  });
  const range = document.getElementById("range");
  const customs = document.querySelectorAll(".filters .custom");
  const showCustom = () => customs.forEach((c) => (c.hidden = range.value !== "custom"));
  range.addEventListener("change", showCustom);
  showCustom();

  const live = document.getElementById("live");
  setupBulk(() => refresh(true));
  if (!live || live.dataset.state === "off") return;
  const text = document.getElementById("live-text");
  const toggle = document.getElementById("live-toggle");
  let paused = false;
  toggle.addEventListener("click", () => {
    paused = !paused;
    toggle.textContent = paused ? "Resume" : "Pause";
    live.dataset.state = paused ? "paused" : "on";
    text.textContent = paused ? "Paused" : "Live";
  });
  async function refresh(now) {
    if (!live || live.dataset.state === "off") return;
    if (!now && (paused || document.hidden)) return;
    const url = new URL(location.href);
    url.searchParams.set("partial", "rows");
    try {
      const resp = await fetch(url, { credentials: "same-origin" });
      if (!resp.ok) throw new Error(String(resp.status));
      const keep = rows()[selected]?.dataset.runId;
      tbody.innerHTML = await resp.text();
      const again = rows().findIndex((r) => r.dataset.runId === keep);
      if (again >= 0) select(again);
      live.dataset.state = paused ? "paused" : "on";
      text.textContent = `Live · updated ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      live.dataset.state = "error";
      text.textContent = `Not updating (${e.message}); retrying`;
    }
  }
  setInterval(() => refresh(false), POLL_MS);
}

// ---- bulk actions: count (dry run), confirm, then the API's NDJSON progress -----------------
function setupBulk(refresh) {
  const bulk = document.getElementById("bulk");
  if (!bulk) return;
  const filter = JSON.parse(bulk.dataset.filter || "{}");
  const bar = document.getElementById("bulk-progress");
  const status = document.getElementById("bulk-status");
  bulk.querySelectorAll("button[data-verb]").forEach((button) => button.addEventListener("click", async () => {
    const verb = button.dataset.verb;
    const path = `${prefix}/api/v1/runs/${verb}`;
    const post = (body) => fetch(path, {
      method: "POST", credentials: "same-origin",
      headers: { ...CSRF, "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    try {
      const dry = await post({ ...filter, dryRun: true });
      const counted = JSON.parse((await dry.text()).trim().split("\n").pop());
      if (!dry.ok) throw new Error(`${counted.error.code}: ${counted.error.message}`);
      const s = counted.summary;
      if (!s.matched) { status.textContent = `No run to ${verb}.`; return; }
      let question = `${verb === "cancel" ? "Cancel" : "Replay"} ${s.matched} run${s.matched === 1 ? "" : "s"}` +
        ` matching these filters${verb === "cancel" ? " (unfinished only)" : ""}?`;
      if (s.truncated) question += ` More match: only the newest ${s.matched} now.`;
      if (s.deniedNamespaces.length) question += ` Left alone (no permission): ${s.deniedNamespaces.join(", ")}.`;
      if (!confirm(question)) return;
      button.disabled = true;
      bar.hidden = false; bar.max = s.matched; bar.value = 0;
      const resp = await post(filter);
      if (!resp.ok) { const e = (await resp.json()).error; throw new Error(`${e.code}: ${e.message}`); }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffered = "", last = null;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffered += decoder.decode(value, { stream: true });
        const lines = buffered.split("\n");
        buffered = lines.pop();
        for (const line of lines.filter(Boolean)) {
          last = JSON.parse(line);
          bar.max = last.total || 1; bar.value = last.done;
          status.textContent = `${last.done} of ${last.total}…`;
        }
      }
      const sum = last && last.summary;
      status.textContent = sum
        ? `Done: ${sum.succeeded} ${verb === "cancel" ? "canceled" : "replayed"}, ${sum.skipped} skipped, ${sum.failed} failed.`
        : "Done.";
      refresh();
    } catch (e) {
      status.textContent = e.message; status.className = "error";
    } finally {
      button.disabled = false;
    }
  }));
}

// ---- a run's page -------------------------------------------------------------------------
function setupRun() {
  const head = document.getElementById("run");
  if (!head) return;
  const id = head.dataset.runId;
  const status = document.getElementById("action-status");
  const say = (msg, bad) => { status.textContent = msg; status.className = bad ? "error" : ""; };

  const cancel = document.getElementById("cancel");
  if (cancel) cancel.addEventListener("click", async () => {
    if (!confirm(`Cancel run ${id}?`)) return;
    cancel.disabled = true;
    try {
      await api("POST", `/runs/${encodeURIComponent(id)}/cancel`);
      say("Cancel requested; the run ends shortly.");
      cancel.hidden = true;
    } catch (e) { say(e.message, true); cancel.disabled = false; }
  });
  const replay = document.getElementById("replay");
  if (replay) replay.addEventListener("click", async () => {
    replay.disabled = true;
    try {
      const made = await api("POST", `/runs/${encodeURIComponent(id)}/replay`);
      location.href = `${prefix}/runs/${encodeURIComponent(made.id)}`;
    } catch (e) { say(e.message, true); replay.disabled = false; }
  });
  const editToggle = document.getElementById("replay-edit-toggle");
  const edit = document.getElementById("replay-edit");
  if (editToggle) editToggle.addEventListener("click", () => { edit.hidden = !edit.hidden; });
  if (edit) edit.addEventListener("submit", async (e) => {
    e.preventDefault();
    let payload;
    try { payload = JSON.parse(document.getElementById("replay-payload").value); }
    catch (err) { say(`The payload is not JSON: ${err.message}`, true); return; }
    try {
      const made = await api("POST", `/runs/${encodeURIComponent(id)}/replay`, { payload });
      location.href = `${prefix}/runs/${encodeURIComponent(made.id)}`;
    } catch (err) { say(err.message, true); }
  });

  document.querySelectorAll("button.copy").forEach((b) => b.addEventListener("click", async () => {
    const text = document.getElementById(b.dataset.copy).textContent;
    try { await navigator.clipboard.writeText(text); b.textContent = "Copied"; }
    catch { b.textContent = "Select and copy"; }
    setTimeout(() => (b.textContent = "Copy"), 1500);
  }));

  const logs = setupLogs(id, head.dataset.finished === "true");
  if (head.dataset.finished !== "true") watchPhase(id, logs);
}

// While a run is unfinished its page follows its phase; when it ends, the logs are read
// to the end and a notice offers a reload for its output, errors and timeline.
const TERMINAL = ["Succeeded", "Failed", "Canceled", "TimedOut", "Deduplicated", "Expired"];
function watchPhase(id, logs) {
  const badge = document.getElementById("phase");
  const timer = setInterval(async () => {
    if (document.hidden) return;
    let run;
    try { run = await api("GET", `/runs/${encodeURIComponent(id)}`); } catch { return; }
    if (run.phase !== badge.textContent) {
      badge.textContent = run.phase;
      badge.className = `phase phase-${run.phase.toLowerCase()}`;
    }
    if (TERMINAL.includes(run.phase)) {
      clearInterval(timer);
      logs.finish();
      document.getElementById("cancel")?.remove();
      const ended = document.getElementById("ended");
      ended.hidden = false;
    }
  }, 3000);
}

function setupLogs(id, finished) {
  const pre = document.getElementById("logs");
  const attempt = document.getElementById("log-attempt");
  const search = document.getElementById("log-search");
  const follow = document.getElementById("log-follow");
  const count = document.getElementById("log-count");
  let lines = [], after = null, timer = null, generation = 0;

  function draw() {
    const q = search.value.toLowerCase();
    const shown = q ? lines.filter((l) => l.message.toLowerCase().includes(q)) : lines;
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.replaceChildren(...shown.map((l) => {
      const span = document.createElement("span");
      span.className = `l-${l.level.toLowerCase()} l-${l.stream}`;
      span.dataset.attempt = l.attempt;
      span.textContent = `${l.ts.slice(11, 23)} #${l.attempt} ${l.level.padEnd(7)} ${l.message}\n`;
      return span;
    }));
    count.textContent = q ? `${shown.length} of ${lines.length} lines` : `${lines.length} lines`;
    if (follow.checked && atBottom) pre.scrollTop = pre.scrollHeight;
  }
  async function load() {
    const mine = generation;
    const params = new URLSearchParams({ limit: "5000" });
    if (attempt.value) params.set("attempt", attempt.value);
    if (after !== null) params.set("after", String(after));
    try {
      const page = await api("GET", `/runs/${encodeURIComponent(id)}/logs?${params}`);
      if (mine !== generation) return;
      lines.push(...page.items);
      after = page.next;
      draw();
      if (page.items.length === 5000) return load();
    } catch (e) { count.textContent = e.message; }
  }
  function schedule() {
    clearInterval(timer);
    if (follow.checked && !finished) timer = setInterval(load, 2000);
  }
  function finish() { finished = true; schedule(); load(); }
  attempt.addEventListener("change", () => { generation++; lines = []; after = null; load(); });
  search.addEventListener("input", draw);
  follow.addEventListener("change", () => { schedule(); if (follow.checked) pre.scrollTop = pre.scrollHeight; });
  load().then(() => { pre.scrollTop = pre.scrollHeight; });
  schedule();
  return { finish };
}

// ---- queues: pause, resume, limit ---------------------------------------------------------
function setupQueues() {
  const table = document.getElementById("queues");
  if (!table) return;
  const ns = encodeURIComponent(table.dataset.namespace);
  const status = document.getElementById("queue-status");
  const patch = async (queue, body) => {
    try {
      await api("PATCH", `/namespaces/${ns}/queues/${encodeURIComponent(queue)}`, body);
      location.reload();
    } catch (e) { status.textContent = e.message; status.className = "error"; }
  };
  table.querySelectorAll("tr[data-queue]").forEach((tr) => {
    const queue = tr.dataset.queue;
    tr.querySelector(".queue-pause")?.addEventListener("click", (e) =>
      patch(queue, { paused: e.target.dataset.paused !== "true" }));
    tr.querySelector(".queue-set")?.addEventListener("click", () => {
      const raw = tr.querySelector(".queue-limit").value.trim();
      patch(queue, { concurrencyLimit: raw === "" ? null : Number(raw) });
    });
  });
}

// ---- keys -------------------------------------------------------------------------------
document.addEventListener("keydown", (e) => {
  const typing = e.target.closest("input, textarea, select");
  if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === "/") {
    const s = document.getElementById("search") || document.getElementById("log-search");
    if (s) { e.preventDefault(); s.focus(); }
  } else if (e.key === "j") { select(selected + 1); }
  else if (e.key === "k") { select(selected - 1); }
  else if (e.key === "Enter" && selected >= 0 && rows()[selected]) { location.href = rows()[selected].dataset.href; }
  else if (e.key === "g") { location.href = `${prefix}/runs`; }
  else if (e.key === "T") { location.href = `${prefix}/tasks`; }
  else if (e.key === "Q") { location.href = `${prefix}/queues`; }
  else if (e.key === "t") { toggleTheme(); }
});

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("theme-toggle")?.addEventListener("click", toggleTheme);
  document.getElementById("namespace-select")?.addEventListener("change", (e) => e.target.form.submit());
  setupRuns();
  setupRun();
  setupQueues();
});
