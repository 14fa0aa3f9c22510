// Draws the console's charts from the JSON blocks the server rendered (no inline
// scripts: the pages' CSP allows scripts from /console/static only).
(function () {
  "use strict";
  function data(id) {
    var node = document.getElementById(id);
    return node ? JSON.parse(node.textContent) : null;
  }
  function when(ts) {
    return new Date(ts * 1000).toISOString().slice(5, 16).replace("T", " ");
  }
  function lines(canvas, labels, series, stacked) {
    var datasets = Object.keys(series).map(function (name) {
      return { label: name, data: series[name], fill: stacked, pointRadius: 0 };
    });
    new Chart(canvas, {
      type: "line",
      data: { labels: labels.map(when), datasets: datasets },
      options: { animation: false, responsive: true,
                 scales: { y: { stacked: stacked, beginAtZero: true } } }
    });
  }
  function overview() {
    var d = data("overview-data");
    if (!d) return;
    document.querySelectorAll("canvas[data-series]").forEach(function (canvas) {
      lines(canvas, d.labels, d.metrics[canvas.dataset.series] || {}, true);
    });
    var tiers = document.querySelector("canvas[data-tiers]");
    if (tiers) {
      new Chart(tiers, { type: "doughnut", options: { animation: false, aspectRatio: 2 },
        data: { labels: Object.keys(d.tiers),
                datasets: [{ data: Object.values(d.tiers) }] } });
    }
    var rates = document.querySelector("canvas[data-rates]");
    if (rates) lines(rates, d.labels, { "error rate": d.rates.errors,
                                         "fallback rate": d.rates.fallbacks }, false);
  }
  function cache() {
    var d = data("cache-data");
    if (!d) return;
    document.querySelectorAll("canvas[data-histogram]").forEach(function (canvas) {
      var h = d[canvas.dataset.histogram];
      if (!h) return;
      var labels = h.edges.slice(0, -1).map(function (e) { return e.toFixed(3); });
      new Chart(canvas, {
        type: "bar",
        data: { labels: labels, datasets: [
          { label: "hits", data: h.hits, stack: "s" },
          { label: "misses", data: h.misses, stack: "s" }] },
        options: { animation: false, plugins: { legend: { display: false } },
                   scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } } }
      });
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    if (typeof Chart === "undefined") return;  // assets not vendored: tables only
    overview();
    cache();
  });
})();
