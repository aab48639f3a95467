// EVC console: the only script. Pages work without it; with it, a running job's events arrive
// live over server-sent events and the page reloads (server-rendered results, curves) at the end.
(function () {
  "use strict";
  var el = document.querySelector("[data-stream]");
  if (!el || !window.EventSource) return;
  var list = document.getElementById("events");
  var state = document.getElementById("job-state");
  var reloadOnEvent = el.hasAttribute("data-reload");
  var pending = null;
  function reloadSoon(ms) {
    if (!pending) pending = setTimeout(function () { window.location.reload(); }, ms);
  }
  var es = new EventSource(el.getAttribute("data-stream"));
  es.addEventListener("job-event", function (e) {
    var ev = JSON.parse(e.data);
    if (list && list.tagName === "OL") {
      var li = document.createElement("li");
      li.textContent = (ev.type || "") + (ev.state ? " \u2192 " + ev.state : "") +
        (ev.host ? " [" + ev.host + "]" : "") + (ev.message ? ": " + ev.message : "");
      list.appendChild(li);
      list.scrollTop = list.scrollHeight;
    }
    if (ev.type === "job" && ev.state && state) { state.textContent = ev.state; state.className = "state state-" + ev.state; }
    if (reloadOnEvent && ev.type === "fl.round") reloadSoon(1000);
  });
  es.addEventListener("end", function (e) {
    es.close();
    var d = JSON.parse(e.data);
    if (state && d.state) { state.textContent = d.state; state.className = "state state-" + d.state; }
    reloadSoon(300);
  });
})();
