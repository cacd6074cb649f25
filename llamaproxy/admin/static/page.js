// llamaproxy operator page: live updates and confirmations. No framework, no build step.
//
// The page is complete without this script (a static snapshot). With it, the sections'
// HTML is replaced by newer renderings from the server: Server-Sent Events from /events,
// or, when they cannot be used, /fragments polled every 2 seconds.
(function () {
  "use strict";

  var POLL_MS = 2000;
  var status = document.getElementById("live-status");
  if (!status) {
    return; // not the dashboard (login, confirmation pages)
  }
  var query = (function () {
    var params = [];
    var key = document.body.getAttribute("data-key");
    var model = document.body.getAttribute("data-model");
    if (key) { params.push("key=" + encodeURIComponent(key)); }
    if (model) { params.push("model=" + encodeURIComponent(model)); }
    return params.length ? "?" + params.join("&") : "";
  })();

  function setStatus(text) {
    status.textContent = text;
  }

  function clock(seconds) {
    return new Date(seconds * 1000).toISOString().substring(11, 19);
  }

  function apply(document_) {
    var sections = document_.sections || {};
    Object.keys(sections).forEach(function (name) {
      var target = document.getElementById("frag-" + name);
      if (target) {
        target.innerHTML = sections[name]; // rendered and escaped by the server
      }
    });
    document.body.setAttribute("data-updated", String(document_.at));
  }

  // Restart buttons ask first; the server asks again when this script is not running.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.classList || !form.classList.contains("confirm")) {
      return;
    }
    if (!window.confirm(form.getAttribute("data-confirm") || "Are you sure?")) {
      event.preventDefault();
      return;
    }
    var yes = document.createElement("input");
    yes.type = "hidden";
    yes.name = "confirm";
    yes.value = "yes";
    form.appendChild(yes);
  });

  var pollTimer = null;

  function poll() {
    fetch("/fragments" + query, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (response.status === 401) {
          window.location.reload(); // the session ended: back to the login form
          return null;
        }
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (document_) {
        if (document_) {
          apply(document_);
          setStatus("Live (polling every 2 s), updated " + clock(document_.at) + " UTC");
        }
      })
      .catch(function () {
        setStatus("Live updates interrupted; retrying");
      })
      .then(function () {
        pollTimer = window.setTimeout(poll, POLL_MS);
      });
  }

  function startPolling() {
    if (pollTimer === null) {
      poll();
    }
  }

  if (!window.EventSource || window.location.hash === "#poll") {
    startPolling();
    return;
  }
  var source = new EventSource("/events" + query);
  var received = false;
  var failures = 0;
  source.onmessage = function (event) {
    received = true;
    failures = 0;
    var document_ = JSON.parse(event.data);
    apply(document_);
    setStatus("Live (Server-Sent Events), updated " + clock(document_.at) + " UTC");
  };
  source.addEventListener("logout", function () {
    source.close();
    window.location.reload();
  });
  source.onerror = function () {
    failures += 1;
    // Never connected, or keeps failing: fall back to polling (which also notices a logout).
    if (!received || failures >= 3) {
      source.close();
      startPolling();
    }
  };
})();
