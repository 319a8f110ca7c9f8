// Lamina's admin page. Everything shown comes from the JSON admin API, called with the admin key
// as a Bearer header; the key lives in sessionStorage. Data reaches the DOM only through
// textContent and attributes, never as HTML.
"use strict";

(() => {
  const KEY_ITEM = "lamina-admin-key";
  const JOB_POLL_MS = 1000;
  const STORE_POLL_MS = 5000;
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const SVG = "http://www.w3.org/2000/svg";

  const state = {
    key: null,
    stops: [],
    storeSignature: null, // live merge + live task versions: the stats are fetched again when it changes
    seenPoints: new Map(), // job id -> [[step, loss], ...] seen while polling (when a job has no loss_curve)
    jobStatus: new Map(), // job id -> the status last seen
    pictureUrl: null,
  };

  const byId = (id) => document.getElementById(id);

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) tr.append(cell instanceof Node ? wrapCell(cell) : el("td", cell));
    return tr;
  }

  function wrapCell(node) {
    if (node.tagName === "TD" || node.tagName === "TH") return node;
    const td = document.createElement("td");
    td.append(node);
    return td;
  }

  // ---- formatting -------------------------------------------------------------------------------

  function num(value) {
    if (value === null || value === undefined) return "–";
    if (typeof value !== "number") return String(value);
    if (!Number.isFinite(value)) return String(value);
    if (Number.isInteger(value)) return String(value);
    if (value !== 0 && Math.abs(value) < 1e-3) return value.toExponential(2);
    return String(Number(value.toPrecision(3)));
  }

  function text(value) {
    if (value === null || value === undefined) return "–";
    if (typeof value === "number") return num(value);
    if (Array.isArray(value)) return "[" + value.map(text).join(", ") + "]";
    if (typeof value === "object") {
      return Object.entries(value).map(([k, v]) => `${k}: ${text(v)}`).join("; ");
    }
    return String(value);
  }

  function when(iso) {
    if (!iso) return "–";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
  }

  // accuracy (percent) -> a background from red (0) through yellow to green (100)
  function heat(percent) {
    const clamped = Math.max(0, Math.min(100, percent));
    return `hsl(${Math.round(clamped * 1.2)}, 70%, 78%)`;
  }

  // a share in [0, 1] -> a blue as dark as the share
  function shade(share) {
    const clamped = Math.max(0, Math.min(1, share));
    return `hsl(210, 70%, ${Math.round(97 - clamped * 45)}%)`;
  }

  // ---- messages ---------------------------------------------------------------------------------

  function say(message, kind) {
    const box = byId("message");
    box.textContent = message;
    box.className = kind || "info";
    box.hidden = !message;
  }

  function pollTrouble(message) {
    const span = byId("updated");
    if (message) {
      span.textContent = `(not updated: ${message})`;
      span.className = "error";
    } else {
      span.textContent = `updated ${new Date().toLocaleTimeString()}`;
      span.className = "";
    }
  }

  // ---- the API ----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body, asBlob) {
    const headers = { Authorization: `Bearer ${state.key}` };
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (error) {
      throw new ApiError(0, `the server did not answer (${error.message})`);
    }
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        const data = await response.json();
        if (data && data.error && data.error.message) message = data.error.message;
        else if (data && data.detail) message = text(data.detail);
      } catch (_) {
        // not JSON: keep the status line
      }
      throw new ApiError(response.status, message);
    }
    return asBlob ? response.blob() : response.json();
  }

  function unauthorised(error) {
    return error instanceof ApiError && (error.status === 401 || error.status === 403);
  }

  // ---- jobs -------------------------------------------------------------------------------------

  function lossPoints(job) {
    let seen = state.seenPoints.get(job.id);
    if (!seen) {
      seen = [];
      state.seenPoints.set(job.id, seen);
    }
    const progress = job.progress;
    if (progress && typeof progress.loss === "number" && Number.isFinite(progress.loss)) {
      const last = seen[seen.length - 1];
      if (!last || last[0] !== progress.step) seen.push([progress.step, progress.loss]);
    }
    const reported = Array.isArray(job.loss_curve) ? job.loss_curve : [];
    const points = reported.length >= seen.length ? reported : seen;
    return points.filter(
      (p) => Array.isArray(p) && Number.isFinite(p[0]) && Number.isFinite(p[1]),
    );
  }

  function lossCurve(points) {
    if (points.length < 2) return el("span", "–", "muted");
    const width = 160;
    const height = 40;
    const pad = 3;
    const steps = points.map((p) => p[0]);
    const losses = points.map((p) => p[1]);
    const [s0, s1] = [Math.min(...steps), Math.max(...steps)];
    const [l0, l1] = [Math.min(...losses), Math.max(...losses)];
    const x = (s) => pad + ((s - s0) / (s1 - s0 || 1)) * (width - 2 * pad);
    const y = (l) => pad + ((l1 - l) / (l1 - l0 || 1)) * (height - 2 * pad);
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("width", String(width));
    svg.setAttribute("height", String(height));
    svg.setAttribute("class", "curve");
    svg.setAttribute("role", "img");
    const label = `loss ${num(points[0][1])} at step ${points[0][0]} to ${num(points[points.length - 1][1])} at step ${points[points.length - 1][0]}`;
    svg.setAttribute("aria-label", label);
    const title = document.createElementNS(SVG, "title");
    title.textContent = label;
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", "currentColor");
    line.setAttribute("stroke-width", "1.5");
    svg.append(title, line);
    return svg;
  }

  function jobRow(job) {
    const progress = job.progress;
    const bar = document.createElement("progress");
    if (progress && progress.total > 0) {
      bar.max = progress.total;
      bar.value = Math.min(progress.step, progress.total);
    } else if (job.status === "succeeded") {
      bar.max = 1;
      bar.value = 1;
    } else {
      bar.removeAttribute("value");
    }
    const progressCell = document.createElement("td");
    progressCell.append(bar, el("span", progress ? ` ${progress.step}/${progress.total}` : ""));
    const status = el("td", job.status, `status status-${job.status}`);
    const notes = [];
    if (job.error && job.error.message) notes.push(job.error.message);
    for (const warning of job.warnings || []) notes.push(warning);
    if (job.cancel_requested && !TERMINAL.has(job.status)) notes.push("cancel requested");
    const tr = row([
      el("code", job.id),
      job.name,
      job.method,
      status,
      progressCell,
      num(progress ? progress.loss : null),
      lossCurve(lossPoints(job)),
      job.merge_id || "–",
      notes.join(" · "),
    ]);
    tr.dataset.job = job.id;
    tr.dataset.task = job.name;
    tr.dataset.status = job.status;
    return tr;
  }

  async function pollJobs() {
    const jobs = (await api("GET", "/jobs")).data || [];
    let storeChanged = false;
    for (const job of jobs) {
      const before = state.jobStatus.get(job.id);
      if (before !== undefined && before !== job.status && TERMINAL.has(job.status)) storeChanged = true;
      state.jobStatus.set(job.id, job.status);
    }
    const body = byId("jobs").tBodies[0];
    const rows = jobs.slice().reverse().slice(0, 100).map(jobRow);
    if (!rows.length) {
      const empty = el("td", "No jobs yet: post a task to POST /tasks.", "muted");
      empty.colSpan = 9;
      rows.push(row([empty]));
    }
    body.replaceChildren(...rows);
    if (storeChanged) refreshStore();
  }

  // ---- tasks, merges, the accuracy matrix, the stats --------------------------------------------

  function accuracyChips(evaluationRow) {
    const span = el("span", null, "chips");
    if (!evaluationRow) {
      span.append(el("span", "no check recorded", "muted"));
      return span;
    }
    for (const [task, value] of Object.entries(evaluationRow)) {
      if (typeof value !== "number") continue;
      const chip = el("span", `${task} ${num(value)}%`, "chip");
      chip.style.background = heat(value);
      span.append(chip);
    }
    return span;
  }

  function actionButton(label, ariaLabel, onClick) {
    const button = el("button", label);
    button.type = "button";
    button.setAttribute("aria-label", ariaLabel);
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await onClick();
      } finally {
        button.disabled = false;
      }
    });
    return button;
  }

  async function act(question, run, done) {
    if (!window.confirm(question)) return;
    say("working…", "info");
    try {
      const result = await run();
      say(done(result), "ok");
    } catch (error) {
      if (unauthorised(error)) return signOut(error.message);
      say(`Failed: ${error.message}`, "error");
    }
    await refreshStore();
  }

  function removeTask(name) {
    return act(
      `Remove task "${name}"? The continual model is rebuilt without it and served at once.`,
      () => api("DELETE", `/admin/tasks/${encodeURIComponent(name)}`),
      (result) =>
        `Removed task ${result.removed}; live merge now ${result.live_merge ? result.live_merge.id : "none (the base model)"}.`,
    );
  }

  function rollback(merge) {
    return act(
      `Roll back to ${merge.id}? Its tasks (${merge.parents.join(", ") || "none"}) become the live tasks, and every server swaps to it.`,
      () => api("POST", "/admin/rollback", { merge_id: merge.id }),
      (result) => `Rolled back: ${result.id} is live.`,
    );
  }

  function renderAdapters(view) {
    byId("live-merge").textContent = view.live_merge || "none (the base model)";
    const served = view.served || {};
    const servedText = served.in_step === false && served.last_error
      ? `this server is behind: ${served.last_error}`
      : `this server serves ${served.live_merge || "the base model"}`;
    byId("served").textContent = `· ${servedText} ·`;

    const tasks = view.tasks || [];
    const taskRows = tasks.map((task) => {
      const tr = row([
        task.name,
        el("code", task.id),
        task.method || "–",
        num(task.rank),
        when(task.created_at),
        accuracyChips(task.evaluation_row),
        actionButton("Remove", `Remove task ${task.name}`, () => removeTask(task.name)),
      ]);
      tr.dataset.task = task.name;
      return tr;
    });
    if (!taskRows.length) {
      const empty = el("td", "No live task: continual is the base model.", "muted");
      empty.colSpan = 7;
      taskRows.push(row([empty]));
    }
    byId("tasks").tBodies[0].replaceChildren(...taskRows);

    const merges = (view.merges || []).slice().reverse(); // newest first
    const mergeRows = merges.map((merge) => {
      const action = merge.live
        ? el("strong", "live", "live-badge")
        : actionButton("Roll back", `Roll back to ${merge.id}`, () => rollback(merge));
      const tr = row([
        el("code", merge.id),
        merge.kind,
        merge.method || "–",
        (merge.parents || []).join(", ") || "–",
        num(merge.rank),
        when(merge.created_at),
        action,
      ]);
      tr.dataset.merge = merge.id;
      if (merge.live) tr.className = "live";
      return tr;
    });
    byId("merges").tBodies[0].replaceChildren(...mergeRows);
  }

  // the base's column: the share of general prompts continual answered as the base did
  function generalOf(entry) {
    return entry.general && typeof entry.general === "object" ? entry.general : null;
  }

  function renderHeatmap(matrix) {
    const table = byId("heatmap");
    const columns = [];
    for (const entry of matrix) {
      for (const [task, value] of Object.entries(entry.row || {})) {
        if (typeof value === "number" && !columns.includes(task)) columns.push(task);
      }
    }
    const withGeneral = matrix.some((entry) => generalOf(entry) !== null);
    const head = document.createElement("tr");
    head.append(el("th", "after"));
    if (withGeneral) head.append(el("th", "base (general)"));
    for (const task of columns) head.append(el("th", task));
    table.tHead.replaceChildren(head);

    const rows = matrix.map((entry) => {
      const tr = document.createElement("tr");
      tr.dataset.after = entry.after;
      tr.append(el("th", entry.after));
      if (withGeneral) {
        const general = generalOf(entry);
        const td = el("td", general ? `${num(general.agreement)}%` : "–", "general");
        if (general && typeof general.agreement === "number") {
          td.style.background = heat(general.agreement);
          td.title = `agreement with the base on ${general.n} general prompts`;
        }
        tr.append(td);
      }
      for (const task of columns) {
        const value = (entry.row || {})[task];
        const td = el("td", typeof value === "number" ? num(value) : "");
        if (typeof value === "number") {
          td.style.background = heat(value);
          td.title = `${task}: ${value}% after ${entry.after}`;
        }
        td.dataset.task = task;
        tr.append(td);
      }
      return tr;
    });
    if (!rows.length) {
      const empty = el("td", "No accuracy rows yet: each task published with a check adds one.", "muted");
      rows.push(row([empty]));
    }
    table.tBodies[0].replaceChildren(...rows);
  }

  // a task-by-task matrix, shaded by value (shares in [0, 1] as they are, others against the largest)
  function matrixTable(matrix, labels) {
    const table = el("table", null, "matrix");
    const values = matrix.flat().filter((v) => typeof v === "number" && Number.isFinite(v));
    const largest = Math.max(1, ...values.map(Math.abs));
    for (let i = 0; i < matrix.length; i++) {
      const tr = document.createElement("tr");
      tr.append(el("th", labels[i] !== undefined ? labels[i] : i));
      for (const value of matrix[i] || []) {
        const td = el("td", num(value));
        if (typeof value === "number") td.style.background = shade(Math.abs(value) / largest);
        tr.append(td);
      }
      table.append(tr);
    }
    return table;
  }

  function isMatrix(value) {
    return Array.isArray(value) && value.length > 0 && value.every(Array.isArray);
  }

  function renderStats(stats) {
    const tasks = stats.tasks || [];
    const aggregate = stats.aggregate || {};
    byId("stats-summary").textContent =
      `${tasks.length} task(s): ${tasks.join(", ") || "none"} · parameters: ${text(stats.params || {})}`;

    // aggregate: numbers and matrices here; lists with one value per task in the per-task table
    const perTask = [];
    const aggregateRows = [];
    for (const [name, value] of Object.entries(aggregate)) {
      if (Array.isArray(value) && !isMatrix(value) && value.length === tasks.length && tasks.length) {
        perTask.push(name);
      } else if (isMatrix(value)) {
        aggregateRows.push(row([el("th", name), matrixTable(value, tasks)]));
      } else {
        aggregateRows.push(row([el("th", name), text(value)]));
      }
    }
    byId("stats-aggregate").tBodies[0].replaceChildren(...aggregateRows);

    const taskTable = byId("stats-tasks");
    const taskHead = document.createElement("tr");
    taskHead.append(el("th", "task"), ...perTask.map((name) => el("th", name)));
    taskTable.tHead.replaceChildren(taskHead);
    taskTable.tBodies[0].replaceChildren(
      ...tasks.map((task, i) => row([el("th", task), ...perTask.map((name) => num(aggregate[name][i]))])),
    );

    const modules = Object.entries(stats.modules || {});
    const columns = [];
    for (const [, view] of modules) {
      for (const [name, value] of Object.entries(view)) {
        const scalar = typeof value === "number" || name === "shape";
        if (scalar && !columns.includes(name)) columns.push(name);
      }
    }
    const moduleTable = byId("stats-modules");
    const moduleHead = document.createElement("tr");
    moduleHead.append(el("th", "module"), ...columns.map((name) => el("th", name)));
    moduleTable.tHead.replaceChildren(moduleHead);
    moduleTable.tBodies[0].replaceChildren(
      ...modules.map(([name, view]) => row([el("th", name), ...columns.map((c) => text(view[c]))])),
    );
  }

  async function loadStore() {
    const view = await api("GET", "/admin/adapters");
    renderAdapters(view);
    const signature = JSON.stringify([view.live_merge, (view.tasks || []).map((t) => t.id)]);
    if (signature === state.storeSignature) return;
    let matrix = view.accuracy_matrix || [];
    try {
      const stats = await api("GET", "/admin/stats");
      matrix = stats.accuracy_matrix || matrix;
      renderStats(stats);
    } catch (error) {
      if (unauthorised(error)) throw error;
      byId("stats-summary").textContent = `statistics unavailable: ${error.message}`;
    }
    renderHeatmap(matrix);
    state.storeSignature = signature;
    if (state.pictureUrl) await loadPicture();
  }

  let storeBusy = null;
  let storeAgain = false;

  // one store refresh at a time; a call during one asks for one more right after it
  function refreshStore() {
    if (storeBusy) {
      storeAgain = true;
      return storeBusy;
    }
    storeBusy = (async () => {
      try {
        do {
          storeAgain = false;
          await loadStore();
        } while (storeAgain);
        pollTrouble(null);
      } catch (error) {
        if (unauthorised(error)) signOut(error.message);
        else pollTrouble(error.message);
      } finally {
        storeBusy = null;
      }
    })();
    return storeBusy;
  }

  async function loadPicture() {
    const blob = await api("GET", "/admin/stats.png", undefined, true);
    if (state.pictureUrl) URL.revokeObjectURL(state.pictureUrl);
    state.pictureUrl = URL.createObjectURL(blob);
    const img = byId("stats-picture");
    img.src = state.pictureUrl;
    img.hidden = false;
    byId("load-picture").textContent = "Refresh picture";
  }

  // ---- session ----------------------------------------------------------------------------------

  function every(ms, task) {
    let stopped = false;
    let timer = null;
    const tick = async () => {
      try {
        await task();
        if (task !== refreshStore) pollTrouble(null);
      } catch (error) {
        if (unauthorised(error)) return signOut(error.message);
        pollTrouble(error.message);
      }
      if (!stopped) timer = setTimeout(tick, ms);
    };
    timer = setTimeout(tick, 0);
    return () => {
      stopped = true;
      clearTimeout(timer);
    };
  }

  async function signIn(key) {
    state.key = key;
    try {
      await api("GET", "/admin/adapters");
    } catch (error) {
      state.key = null;
      sessionStorage.removeItem(KEY_ITEM);
      say(unauthorised(error) ? `Key refused: ${error.message}` : `Cannot reach the admin API: ${error.message}`, "error");
      return;
    }
    sessionStorage.setItem(KEY_ITEM, key);
    say("", "info");
    byId("login").hidden = true;
    byId("dashboard").hidden = false;
    byId("session").hidden = false;
    state.storeSignature = null;
    state.stops.push(every(JOB_POLL_MS, pollJobs), every(STORE_POLL_MS, refreshStore));
  }

  function signOut(reason) {
    for (const stop of state.stops.splice(0)) stop();
    state.key = null;
    sessionStorage.removeItem(KEY_ITEM);
    if (state.pictureUrl) URL.revokeObjectURL(state.pictureUrl);
    state.pictureUrl = null;
    byId("stats-picture").hidden = true;
    byId("dashboard").hidden = true;
    byId("session").hidden = true;
    byId("login").hidden = false;
    byId("key").value = "";
    say(reason ? `Signed out: ${reason}` : "", reason ? "error" : "info");
  }

  document.addEventListener("DOMContentLoaded", () => {
    byId("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = byId("key").value.trim();
      if (key) signIn(key);
    });
    byId("forget").addEventListener("click", () => signOut(null));
    byId("refresh").addEventListener("click", () => {
      state.storeSignature = null;
      refreshStore();
    });
    byId("load-picture").addEventListener("click", async () => {
      try {
        await loadPicture();
      } catch (error) {
        if (unauthorised(error)) return signOut(error.message);
        say(`Picture unavailable: ${error.message}`, "error");
      }
    });
    const saved = sessionStorage.getItem(KEY_ITEM);
    if (saved) signIn(saved);
  });
})();
