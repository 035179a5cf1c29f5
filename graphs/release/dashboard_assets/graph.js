// Graph viewer: draws one prompt's circuit (window.GREYLENS_CIRCUITS[slug], circuit-tracer shape)
// as an SVG — one column per token, rows embedding / layer l / layer l+Δ / logit — and lists the
// reasoning paths of the selected token from its greylens explanation.
(function () {
  "use strict";
  const circuits = window.GREYLENS_CIRCUITS || {};
  const slugs = Object.keys(circuits).sort();
  const select = document.getElementById("prompt");
  const svg = document.getElementById("graph");
  const tokens = document.getElementById("tokens");
  const panel = document.getElementById("paths");
  const NS = "http://www.w3.org/2000/svg";
  const COL = 96, ROW = 110, TOP = 30;
  let current = null;

  function el(name, attrs, text) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function layerRows(nodes) {
    // logit on top, then feature layers high to low, embeddings at the bottom
    const layers = [...new Set(nodes.filter((n) => n.feature_type === "sae feature").map((n) => Number(n.layer)))].sort((a, b) => b - a);
    const rows = { logit: 0 };
    layers.forEach((layer, i) => { rows[String(layer)] = i + 1; });
    rows.E = layers.length + 1;
    return rows;
  }

  function draw(slug) {
    current = circuits[slug];
    const nodes = current.nodes, links = current.links;
    const rows = layerRows(nodes);
    const ctxs = [...new Set(nodes.map((n) => n.ctx_idx))].sort((a, b) => a - b);
    const place = {};
    const perCell = {};
    for (const n of nodes) {
      const row = n.feature_type === "logit" ? 0 : rows[n.layer];
      const cellKey = row + ":" + n.ctx_idx;
      const k = (perCell[cellKey] = (perCell[cellKey] || 0) + 1) - 1;
      place[n.node_id] = { x: 90 + ctxs.indexOf(n.ctx_idx) * COL + (k % 4) * 18, y: TOP + row * ROW + Math.floor(k / 4) * 18, node: n };
    }
    svg.replaceChildren();
    svg.setAttribute("width", 110 + ctxs.length * COL);
    svg.setAttribute("height", TOP + (rows.E + 1) * ROW - 40);
    for (const [name, row] of Object.entries(rows)) {
      svg.appendChild(el("text", { x: 4, y: TOP + row * ROW + 4, fill: "#888" }, name === "E" ? "tokens" : name === "logit" ? "predicted" : "layer " + name));
    }
    const maxW = Math.max(1e-9, ...links.map((l) => Math.abs(l.weight)));
    for (const l of links) {
      const a = place[l.source], b = place[l.target];
      if (!a || !b) continue;
      svg.appendChild(el("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y, class: "link", "data-ctx": a.node.ctx_idx,
        stroke: l.weight >= 0 ? "#3451b2" : "#c0392b", "stroke-width": 0.5 + 3.5 * Math.abs(l.weight) / maxW, "stroke-opacity": 0.55 }));
    }
    for (const p of Object.values(place)) {
      const n = p.node;
      const colour = { embedding: "#999", logit: "#2e8b57" }[n.feature_type] || (n.role === "implied" ? "#8a3ffc" : n.role === "target" ? "#dd8452" : "#4c72b0");
      const circle = el("circle", { cx: p.x, cy: p.y, r: 6, fill: colour, class: "node", "data-ctx": n.ctx_idx, "data-node": n.node_id });
      circle.appendChild(el("title", {}, (n.feature === null ? "" : "feature " + n.feature + " ") + (n.clerp || "") + (n.activation != null ? " · act " + Number(n.activation).toFixed(3) : "")));
      if (n.feature_type === "sae feature" && n.role !== "target") {
        const a = el("a", { href: "features/" + n.feature + ".html" });
        a.appendChild(circle);
        svg.appendChild(a);
      } else {
        svg.appendChild(circle);
      }
      if (n.feature_type !== "sae feature") svg.appendChild(el("text", { x: p.x - 8, y: p.y + (n.feature_type === "logit" ? -10 : 18) }, String(n.clerp).replace(/\n/g, "⏎").slice(0, 10)));
    }
    drawTokens();
  }

  function drawTokens() {
    tokens.replaceChildren();
    const positions = current.greylens_explanation ? current.greylens_explanation.positions : [];
    positions.forEach((p) => {
      const b = document.createElement("button");
      b.textContent = p.token.replace(/\n/g, "⏎") || "␣";
      b.dataset.ctx = p.position;
      b.addEventListener("click", () => focus(p));
      tokens.appendChild(b);
    });
    if (positions.length) focus(positions.reduce((best, p) => (score(p) > score(best) ? p : best), positions[0]));
  }

  function score(p) { return p.paths.length + p.direct.length + p.implied.length; }

  function focus(p) {
    for (const b of tokens.children) b.classList.toggle("on", Number(b.dataset.ctx) === p.position);
    for (const item of svg.querySelectorAll("[data-ctx]")) item.classList.toggle("dim", Number(item.dataset.ctx) !== p.position);
    const column = svg.querySelector('circle[data-ctx="' + p.position + '"]');
    if (column) svg.parentElement.scrollLeft = Math.max(0, Number(column.getAttribute("cx")) - svg.parentElement.clientWidth / 2);
    const lines = [];
    lines.push("<h3>" + esc(p.token) + " → " + esc(p.predicted) + " <small>(p=" + p.probability + ")</small></h3>");
    lines.push("<b>evidence</b>: " + (p.evidence.map(([f, a]) => feat(f) + " " + a.toFixed(2)).join(", ") || "none"));
    lines.push("<br><b>implied by the graph</b>: " + (p.implied.map((i) => feat(i.feature) + " ← " + i.from.map(([s]) => feat(s)).join(", ")).join("; ") || "none"));
    const paths = p.paths.map((q) => "<li>" + feat(q.source) + " → L+Δ " + q.target + " → " + esc(p.predicted) + " <small>" + q.weight.toFixed(3) + "</small></li>");
    const direct = p.direct.map((d) => "<li>" + feat(d.feature) + " → " + esc(p.predicted) + " <small>" + d.weight.toFixed(3) + "</small></li>");
    lines.push("<h4>reasoning paths</h4><ol class='path-list'>" + (paths.concat(direct).join("") || "<li>none</li>") + "</ol>");
    panel.innerHTML = lines.join("");
  }

  function feat(f) { return "<a href='features/" + f + ".html'>" + f + "</a>"; }
  function esc(s) { return String(s).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";").replace(/\n/g, "⏎"); }

  for (const slug of slugs) {
    const option = document.createElement("option");
    option.value = slug;
    option.textContent = circuits[slug].metadata.prompt;
    select.appendChild(option);
  }
  const wanted = decodeURIComponent(window.location.hash.slice(1));
  if (slugs.includes(wanted)) select.value = wanted;
  select.addEventListener("change", () => { window.location.hash = select.value; draw(select.value); });
  document.getElementById("prompt-text").textContent = slugs.length ? slugs.length + " prompt(s)" : "no explained prompts in this release";
  if (slugs.length) draw(select.value);
})();
