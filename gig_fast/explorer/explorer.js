/* gig_fast explorer: the interactive concept graph of one GIG run.
 *
 * Data comes from <script type="application/json"> elements written by gig_fast.explorer.render:
 *   gig-main      layers, classes, concept sizes, the embedded images' graphs
 *   gig-pictures  crop table, per concept its nearest samples, per image picture and heat-maps
 *   gig-usage     "layer|concept" -> [class, rank, normalized, ...]        (parsed on first use)
 *   gig-pairs     "c1-c2" -> {s: [layer, concept, score, imp1, imp2, ...],  (parsed on first use)
 *                             e: [src layer, src, tgt layer, tgt, weight, norm, class, ...]}
 *   gig-class-<c> one class graph {n: [layer, concept, score, norm, ...],
 *                                  e: [src layer, src, tgt layer, tgt, weight, norm, ...]}
 *   gig-decompositions  optional: PFV decomposition cards (paper App. E; gig_fast/explorer/cards.py)
 * Only the graph on screen is decoded and drawn, so a 1,000-class run is as quick to open as a small one.
 * The page opens on a class that has explained images; classes without any are hidden from (or marked
 * in) the class search. Served by `gig-fast serve` (main.api set, CSP connect-src 'self'), it also
 * loads what the embedded report lacks from the run API: any explained image's graph with its
 * heat-maps, the top images of a concept, and the explanation of an uploaded image file.
 * Security: data strings are only ever inserted with textContent / setAttribute, never as markup.
 */
