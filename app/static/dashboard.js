// Live refresh of a run page: poll the run's progress endpoint and replace the parts of the
// page it returns (progress, actions, timeline, charts) until the run ends.
(function () {
  "use strict";

  var POLL_MS = 2000;
  var MAX_BACKOFF_MS = 30000;

  var root = document.getElementById("run-live");
  if (!root || root.dataset.terminal === "true") {
    return;
  }
  var progressUrl = root.dataset.progressUrl;
  var delayMs = POLL_MS;

  function schedule() {
    window.setTimeout(refresh, delayMs);
  }

  function apply(body) {
    Object.keys(body.fragments).forEach(function (id) {
      var element = document.getElementById(id);
      if (element) {
        element.innerHTML = body.fragments[id];
      }
    });
    root.dataset.terminal = body.terminal ? "true" : "false";
  }

  function refresh() {
    fetch(progressUrl, {
      headers: { Accept: "application/json" },
      credentials: "same-origin",
      cache: "no-store",
    })
      .then(function (response) {
        if (response.status === 401) {
          window.location.assign(root.dataset.signInUrl);
          return null;
        }
        if (!response.ok) {
          throw new Error("progress request failed with HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (body) {
        if (body === null) {
          return;
        }
        apply(body);
        delayMs = POLL_MS;
        if (!body.terminal) {
          schedule();
        }
      })
      .catch(function (error) {
        // Keep polling through a server restart or a dropped connection, but less often.
        console.warn("rundpo dashboard:", error);
        delayMs = Math.min(delayMs * 2, MAX_BACKOFF_MS);
        schedule();
      });
  }

  schedule();
})();
