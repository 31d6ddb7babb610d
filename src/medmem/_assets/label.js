
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("medmem-data").textContent);
  var pairs = data.pairs;
  var storeKey = "medmem-labels:" + data.token;
  var KEYS = {c: "copy", n: "novel", u: "unsure"};
  var labels = {};
  var pos = 0;
  var el = function (id) { return document.getElementById(id); };

  function loadStored() {
    try {
      var raw = window.localStorage.getItem(storeKey);
      if (!raw) { return; }
      var saved = JSON.parse(raw);
      var known = {};
      pairs.forEach(function (p) { known[p.pair_id] = true; });
      Object.keys(saved.labels || {}).forEach(function (k) {
        var v = saved.labels[k];
        if (known[k] && (v === "copy" || v === "novel" || v === "unsure")) { labels[k] = v; }
      });
      if (typeof saved.pos === "number" && saved.pos >= 0 && saved.pos < pairs.length) {
        pos = saved.pos;
      }
    } catch (e) { /* no storage: labels live in this page until saved */ }
  }

  function store() {
    try {
      window.localStorage.setItem(storeKey, JSON.stringify({labels: labels, pos: pos}));
    } catch (e) {
      el("message").textContent = "This browser does not keep labels across reloads: " +
        "save labels.csv before closing the page.";
    }
  }

  function buildViews() {
    var body = el("views");
    data.views.forEach(function (name, v) {
      var tr = document.createElement("tr");
      tr.className = "view-" + v;
      var th = document.createElement("td");
      th.className = "view-name";
      th.textContent = data.views.length > 1 ? name : "";
      tr.appendChild(th);
      ["train", "synthetic"].forEach(function (side) {
        var td = document.createElement("td");
        var img = document.createElement("img");
        img.id = side + "-" + v;
        img.alt = side === "train" ? "training image" : "synthetic image";
        td.appendChild(img);
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
  }

  function counts() {
    var c = {copy: 0, novel: 0, unsure: 0, done: 0};
    pairs.forEach(function (p) {
      var v = labels[p.pair_id];
      if (v) { c[v] += 1; c.done += 1; }
    });
    return c;
  }

  function render() {
    var p = pairs[pos];
    el("pair-number").textContent = "Pair " + p.pair_id + " of " + pairs.length;
    data.views.forEach(function (name, v) {
      el("train-" + v).src = "data:image/png;base64," + p.train[v];
      el("synthetic-" + v).src = "data:image/png;base64," + p.synthetic[v];
    });
    var label = labels[p.pair_id] || "";
    var cur = el("current-label");
    cur.textContent = label || "not labelled";
    cur.className = label;
    ["copy", "novel", "unsure"].forEach(function (v) {
      el("btn-" + v).setAttribute("aria-pressed", label === v ? "true" : "false");
    });
    var c = counts();
    el("progress-text").textContent = c.done + " of " + pairs.length + " labelled (" +
      c.copy + " copy, " + c.novel + " novel, " + c.unsure + " unsure)";
    el("progress-bar").value = c.done;
    el("prev").disabled = pos === 0;
    el("next").disabled = pos === pairs.length - 1;
  }

  function move(step) {
    pos = Math.max(0, Math.min(pairs.length - 1, pos + step));
    store();
    render();
  }

  function setLabel(value) {
    labels[pairs[pos].pair_id] = value;
    el("message").textContent = "";
    if (pos < pairs.length - 1) { pos += 1; }
    else if (counts().done === pairs.length) {
      el("message").textContent = "All pairs labelled: press Save labels.csv.";
    }
    store();
    render();
  }

  function csvField(value) {
    var s = String(value);
    return /[",\r\n]/.test(s) ? "\"" + s.replace(/"/g, "\"\"") + "\"" : s;
  }

  function toCsv() {
    var lines = ["pair_id,train_id,synthetic_id,label"];
    pairs.forEach(function (p) {
      lines.push([p.pair_id, p.train_id, p.synthetic_id, labels[p.pair_id] || ""]
        .map(csvField).join(","));
    });
    return lines.join("\n") + "\n";
  }

  function save() {
    var blob = new Blob([toCsv()], {type: "text/csv;charset=utf-8"});
    var url = URL.createObjectURL(blob);
    var a = document.createElement("a");
    a.href = url;
    a.download = "labels.csv";
    a.style.display = "none";
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(url); a.remove(); }, 2000);
    el("message").textContent = "labels.csv saved (" + counts().done + " of " +
      pairs.length + " labelled) to your downloads folder.";
  }

  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) { return; }
    var k = e.key.length === 1 ? e.key.toLowerCase() : e.key;
    if (KEYS[k]) { setLabel(KEYS[k]); }
    else if (k === "ArrowRight" || k === "ArrowDown" || k === "j") { move(1); }
    else if (k === "ArrowLeft" || k === "ArrowUp" || k === "k") { move(-1); }
    else { return; }
    e.preventDefault();
  });
  ["copy", "novel", "unsure"].forEach(function (v) {
    el("btn-" + v).addEventListener("click", function () { setLabel(v); });
  });
  el("prev").addEventListener("click", function () { move(-1); });
  el("next").addEventListener("click", function () { move(1); });
  el("save").addEventListener("click", save);
  // after a mouse click, give the keys back to the shortcuts (Space would re-press the button)
  Array.prototype.forEach.call(document.querySelectorAll("button"), function (b) {
    b.addEventListener("click", function (e) { if (e.detail > 0) { b.blur(); } });
  });

  loadStored();
  buildViews();
  el("progress-bar").max = pairs.length;
  render();
  document.body.setAttribute("data-ready", "1");
})();
