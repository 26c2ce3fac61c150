/* grove-engine web UI: the grove's agent graph, drawn as plain SVG.
 *
 * Loaded by base.html before app.js; app.js creates one `window.GroveGraph` on the grove
 * page and calls update() with every /api/status object (first fetch and each SSE event).
 *
 * Layout is stable for the page's lifetime: a node keeps the slot it was first given
 * (row = spawn depth, column = slot) even when other nodes come or go. The first non-empty
 * update lays out a tidy tree (roots left to right by name, children under their parent);
 * later nodes take the next free slot of their row at or after their parent's column (a
 * new root goes right of everything). Updates are incremental: existing <g> elements are
 * reused, only changed classes and texts are written. Everything shown is untrusted and
 * goes in with textContent / non-URL attributes only; links are built from
 * encodeURIComponent'd names.
 */
(function () {
  "use strict";

  const SVG_NS = "http://www.w3.org/2000/svg";
  const NODE_W = 164;
  const NODE_H = 50;
  const COL_W = 180;
  const ROW_H = 92;
  const PAD = 16;

  function svgEl(tag, attrs, parent) {
    const e = document.createElementNS(SVG_NS, tag);
    if (attrs) {
      for (const k of Object.keys(attrs)) e.setAttribute(k, String(attrs[k]));
    }
    if (parent) parent.appendChild(e);
    return e;
  }

  /** "$0.0123" for a known cost, "" when unknown (never "$0" for unknown). */
  function formatCost(usage) {
    if (!usage || typeof usage.costUSD !== "number" || !isFinite(usage.costUSD)) return "";
    return "$" + usage.costUSD.toFixed(4);
  }

  /** input + output tokens when both are known, else "". */
  function formatTokens(usage) {
    if (!usage || typeof usage.inputTokens !== "number" ||
        typeof usage.outputTokens !== "number") return "";
    return String(usage.inputTokens + usage.outputTokens);
  }

  function phaseClass(phase) {
    return "phase-" + String(phase || "unknown").toLowerCase().replace(/[^a-z0-9]+/g, "-");
  }

  function conditionOf(row, type) {
    const cs = Array.isArray(row.conditions) ? row.conditions : [];
    for (const c of cs) if (c && c.type === type) return c;
    return null;
  }

  class GroveGraph {
    /**
     * @param {SVGSVGElement} svg  the (empty) svg#graph element
     * @param {{grove: string, onNodeClick?: (name: string, requested: boolean) => void}} opts
     */
    constructor(svg, opts) {
      this.svg = svg;
      this.grove = (opts && opts.grove) || "";
      this.onNodeClick = (opts && opts.onNodeClick) || null;
      this.pos = new Map();      // name -> {row, col}; never changes once set
      this.taken = new Map();    // row -> Set(col)
      this.maxCol = -1;
      this.maxRow = -1;
      this.nodes = new Map();    // name -> {g, a, title, name, sub, cls, subText, titleText, href}
      this.edges = new Map();    // key -> path element
      this.version = null;
      while (svg.firstChild) svg.removeChild(svg.firstChild);
      this._defs();
      this.edgeLayer = svgEl("g", {class: "edges"}, svg);
      this.nodeLayer = svgEl("g", {class: "nodes"}, svg);
      svg.addEventListener("click", (ev) => this._click(ev));
      this._resize();
    }

    _defs() {
      const defs = svgEl("defs", null, this.svg);
      const clip = svgEl("clipPath", {id: "node-clip", clipPathUnits: "userSpaceOnUse"}, defs);
      svgEl("rect", {x: 0, y: 0, width: NODE_W - 8, height: NODE_H}, clip);
      const m = svgEl("marker", {id: "dep-arrow", viewBox: "0 0 8 8", refX: 8, refY: 4,
        markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse"}, defs);
      svgEl("path", {d: "M0,0 L8,4 L0,8 z", class: "arrow"}, m);
    }

    _click(ev) {
      if (!this.onNodeClick) return; // the <a> navigates by itself
      const g = ev.target && ev.target.closest ? ev.target.closest("g.node") : null;
      if (!g) return;
      ev.preventDefault();
      this.onNodeClick(g.getAttribute("data-agent") || "", g.classList.contains("requested"));
    }

    /** The pixel position of a node's top-left corner, or null. */
    positionOf(name) {
      const p = this.pos.get(name);
      return p ? {x: PAD + p.col * COL_W, y: PAD + p.row * ROW_H} : null;
    }

    // -- layout -----------------------------------------------------------------------

    _take(name, row, col) {
      this.pos.set(name, {row, col});
      let s = this.taken.get(row);
      if (!s) { s = new Set(); this.taken.set(row, s); }
      s.add(col);
      if (col > this.maxCol) this.maxCol = col;
      if (row > this.maxRow) this.maxRow = row;
    }

    _depths(items) {
      const depth = new Map();
      for (const name of items.keys()) {
        if (depth.has(name)) continue;
        const chain = [];
        const seen = new Set();
        let cur = name;
        let base = 0;
        while (true) {
          if (depth.has(cur)) { base = depth.get(cur) + 1; break; }
          if (seen.has(cur)) { base = 0; break; } // a cycle: treat as a root
          seen.add(cur);
          chain.push(cur);
          const p = items.get(cur).parent;
          if (!p || !items.has(p)) { base = 0; break; }
          cur = p;
        }
        for (let i = chain.length - 1; i >= 0; i--) depth.set(chain[i], base + (chain.length - 1 - i));
      }
      return depth;
    }

    _tidy(items) {
      const kids = new Map();
      const roots = [];
      for (const [name, it] of items) {
        if (it.parent && items.has(it.parent) && it.parent !== name) {
          let l = kids.get(it.parent);
          if (!l) { l = []; kids.set(it.parent, l); }
          l.push(name);
        } else {
          roots.push(name);
        }
      }
      const byName = (a, b) => (a < b ? -1 : a > b ? 1 : 0);
      roots.sort(byName);
      for (const l of kids.values()) l.sort(byName);
      let next = 0;
      const placed = new Set();
      const place = (name, row) => {
        placed.add(name);
        const ks = (kids.get(name) || []).filter((k) => !placed.has(k));
        let col;
        if (!ks.length) {
          col = next++;
        } else {
          for (const k of ks) place(k, row + 1);
          // over its children: centred for a few, near the first of many (a wide fan-out
          // would put the parent far off to the right)
          const first = this.pos.get(ks[0]).col;
          const span = this.pos.get(ks[ks.length - 1]).col - first;
          col = first + Math.min(Math.floor(span / 2), 2);
        }
        this._take(name, row, col);
      };
      for (const r of roots) place(r, 0);
    }

    _placeNew(name, parent) {
      const pp = parent && parent !== name ? this.pos.get(parent) : null;
      if (!pp) {
        this._take(name, 0, this.maxCol + 1);
        return;
      }
      const row = pp.row + 1;
      const s = this.taken.get(row) || new Set();
      let col = pp.col;
      while (s.has(col)) col++;
      this._take(name, row, col);
    }

    _resize() {
      const w = Math.max(200, PAD * 2 + (this.maxCol + 1) * COL_W - (COL_W - NODE_W));
      const h = Math.max(80, PAD * 2 + (this.maxRow + 1) * ROW_H - (ROW_H - NODE_H));
      if (this.width === w && this.height === h) return;
      this.width = w;
      this.height = h;
      this.svg.setAttribute("width", String(w));
      this.svg.setAttribute("height", String(h));
      this.svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    }

    // -- update -----------------------------------------------------------------------

    /** Apply one /api/status object: {version, grove: {agents: [row]}, requests: [...]} */
    update(payload) {
      const entry = (payload && payload.grove) || {};
      const rows = Array.isArray(entry.agents) ? entry.agents : [];
      const reqs = Array.isArray(payload && payload.requests) ? payload.requests : [];
      if (payload && payload.version !== undefined) this.version = payload.version;

      // name -> {parent, row?, req?}
      const items = new Map();
      for (const r of rows) {
        if (r && typeof r.name === "string") items.set(r.name, {parent: r.parent || "", row: r});
      }
      for (const q of reqs) {
        if (q && typeof q.agent === "string" && !items.has(q.agent)) {
          items.set(q.agent, {parent: q.parent || "", req: q});
        }
      }

      // positions: tidy layout first time, then next free slots
      let unplaced = 0;
      for (const n of items.keys()) if (!this.pos.has(n)) unplaced++;
      if (unplaced) {
        if (this.pos.size === 0) this._tidy(items);
        const depth = this._depths(items);
        const todo = [];
        for (const n of items.keys()) if (!this.pos.has(n)) todo.push(n);
        todo.sort((a, b) => (depth.get(a) - depth.get(b)) || (a < b ? -1 : a > b ? 1 : 0));
        for (const n of todo) this._placeNew(n, items.get(n).parent);
        this._resize();
      }

      // nodes
      for (const [name, it] of items) this._node(name, it);
      for (const [name, rec] of this.nodes) {
        if (!items.has(name)) {
          rec.g.remove();
          this.nodes.delete(name);
        }
      }

      // edges
      const want = new Set();
      for (const [name, it] of items) {
        if (it.parent && items.has(it.parent) && it.parent !== name) {
          const key = "s\u0000" + it.parent + "\u0000" + name;
          want.add(key);
          this._edge(key, it.parent, name, it.req ? "edge spawn request" : "edge spawn");
        }
        const deps = it.row && Array.isArray(it.row.dependsOn) ? it.row.dependsOn : [];
        for (const d of deps) {
          if (typeof d !== "string" || !items.has(d) || d === name) continue;
          const key = "d\u0000" + d + "\u0000" + name;
          want.add(key);
          this._edge(key, d, name, "edge dep");
        }
      }
      for (const [key, path] of this.edges) {
        if (!want.has(key)) {
          path.remove();
          this.edges.delete(key);
        }
      }
    }

    _node(name, it) {
      let rec = this.nodes.get(name);
      if (!rec) {
        const p = this.positionOf(name);
        const g = this._proto().cloneNode(true);
        g.setAttribute("data-agent", name);
        g.setAttribute("transform", "translate(" + p.x + "," + p.y + ")");
        const a = g.firstChild;
        const title = a.firstChild;
        const tn = title.nextSibling.nextSibling.nextSibling;
        tn.textContent = name;
        rec = {g, a, title, sub: tn.nextSibling, cls: "", phase: "", subText: null, titleText: null,
          href: ""};
        this.nodes.set(name, rec);
        this.nodeLayer.appendChild(g);
      }
      let cls, phase, sub, tip, href;
      const G = encodeURIComponent(this.grove);
      if (it.row) {
        const r = it.row;
        phase = String(r.phase || "Unknown");
        const waiting = conditionOf(r, "WaitingForInput");
        const budget = conditionOf(r, "Budget");
        cls = "node " + phaseClass(phase) + (waiting ? " waiting" : "") + (budget ? " budget" : "");
        const parts = [waiting ? "needs input" : phase];
        if (budget) parts.push("budget");
        const cost = formatCost(r.usage);
        if (cost) parts.push(cost);
        sub = parts.join(" \u00b7 ");
        tip = name + "\n" + phase + (r.reason ? ": " + r.reason : "") +
          (waiting && waiting.message ? "\nneeds input: " + waiting.message : "") +
          (budget && budget.message ? "\nbudget: " + budget.message : "");
        href = "/agent/" + G + "/" + encodeURIComponent(name);
      } else {
        const q = it.req;
        phase = "Requested";
        const awaiting = q.status === "awaiting-approval";
        cls = "node requested phase-requested" + (awaiting ? " awaiting" : "");
        sub = awaiting ? "awaits approval" : "requested";
        tip = name + "\nspawn request " + (q.id || "") + " from " + (q.parent || "?") +
          (awaiting ? " (awaits approval)" : "");
        href = (awaiting ? "/inbox/" : "/plan/") + G;
      }
      if (rec.cls !== cls) { rec.g.setAttribute("class", cls); rec.cls = cls; }
      if (rec.phase !== phase) { rec.g.setAttribute("data-phase", phase); rec.phase = phase; }
      if (rec.subText !== sub) { rec.sub.textContent = sub; rec.subText = sub; }
      if (rec.titleText !== tip) { rec.title.textContent = tip; rec.titleText = tip; }
      if (rec.href !== href) { rec.a.setAttribute("href", href); rec.href = href; }
    }

    /** The empty node all nodes are cloned from: <g><a><title/><rect.box/><rect.stripe/>
     * <text.name/><text.sub/></a></g> */
    _proto() {
      if (!this.protoNode) {
        const g = svgEl("g", {class: "node"});
        const a = svgEl("a", null, g);
        svgEl("title", null, a);
        svgEl("rect", {class: "box", x: 0, y: 0, width: NODE_W, height: NODE_H, rx: 5}, a);
        svgEl("rect", {class: "stripe", x: 0, y: 0, width: 5, height: NODE_H, rx: 2}, a);
        svgEl("text", {class: "name", x: 12, y: 20}, a);
        svgEl("text", {class: "sub", x: 12, y: 38}, a);
        this.protoNode = g;
      }
      return this.protoNode;
    }

    _edge(key, from, to, cls) {
      let path = this.edges.get(key);
      if (path) {
        if (path.getAttribute("class") !== cls) path.setAttribute("class", cls);
        return;
      }
      const a = this.pos.get(from);
      const b = this.pos.get(to);
      const ax = PAD + a.col * COL_W + NODE_W / 2;
      const bx = PAD + b.col * COL_W + NODE_W / 2;
      const aTop = PAD + a.row * ROW_H;
      const bTop = PAD + b.row * ROW_H;
      let d;
      if (a.row < b.row) {
        const y1 = aTop + NODE_H;
        const y2 = bTop;
        const my = (y1 + y2) / 2;
        d = "M" + ax + "," + y1 + " C" + ax + "," + my + " " + bx + "," + my + " " + bx + "," + y2;
      } else if (a.row > b.row) {
        const y1 = aTop;
        const y2 = bTop + NODE_H;
        const my = (y1 + y2) / 2;
        d = "M" + ax + "," + y1 + " C" + ax + "," + my + " " + bx + "," + my + " " + bx + "," + y2;
      } else {
        // same row: an arc below the boxes
        const y = aTop + NODE_H;
        const dip = Math.min(ROW_H - NODE_H - 6, 14 + Math.abs(a.col - b.col) * 4);
        const x1 = ax + (bx > ax ? 12 : -12);
        const x2 = bx + (bx > ax ? -12 : 12);
        d = "M" + x1 + "," + y + " C" + x1 + "," + (y + dip) + " " + x2 + "," + (y + dip) + " " + x2 + "," + y;
      }
      path = svgEl("path", {class: cls, d, "data-from": from, "data-to": to});
      if (cls === "edge dep") path.setAttribute("marker-end", "url(#dep-arrow)");
      this.edgeLayer.appendChild(path);
      this.edges.set(key, path);
    }
  }

  GroveGraph.formatCost = formatCost;
  GroveGraph.formatTokens = formatTokens;
  GroveGraph.phaseClass = phaseClass;
  window.GroveGraph = GroveGraph;
})();
