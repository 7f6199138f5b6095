// Live updates: server-sent events from /events make htmx refresh the parts of the
// page marked hx-trigger="jr-change from:body" (no reload, no framework).
(function () {
  "use strict";
  var url = document.body.dataset.events;
  if (!url || !window.EventSource) { return; }
  var badge = document.getElementById("live");
  var source = new EventSource(url);
  var first = true;
  source.addEventListener("ready", function () {
    if (badge) { badge.classList.add("on"); }
    if (!first) { htmx.trigger(document.body, "jr-change"); }  // missed while away
    first = false;
  });
  source.addEventListener("change", function () {
    htmx.trigger(document.body, "jr-change");
  });
  source.onerror = function () {
    if (badge) { badge.classList.remove("on"); }
  };
  // Confirm before bulk actions (no inline script: the page's CSP forbids it).
  document.addEventListener("submit", function (event) {
    var question = event.target.dataset.confirm;
    if (question && !window.confirm(question)) { event.preventDefault(); }
  });
})();
