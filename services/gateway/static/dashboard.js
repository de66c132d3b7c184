// The dlora status page: polls GET /v1/status (admin) once a second and draws it.
//
// The admin key comes from the URL's fragment (#key=..., removed at once) or the form, is kept in
// this tab's sessionStorage only and goes out as a bearer token with each poll. A 401 or 403
// forgets it and asks again. Every value is put in with textContent: adapter names are user input.
"use strict";

(function () {
  const KEY = "dlora.adminKey";
  const STATUS_URL = "v1/status"; // relative: works behind a proxy that serves the gateway under a prefix
  const POLL_MS = 1000;
  const HISTORY = 60;

  const $ = (id) => document.getElementById(id);
  let generation = 0; // bumped to stop an older polling loop (new key, or the key refused)
  let timer = null;
  let lastOk = null; // Date of the last good answer
  let samples = []; // {queue, tps} per poll
  let previous = null; // {time, tokens, gateway} of the previous answer, for tokens/s

  // ---- small DOM helpers --------------------------------------------------------------------
  function el(tag, opts, ...children) {
    const node = document.createElement(tag);
    if (opts) {
      if (opts.cls) node.className = opts.cls;
      if (opts.text !== undefined && opts.text !== null) node.textContent = String(opts.text);
      if (opts.title) node.title = opts.title;
      if (opts.data) for (const [k, v] of Object.entries(opts.data)) node.dataset[k] = v;
    }
    for (const c of children) if (c) node.appendChild(c);
    return node;
  }
  const td = (text, cls, field) => el("td", { text, cls, data: field ? { field } : null });
  const num = (value, field) => td(fmtInt(value), "num", field);

  function fmtInt(n) {
    return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US");
  }
  function fmtMs(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const ms = seconds * 1000;
    return ms >= 100 ? ms.toFixed(0) : ms.toFixed(1);
  }
  function fmtPair(a, b) {
    return a === null || a === undefined ? "–" : fmtMs(a) + " / " + fmtMs(b);
  }
  function fmtSeconds(s) {
    return s < 10 ? s.toFixed(2) + " s" : s.toFixed(0) + " s";
  }
  function fmtClock(date) {
    return date.toLocaleTimeString("en-GB", { hour12: false });
  }
  function badge(text, cls, title) {
    return el("span", { cls: "badge " + cls, text, title });
  }

  // ---- the key ------------------------------------------------------------------------------
  function keyFromFragment() {
    const m = /^#key=(.+)$/.exec(location.hash);
    if (!m) return;
    let key = m[1];
    try {
      key = decodeURIComponent(key);
    } catch (e) {
      /* keep it as typed */
    }
    key = key.trim(); // as the form trims what is typed
    sessionStorage.setItem(KEY, key);
    // Out of the address bar and the history: a copied or bookmarked URL will not carry it.
    window.history.replaceState(null, "", location.pathname + location.search);
  }

  function showLogin(message) {
    generation++;
    clearTimeout(timer);
    $("content").hidden = true;
    $("summary").hidden = true;
    $("banner").hidden = true;
    $("updated").textContent = "";
    // No data stays on a page whose key was refused.
    for (const id of ["workers", "adapters"]) $(id).tBodies[0].replaceChildren();
    $("migrations").replaceChildren();
    samples = [];
    previous = null;
    $("login-message").textContent = message || "";
    $("login-message").hidden = !message;
    $("login").hidden = false;
    $("key-input").focus();
  }

  function start() {
    const key = sessionStorage.getItem(KEY);
    if (!key) {
      showLogin("");
      return;
    }
    // A header carries visible ASCII only: fetch refused any other key, which read as the
    // gateway not answering ("Connection lost", retried for ever).
    if (!/^[\x21-\x7e]+$/.test(key)) {
      sessionStorage.removeItem(KEY);
      showLogin("That key holds characters an HTTP header cannot carry. Enter the admin key.");
      return;
    }
    $("login").hidden = true;
    const gen = ++generation;
    clearTimeout(timer);
    poll(key, gen);
  }

  // ---- polling ------------------------------------------------------------------------------
  async function poll(key, gen) {
    let response;
    try {
      response = await fetch(STATUS_URL, {
        headers: { Authorization: "Bearer " + key, Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
      });
    } catch (e) {
      if (gen === generation) lost("Connection lost: the gateway does not answer. Retrying…");
      return;
    }
    if (gen !== generation) return;
    if (response.status === 401 || response.status === 403) {
      sessionStorage.removeItem(KEY);
      let why = "";
      try {
        why = (await response.json()).error.message || "";
      } catch (e) {
        // not the gateway's JSON: the generic words below
      }
      if (gen !== generation) return;
      // a gateway with no admin_key refuses every key: saying "that key" sent users to retype it
      const off = why.includes("no admin_key is configured");
      showLogin(
        off
          ? "The status page is off: this gateway has no admin_key configured."
          : response.status === 401
            ? "The gateway refused that key. Enter the admin key."
            : "That key may not see the status: it needs the admin scope."
      );
      return;
    }
    if (!response.ok) {
      lost("The gateway answered " + response.status + ". Retrying…");
      return;
    }
    let doc;
    try {
      doc = await response.json();
    } catch (e) {
      lost("The gateway sent something unreadable. Retrying…");
      return;
    }
    if (gen !== generation) return;
    lastOk = new Date();
    $("banner").hidden = true;
    render(doc);
    schedule(key, gen);
  }

  function lost(message) {
    const banner = $("banner");
    banner.textContent = message + (lastOk ? " Last good update at " + fmtClock(lastOk) + "." : "");
    banner.hidden = false;
    $("updated").classList.add("stale");
    schedule(sessionStorage.getItem(KEY), generation);
  }

  function schedule(key, gen) {
    clearTimeout(timer);
    if (!key) return;
    timer = setTimeout(() => poll(key, gen), POLL_MS);
  }

  // ---- drawing ------------------------------------------------------------------------------
  function render(doc) {
    $("content").hidden = false;
    $("summary").hidden = false;
    $("model").textContent = doc.model;
    $("gateway").textContent = doc.gateway;
    $("live-workers").textContent = String(doc.workers.length);
    $("clock").textContent = fmtClock(new Date(doc.time * 1000));
    const updated = $("updated");
    updated.textContent = "Last update " + fmtClock(lastOk);
    updated.classList.remove("stale");

    const workers = doc.workers.map((w) => w.worker);
    renderWorkers(doc.workers, doc.model_digest);
    renderAdapters(doc.adapters, workers);
    renderMigrations(doc.migrations);
    track(doc);
  }

  function renderWorkers(workers, digest) {
    const rows = workers.map((w) => {
      const mode = w.mode || "idle";
      const modeCell = el("td", { data: { field: "mode" } }, badge(mode, "mode-" + mode));
      if (w.draining) modeCell.appendChild(badge("draining", "draining"));
      // another base model than the gateway's: none of its requests go there
      if (w.model_digest && digest && w.model_digest !== digest) modeCell.appendChild(badge("other model", "draining"));

      const pct = Math.max(0, Math.min(1, w.kv_cache_usage)) * 100;
      const fill = el("span", { cls: "fill" + (pct >= 90 ? " hot" : pct >= 70 ? " warm" : "") });
      fill.style.width = pct.toFixed(1) + "%"; // CSSOM, not a style attribute: allowed by the CSP
      const kv = el(
        "td",
        { data: { field: "kv" }, title: w.total_blocks - w.free_blocks + " of " + w.total_blocks + " blocks" },
        el("span", { cls: "bar" }, fill),
        el("span", { cls: "pct", text: pct.toFixed(0) + "%" })
      );

      const chips = el("td", { cls: "chips", data: { field: "adapters" } });
      for (const a of w.adapters) {
        chips.appendChild(
          el(
            "span",
            { cls: "chip" + (a.merged ? " merged" : ""), data: { adapter: a.name, tier: a.tier } },
            el("span", { cls: "chip-name", text: a.name }),
            el("span", { cls: "tier tier-" + a.tier, text: a.tier })
          )
        );
      }
      if (!w.adapters.length) chips.appendChild(el("span", { cls: "muted", text: "none loaded" }));

      const device = [w.device, w.dtype].filter(Boolean).join(" · ") || "–";
      return el(
        "tr",
        { data: { worker: w.worker } },
        el("td", { cls: "name", text: w.worker, title: "incarnation " + w.incarnation, data: { field: "worker" } }),
        td(device, "mono", "device"),
        modeCell,
        td(w.merged || "–", w.merged ? "" : "muted", "merged"),
        num(w.running, "running"),
        num(w.waiting, "waiting"),
        kv,
        chips,
        td(fmtSeconds(w.stats_age_s), "num" + (w.stats_age_s > 2 ? " stale" : ""), "age")
      );
    });
    $("workers").tBodies[0].replaceChildren(...rows);
    $("workers-empty").hidden = workers.length > 0;
  }

  function placementGrid(workers, cell) {
    const grid = el("span", { cls: "place" });
    for (const w of workers) grid.appendChild(cell(w));
    return grid;
  }

  function renderAdapters(adapters, workers) {
    // The header's grid names the workers, one column each, over the rows' grids.
    const head = $("placement-head");
    head.replaceChildren(
      el("span", { cls: "place-title", text: "Where", title: "where each adapter is loaded, per live worker" }),
      placementGrid(workers, (w) => el("span", { cls: "place-head", text: w, title: w }))
    );
    const rows = adapters.map((a) => {
      const where = placementGrid(workers, (w) => {
        const tier = a.base ? "base" : a.placement[w] || "none";
        const text = a.base ? "base" : a.placement[w] || "–";
        return el("span", { cls: "cell tier-" + tier, text, title: w + ": " + text, data: { worker: w } });
      });
      const name = el("td", { cls: "name", data: { field: "name" } }, el("span", { text: a.name }));
      if (a.base) name.appendChild(badge("base model", "base"));
      return el(
        "tr",
        { data: { adapter: a.name } },
        name,
        td(a.base ? "–" : a.rank, "num", "rank"),
        el("td", { data: { field: "placement" } }, where),
        num(a.running, "running"),
        num(a.waiting, "waiting"),
        num(a.requests, "requests"),
        td(fmtInt(a.errors), "num" + (a.errors ? " bad" : ""), "errors"),
        num(a.aborted, "aborted"),
        num(a.tokens, "tokens"),
        td(fmtPair(a.ttft_p50_s, a.ttft_p90_s), "num", "ttft"),
        td(fmtPair(a.e2e_p50_s, a.e2e_p90_s), "num", "e2e")
      );
    });
    $("adapters").tBodies[0].replaceChildren(...rows);
  }

  function renderMigrations(plans) {
    const items = plans.map((p) => {
      const head = el(
        "div",
        { cls: "plan-head" },
        el("time", { text: fmtClock(new Date(p.created * 1000)) }),
        p.trigger ? badge(p.trigger, "trigger", "the bound the cluster passed") : null,
        badge(p.method, "method"),
        el("span", { text: p.moves.length + (p.moves.length === 1 ? " move" : " moves") }),
        el("span", { cls: "muted", text: "solved in " + fmtMs(p.solve_seconds) + " ms" }),
        el("span", {
          cls: "muted",
          text: "makespan " + p.makespan_before_s.toFixed(2) + " s → " + p.makespan_after_s.toFixed(2) + " s",
        })
      );
      const moves = el("ul", { cls: "moves" });
      for (const m of p.moves) {
        moves.appendChild(
          el(
            "li",
            { data: { request: m.request_id } },
            el("span", { cls: "mono", text: m.request_id }),
            el("span", { text: " (" + (m.adapter || "base") + ") → " }),
            el("b", { text: m.to_worker }),
            badge(m.ship_kv ? "kv" : "recompute", m.ship_kv ? "kv" : "recompute")
          )
        );
      }
      return el("li", { data: { plan: p.plan_id } }, head, p.moves.length ? moves : null);
    });
    $("migrations").replaceChildren(...items);
    $("migrations-empty").hidden = plans.length > 0;
  }

  // ---- the sparkline ------------------------------------------------------------------------
  function track(doc) {
    const queue = doc.workers.reduce((n, w) => n + w.running + w.waiting, 0);
    const tokens = doc.adapters.reduce((n, a) => n + a.tokens, 0);
    let tps = 0;
    if (previous && previous.gateway === doc.gateway && doc.time > previous.time) {
      tps = Math.max(0, tokens - previous.tokens) / (doc.time - previous.time);
    }
    previous = { time: doc.time, tokens, gateway: doc.gateway };
    samples.push({ queue, tps });
    if (samples.length > HISTORY) samples = samples.slice(-HISTORY);
    $("now-queue").textContent = String(queue);
    $("now-tokens").textContent = tps.toFixed(0);
    drawSpark();
  }

  function drawSpark() {
    const canvas = $("spark");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 600;
    const height = canvas.clientHeight || 64;
    if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
    if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const styles = getComputedStyle(canvas);
    ctx.strokeStyle = styles.getPropertyValue("--grid").trim() || "#e5e7eb";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(0, height - 0.5);
    ctx.lineTo(width, height - 0.5);
    ctx.stroke();
    // Spread over the width until HISTORY polls are in, then scrolling left.
    const step = width / Math.max(1, samples.length - 1);
    const x0 = samples.length > 1 ? 0 : width;
    // Each series on its own scale, newest on the right; the queue filled under its line.
    const line = (key, color, fill) => {
      if (!samples.length) return;
      const max = Math.max(1, ...samples.map((h) => h[key]));
      const points = samples.map((h, i) => [x0 + i * step, height - 2 - (h[key] / max) * (height - 8)]);
      ctx.beginPath();
      points.forEach(([x, y], i) => (i === 0 ? ctx.moveTo(x, y) : ctx.lineTo(x, y)));
      if (fill) {
        ctx.save();
        ctx.lineTo(points[points.length - 1][0], height);
        ctx.lineTo(points[0][0], height);
        ctx.closePath();
        ctx.globalAlpha = 0.12;
        ctx.fillStyle = color;
        ctx.fill();
        ctx.restore();
        ctx.beginPath();
        points.forEach(([x, y], i) => (i === 0 ? ctx.moveTo(x, y) : ctx.lineTo(x, y)));
      }
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.75;
      ctx.lineJoin = "round";
      ctx.stroke();
    };
    line("tps", styles.getPropertyValue("--tokens").trim() || "#9333ea", false);
    line("queue", styles.getPropertyValue("--queue").trim() || "#2563eb", true);
  }

  // ---- wiring -------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      $("key-input").value = "";
      sessionStorage.setItem(KEY, key);
      start();
    });
    // A link with a new key opened in this tab changes only the fragment: no reload.
    window.addEventListener("hashchange", () => {
      if (location.hash.startsWith("#key=")) {
        keyFromFragment();
        start();
      }
    });
    keyFromFragment();
    start();
  });
})();
