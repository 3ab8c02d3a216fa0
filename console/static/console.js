// modelcd console: live sections over server-sent events, and the rollout buttons.
// Plain JavaScript, no build step, no library. The server renders every section; this script
// only swaps a section's HTML when a newer rendering arrives and posts the buttons' actions to
// the deployment API's own /endpoints routes (same checks as the CLI).
"use strict";

(function () {
  const announce = document.getElementById("announce");
  const titles = { deployments: "Deployments", models: "Models", endpoints: "Endpoints", shadows: "Shadows", fleet: "Fleet" };
  let pending = new Set();
  let timer = null;

  // Screen readers hear which sections changed, at most every 5 s, not every table cell.
  function say(text) {
    if (announce) { announce.textContent = text; }
  }
  function noteUpdate(id) {
    if (!titles[id]) { return; }
    pending.add(titles[id]);
    if (timer === null) {
      timer = setTimeout(function () {
        say("Updated: " + Array.from(pending).join(", "));
        pending = new Set();
        timer = null;
      }, 5000);
    }
  }

  function replace(id, html) {
    const el = document.getElementById(id);
    if (!el) { return; }
    // Keep keyboard focus on the same control when its section is re-rendered.
    const focused = document.activeElement;
    let key = null;
    if (focused && el.contains(focused) && focused.dataset && focused.dataset.action) {
      key = [focused.dataset.endpoint, focused.dataset.action];
    }
    const results = {};
    el.querySelectorAll(".action-result").forEach(function (r) {
      const art = r.closest("[data-endpoint]");
      if (art && r.textContent) { results[art.dataset.endpoint] = r.textContent; }
    });
    el.innerHTML = html;
    Object.keys(results).forEach(function (ep) {
      const art = el.querySelector('[data-endpoint="' + CSS.escape(ep) + '"] .action-result');
      if (art) { art.textContent = results[ep]; }
    });
    if (key) {
      const again = el.querySelector('button[data-endpoint="' + CSS.escape(key[0]) + '"][data-action="' + CSS.escape(key[1]) + '"]');
      if (again) { again.focus(); }
    }
    noteUpdate(id);
  }

  function connect() {
    const status = document.getElementById("status");
    const source = new EventSource("/console/events");
    source.addEventListener("section", function (ev) {
      const msg = JSON.parse(ev.data);
      replace(msg.id, msg.html);
    });
    source.addEventListener("open", function () { document.body.dataset.live = "yes"; });
    source.addEventListener("error", function () {
      document.body.dataset.live = "no";
      if (status && source.readyState === EventSource.CLOSED) {
        status.textContent = "Live updates stopped; reload the page.";
      }
    });
  }

  document.addEventListener("click", function (ev) {
    const button = ev.target.closest("button.action");
    if (!button) { return; }
    const endpoint = button.dataset.endpoint;
    const action = button.dataset.action;
    if ((action === "abort" || action === "promote") &&
        !window.confirm(action.charAt(0).toUpperCase() + action.slice(1) + " the rollout of " + endpoint + "?")) {
      return;
    }
    const result = button.closest("[data-endpoint]").querySelector(".action-result");
    button.disabled = true;
    fetch("/endpoints/" + encodeURIComponent(endpoint) + "/rollout/" + encodeURIComponent(action), {
      method: "POST",
      credentials: "same-origin",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ reason: action + " from the console" }),
    }).then(function (resp) {
      return resp.json().catch(function () { return {}; }).then(function (body) {
        if (resp.status === 401) { window.location = "/console/login"; return; }
        const text = resp.ok ? action + " sent to the rollout controller" : action + " refused: " + (body.error || resp.status);
        if (result) { result.textContent = text; }
        say(text);
        button.disabled = false;
      });
    }).catch(function (err) {
      const text = action + " failed: " + err;
      if (result) { result.textContent = text; }
      say(text);
      button.disabled = false;
    });
  });

  connect();
}());
