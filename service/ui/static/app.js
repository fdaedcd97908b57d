// The web view: #/ is the runs list, #/runs/NAME a run's page. The view on screen is polled every POLL_MS
// while the tab is visible (a hidden tab asks nothing), one poll at a time.

import { forgetKey, hasKey } from "./api.js";
import { setStatus } from "./page.js";
import { RunView } from "./run.js";
import { RunsView } from "./runs.js";

const POLL_MS = 2000;
window.optimUI = { charts: {}, polls: 0, view: null };

let view = null;
let polling = null;

function route() {
  const match = /^#\/runs\/(.+)$/.exec(location.hash);
  return match ? { page: "run", name: decodeURIComponent(match[1]) } : { page: "runs" };
}

function show() {
  if (view) view.stop();
  const root = document.getElementById("view");
  root.replaceChildren();
  window.optimUI.charts = {};
  const where = route();
  view = where.page === "run" ? new RunView(root, where.name) : new RunsView(root);
  window.optimUI.view = where;
  document.title = where.page === "run" ? `${where.name} · optim-service` : "optim-service";
  if (polling) polling.finally(poll); // the previous view's poll first
  else poll();
}

async function poll() {
  if (document.hidden || polling) return;
  const current = view;
  polling = (async () => {
    try {
      await current.poll();
      if (current === view) setStatus(`updated ${new Date().toLocaleTimeString()}`);
      window.optimUI.polls += 1;
    } catch (err) {
      setStatus(`could not reach the service: ${err.message}`, "error");
    } finally {
      polling = null;
      document.getElementById("forget-key").hidden = !hasKey();
    }
  })();
  await polling;
}

function start() {
  document.getElementById("forget-key").addEventListener("click", () => {
    forgetKey();
    location.reload();
  });
  document.addEventListener("optim:key", () => {
    document.getElementById("forget-key").hidden = false;
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) poll();
  });
  window.addEventListener("hashchange", show);
  setInterval(poll, POLL_MS);
  show();
}

start();
