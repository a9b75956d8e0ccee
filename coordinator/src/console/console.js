// The Treaty console's live refresh: every 2 s, ask the page's live endpoint (data-src on
// #live, which answers {"html": ..., "refreshed_at": ...}) and put the server-rendered,
// server-escaped HTML in place. Forms sit outside #live, so what an operator types survives.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var stamp = document.getElementById("refreshed");
  if (!live || !stamp) {
    return;
  }
  // Tells a reader of the DOM (and the end-to-end test) that the script ran.
  document.body.setAttribute("data-live", "on");
  var busy = false;
  function show(text, ok) {
    stamp.textContent = text;
    stamp.className = ok ? "ok" : "stale";
  }
  function refresh() {
    if (busy) {
      return;
    }
    busy = true;
    fetch(live.getAttribute("data-src"), { cache: "no-store", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (body) {
        live.innerHTML = body.html;
        show("live, refreshed " + body.refreshed_at, true);
      })
      .catch(function (error) {
        show("not refreshed (" + error.message + "): showing the last state read", false);
      })
      .then(function () {
        busy = false;
      });
  }
  show("live, refreshed " + (live.getAttribute("data-rendered") || "at load"), true);
  window.setInterval(refresh, 2000);
})();
