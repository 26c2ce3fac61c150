/* grove-engine web UI: the pages' behaviour (vanilla JS, no build step).
 *
 * Loaded last by base.html on every page; picks what to do from <body data-page>. Reads the
 * JSON API with fetch, follows /api/stream (SSE) for status, and sends actions with post(),
 * showing the one-line result in #flash. Every API request carries the session (kept in
 * this origin's localStorage by the sign-in page, never in a cookie: cookies are not kept
 * apart by port, localStorage is) in the X-Grove-Session header, or the stream's URL. Everything displayed comes from agents and is untrusted: it goes into the DOM
 * with textContent only; links are built from names passed through encodeURIComponent.
 */
(function () {
  "use strict";

  const body = document.body;
  const PAGE = body.dataset.page || "";
  const GROVE = body.dataset.grove || "";
  const AGENT = body.dataset.agent || "";
  let SESSION = "";
  try { SESSION = window.localStorage.getItem("grove-session") || ""; } catch (e) { SESSION = ""; }
  const enc = encodeURIComponent;
  const G = enc(GROVE);
  const Graph = window.GroveGraph;
  const fmtCost = Graph ? Graph.formatCost : () => "";
  const fmtTokens = Graph ? Graph.formatTokens : () => "";
  const phaseClass = Graph ? Graph.phaseClass : (p) => "phase-" + String(p).toLowerCase();

  // -- DOM helpers ------------------------------------------------------------------------

  function $(id) { return document.getElementById(id); }

  /** An element; attrs are non-URL attributes (plus href built by the caller from
   * encodeURIComponent'd names); children are nodes or strings (as text). */
  function h(tag, attrs, ...children) {
    const e = document.createElement(tag);
    if (attrs) {
      for (const k of Object.keys(attrs)) {
        const v = attrs[k];
        if (v === null || v === undefined || v === false) continue;
        if (k === "class") e.className = String(v);
        else e.setAttribute(k, v === true ? "" : String(v));
      }
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      e.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return e;
  }

  function clear(e) { while (e.firstChild) e.removeChild(e.firstChild); }

  function setText(e, text) {
    const t = String(text);
    if (e.textContent !== t) e.textContent = t;
  }

  function agentHref(name) { return "/agent/" + G + "/" + enc(name); }

  function str(v) { return v === null || v === undefined ? "" : String(v); }

  // -- API --------------------------------------------------------------------------------

  async function getJSON(url) {
    let r;
    try {
      r = await fetch(url, {credentials: "omit",
        headers: {"Accept": "application/json", "X-Grove-Session": SESSION}});
    } catch (e) {
      throw new Error("error: the server does not answer");
    }
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) {
      throw new Error(data && data.error ? String(data.error) : "error: HTTP " + r.status);
    }
    return data;
  }

  function flash(kind, text) {
    const f = $("flash");
    if (!f) return;
    clear(f);
    f.appendChild(h("p", {class: kind}, String(text)));
  }

  /** POST /api/action {action, grove, ...body}; shows the result in #flash. Returns the
   * response object when it says ok, else null. */
  async function post(action, fields) {
    const payload = Object.assign({action: action, grove: GROVE}, fields || {});
    let r;
    try {
      r = await fetch("/api/action", {
        method: "POST",
        credentials: "omit",
        headers: {"Content-Type": "application/json", "X-Grove-Session": SESSION,
                  "Accept": "application/json"},
        body: JSON.stringify(payload),
      });
    } catch (e) {
      flash("error", "error: the server does not answer");
      return null;
    }
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (r.ok && data && data.ok) {
      flash("ok", data.message ? String(data.message) : action + ": started");
      return data;
    }
    flash("error", data && data.error ? String(data.error) : "error: HTTP " + r.status);
    return null;
  }

  /** Run `fn` with `buttons` disabled meanwhile. */
  async function busy(buttons, fn) {
    for (const b of buttons) if (b) b.disabled = true;
    try { return await fn(); } finally { for (const b of buttons) if (b) b.disabled = false; }
  }

  // -- live status (SSE) and the inbox badge ----------------------------------------------

  function setLive(on) {
    const l = $("live");
    if (!l) return;
    setText(l, on ? "live" : "reconnecting");
    l.className = on ? "live" : "offline";
  }

  /** Follow /api/stream; `onStatus(payload, fresh)` for each status event (fresh: the
   * first one after (re)connecting). */
  function openStream(onStatus) {
    if (typeof EventSource === "undefined") return null;
    const es = new EventSource("/api/stream?grove=" + G + "&session=" + enc(SESSION));
    let fresh = true;
    es.addEventListener("open", () => { fresh = true; setLive(true); });
    es.addEventListener("error", () => { setLive(es.readyState === EventSource.OPEN); });
    es.addEventListener("status", (ev) => {
      let data;
      try { data = JSON.parse(ev.data); } catch (e) { return; }
      setLive(true);
      const f = fresh;
      fresh = false;
      onStatus(data, f);
    });
    window.addEventListener("pagehide", () => es.close());
    return es;
  }

  let inboxBusy = false;
  let inboxAgain = false;
  const inboxListeners = [];

  function setBadge(n) {
    const b = $("inbox-count");
    if (!b) return;
    setText(b, String(n));
    b.className = n > 0 ? "badge" : "badge zero";
  }

  /** Fetch /api/inbox (coalesced), update the nav badge and tell the listeners. */
  async function refreshInbox() {
    if (inboxBusy) { inboxAgain = true; return; }
    inboxBusy = true;
    try {
      do {
        inboxAgain = false;
        try {
          const data = await getJSON("/api/inbox?grove=" + G);
          const w = Array.isArray(data && data.waiting) ? data.waiting : [];
          const a = Array.isArray(data && data.approvals) ? data.approvals : [];
          setBadge(w.length + a.length);
          for (const fn of inboxListeners) fn({waiting: w, approvals: a});
        } catch (e) {
          if (PAGE === "inbox") flash("error", e.message);
        }
      } while (inboxAgain);
    } finally {
      inboxBusy = false;
    }
  }

  // -- grove page -------------------------------------------------------------------------

  const PHASE_ORDER = ["Running", "Creating", "Pending", "Succeeded", "Failed", "Stopped",
    "Unknown", "Orphaned"];

  function waitingOf(row) {
    const cs = Array.isArray(row.conditions) ? row.conditions : [];
    return cs.find((c) => c && c.type === "WaitingForInput") || null;
  }

  function grovePage() {
    const svg = $("graph");
    const graph = Graph && svg ? new Graph(svg, {grove: GROVE}) : null;
    window.groveGraph = graph;
    const tbody = document.querySelector("#agents tbody");
    const rowsByName = new Map();
    let order = "";
    let last = null;
    let rendered = false;

    const fit = $("fit");
    if (fit) {
      fit.addEventListener("click", () => {
        const wrap = $("graph-wrap");
        const on = wrap.classList.toggle("fit");
        fit.textContent = on ? "Actual size" : "Fit to width";
      });
    }

    function renderTable(rows) {
      if (!tbody) return;
      const seen = new Set();
      for (const r of rows) {
        if (!r || typeof r.name !== "string") continue;
        seen.add(r.name);
        let rec = rowsByName.get(r.name);
        if (!rec) {
          const pill = h("span", {class: "pill"});
          const cells = {
            phase: pill,
            reason: h("td", {class: "reason"}),
            tokens: h("td", {class: "num tokens"}),
            cost: h("td", {class: "num cost"}),
          };
          const tr = h("tr", {"data-agent": r.name},
            h("td", {class: "name"}, h("a", {href: agentHref(r.name)}, r.name)),
            h("td", {class: "phase"}, pill), cells.reason, cells.tokens, cells.cost);
          rec = {tr, cells, cls: null};
          rowsByName.set(r.name, rec);
        }
        const waiting = waitingOf(r);
        const phase = str(r.phase) || "Unknown";
        const pcls = "pill " + phaseClass(phase) + (waiting ? " waiting" : "");
        if (rec.cls !== pcls) { rec.cells.phase.className = pcls; rec.cls = pcls; }
        setText(rec.cells.phase, waiting ? phase + " (needs input)" : phase);
        setText(rec.cells.reason, str(r.reason));
        setText(rec.cells.tokens, fmtTokens(r.usage));
        setText(rec.cells.cost, fmtCost(r.usage));
      }
      for (const [name, rec] of rowsByName) {
        if (!seen.has(name)) { rec.tr.remove(); rowsByName.delete(name); }
      }
      const names = Array.from(rowsByName.keys()).sort();
      const key = names.join("\u0000");
      if (key !== order) {
        order = key;
        for (const n of names) tbody.appendChild(rowsByName.get(n).tr);
      }
    }

    function renderSummary(payload, rows) {
      const counts = new Map();
      let waiting = 0;
      let cost = 0;
      let known = 0;
      for (const r of rows) {
        const p = str(r.phase) || "Unknown";
        counts.set(p, (counts.get(p) || 0) + 1);
        if (waitingOf(r)) waiting++;
        if (r.usage && typeof r.usage.costUSD === "number") { cost += r.usage.costUSD; known++; }
      }
      const parts = [rows.length + (rows.length === 1 ? " agent" : " agents")];
      const phases = Array.from(counts.keys()).sort((a, b) => {
        const ia = PHASE_ORDER.indexOf(a) < 0 ? 99 : PHASE_ORDER.indexOf(a);
        const ib = PHASE_ORDER.indexOf(b) < 0 ? 99 : PHASE_ORDER.indexOf(b);
        return ia - ib || (a < b ? -1 : 1);
      });
      for (const p of phases) parts.push(counts.get(p) + " " + p);
      if (waiting) parts.push(waiting + " need" + (waiting === 1 ? "s" : "") + " input");
      const reqs = Array.isArray(payload.requests) ? payload.requests.length : 0;
      if (reqs) parts.push(reqs + " spawn request" + (reqs === 1 ? "" : "s"));
      if (known) {
        let c = "total cost " + fmtCost({costUSD: cost});
        if (known < rows.length) c += " (unknown for " + (rows.length - known) + ")";
        parts.push(c);
      }
      setText($("summary"), parts.join(" \u00b7 "));
    }

    function renderErrors(entry) {
      const box = $("grove-errors");
      if (!box) return;
      const errs = Array.isArray(entry.errors) ? entry.errors.map(str) : [];
      const key = errs.join("\n");
      if (box.dataset.key === key) return;
      box.dataset.key = key;
      clear(box);
      for (const e of errs) box.appendChild(h("p", {class: "error"}, e));
    }

    function renderEvents(list) {
      const box = $("events");
      if (!box) return;
      const evs = Array.isArray(list) ? list.slice().reverse() : [];
      const key = evs.length ? str(evs[0].time) + str(evs[0].event) + evs.length : "";
      if (box.dataset.key === key) return;
      box.dataset.key = key;
      clear(box);
      if (!evs.length) {
        box.appendChild(h("li", {class: "empty"}, "No events yet"));
        return;
      }
      for (const e of evs) {
        if (!e || typeof e !== "object") continue;
        const detail = str(e.reason || e.message || e.child || e.error || "");
        box.appendChild(h("li", {class: "event", "data-event": str(e.event)},
          h("span", {class: "time"}, str(e.time)), " ",
          h("strong", null, str(e.event)), " ",
          e.agent ? h("a", {href: agentHref(str(e.agent))}, str(e.agent)) : "",
          detail ? h("span", {class: "hint"}, " \u2014 " + detail) : ""));
      }
    }

    function apply(payload, fresh) {
      if (!payload || typeof payload !== "object") return;
      const v = payload.version;
      if (!fresh && last !== null && typeof v === "number" && typeof last === "number" && v <= last) {
        return;
      }
      last = v;
      const entry = payload.grove || {};
      const rows = Array.isArray(entry.agents) ? entry.agents : [];
      if (graph) graph.update(payload);
      renderTable(rows);
      renderSummary(payload, rows);
      renderErrors(entry);
      renderEvents(payload.events);
      const now = performance.now();
      if (!rendered) {
        rendered = true;
        body.dataset.rendered = String(now);
        window.groveRenderedAt = now;
      }
      window.groveLastUpdate = {version: v, at: now};
      body.dataset.version = String(v);
    }

    getJSON("/api/status?grove=" + G).then((p) => apply(p, false),
      (e) => flash("error", e.message));
    openStream((p, fresh) => { apply(p, fresh); refreshInbox(); });
    refreshInbox();
  }

  // -- agent page -------------------------------------------------------------------------

  function kvRow(dl, key, value) {
    dl.appendChild(h("dt", null, key));
    dl.appendChild(typeof value === "string" ? h("dd", null, value) : h("dd", null, value));
  }

  function flatten(data, prefix, out) {
    if (data && typeof data === "object" && !Array.isArray(data) && Object.keys(data).length) {
      for (const k of Object.keys(data).sort()) flatten(data[k], prefix.concat([k]), out);
    } else {
      out.push([prefix.join("."), data]);
    }
    return out;
  }

  function table(cls, heads, rows) {
    const t = h("table", {class: cls});
    t.appendChild(h("thead", null, h("tr", null, ...heads.map((x) => h("th", null, x)))));
    const tb = h("tbody");
    for (const r of rows) tb.appendChild(h("tr", null, ...r.map((x) => h("td", null, x))));
    t.appendChild(tb);
    return t;
  }

  function limitsText(lim) {
    if (!lim || typeof lim !== "object") return "";
    return Object.keys(lim).sort().map((k) => k + " " + str(lim[k])).join(", ");
  }

  function agentPage() {
    let rowKey = "";

    function renderRow(row) {
      if (!row) return;
      const key = JSON.stringify(row);
      if (key === rowKey) return;
      rowKey = key;
      const phase = str(row.phase) || "Unknown";
      const waiting = waitingOf(row);
      const pill = $("agent-phase");
      if (pill) {
        pill.className = "pill " + phaseClass(phase) + (waiting ? " waiting" : "");
        setText(pill, waiting ? phase + " (needs input)" : phase);
      }
      const dl = document.querySelector("#summary dl") || $("summary");
      clear(dl);
      kvRow(dl, "Phase", phase);
      kvRow(dl, "Reason", str(row.reason) || "-");
      const conds = Array.isArray(row.conditions) ? row.conditions : [];
      const cdd = h("div", {class: "conditions"});
      for (const c of conds) {
        if (!c || typeof c !== "object") continue;
        cdd.appendChild(h("div", {class: "condition " + (c.type === "Budget" ? "budget" : "waiting")},
          h("strong", null, str(c.type)), c.message ? ": " + str(c.message) : "",
          c.since ? h("span", {class: "since"}, " since " + str(c.since)) : null));
      }
      kvRow(dl, "Conditions", conds.length ? cdd : "none");
      kvRow(dl, "Runtime", str(row.runtime) || "-");
      kvRow(dl, "Branch", str(row.branch) || "-");
      kvRow(dl, "Parent", row.parent ? h("a", {href: agentHref(str(row.parent))}, str(row.parent)) : "-");
      const deps = Array.isArray(row.dependsOn) ? row.dependsOn : [];
      if (deps.length) {
        const span = h("span");
        deps.forEach((d, i) => {
          if (i) span.appendChild(document.createTextNode(", "));
          span.appendChild(h("a", {href: agentHref(str(d))}, str(d)));
        });
        kvRow(dl, "Depends on", span);
      }
      kvRow(dl, "Workspace", [str(row.workspace), row.dirty ? "dirty" : "",
        typeof row.ahead === "number" ? row.ahead + " ahead" : ""].filter(Boolean).join(", ") || "-");
      if (row.exitCode !== null && row.exitCode !== undefined) kvRow(dl, "Exit code", str(row.exitCode));
      kvRow(dl, "Tokens", fmtTokens(row.usage) || "unknown");
      kvRow(dl, "Cost", fmtCost(row.usage) || "unknown");
      kvRow(dl, "Limits", limitsText(row.limits) || "none");
      if (row.inManifest === false) kvRow(dl, "Manifest", "not in the manifests");
      if (row.upToDate === false) kvRow(dl, "Spec", "out of date (apply to converge)");

      const u = row.usage || {};
      const bits = [];
      if (typeof u.inputTokens === "number") bits.push(u.inputTokens + " input tokens");
      if (typeof u.outputTokens === "number") bits.push(u.outputTokens + " output tokens");
      if (typeof u.costUSD === "number") bits.push("cost " + fmtCost(u));
      if (typeof u.turns === "number") bits.push(u.turns + " turns");
      setText($("usage"), bits.length ? bits.join(", ") : "nothing reported");
    }

    function renderCost(cost) {
      const tree = cost && cost.tree;
      if (!tree || typeof tree !== "object") return;
      const left = tree.left && typeof tree.left === "object" ? limitsText(tree.left) : "";
      const sub = tree.subtree && typeof tree.subtree === "object" ? tree.subtree : null;
      const extra = [];
      if (sub && typeof sub.costUSD === "number") extra.push("subtree cost " + fmtCost(sub));
      if (left) extra.push("left: " + left);
      if (tree.stoppedReason) extra.push("stopped: " + str(tree.stoppedReason));
      if (extra.length) {
        const p = $("usage");
        p.appendChild(h("span", {class: "hint"}, " \u00b7 " + extra.join(" \u00b7 ")));
      }
    }

    function renderCommits(commits) {
      const box = $("commits");
      clear(box);
      if (!Array.isArray(commits) || !commits.length) {
        box.appendChild(h("p", {class: "empty"}, "No commits on the agent's branch."));
        return;
      }
      const ul = h("ul", {class: "commits"});
      for (const c of commits) {
        ul.appendChild(h("li", null, h("code", null, str(c.sha).slice(0, 10)), " ",
          str(c.subject), h("span", {class: "hint"}, " \u2014 " + str(c.author) + ", " + str(c.time))));
      }
      box.appendChild(ul);
    }

    function renderExplain(doc) {
      const box = $("explain");
      clear(box);
      if (!doc || typeof doc !== "object") return;
      const sources = doc.sources && typeof doc.sources === "object" ? doc.sources : {};
      const rows = flatten(doc.settings || {}, [], []).filter((r) => r[0]).map((r) => [
        h("code", null, r[0]), JSON.stringify(r[1]) === undefined ? "" : JSON.stringify(r[1]),
        str(sources[r[0]] || "rendered")]);
      if (doc.specHash) box.appendChild(h("p", {class: "hint"}, "spec " + str(doc.specHash)));
      box.appendChild(table("grid", ["Setting", "Value", "Source"], rows));
    }

    async function loadAgent() {
      try {
        const d = await getJSON("/api/agent?grove=" + G + "&agent=" + enc(AGENT));
        rowKey = "";
        renderRow(d.row);
        renderCost(d.cost);
        renderCommits(d.commits);
        renderExplain(d.explain);
      } catch (e) {
        flash("error", e.message);
      }
    }

    async function loadEgress() {
      const box = $("egress");
      try {
        const d = await getJSON("/api/agent/egress?grove=" + G + "&agent=" + enc(AGENT));
        const recs = Array.isArray(d && d.records) ? d.records : [];
        clear(box);
        if (!recs.length) { box.appendChild(h("p", {class: "empty"}, "No connections recorded.")); return; }
        const t = table("grid", ["Time", "Method", "Target", "Up", "Down", "Duration", "Verdict"],
          recs.map((r) => [str(r.time), str(r.method), str(r.target), str(r.bytesUp),
            str(r.bytesDown), r.durationMs === undefined ? "" : str(r.durationMs) + " ms",
            str(r.verdict) + (r.reason ? " (" + str(r.reason) + ")" : "")]));
        recs.forEach((r, i) => { if (r.verdict === "refused") t.tBodies[0].rows[i].className = "refused"; });
        box.appendChild(t);
      } catch (e) {
        clear(box);
        box.appendChild(h("p", {class: "error"}, e.message));
      }
    }

    /** Poll a text endpoint into a <pre>; `stick`: keep scrolled to the bottom. */
    /** The agent's log as it grows (SSE over `engine logs --follow`): chunks appended as
     * text, the newest MAX_LOG characters kept, scrolled along while at the bottom. Ends
     * with the agent (the stream says "end"); falls back to polling if streams fail. */
    function followLog(pre) {
      const MAX_LOG = 512 * 1024;
      if (typeof EventSource === "undefined") { textPoller(pre, "/api/agent/logs", 2000, true); return; }
      const es = new EventSource("/api/agent/logs/stream?grove=" + G + "&agent=" + enc(AGENT) +
        "&session=" + enc(SESSION));
      let got = false;
      let first = true;
      es.addEventListener("open", () => { got = false; });  // a new stream sends all again
      es.addEventListener("chunk", (ev) => {
        let text;
        try { text = JSON.parse(ev.data); } catch (e) { return; }
        if (typeof text !== "string") return;
        const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 24;
        if (!got) { pre.textContent = ""; got = true; }
        let all = pre.textContent + text;
        if (all.length > MAX_LOG) all = all.slice(all.length - MAX_LOG);
        pre.textContent = all;
        if (first || atBottom) pre.scrollTop = pre.scrollHeight;
        first = false;
        pre.classList.remove("stale");
      });
      es.addEventListener("end", (ev) => {
        es.close();
        if (ev.data === "busy") {  // too many streams open: poll instead
          textPoller(pre, "/api/agent/logs", 2000, true);
          return;
        }
        if (!got) pre.textContent = "(the agent printed nothing)";
        body.dataset.logEnded = "1";
      });
      es.addEventListener("error", () => {
        if (es.readyState === EventSource.CLOSED) {  // refused: poll instead
          textPoller(pre, "/api/agent/logs", 2000, true);
        } else {
          pre.classList.add("stale");
        }
      });
      window.addEventListener("pagehide", () => es.close());
    }

    function textPoller(pre, path, every, stick) {
      let first = true;
      let running = false;
      async function once() {
        if (running) return;
        running = true;
        try {
          const d = await getJSON(path + "?grove=" + G + "&agent=" + enc(AGENT));
          const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 24;
          const t = str(d && d.text);
          if (pre.textContent !== t) {
            pre.textContent = t;
            if (stick && (first || atBottom)) pre.scrollTop = pre.scrollHeight;
          }
          first = false;
          pre.classList.remove("stale");
        } catch (e) {
          pre.classList.add("stale");
          if (first) pre.textContent = e.message;
        } finally {
          running = false;
        }
      }
      function loop() {
        once().finally(() => { if (every) setTimeout(loop, every); });
      }
      loop();
      return once;
    }

    followLog($("logs"));
    const screenNow = textPoller($("screen"), "/api/agent/screen", 3000, false);
    const diffNow = textPoller($("diff"), "/api/agent/diff", 0, false);
    $("screen-refresh").addEventListener("click", () => screenNow());
    $("diff-refresh").addEventListener("click", () => diffNow());

    for (const b of document.querySelectorAll("button.action[data-action]")) {
      b.addEventListener("click", async () => {
        const action = b.dataset.action;
        if (action === "merge" && !window.confirm(
          "Merge " + AGENT + "'s branch into the base branch?")) return;
        const all = Array.from(document.querySelectorAll("button.action"));
        const ok = await busy(all, () => post(action, {agent: AGENT}));
        if (ok) loadAgent();
      });
    }
    const send = $("send");
    const msg = $("message");
    send.addEventListener("click", async () => {
      const text = msg.value;
      if (!text.trim()) { flash("error", "error: the message is empty"); return; }
      const ok = await busy([send], () => post("message", {agent: AGENT, text: text}));
      if (ok) msg.value = "";
    });

    loadAgent();
    loadEgress();
    refreshInbox();
    openStream((p) => {
      const rows = p && p.grove && Array.isArray(p.grove.agents) ? p.grove.agents : [];
      const row = rows.find((r) => r && r.name === AGENT);
      if (row) renderRow(row);
      refreshInbox();
    });
  }

  // -- inbox page -------------------------------------------------------------------------

  function inboxPage() {
    const wBox = document.querySelector("#waiting .items") || $("waiting");
    const aBox = document.querySelector("#approvals .items") || $("approvals");
    const waitingEls = new Map();
    const approvalEls = new Map();

    function empty(box, text) {
      let p = box.querySelector(":scope > p.empty");
      if (text) {
        if (!p) { p = h("p", {class: "empty"}, text); box.appendChild(p); }
      } else if (p) {
        p.remove();
      }
    }

    function waitingItem(w) {
      const name = str(w.agent);
      const reply = h("textarea", {class: "reply", rows: 2, placeholder: "Reply to " + name});
      const btn = h("button", {type: "button", class: "send"}, "Send");
      const el = {
        div: null, msg: h("p", {class: "message"}), since: h("span", {class: "since"}),
      };
      el.div = h("div", {class: "waiting-item", "data-agent": name},
        h("div", {class: "item-head"}, h("a", {href: agentHref(name), class: "agent"}, name), " ", el.since),
        el.msg, reply, h("div", {class: "actions"}, btn));
      btn.addEventListener("click", async () => {
        const text = reply.value;
        if (!text.trim()) { flash("error", "error: the reply is empty"); return; }
        const ok = await busy([btn], () => post("message", {agent: name, text: text}));
        if (ok) { reply.value = ""; refreshInbox(); }
      });
      return el;
    }

    function approvalItem(a) {
      const id = str(a.id);
      const reason = h("input", {type: "text", class: "reason", placeholder: "reason (needed to deny; the agent is told)"});
      const approve = h("button", {type: "button", class: "approve primary"}, "Approve");
      const deny = h("button", {type: "button", class: "deny danger"}, "Deny");
      const el = {
        div: null, head: h("div", {class: "item-head"}),
        dl: h("dl", {class: "kv"}), task: h("pre", {class: "task"}), digest: h("code", {class: "digest"}),
        data: a,
      };
      el.div = h("div", {class: "approval", "data-request": id, "data-parent": str(a.parent)}, el.head, el.dl, el.task,
        h("p", {class: "hint"}, "digest ", el.digest),
        h("div", {class: "actions"}, approve, reason, deny));
      approve.addEventListener("click", async () => {
        const ok = await busy([approve, deny], () => post("approve",
          {request: id, parent: str(el.data.parent), digest: str(el.data.digest)}));
        if (ok) refreshInbox();
      });
      deny.addEventListener("click", async () => {
        const ok = await busy([approve, deny], () => post("deny",
          {request: id, parent: str(el.data.parent), reason: reason.value}));
        if (ok) refreshInbox();
      });
      return el;
    }

    function render(data) {
      const seenW = new Set();
      for (const w of data.waiting) {
        const name = str(w && w.agent);
        if (!name) continue;
        seenW.add(name);
        let el = waitingEls.get(name);
        if (!el) { el = waitingItem(w); waitingEls.set(name, el); wBox.appendChild(el.div); }
        setText(el.msg, str(w.message));
        setText(el.since, w.since ? "waiting since " + str(w.since) : "");
      }
      for (const [n, el] of waitingEls) if (!seenW.has(n)) { el.div.remove(); waitingEls.delete(n); }
      empty(wBox, waitingEls.size ? "" : "Nobody is waiting");

      const seenA = new Set();
      for (const a of data.approvals) {
        const id = str(a && a.id);
        if (!id) continue;
        const key = str(a.parent) + "/" + id;  // request ids are their parent's own
        seenA.add(key);
        let el = approvalEls.get(key);
        if (!el) { el = approvalItem(a); approvalEls.set(key, el); aBox.appendChild(el.div); }
        el.data = a;
        clear(el.head);
        el.head.appendChild(h("a", {href: agentHref(str(a.parent)), class: "agent"}, str(a.parent)));
        el.head.appendChild(document.createTextNode(" asks to spawn "));
        el.head.appendChild(h("strong", {class: "child"}, str(a.agent)));
        el.head.appendChild(h("span", {class: "hint"}, " request " + id));
        clear(el.dl);
        kvRow(el.dl, "Parent", str(a.parent));
        kvRow(el.dl, "Child", str(a.agent));
        kvRow(el.dl, "Profile", str(a.profile) || "-");
        kvRow(el.dl, "Harness", str(a.harness) || "-");
        kvRow(el.dl, "Depends on", Array.isArray(a.dependsOn) && a.dependsOn.length ?
          a.dependsOn.map(str).join(", ") : "-");
        setText(el.task, str(a.task));
        setText(el.digest, str(a.digest));
      }
      for (const [id, el] of approvalEls) if (!seenA.has(id)) { el.div.remove(); approvalEls.delete(id); }
      empty(aBox, approvalEls.size ? "" : "No spawn request waits for approval");
    }

    inboxListeners.push(render);
    refreshInbox();
    openStream(() => refreshInbox());
  }

  // -- markdown, as a pull-request comment shows it ----------------------------------------

  /** The subset of markdown the topology comment uses (headings, paragraphs, tables,
   * lists, code blocks, `code`, **bold**), built as DOM nodes: every character of the
   * source stays text, so nothing in it can become markup. HTML comments are dropped;
   * other tags (<sub>) are shown without their brackets' effect, as text. */
  function markdown(src) {
    const out = document.createDocumentFragment();
    const lines = src.replace(/<!--[\s\S]*?-->/g, "").split("\n");
    function inline(text) {
      const frag = document.createDocumentFragment();
      const text2 = text.replace(/<\/?sub>/g, "");
      const re = /`([^`]+)`|\*\*([^*]+)\*\*/g;
      let at = 0, m;
      while ((m = re.exec(text2)) !== null) {
        if (m.index > at) frag.appendChild(document.createTextNode(text2.slice(at, m.index)));
        frag.appendChild(m[1] !== undefined ? h("code", null, m[1]) : h("strong", null, m[2]));
        at = m.index + m[0].length;
      }
      if (at < text2.length) frag.appendChild(document.createTextNode(text2.slice(at)));
      return frag;
    }
    function cells(line) {
      return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
    }
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) { i++; continue; }
      const fence = line.match(/^```(\w*)/);
      if (fence) {
        const code = [];
        i++;
        while (i < lines.length && !lines[i].startsWith("```")) code.push(lines[i++]);
        i++;
        const pre = h("pre", {class: "term md-code"}, code.join("\n"));
        if (fence[1]) pre.setAttribute("data-lang", fence[1]);
        out.appendChild(pre);
        continue;
      }
      const head = line.match(/^(#{1,6})\s+(.*)$/);
      if (head) {
        out.appendChild(h("h" + Math.min(6, head[1].length + 1), {class: "md-h"}, inline(head[2])));
        i++;
        continue;
      }
      if (line.trim().startsWith("|") && i + 1 < lines.length && /^\s*\|[\s|:-]+\|\s*$/.test(lines[i + 1])) {
        const table = h("table", {class: "grid md-table"});
        const tr = h("tr");
        for (const c of cells(line)) tr.appendChild(h("th", null, inline(c)));
        table.appendChild(h("thead", null, tr));
        const tb = h("tbody");
        i += 2;
        while (i < lines.length && lines[i].trim().startsWith("|")) {
          const row = h("tr");
          for (const c of cells(lines[i])) row.appendChild(h("td", null, inline(c)));
          tb.appendChild(row);
          i++;
        }
        table.appendChild(tb);
        out.appendChild(table);
        continue;
      }
      if (/^\s*[-*]\s+/.test(line)) {
        const ul = h("ul", {class: "md-list"});
        while (i < lines.length && /^\s*[-*]\s+/.test(lines[i])) {
          ul.appendChild(h("li", null, inline(lines[i].replace(/^\s*[-*]\s+/, ""))));
          i++;
        }
        out.appendChild(ul);
        continue;
      }
      const para = [];
      while (i < lines.length && lines[i].trim() && !/^(#|```|\s*[-*]\s|\s*\|)/.test(lines[i])) {
        para.push(lines[i++]);
      }
      if (!para.length) { para.push(line); i++; }
      out.appendChild(h("p", null, inline(para.join(" "))));
    }
    return out;
  }

  // -- plan page --------------------------------------------------------------------------

  function planPage() {
    let planId = "";
    let summaryText = "";
    let changeList = [];
    const applyBtn = $("apply");
    const modal = $("confirm");

    function summaryOf(doc) {
      if (!doc.changes) return "No changes: the grove matches its manifests.";
      const s = doc.summary && typeof doc.summary === "object" ? doc.summary : {};
      const parts = Object.keys(s).filter((k) => Number(s[k]) > 0).map((k) => s[k] + " " + k);
      return "Changes: " + (parts.length ? parts.join(", ") : "yes") + ".";
    }

    function render(d) {
      planId = str(d && d.planId);
      const doc = (d && d.plan) || {};
      const groves = Array.isArray(doc.groves) ? doc.groves : [];
      const mine = groves.filter((g) => !g.grove || g.grove === GROVE);
      const tbody = document.querySelector("#plan-changes tbody");
      clear(tbody);
      let n = 0;
      const reqs = [];
      changeList = [];
      for (const g of mine) {
        for (const c of Array.isArray(g.changes) ? g.changes : []) {
          n++;
          changeList.push(c);
          const fields = Array.isArray(c.fields) ? c.fields.map(str).join(", ") : "";
          const waits = Array.isArray(c.waitsFor) ? c.waitsFor.map(str).join(", ") : "";
          tbody.appendChild(h("tr", {class: "change action-" + str(c.action).replace(/[^a-z-]/gi, ""),
            "data-agent": str(c.agent), "data-action": str(c.action)},
          h("td", {class: "action"}, h("span", {class: "pill act"}, str(c.action))),
          h("td", null, h("a", {href: agentHref(str(c.agent))}, str(c.agent))),
          h("td", null, str(c.reason)), h("td", null, fields), h("td", null, waits)));
        }
        for (const r of Array.isArray(g.spawnRequests) ? g.spawnRequests : []) reqs.push(r);
      }
      if (!n) tbody.appendChild(h("tr", {class: "none"}, h("td", {colspan: 5, class: "empty"}, "Nothing to do.")));
      const same = changeList.filter((c) => str(c.action) === "no-op").length;
      const toggle = $("show-unchanged");
      if (toggle) {
        toggle.hidden = !same;
        setText(toggle, ($("plan-changes").classList.contains("show-all") ? "Hide " : "Show ") +
          same + " unchanged");
      }
      summaryText = summaryOf(doc);
      setText($("plan-summary"), summaryText);
      const ul = $("spawn-requests");
      clear(ul);
      for (const r of reqs) {
        ul.appendChild(h("li", {"data-request": str(r.request)},
          h("a", {href: agentHref(str(r.parent))}, str(r.parent)), " \u2192 ",
          h("strong", null, str(r.agent)), h("span", {class: "hint"}, " request " + str(r.request)),
          r.approval === "pending" ? " " : null,
          r.approval === "pending" ? h("span", {class: "pill waiting"}, "awaits approval") : null));
      }
      if (!reqs.length) ul.appendChild(h("li", {class: "empty"}, "No spawn requests."));
      applyBtn.disabled = !doc.changes;
    }

    const toggle = $("show-unchanged");
    if (toggle) {
      toggle.addEventListener("click", () => {
        const t = $("plan-changes");
        t.classList.toggle("show-all");
        const n = t.querySelectorAll("tr.change.action-no-op").length;
        setText(toggle, (t.classList.contains("show-all") ? "Hide " : "Show ") + n + " unchanged");
      });
    }

    async function load() {
      try { render(await getJSON("/api/plan?grove=" + G)); } catch (e) {
        flash("error", e.message);
        applyBtn.disabled = true;
      }
    }

    function showModal(on) {
      modal.hidden = !on;
      if (!on) return;
      const box = $("confirm-text");
      clear(box);
      box.appendChild(document.createTextNode(summaryText));
      const ul = h("ul", {class: "confirm-changes"});
      for (const c of changeList.slice(0, 20)) {
        ul.appendChild(h("li", null, h("strong", null, str(c.action)), " " + str(c.agent)));
      }
      if (changeList.length > 20) ul.appendChild(h("li", null, "and " + (changeList.length - 20) + " more"));
      if (changeList.length) box.appendChild(ul);
      $("confirm-no").focus();
    }

    async function followJob(id) {
      const out = $("job-output");
      out.hidden = false;
      out.textContent = "applying...";
      while (true) {
        let j;
        try {
          j = await getJSON("/api/job/" + enc(id));
        } catch (e) {
          flash("error", e.message);
          return;
        }
        setText(out, str(j && j.output));
        out.scrollTop = out.scrollHeight;
        if (j && j.done) {
          if (j.code === 0) flash("ok", "apply finished");
          else flash("error", "error: apply ended with exit code " + str(j.code));
          return;
        }
        await new Promise((r) => setTimeout(r, 500));
      }
    }

    applyBtn.addEventListener("click", () => showModal(true));
    $("confirm-no").addEventListener("click", () => showModal(false));
    document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && !modal.hidden) showModal(false); });
    $("confirm-yes").addEventListener("click", async () => {
      showModal(false);
      const res = await busy([applyBtn], () => post("apply", {planId: planId}));
      if (res && res.job) {
        applyBtn.disabled = true;
        await followJob(str(res.job));
      }
      await load();
    });

    $("compare").addEventListener("click", async () => {
      const btn = $("compare");
      const q = "/api/topology?grove=" + G + "&base=" + enc($("base").value.trim()) +
        "&head=" + enc($("head").value.trim());
      await busy([btn], async () => {
        try {
          const d = await getJSON(q);
          setText($("topology"), str(d && d.text));
          const view = $("topology-view");
          if (view) { clear(view); view.appendChild(markdown(str(d && d.text))); }
        } catch (e) {
          flash("error", e.message);
        }
      });
    });

    load();
    refreshInbox();
    openStream(() => refreshInbox());
  }

  // -- history page -----------------------------------------------------------------------

  function historyPage() {
    const tbody = document.querySelector("#history tbody");

    function who(c) {
      const box = h("div", {class: "who"});
      for (const a of Array.isArray(c.added) ? c.added : []) {
        const line = a.spawnedBy
          ? [h("a", {href: agentHref(str(a.spawnedBy))}, str(a.spawnedBy)), " \u2192 ",
            h("a", {href: agentHref(str(a.name))}, str(a.name))]
          : ["+ ", h("a", {href: agentHref(str(a.name))}, str(a.name))];
        if (a.approvedBy) line.push(h("span", {class: "hint"}, " approved by " + str(a.approvedBy)));
        box.appendChild(h("div", {class: "added"}, ...line));
      }
      for (const r of Array.isArray(c.removed) ? c.removed : []) {
        box.appendChild(h("div", {class: "removed"}, "\u2212 " + str(r.name)));
      }
      for (const ch of Array.isArray(c.changed) ? c.changed : []) {
        const f = Array.isArray(ch.fields) ? ch.fields.map(str).join(", ") : "";
        box.appendChild(h("div", {class: "changed"}, "~ " + str(ch.name) + (f ? " (" + f + ")" : "")));
      }
      if (c.invalid) box.appendChild(h("div", {class: "error"}, "manifests do not parse: " + str(c.invalid)));
      return box;
    }

    async function load() {
      let d;
      try { d = await getJSON("/api/history?grove=" + G); } catch (e) {
        flash("error", e.message);
        return;
      }
      clear(tbody);
      const commits = Array.isArray(d && d.commits) ? d.commits : [];
      const denials = Array.isArray(d && d.denials) ? d.denials : [];
      for (const c of commits) {
        if (c.grove && c.grove !== GROVE) continue;
        const kind = c.uncommitted ? "uncommitted" : c.invalid ? "invalid" : "commit";
        tbody.appendChild(h("tr", {class: "entry " + kind, "data-commit": str(c.commit)},
          h("td", {class: "time"}, str(c.date)),
          h("td", null, c.commit ? h("code", null, str(c.commit).slice(0, 10)) : "-"),
          h("td", {class: "kind"}, kind), h("td", null, who(c)),
          h("td", {class: "subject"}, str(c.subject),
            c.author ? h("span", {class: "hint"}, " \u2014 " + str(c.author)) : null)));
      }
      for (const x of denials) {
        if (x.grove && x.grove !== GROVE) continue;
        tbody.appendChild(h("tr", {class: "entry denied", "data-request": str(x.request)},
          h("td", {class: "time"}, str(x.time)), h("td", null, "-"), h("td", {class: "kind"}, "denied"),
          h("td", null, h("div", {class: "who"}, str(x.parent) + " \u2717 " + str(x.child))),
          h("td", {class: "subject"}, "spawn request " + str(x.request) + " denied" +
            (x.by ? " by " + str(x.by) : "") + (x.reason ? ": " + str(x.reason) : ""))));
      }
      if (!tbody.rows.length) {
        tbody.appendChild(h("tr", {class: "none"}, h("td", {colspan: 5, class: "empty"}, "No history yet.")));
      }
    }

    load();
    refreshInbox();
    openStream(() => refreshInbox());
  }

  window.grovePost = post;

  const pages = {grove: grovePage, agent: agentPage, inbox: inboxPage, plan: planPage,
    history: historyPage};
  if (pages[PAGE]) pages[PAGE]();
})();