(function () {
  "use strict";

  const SVG_NS = "http://www.w3.org/2000/svg";
  const PIC = 64;          // node picture side (graph units)
  const COL = 96;          // horizontal distance between nodes
  const ROW = 118;         // vertical distance between layers
  const LEFT = 120;        // room for the layer names
  const CLS_W = 150, CLS_H = 40;
  const ERROR = -1;        // the id of a layer's error node (a concept id is >= 0)
  const ERROR_GAP = 32;    // extra room between a row's concepts and its error node
  const MIN_SCALE = 0.7;   // first view: pictures at least ~45 px; "fit" shows everything

  const $ = (id) => document.getElementById(id);
  const readJSON = (id) => { const el = $(id); return el ? JSON.parse(el.textContent) : null; };
  const lazyCache = new Map();
  function lazyJSON(id) {  // parsed on first use only: keeps start-up independent of the run's size
    if (!lazyCache.has(id)) lazyCache.set(id, readJSON(id));
    return lazyCache.get(id);
  }

  const main = readJSON("gig-main");
  const pictures = readJSON("gig-pictures");
  const decompositions = readJSON("gig-decompositions") || [];
  const layers = main.layers;
  const CLASSES = layers.length - 1;          // index of the pseudo-layer "classes"
  const classes = main.classes;
  const classById = new Map(classes.map((c) => [c.id, c]));
  const imageById = new Map(main.images.map((g) => [g.id, g]));

  const state = { mode: "class", a: null, b: null, image: null, view: null, vb: null, selected: null };
  const withGraph = new Set(main.class_graphs);      // classes with explained images (and so a graph)
  const hasImages = (c) => withGraph.has(c);
  const defaultClass = () => (main.class_graphs.length ? main.class_graphs[0] : classes[0].id);

  // -- the run API (only when served by `gig-fast serve`) -----------------------------------------
  const API = main.api || null;
  function api(path, options) {
    return fetch(API + path, options).then((r) => r.json().then((body) => {
      if (!r.ok) throw new Error(body && body.error ? body.error : "HTTP " + r.status);
      return body;
    }));
  }
  function adoptConcepts(v) {
    // the top-1 pictures and facts of concepts the page did not have (an image or pair view from the API)
    const offset = pictures.crops.length;
    pictures.crops.push(...v.crops);
    for (const [key, samples] of Object.entries(v.samples)) {
      if (!pictures.concepts[key]) pictures.concepts[key] = samples.map((s) => [s[0] + offset, ...s.slice(1)]);
    }
    for (const [key, facts] of Object.entries(v.concepts)) if (!main.concepts[key]) main.concepts[key] = facts;
  }
  function adoptView(v) {
    // an image view from the API: its graph, picture, heat-maps and the pictures of new concepts
    adoptConcepts(v);
    pictures.images[String(v.id)] = { picture: v.picture, heat: v.heat };
    const g = { id: v.id, label: v.label, prediction: v.prediction, class: v["class"], n: v.n, e: v.e };
    imageById.set(v.id, g);
    return g;
  }

  // ---------------------------------------------------------------------------------------------
  // small DOM helpers (text only: data never becomes markup)
  // ---------------------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }
  const className = (id) => (classById.has(id) ? classById.get(id).name : String(id));
  const fmt = (x) => (x === undefined || x === null ? "" : Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0)
    ? Number(x).toExponential(2) : Number(x).toFixed(Math.abs(x) >= 100 ? 1 : 3));
  const conceptKey = (li, q) => layers[li].name + "|" + q;
  function setStatus(text) { $("status").textContent = text; }

  // ---------------------------------------------------------------------------------------------
  // view model: nodes keyed "layerIndex|id", edges between them; tags say which graph they came from
  // ---------------------------------------------------------------------------------------------
  function newView(kind, title) { return { kind, title, nodes: new Map(), edges: new Map() }; }

  function addNode(view, li, q, tag, score, norm) {
    const key = li + "|" + q;
    let node = view.nodes.get(key);
    if (!node) {
      node = { key, li, q, tags: new Set(), score: {}, norm: 0, shared: null };
      view.nodes.set(key, node);
    }
    node.tags.add(tag);
    if (score !== undefined) { node.score[tag] = score; node.norm = Math.max(node.norm, norm); }
    return node;
  }

  function addEdge(view, e, i, tag) {
    // e[i..i+5] = source layer, source, target layer, target, weight, normalized
    const s = addNode(view, e[i], e[i + 1], tag), t = addNode(view, e[i + 2], e[i + 3], tag);
    const key = s.key + ">" + t.key;
    const old = view.edges.get(key);
    if (old) { old.tags.add(tag); if (e[i + 5] > old.n) { old.w = e[i + 4]; old.n = e[i + 5]; } }
    else view.edges.set(key, { key, s: s.key, t: t.key, w: e[i + 4], n: e[i + 5], tags: new Set([tag]) });
  }

  function decode(view, g, tag) {
    const n = g.n, e = g.e, x = g.x || [];
    for (let i = 0; i < n.length; i += 4) addNode(view, n[i], n[i + 1], tag, n[i + 2], n[i + 3]);
    for (let i = 0; i < e.length; i += 6) addEdge(view, e, i, tag);
    // error nodes (graph.json version 2): one per layer, id ERROR, its edges in x = [layer, score, target
    // layer, target, weight, normalized, ...] (the score repeats on each of its edges)
    for (let i = 0; i < x.length; i += 6) {
      addNode(view, x[i], ERROR, tag, x[i + 1], 0).error = true;
      addEdge(view, [x[i], ERROR, x[i + 2], x[i + 3], x[i + 4], x[i + 5]], 0, tag);
    }
  }

  const classGraph = (c) => lazyJSON("gig-class-" + c) || { n: [], e: [] };

  function classView(c) {
    const view = newView("class", "class " + c);
    view.classes = [c];
    decode(view, classGraph(c), "a");
    addNode(view, CLASSES, c, "a");
    return view;
  }

  const fetchedPairs = new Map();  // "lo-hi" -> {s, e}: pairs loaded from the run API (served page)
  const pairKey = (a, b) => Math.min(a, b) + "-" + Math.max(a, b);
  function pairData(a, b) {
    const key = pairKey(a, b);
    return (lazyJSON("gig-pairs") || {})[key] || fetchedPairs.get(key) || { s: [], e: [] };
  }

  function sharedOf(a, b) {
    // the pair graph's shared concepts (top_shared per layer, scored min of both normalised importances)
    const lo = Math.min(a, b);
    const flat = pairData(a, b).s;
    const out = [];
    if (flat) {
      for (let i = 0; i < flat.length; i += 5) {
        const imp = lo === a ? [flat[i + 3], flat[i + 4]] : [flat[i + 4], flat[i + 3]];
        out.push({ li: flat[i], q: flat[i + 1], score: flat[i + 2], importance: imp });
      }
    }
    return out;
  }

  function pairView(a, b) {
    const view = newView("pair", "pair " + a + "-" + b);
    view.classes = [a, b];
    decode(view, classGraph(a), "a");
    decode(view, classGraph(b), "b");
    addNode(view, CLASSES, a, "a");
    addNode(view, CLASSES, b, "b");
    for (const s of sharedOf(a, b)) {
      const node = addNode(view, s.li, s.q, "pair", s.importance[0], s.score);
      node.shared = s;
    }
    // the GIG edges of the shared concepts to their parents and children, per class (paper Fig. 1)
    const e = pairData(a, b).e;
    for (let i = 0; i < e.length; i += 7) addEdge(view, e, i, e[i + 6] === a ? "a" : "b");
    // a concept among the top concepts of both classes is shared even if the pair list is absent
    for (const node of view.nodes.values()) {
      if (node.li !== CLASSES && !node.error && node.tags.has("a") && node.tags.has("b") && !node.shared) {
        node.shared = { score: null };
      }
    }
    return view;
  }

  function imageView(id) {
    const g = imageById.get(id);
    const view = newView("image", "image " + id);
    view.classes = [g.class];
    view.image = id;
    decode(view, g, "a");
    addNode(view, CLASSES, g.class, "a");
    return view;
  }

  // ---------------------------------------------------------------------------------------------
  // layout and drawing: the classifier on top, each analysed layer one row further down
  // ---------------------------------------------------------------------------------------------
  function groupRank(view, node) {
    if (node.error) return 3;  // a layer's error node: at the end of its row, apart from the concepts
    if (view.kind !== "pair") return 0;
    if (node.shared) return 1;
    return node.tags.has("a") ? 0 : 2;
  }

  function layout(view) {
    const rows = new Map();
    for (const node of view.nodes.values()) {
      if (!rows.has(node.li)) rows.set(node.li, []);
      rows.get(node.li).push(node);
    }
    const order = [...rows.keys()].sort((x, y) => y - x);
    let widest = 0;
    for (const li of order) {
      rows.get(li).sort((u, v) => groupRank(view, u) - groupRank(view, v) || v.norm - u.norm || u.q - v.q);
      const gap = rows.get(li).some((node) => node.error) ? ERROR_GAP : 0;
      widest = Math.max(widest, rows.get(li).length * (li === CLASSES ? CLS_W + 20 : COL) + gap);
    }
    order.forEach((li, r) => {
      const row = rows.get(li);
      const step = li === CLASSES ? CLS_W + 20 : COL;
      const start = LEFT + (widest - row.length * step) / 2 + step / 2;
      row.forEach((node, i) => { node.x = start + i * step + (node.error ? ERROR_GAP : 0); node.y = 40 + r * ROW; });
    });
    view.rows = order;
    view.width = LEFT + widest + 20;
    view.height = 40 + order.length * ROW;
  }

  function edgeColour(e) {
    const light = 82 - 52 * e.n;  // thicker and bluer = stronger (paper Fig. 1)
    return e.w >= 0 ? `hsl(222, 80%, ${light}%)` : `hsl(16, 80%, ${light}%)`;
  }

  function drawEdge(view, e) {
    const s = view.nodes.get(e.s), t = view.nodes.get(e.t);
    const sy = s.y - PIC / 2 - 2, ty = t.y + (t.li === CLASSES ? CLS_H / 2 : PIC / 2 + 16);
    const my = (sy + ty) / 2;
    const path = svg("path", {
      class: s.error ? "edge from-error" : "edge", d: `M${s.x},${sy} C${s.x},${my} ${t.x},${my} ${t.x},${ty}`,
      stroke: edgeColour(e), "stroke-width": (0.6 + 6 * e.n).toFixed(2),
      "stroke-opacity": (0.35 + 0.65 * e.n).toFixed(2), "data-key": e.key,
    });
    const title = svg("title");
    title.textContent = `${nodeName(e.s)} → ${nodeName(e.t)}: GIG ${fmt(e.w)} (normalised ${fmt(e.n)})`;
    path.append(title);
    return path;
  }

  function nodePicture(node) {
    const samples = pictures.concepts[conceptKey(node.li, node.q)];
    if (!samples || !samples.length || samples[0][0] < 0) return null;
    return pictures.crops[samples[0][0]];
  }

  function drawNode(view, node) {
    const cls = ["node"];
    if (node.li === CLASSES) cls.push("cls");
    if (view.kind === "pair" && node.li !== CLASSES && !node.error) {
      if (node.shared) cls.push("shared");
      else cls.push(node.tags.has("a") ? "in-a" : "in-b");
    }
    if (view.kind === "pair" && node.li === CLASSES) cls.push(node.tags.has("a") ? "in-a" : "in-b");
    const g = svg("g", { class: cls.join(" "), transform: `translate(${node.x},${node.y})`, "data-key": node.key,
                         "data-layer": layers[node.li].name, "data-concept": node.q, tabindex: "0", role: "button" });
    const title = svg("title");
    if (node.li === CLASSES) {
      title.textContent = className(node.q);
      g.append(title, svg("rect", { class: "frame", x: -CLS_W / 2, y: -CLS_H / 2, width: CLS_W, height: CLS_H, rx: 6 }));
      const label = svg("text", { y: 5 });
      const name = className(node.q);
      label.textContent = name.length > 22 ? name.slice(0, 21) + "…" : name;
      g.append(label);
      return g;
    }
    if (node.error) {
      g.classList.add("error");
      title.textContent = `reconstruction error of ${layers[node.li].name}: the part of the layer above's change ` +
        `its concepts do not explain (Σ ${fmt(Object.values(node.score)[0])})`;
      g.append(title, svg("rect", { class: "frame", x: -PIC / 2 - 3, y: -PIC / 2 - 3, width: PIC + 6, height: PIC + 22, rx: 4 }));
      const label = svg("text", { y: 5 });
      label.textContent = "error";
      g.append(label);
      return g;
    }
    title.textContent = `concept #${node.q} at ${layers[node.li].name}`;
    g.append(title, svg("rect", { class: "frame", x: -PIC / 2 - 3, y: -PIC / 2 - 3, width: PIC + 6, height: PIC + 22, rx: 4 }));
    const uri = nodePicture(node);
    if (uri) {
      g.append(svg("image", { href: uri, x: -PIC / 2, y: -PIC / 2, width: PIC, height: PIC,
                              preserveAspectRatio: "xMidYMid meet", style: "image-rendering:pixelated" }));
    } else {
      g.append(svg("rect", { x: -PIC / 2, y: -PIC / 2, width: PIC, height: PIC, fill: "#e8ebf1" }));
    }
    const label = svg("text", { y: PIC / 2 + 14 });
    label.textContent = "#" + node.q;
    g.append(label);
    return g;
  }

  function inputPicture(view) {
    // the explained image itself, left of its class node (paper Fig. 3)
    const pics = pictures.images[String(view.image)];
    const cls = view.nodes.get(CLASSES + "|" + view.classes[0]);
    const g = svg("g", { class: "input-picture", transform: `translate(${cls.x - CLS_W / 2 - 20 - PIC},${cls.y - PIC / 2})` });
    if (pics) g.append(svg("image", { href: pics.picture, width: PIC, height: PIC, style: "image-rendering:pixelated" }));
    const t = svg("text", { class: "row-label", x: PIC / 2, y: PIC + 14, "text-anchor": "middle" });
    t.textContent = "image #" + view.image;
    g.append(t);
    return g;
  }

  function graphStyle() {
    // the stylesheet rules that draw the graph, copied into the SVG so exports look the same
    const rules = [];
    for (const sheet of document.styleSheets) {
      for (const rule of sheet.cssRules) {
        if (rule.selectorText && /^\.(node|edge|row-label)/.test(rule.selectorText)) rules.push(rule.cssText);
      }
    }
    const style = svg("style");
    style.textContent = rules.join("\n");
    return style;
  }

  function render(view) {
    layout(view);
    const root = $("graph");
    root.replaceChildren(graphStyle());
    const scene = svg("g", { id: "scene" });
    const labels = svg("g", { class: "row-labels" });
    view.rows.forEach((li, r) => {
      const t = svg("text", { class: "row-label", x: 8, y: 40 + r * ROW + 4 });
      t.textContent = li === CLASSES ? "classifier" : layers[li].name;
      labels.append(t);
    });
    const edges = svg("g", { class: "edges" });
    [...view.edges.values()].sort((x, y) => x.n - y.n).forEach((e) => edges.append(drawEdge(view, e)));
    const nodes = svg("g", { class: "nodes" });
    for (const node of view.nodes.values()) nodes.append(drawNode(view, node));
    scene.append(labels, edges, nodes);
    if (view.kind === "image") scene.append(inputPicture(view));
    root.append(scene);
    state.view = view;
    indexAdjacency(view);
    fit(true);
  }

  function indexAdjacency(view) {
    view.adj = new Map();
    for (const e of view.edges.values()) {
      for (const k of [e.s, e.t]) { if (!view.adj.has(k)) view.adj.set(k, []); view.adj.get(k).push(e); }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // zoom and pan (the SVG viewBox)
  // ---------------------------------------------------------------------------------------------
  function applyViewBox() {
    const v = state.vb;
    $("graph").setAttribute("viewBox", `${v.x} ${v.y} ${v.w} ${v.h}`);
  }

  function fit(readable) {
    // the whole graph; with `readable`, no smaller than MIN_SCALE, from the classifier down
    const box = $("graph").getBoundingClientRect();
    const view = state.view;
    const W = box.width || 800, H = box.height || 600;
    let scale = Math.min(W / (view.width + 20), H / (view.height + 20));
    const top = readable && scale < MIN_SCALE;
    if (top) scale = Math.min(MIN_SCALE, W / (view.width + 20));
    const w = W / scale, h = H / scale;
    state.vb = { x: (view.width - w) / 2, y: top ? 0 : (view.height - h) / 2 + 10, w, h };
    applyViewBox();
  }

  function zoom(factor, cx, cy) {
    const v = state.vb;
    const px = cx === undefined ? v.x + v.w / 2 : cx, py = cy === undefined ? v.y + v.h / 2 : cy;
    v.x = px - (px - v.x) / factor; v.y = py - (py - v.y) / factor;
    v.w /= factor; v.h /= factor;
    applyViewBox();
  }

  function toGraph(evt) {
    const box = $("graph").getBoundingClientRect(), v = state.vb;
    const s = Math.max(v.w / box.width, v.h / box.height);  // preserveAspectRatio meet
    return { x: v.x + (evt.clientX - box.left - (box.width - v.w / s) / 2) * s,
             y: v.y + (evt.clientY - box.top - (box.height - v.h / s) / 2) * s, s };
  }

  function wirePanZoom() {
    const root = $("graph");
    root.addEventListener("wheel", (evt) => {
      // wheel scrolls (the graph is tall); ctrl + wheel (and trackpad pinch) zooms at the pointer
      evt.preventDefault();
      const p = toGraph(evt);
      if (evt.ctrlKey || evt.metaKey) zoom(Math.exp(-evt.deltaY * 0.004), p.x, p.y);
      else { state.vb.x += evt.deltaX * p.s; state.vb.y += evt.deltaY * p.s; applyViewBox(); }
    }, { passive: false });
    let drag = null;
    root.addEventListener("pointerdown", (evt) => {
      drag = { x: evt.clientX, y: evt.clientY, vx: state.vb.x, vy: state.vb.y, s: toGraph(evt).s, moved: false };
    });
    root.addEventListener("pointermove", (evt) => {
      if (!drag) return;
      const dx = evt.clientX - drag.x, dy = evt.clientY - drag.y;
      if (!drag.moved && Math.hypot(dx, dy) < 4) return;  // a click, not a drag
      if (!drag.moved) { drag.moved = true; root.setPointerCapture(evt.pointerId); root.classList.add("dragging"); }
      state.vb.x = drag.vx - dx * drag.s; state.vb.y = drag.vy - dy * drag.s;
      applyViewBox();
    });
    const end = () => { if (drag && drag.moved) state.justDragged = true; drag = null; root.classList.remove("dragging"); };
    root.addEventListener("pointerup", end);
    root.addEventListener("pointercancel", end);
    root.addEventListener("click", (evt) => {
      if (state.justDragged) { state.justDragged = false; return; }
      const g = evt.target.closest(".node");
      if (g) openCard(g.getAttribute("data-key"));
    });
    root.addEventListener("keydown", (evt) => {
      const g = evt.target.closest && evt.target.closest(".node");
      if (g && (evt.key === "Enter" || evt.key === " ")) { evt.preventDefault(); openCard(g.getAttribute("data-key")); }
    });
    root.addEventListener("mouseover", (evt) => {
      const g = evt.target.closest(".node");
      if (g) highlight(g.getAttribute("data-key"));
    });
    root.addEventListener("mouseout", (evt) => {
      if (evt.target.closest(".node") && !(evt.relatedTarget && evt.relatedTarget.closest && evt.relatedTarget.closest(".node"))) highlight(null);
    });
    $("zoom-in").addEventListener("click", () => zoom(1.25));
    $("zoom-out").addEventListener("click", () => zoom(0.8));
    $("zoom-fit").addEventListener("click", () => fit(false));
    window.addEventListener("resize", () => state.view && fit(true));
  }

  function highlight(key) {
    const scene = $("scene");
    if (!scene) return;
    for (const hot of scene.querySelectorAll(".hot")) hot.classList.remove("hot");
    scene.classList.toggle("dim", key !== null);
    if (key === null) return;
    const keys = new Set([key]);
    for (const e of state.view.adj.get(key) || []) {
      keys.add(e.s); keys.add(e.t);
      const path = scene.querySelector(`.edge[data-key="${CSS.escape(e.key)}"]`);
      if (path) path.classList.add("hot");
    }
    for (const k of keys) {
      const g = scene.querySelector(`.node[data-key="${CSS.escape(k)}"]`);
      if (g) g.classList.add("hot");
    }
  }

  // ---------------------------------------------------------------------------------------------
  // the concept card
  // ---------------------------------------------------------------------------------------------
  function nodeName(key) {
    const [li, q] = key.split("|").map(Number);
    if (q === ERROR && li !== CLASSES) return `error (${layers[li].name})`;
    return li === CLASSES ? "class " + className(q) : `#${q} (${layers[li].name})`;
  }

  function gigTable(view, key, side) {
    // side "up": edges from this concept to the layer above (parents); "down": from the layer below (children)
    const rows = (view.adj.get(key) || []).filter((e) => (side === "up" ? e.s === key : e.t === key))
      .sort((x, y) => y.n - x.n);
    if (!rows.length) return el("p", { class: "note" }, "none in this view");
    const table = el("table", {}, el("tr", {}, el("th", {}, side === "up" ? "parent" : "child"),
      el("th", { class: "num" }, "GIG"), el("th", { class: "num" }, "normalised")));
    for (const e of rows) {
      const other = side === "up" ? e.t : e.s;
      const link = el("button", { type: "button", "data-key": other }, nodeName(other));
      link.addEventListener("click", () => openCard(other));
      table.append(el("tr", {}, el("td", {}, link), el("td", { class: "num" }, fmt(e.w)), el("td", { class: "num" }, fmt(e.n))));
    }
    return table;
  }

  function cropsSection(li, q) {
    const samples = pictures.concepts[conceptKey(li, q)] || [];
    const box = el("div", { class: "crops" });
    for (const [crop, img, pos, cos, member, label] of samples) {
      const fig = el("figure", { class: member ? "crop" : "crop outside", "data-image": img });
      const alt = `image ${img}, position ${pos}, cosine ${cos}${member ? "" : ", outside the cluster"}`;
      if (crop >= 0) fig.append(el("img", { src: pictures.crops[crop], alt, title: alt + " (iERF in blue, context dimmed)" }));
      fig.append(el("figcaption", { title: className(label) }, `#${img} · ${className(label)}`));
      fig.append(el("figcaption", {}, `cos ${Number(cos).toFixed(2)}`));
      box.append(fig);
    }
    if (!samples.length) return el("p", { class: "note" }, "No samples in this report.");
    if (!main.ierf) return el("div", {}, el("p", { class: "note" }, "The run kept no iERF maps (store_ierf = False): samples without pictures."), box);
    return box;
  }

  function heatFigure(imageId, key) {
    const pics = pictures.images[String(imageId)];
    const uri = pics && pics.heat[key];
    if (!uri) return null;
    const g = imageById.get(imageId);
    const caption = g ? `#${imageId} · ${className(g.label)}` : `#${imageId}`;
    return el("figure", { class: "heat", "data-image": imageId },
      el("div", { class: "stack" }, el("img", { src: pics.picture, alt: "input image " + imageId }),
        el("img", { class: "overlay", src: uri, alt: "localisation heat-map" })),
      el("figcaption", {}, caption));
  }

  function localisationSection(view, li, q) {
    const key = conceptKey(li, q);
    let ids;
    if (view.kind === "image") ids = [view.image];
    else ids = main.images.filter((g) => view.classes.includes(g.class)).map((g) => g.id);
    const figs = ids.map((id) => heatFigure(id, key)).filter(Boolean).slice(0, 8);
    if (figs.length) {
      return [el("p", { class: "facts" }, "Code value of the concept at each position of " + layers[li].name +
        " (red > 0, blue < 0; each map scaled to its own maximum)."), el("div", { class: "heat-list" }, ...figs)];
    }
    const why = !Object.keys(pictures.images).length ? "No heat-maps are embedded in this report."
      : view.kind === "image" ? "This concept is not used in the selected image at this layer."
        : "Not used in the embedded images of this class (pick one in the Image view).";
    return [el("p", { class: "note" }, why)];
  }

  function topImagesSection(li, q) {
    // served only: the explained images that use this concept most (the run's store), each a link to its graph
    const box = el("div", { class: "top-images" }, el("span", { class: "note" }, "loading…"));
    api(`/concepts/${encodeURIComponent(layers[li].name)}/${q}/images?n=12`).then((rows) => {
      box.replaceChildren();
      for (const r of rows) {
        const b = el("button", { type: "button", "data-image": r.image,
          title: `Σ code ${fmt(r.usage)}, peak ${fmt(r.peak)} at position ${r.peak_position}` },
          `#${r.image} · ${className(r["class"])}`);
        b.addEventListener("click", () => showImage(r.image));
        box.append(b);
      }
      if (!rows.length) box.append(el("span", { class: "note" }, "no explained image uses it"));
    }).catch((err) => box.replaceChildren(el("span", { class: "note" }, "could not load: " + err.message)));
    return [el("p", { class: "facts" }, `Among all ${main.images_total} explained images, by Σ of its code values.`), box];
  }

  function pageImages(view) {
    // the explained images the page shows for this view (as the localisation section): at most 8
    const ids = view.kind === "image" ? [view.image]
      : main.images.filter((g) => view.classes.includes(g.class)).map((g) => g.id);
    return ids.filter((id) => typeof id === "number").slice(0, 8);
  }

  function interventionSection(view, node) {
    // served only: remove the concept in the page's images (POST /api/intervene) and show what changes:
    // the top classes' probabilities and the codes of the graph's nodes below the classifier, above this one
    const images = pageImages(view);
    const below = [...view.nodes.values()].filter((n) => n.li > node.li && n.li !== CLASSES && !n.error)
      .sort((x, y) => x.li - y.li || x.q - y.q);
    const box = el("div", { class: "intervention" });
    const button = el("button", { type: "button", class: "remove-concept" }, "remove it");
    button.disabled = !images.length;
    button.addEventListener("click", () => {
      button.disabled = true;
      box.replaceChildren(el("span", { class: "note" }, "running…"));
      const body = { images, edits: [[layers[node.li].name, node.q, 0]], top: 3,
        targets: below.map((n) => [layers[n.li].name, n.q]) };
      api("/intervene", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })
        .then((res) => { box.replaceChildren(...interventionTables(res.results, below)); })
        .catch((err) => box.replaceChildren(el("span", { class: "note" }, "could not run: " + err.message)))
        .finally(() => { button.disabled = false; });
    });
    const lead = el("p", { class: "facts" }, images.length
      ? `Set its code to 0 at ${layers[node.li].name} in ${images.length} image(s) of this view (the rest of the ` +
        "PFV kept) and run the network on from there."
      : "No embedded image in this view to run it on.");
    return [lead, button, box];
  }

  function interventionTables(results, below) {
    const classes = el("table", { class: "classes-change" }, el("tr", {}, el("th", {}, "image"), el("th", {}, "class"),
      el("th", { class: "num" }, "p before"), el("th", { class: "num" }, "p after")));
    for (const r of results) {
      for (const t of r.top_classes) {
        classes.append(el("tr", { "data-image": r.image, "data-class": t["class"] }, el("td", {}, `#${r.image}`),
          el("td", {}, className(t["class"])), el("td", { class: "num" }, fmt(t.before)), el("td", { class: "num" }, fmt(t.after))));
      }
    }
    const out = [el("h4", {}, "Top classes"), classes];
    if (below.length) {
      const nodes = el("table", { class: "nodes-change" }, el("tr", {}, el("th", {}, "concept"),
        el("th", { class: "num" }, "Σ code before"), el("th", { class: "num" }, "after")));
      for (const n of below) {
        const name = layers[n.li].name;
        const rows = results.flatMap((r) => r.concepts.filter((c) => c.layer === name && c.concept === n.q));
        const mean = (k) => rows.reduce((a, c) => a + c[k], 0) / Math.max(rows.length, 1);
        nodes.append(el("tr", { "data-key": n.key }, el("td", {}, nodeName(n.key)),
          el("td", { class: "num" }, fmt(mean("before"))), el("td", { class: "num" }, fmt(mean("after")))));
      }
      out.push(el("h4", {}, "Graph nodes above it (mean over the images)"), nodes);
    }
    return out;
  }

  function usageSection(li, q) {
    const flat = lazyJSON("gig-usage")[conceptKey(li, q)] || [];
    const box = el("div", { class: "usage" });
    const shown = Math.min(flat.length / 3, 60);
    for (let i = 0; i < shown * 3; i += 3) {
      const c = flat[i];
      const b = el("button", { type: "button", "data-class": c, title: `rank ${flat[i + 1]}, normalised ${fmt(flat[i + 2])}` },
        `${className(c)} (#${flat[i + 1]})`);
      if (state.view.classes.includes(c)) b.classList.add("current");
      b.addEventListener("click", () => showClass(c));
      box.append(b);
    }
    const lead = el("p", { class: "facts" }, `Among the top concepts of ${flat.length / 3} class graph(s)` +
      (flat.length / 3 > shown ? ` (first ${shown} shown)` : "") + "; (#rank in that class).");
    return flat.length ? [lead, box] : [el("p", { class: "note" }, "Not among any class's top concepts.")];
  }

  function classCard(body, c) {
    const info = classById.get(c) || { n_images: 0 };
    body.append(el("h2", {}, className(c)), el("p", { class: "facts" }, `class id ${c} · ${info.n_images} explained images`));
    if (state.view.kind !== "class" || state.a !== c) {
      const b = el("button", { type: "button" }, "show this class's graph");
      b.addEventListener("click", () => showClass(c));
      body.append(b);
    }
    body.append(el("h3", {}, "GIG from the last layer"), gigTable(state.view, CLASSES + "|" + c, "down"));
  }

  function openCard(key) {
    const view = state.view;
    const node = view.nodes.get(key);
    if (!node) return;
    state.selected = key;
    for (const g of $("graph").querySelectorAll(".node.selected")) g.classList.remove("selected");
    const g = $("graph").querySelector(`.node[data-key="${CSS.escape(key)}"]`);
    if (g) g.classList.add("selected");
    const body = $("card-body");
    body.replaceChildren();
    $("card").hidden = false;
    body.setAttribute("data-key", key);
    if (node.li === CLASSES) { classCard(body, node.q); return; }
    if (node.error) { errorCard(body, view, node); return; }
    const [size, norm] = main.concepts[conceptKey(node.li, node.q)] || [null, null];
    body.append(el("h2", {}, `Concept #${node.q}`),
      el("p", { class: "facts" }, `layer ${layers[node.li].name} · id ${node.q}` +
        (size !== null ? ` · ${size} PFVs in its cluster · ‖v‖ ${fmt(norm)}` : "")));
    const scores = Object.entries(node.score).filter(([tag]) => tag !== "pair").map(([tag, s]) =>
      `${className(view.classes[tag === "b" ? 1 : 0])}: ${fmt(s)}`);
    if (scores.length) body.append(el("p", { class: "facts" }, "score (Σ GIG to the layer above) " + scores.join(" · ")));
    if (node.shared) {
      const s = node.shared;
      body.append(el("p", { class: "facts" }, "shared by both classes" + (s.score === null ? " (in both top sets)"
        : ` (min normalised importance ${fmt(s.score)}; importance ${className(view.classes[0])} ` +
          `${fmt(s.importance[0])}, ${className(view.classes[1])} ${fmt(s.importance[1])})`)));
    }
    body.append(el("h3", {}, "Nearest PFV samples (iERF with context)"),
      el("p", { class: "facts" }, "The PFVs of the PFV–iERF dataset nearest to the concept vector (cosine), " +
        "nearest first: iERF tinted blue, context dimmed; dashed frame: outside the concept's cluster."),
      cropsSection(node.li, node.q));
    body.append(el("h3", {}, "Localisation"), ...localisationSection(view, node.li, node.q));
    if (API) body.append(el("h3", {}, "Images that use it most"), ...topImagesSection(node.li, node.q));
    if (API) body.append(el("h3", {}, "Intervention"), ...interventionSection(view, node));
    body.append(el("h3", {}, "Used by classes"), ...usageSection(node.li, node.q));
    body.append(el("h3", {}, "GIG to parents (layer above)"), gigTable(view, key, "up"));
    body.append(el("h3", {}, "GIG from children (layer below)"), gigTable(view, key, "down"));
  }

  function errorCard(body, view, node) {
    const scores = Object.entries(node.score).map(([tag, s]) => `${className(view.classes[tag === "b" ? 1 : 0])}: ${fmt(s)}`);
    body.append(el("h2", {}, `Error node of ${layers[node.li].name}`),
      el("p", { class: "facts" }, "The layer's reconstruction residual X − β − UV: its GIG is the part of each " +
        "target's change that the layer's concepts do not explain, T(X) − T(β + UV); concepts and error add up " +
        "to the model's real change. Score (Σ over its targets) " + scores.join(" · ")),
      el("h3", {}, "GIG to parents (layer above)"), gigTable(view, node.key, "up"));
  }

  // ---------------------------------------------------------------------------------------------
  // the PFV decomposition card (paper App. E): x = sum_q u_q v_q + beta, each term with its samples
  // ---------------------------------------------------------------------------------------------
  function sampleFigure(s) {
    const fig = el("figure", { class: s.member ? "crop" : "crop outside", "data-image": s.image });
    const alt = `image ${s.image}, cosine ${s.cosine}${s.member ? "" : ", outside the cluster"}`;
    if (s.crop) fig.append(el("img", { src: s.crop, alt, title: alt + " (iERF in blue, context dimmed)" }));
    fig.append(el("figcaption", { title: className(s.label) }, `#${s.image} · ${className(s.label)}`));
    fig.append(el("figcaption", {}, `cos ${Number(s.cosine).toFixed(2)}`));
    return fig;
  }

  function conceptLink(li, q) {
    // a button to the concept's own card when the concept is drawn in the current view, else plain text
    const key = li + "|" + q;
    if (li < 0 || !state.view || !state.view.nodes.has(key)) return el("span", {}, `#${q}`);
    const b = el("button", { type: "button", "data-key": key }, `#${q}`);
    b.addEventListener("click", () => openCard(key));
    return b;
  }

  function openDecomposition(i) {
    const d = decompositions[i];
    if (!d) return;
    $("decomposition-select").value = String(i);
    const li = layers.findIndex((lay) => lay.name === d.layer);
    const body = $("card-body");
    body.replaceChildren();
    $("card").hidden = false;
    body.setAttribute("data-decomposition", String(i));
    body.append(el("h2", {}, "PFV decomposition"),
      el("p", { class: "facts" }, `layer ${d.layer} · image #${d.image} (${d.class_name}) · position ` +
        (d.yx ? `(${d.yx[0]}, ${d.yx[1]}) of ${d.spatial[0]}×${d.spatial[1]}` : String(d.position))),
      el("p", { class: "facts" }, `x ≈ Σ u·v + β with ${d.active} of ${d.K} concepts · rel-L2 ${fmt(d.rel_l2)}` +
        (d.norm !== undefined ? ` · ‖x‖ ${fmt(d.norm)}, ‖x − β‖ ${fmt(d.centred_norm)}, residual ${fmt(d.residual_norm)}` : "")));
    if (d.crop) {
      body.append(el("figure", { class: "crop pfv" }, el("img", { src: d.crop, alt: "the PFV's iERF with context" }),
        el("figcaption", {}, "the PFV's iERF")));
    }
    body.append(el("h3", {}, `Top ${d.terms.length} concepts by |u|·‖v‖`));
    for (const t of d.terms) {
      const head = el("p", { class: "term" }, el("b", {}, (t.coefficient >= 0 ? "+ " : "− ") +
        Math.abs(t.coefficient).toFixed(2) + " × "), conceptLink(li, t.concept),
        el("span", { class: "facts" }, ` · ${(100 * t.share).toFixed(0)}% of Σ|u|‖v‖ · cos(v, x − β) ${fmt(t.cosine)}` +
          (t.size !== null && t.size !== undefined ? ` · ${t.size} PFVs in its cluster` : "")));
      body.append(head);
      if (t.samples.length) body.append(el("div", { class: "crops" }, ...t.samples.map(sampleFigure)));
    }
    body.append(el("p", { class: "note" }, "Samples: the PFVs of the PFV–iERF dataset nearest to the concept " +
      "vector (cosine), nearest first; dashed frame: outside the concept's cluster."));
  }

  function wireDecompositions() {
    if (!decompositions.length) return;
    const select = $("decomposition-select");
    select.append(el("option", { value: "" }, "choose…"));
    decompositions.forEach((d, i) => select.append(el("option", { value: String(i) },
      `${d.layer} · image #${d.image} (${d.class_name})`)));
    select.addEventListener("change", () => { if (select.value !== "") openDecomposition(Number(select.value)); });
    $("box-decomposition").hidden = false;
  }

  // ---------------------------------------------------------------------------------------------
  // views and controls
  // ---------------------------------------------------------------------------------------------
  function setHash(text) {
    state.hash = text;
    try { history.replaceState(null, "", "#" + text); } catch (err) { /* file:// in some browsers */ }
  }

  function describe(view) {
    const n = [...view.nodes.values()].filter((x) => x.li !== CLASSES && !x.error).length;
    const errors = [...view.nodes.values()].filter((x) => x.error).length;
    const base = `${n} concepts, ${view.edges.size} edges` + (errors ? `, ${errors} error nodes` : "");
    if (view.kind === "class" && !hasImages(view.classes[0])) {
      return `Class “${className(view.classes[0])}” has no explained images, so no graph · ` +
        `${main.class_graphs.length} of ${classes.length} classes have one`;
    }
    if (view.kind === "class") return `Class “${className(view.classes[0])}”: top-${main.settings.top_concepts} concepts per layer · ${base}`;
    if (view.kind === "pair") {
      const shared = [...view.nodes.values()].filter((x) => x.shared).length;
      return `Classes “${className(view.classes[0])}” and “${className(view.classes[1])}”: ${shared} shared concepts highlighted · ${base}`;
    }
    const g = imageById.get(view.image);
    if (view.image === "upload") return `Uploaded image, predicted “${className(g.prediction)}”, explained for “${className(g.class)}” · ${base}`;
    return `Image #${view.image} (label “${className(g.label)}”, predicted “${className(g.prediction)}”) · ${base} · ` +
      `${main.images.length} of ${main.images_total} explained images are embedded in this report`;
  }

  function show(view, hash) {
    render(view);
    setStatus(describe(view));
    setHash(hash);
    $("card").hidden = true;
    state.selected = null;
    $("legend-pair").hidden = view.kind !== "pair";
  }

  function setMode(mode) {
    state.mode = mode;
    for (const b of document.querySelectorAll("button.mode")) b.setAttribute("aria-pressed", String(b.getAttribute("data-mode") === mode));
    $("box-a").hidden = mode === "image";
    $("box-b").hidden = mode !== "pair";
    $("box-image").hidden = mode !== "image";
  }

  function showClass(c) {
    state.a = c;
    setMode("class");
    $("search-a").value = className(c);
    show(classView(c), "class=" + c);
  }

  function mostSimilar(c) {
    // the class sharing most top concepts with c (from the usage index), for a useful default pair
    const usage = lazyJSON("gig-usage"), count = new Map();
    const g = classGraph(c);
    for (let i = 0; i < g.n.length; i += 4) {
      const flat = usage[conceptKey(g.n[i], g.n[i + 1])] || [];
      for (let j = 0; j < flat.length; j += 3) if (flat[j] !== c) count.set(flat[j], (count.get(flat[j]) || 0) + 1);
    }
    // prefer a pair the run computed (each class with its pair_neighbours nearest classes): others have no
    // shared-concept list or edges
    const pairs = lazyJSON("gig-pairs") || {};
    const paired = (o) => (Math.min(c, o) + "-" + Math.max(c, o)) in pairs;
    const pool = main.class_graphs.length > 1 ? main.class_graphs : classes.map((x) => x.id);
    let best = pool.length > 1 ? pool[(pool.indexOf(c) + 1) % pool.length] : c, most = 0, bestPaired = paired(best);
    for (const [other, k] of count) {
      const p = paired(other);
      if ((p && !bestPaired) || (p === bestPaired && (k > most || (k === most && other < best)))) {
        best = other; most = k; bestPaired = p;
      }
    }
    return best;
  }

  function showPair(a, b) {
    if (b === undefined || b === null || b === a) b = mostSimilar(a);
    const key = pairKey(a, b);
    if (API && !((lazyJSON("gig-pairs") || {})[key]) && !fetchedPairs.has(key)) {
      // graph.json embeds a sample of the pair graphs; the run's store has every pair
      setStatus(`Loading the pair graph of ${className(a)} and ${className(b)}…`);
      const known = Object.keys(pictures.concepts).join(",");
      api(`/pairs/${Math.min(a, b)}/${Math.max(a, b)}/view?known=${encodeURIComponent(known)}`)
        .then((v) => { adoptConcepts(v); fetchedPairs.set(key, { s: v.s, e: v.e }); showPair(a, b); })
        .catch((err) => setStatus(`Pair ${className(a)} / ${className(b)}: ${err.message}`));
      return;
    }
    state.a = a; state.b = b;
    setMode("pair");
    $("search-a").value = className(a);
    $("search-b").value = className(b);
    show(pairView(a, b), "pair=" + a + "-" + b);
  }

  function showImage(id) {
    if (!imageById.has(id) && API && id !== "upload") {
      setStatus(`Loading image #${id}…`);
      const known = Object.keys(pictures.concepts).join(",");
      api(`/images/${id}/view?known=${encodeURIComponent(known)}`).then((v) => { adoptView(v); showImage(id); })
        .catch((err) => setStatus(`Image #${id}: ${err.message}`));
      return;
    }
    if (!imageById.has(id)) { setStatus(`Image #${id} is not embedded in this report.`); return; }
    state.image = id;
    setMode("image");
    if ([...$("image-select").options].some((o) => o.value === String(id))) $("image-select").value = String(id);
    show(imageView(id), "image=" + id);
  }

  function wireSearch(which) {
    const input = $("search-" + which), list = $("results-" + which);
    let lower = null;  // built on first use
    const matches = () => {
      const q = input.value.trim().toLowerCase();
      if (!q) return [];
      lower = lower || classes.map((c) => c.name.toLowerCase());
      const out = [];
      const hide = !$("box-empty").hidden && $("hide-empty").checked;
      for (let i = 0; i < classes.length && out.length < 30; i++) {
        if (hide && !hasImages(classes[i].id)) continue;
        if (lower[i].includes(q) || String(classes[i].id) === q) out.push(classes[i]);
      }
      return out;
    };
    const choose = (c) => {
      list.hidden = true;
      if (which === "a") { if (state.mode === "pair") showPair(c, state.b === c ? null : state.b); else showClass(c); }
      else showPair(state.a === null ? c : state.a, c);
    };
    input.addEventListener("input", () => {
      const found = matches();
      list.replaceChildren(...found.map((c) => {
        const b = el("button", { type: "button", "data-class": c.id, class: hasImages(c.id) ? "" : "empty" },
          `${c.name} (#${c.id})`);
        b.addEventListener("click", () => choose(c.id));
        return el("li", {}, b);
      }));
      if (!found.length && input.value.trim()) list.append(el("li", { class: "note" }, "no class matches"));
      list.hidden = !input.value.trim();
    });
    input.addEventListener("keydown", (evt) => {
      if (evt.key === "Enter") { const found = matches(); if (found.length) choose(found[0].id); }
      if (evt.key === "Escape") list.hidden = true;
    });
    input.addEventListener("focus", () => input.select());
  }

  function wireControls() {
    for (const b of document.querySelectorAll("button.mode")) {
      b.addEventListener("click", () => {
        const mode = b.getAttribute("data-mode");
        if (mode === "class") showClass(state.a === null ? defaultClass() : state.a);
        else if (mode === "pair") showPair(state.a === null ? defaultClass() : state.a, state.b);
        else if (main.images.length) showImage(state.image === null ? main.images[0].id : state.image);
        else setStatus("No explained images are embedded in this report.");
      });
    }
    const select = $("image-select");
    for (const g of main.images) {
      select.append(el("option", { value: String(g.id) },
        `#${g.id} · ${className(g.label)}` + (g.prediction !== g.label ? ` (predicted ${className(g.prediction)})` : "")));
    }
    select.addEventListener("change", () => showImage(Number(select.value)));
    $("box-empty").hidden = main.class_graphs.length === classes.length;  // some classes have no images
    if (API) {
      for (const x of document.querySelectorAll(".served")) x.hidden = false;
      const load = () => { if (/^\d+$/.test($("image-id").value)) { setMode("image"); showImage(Number($("image-id").value)); } };
      $("image-load").addEventListener("click", load);
      $("image-id").addEventListener("keydown", (evt) => { if (evt.key === "Enter") load(); });
      $("upload").addEventListener("change", () => {
        const file = $("upload").files[0];
        if (!file) return;
        setStatus(`Explaining ${file.name}…`);
        api("/explain?view=true", { method: "POST", body: file }).then((v) => {
          imageById.delete("upload");
          adoptView({ ...v, id: "upload" });
          showImage("upload");
        }).catch((err) => setStatus(`${file.name}: ${err.message}`));
      });
    }
    wireSearch("a");
    wireSearch("b");
    $("card-close").addEventListener("click", () => { $("card").hidden = true; });
    $("export-svg").addEventListener("click", () => download(new Blob([svgText()], { type: "image/svg+xml" }), "svg"));
    $("export-png").addEventListener("click", () => pngBlob().then((blob) => download(blob, "png")));
    $("export-csv").addEventListener("click", () => download(new Blob([csvText()], { type: "text/csv" }), "csv"));
    document.addEventListener("click", (evt) => {
      for (const w of ["a", "b"]) if (!$("box-" + w).contains(evt.target)) $("results-" + w).hidden = true;
    });
  }

  // ---------------------------------------------------------------------------------------------
  // exports of the current view: SVG / PNG picture, CSV numbers
  // ---------------------------------------------------------------------------------------------
  function svgText() {
    const clone = $("graph").cloneNode(true);
    const v = state.vb;
    clone.setAttribute("xmlns", SVG_NS);
    clone.setAttribute("width", Math.round(v.w));
    clone.setAttribute("height", Math.round(v.h));
    clone.removeAttribute("class");
    for (const x of clone.querySelectorAll(".dim, .hot, .selected")) x.classList.remove("dim", "hot", "selected");
    const bg = svg("rect", { x: v.x, y: v.y, width: v.w, height: v.h, fill: "#fff" });
    clone.insertBefore(bg, clone.firstChild.nextSibling);
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + new XMLSerializer().serializeToString(clone);
  }

  function pngBlob(scale) {
    const text = svgText(), v = state.vb, k = scale || 2;
    return new Promise((resolve, reject) => {
      const url = URL.createObjectURL(new Blob([text], { type: "image/svg+xml" }));
      const img = new Image();
      img.onload = () => {
        const canvas = document.createElement("canvas");
        canvas.width = Math.round(v.w * k); canvas.height = Math.round(v.h * k);
        canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
        URL.revokeObjectURL(url);
        canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("PNG export failed"))), "image/png");
      };
      img.onerror = () => { URL.revokeObjectURL(url); reject(new Error("PNG export failed")); };
      img.src = url;
    });
  }

  function csvField(x) {
    if (x === undefined || x === null) return "";
    if (typeof x === "number") return String(x);
    let s = String(x);
    if (/^[=+\-@\t\r]/.test(s)) s = "'" + s;  // no formula injection into spreadsheets
    return '"' + s.replace(/"/g, '""') + '"';
  }

  function csvText() {
    const view = state.view;
    const head = ["view", "kind", "layer", "id", "name", "target_layer", "target_id", "target_name", "weight",
      "normalized", "score", "score_b", "shared"];
    const lines = [head.join(",")];
    const name = (li, q) => (li === CLASSES ? className(q) : "");
    for (const n of view.nodes.values()) {
      const a = n.score.a !== undefined ? n.score.a : null, b = n.score.b !== undefined ? n.score.b : null;
      lines.push([view.title, n.error ? "error node" : "node", layers[n.li].name, n.q, name(n.li, n.q), null, null, null, null,
        n.li === CLASSES ? null : n.norm, a, b, view.kind === "pair" && n.li !== CLASSES ? (n.shared ? 1 : 0) : null]
        .map(csvField).join(","));
    }
    for (const e of view.edges.values()) {
      const s = view.nodes.get(e.s), t = view.nodes.get(e.t);
      lines.push([view.title, s.error ? "error edge" : "edge", layers[s.li].name, s.q, name(s.li, s.q), layers[t.li].name, t.q, name(t.li, t.q),
        e.w, e.n, null, null, null].map(csvField).join(","));
    }
    return lines.join("\r\n") + "\r\n";
  }

  function download(blob, ext) {
    const a = el("a", { href: URL.createObjectURL(blob), download: `gig-${state.view.title.replace(/[^\w-]+/g, "_")}.${ext}` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }

  // ---------------------------------------------------------------------------------------------
  // start
  // ---------------------------------------------------------------------------------------------
  function initialView() {
    const params = new URLSearchParams(location.hash.slice(1));
    const num = (k) => (params.has(k) && /^\d+$/.test(params.get(k)) ? Number(params.get(k)) : null);
    if (params.has("pair")) {
      const m = /^(\d+)-(\d+)$/.exec(params.get("pair"));
      if (m && classById.has(+m[1]) && classById.has(+m[2])) return showPair(+m[1], +m[2]);
    }
    if (num("image") !== null && (imageById.has(num("image")) || API)) return showImage(num("image"));
    if (num("class") !== null && classById.has(num("class"))) return showClass(num("class"));
    return showClass(defaultClass());  // a class with explained images: never an empty canvas
  }

  function start() {
    $("page-title").textContent = main.title;
    $("run-info").textContent = `${main.model.arch} on ${main.model.dataset} · run ${main.run_key} · ` +
      `${classes.length} classes · ${layers.length - 1} layers`;
    wirePanZoom();
    wireControls();
    wireDecompositions();
    const asked = new URLSearchParams(location.hash.slice(1)).get("decomposition") || "";  // before the view sets the hash
    initialView();
    const params = new URLSearchParams(location.hash.slice(1));
    if (params.has("concept")) openCard(params.get("concept"));
    if (/^\d+$/.test(asked)) openDecomposition(Number(asked));
    window.addEventListener("hashchange", () => { if (location.hash.slice(1) !== state.hash) initialView(); });
    window.GIG.readyMs = performance.now();  // ms since navigation start: the "interactive" time
    document.documentElement.setAttribute("data-ready", "1");
  }

  window.GIG = { showClass, showPair, showImage, openCard, openDecomposition, csvText, svgText, pngBlob, fit, zoom, state,
    readyMs: null };
  start();
}());
