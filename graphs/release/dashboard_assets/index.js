// Feature index: search and sort over window.GREYLENS_FEATURES
// (rows: [feature, label, density, max_activation, mean_activation, top logits]).
// The URL hash keeps the state (#q=word&sort=density) so a link shows the same view.
(function () {
  "use strict";
  const rows = window.GREYLENS_FEATURES || [];
  const search = document.getElementById("search");
  const sort = document.getElementById("sort");
  const body = document.querySelector("#features tbody");
  const count = document.getElementById("count");
  const LIMIT = 500;  // rows drawn at once; the count says how many matched
  const keys = { feature: (r) => r[0], density: (r) => -r[2], max: (r) => -r[3], mean: (r) => -r[4], label: (r) => r[1] };

  function readHash() {
    const params = new URLSearchParams(window.location.hash.slice(1));
    if (params.has("q")) search.value = params.get("q");
    if (params.has("sort") && keys[params.get("sort")]) sort.value = params.get("sort");
  }

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  function render() {
    const q = search.value.trim().toLowerCase();
    const matched = rows.filter((r) => !q || String(r[0]) === q || r[1].toLowerCase().includes(q) || r[5].toLowerCase().includes(q));
    const key = keys[sort.value];
    matched.sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : a[0] - b[0]));
    body.replaceChildren();
    for (const r of matched.slice(0, LIMIT)) {
      const tr = document.createElement("tr");
      tr.dataset.feature = r[0];
      const id = document.createElement("td");
      const link = document.createElement("a");
      link.href = "features/" + r[0] + ".html";
      link.textContent = r[0];
      id.appendChild(link);
      tr.append(id, cell(r[1], "label"), cell(r[2].toPrecision(3)), cell(r[3].toPrecision(4)), cell(r[4].toPrecision(4)), cell(r[5]));
      body.appendChild(tr);
    }
    count.textContent = "showing " + Math.min(matched.length, LIMIT) + " of " + matched.length + " matching (" + rows.length + " features)";
  }

  readHash();
  search.addEventListener("input", render);
  sort.addEventListener("change", render);
  window.addEventListener("hashchange", () => { readHash(); render(); });
  render();
})();
