// A run's page: where it stands, its curves over steps, its checkpoints.
//
// A poll is one GET /runs/{run} (from the database, no run loaded); only when t moved does the page ask for
// more: the history, downsampled to about the charts' width (points=), and, at most every PREVIEW_EVERY_MS,
// the LR ahead and the checkpoints (those two hold the run in the service's memory).

import { ApiError, api, runPath } from "./api.js";
import { Chart, align, color } from "./charts.js";
import { ago, bytes, confirmAction, el, number, optimizerOf, schedulerOf, setStatus, snapshotOf, workersOf } from "./page.js";

const PREVIEW_EVERY_MS = 10_000;
const MAX_AHEAD = 5_000;
const NORMS = [
  ["grad_norm", "Gradient norm", ""],
  ["update_norm", "Update norm", ""],
  ["param_norm", "Parameter norm", ""],
  ["step_ms", "Step latency", "ms"],
];
// the service's own series (the rest are the worker's scalars); "time" (wall clock) is not drawn
const KNOWN = new Set(["loss", "time", ...NORMS.map((n) => n[0])]);

// how far ahead the LR is previewed: to the schedule's end when the spec says where that is
function aheadOf(run) {
  const s = run.spec && run.spec.scheduler;
  let end = null;
  if (s && typeof s === "object") {
    for (const key of ["num_epochs", "T_max", "total_iters", "total_steps"]) {
      if (typeof s[key] === "number") {
        end = s[key] + (typeof s.cooldown_epochs === "number" ? s.cooldown_epochs : 0);
        break;
      }
    }
  }
  const ahead = end !== null && end > run.t ? end - run.t : Math.ceil(run.t / 4);
  return Math.min(MAX_AHEAD, Math.max(50, ahead));
}

function thin(values, points) {
  const stride = Math.max(1, Math.ceil(values.length / points));
  const kept = [];
  for (let i = 0; i < values.length; i += stride) kept.push(i);
  if (kept[kept.length - 1] !== values.length - 1) kept.push(values.length - 1);
  return kept;
}

export class RunView {
  constructor(root, name) {
    this.name = name;
    this.shownT = null;
    this.dirty = true;
    this.previewAt = 0;
    this.preview = null;
    this.facts = el("dl", { class: "facts" });
    this.charts = el("section", { class: "charts" });
    this.checkpoints = el("tbody");
    this.notice = el("p", { class: "notice", id: "notice", role: "status" });
    const save = el("form", { class: "save", id: "save-checkpoint" },
      el("input", { name: "name", placeholder: "checkpoint name", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9_.\\-]{0,127}" }),
      el("button", { type: "submit", text: "Save checkpoint" }),
    );
    save.addEventListener("submit", (event) => {
      event.preventDefault();
      this.saveCheckpoint(save.elements.name.value.trim()).then(() => save.reset());
    });
    root.append(
      el("h1", {}, el("a", { href: "#/", text: "Runs" }), " / ", el("span", { id: "run-name", text: name })),
      this.notice,
      this.facts,
      this.charts,
      el("h2", { text: "Checkpoints" }),
      el("table", { class: "checkpoints", id: "checkpoints" },
        el("thead", {}, el("tr", {}, ...["Name", "t", "Epoch", "Size", "Saved", ""].map((c) => el("th", { text: c })))),
        this.checkpoints,
      ),
      save,
    );
    this.loss = new Chart(this.charts, "loss", "Loss");
    this.lr = new Chart(this.charts, "lr", "Learning rate (solid: applied, dashed: the scheduler's preview ahead)");
    this.norms = NORMS.map(([key, title, unit]) => [key, new Chart(this.charts, key, title, { unit })]);
    this.scalars = null;
  }

  stop() {
    for (const chart of this.allCharts()) chart.destroy();
  }

  allCharts() {
    return [this.loss, this.lr, ...this.norms.map((n) => n[1]), ...(this.scalars ? [this.scalars] : [])];
  }

  async poll() {
    let run;
    try {
      run = await api(runPath(this.name));
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        this.facts.replaceChildren(el("p", { class: "error", text: `Run ${this.name} does not exist (deleted, or another tenant's).` }));
        return;
      }
      throw err;
    }
    this.run = run;
    this.showFacts(run);
    if (run.t === this.shownT && !this.dirty) return;
    const due = this.dirty || Date.now() - this.previewAt >= PREVIEW_EVERY_MS;
    this.dirty = false;
    const work = [this.loadHistory(run)];
    if (due) {
      this.previewAt = Date.now();
      work.push(this.loadPreview(run), this.loadCheckpoints());
    }
    await Promise.all(work);
    this.draw(run);
    this.shownT = run.t;
  }

  showFacts(run) {
    const lrs = (run.lr || []).map((lr, g) => `${g}: ${number(lr)}`).join(" · ") || "–";
    const rows = [
      ["t", String(run.t), "run-t"],
      ["Epoch", String(run.epoch)],
      ["Optimizer", optimizerOf(run.spec)],
      ["Scheduler", schedulerOf(run.spec) || "none"],
      ["LR per group", lrs, "run-lr"],
      ["Steps/s", run.steps_per_s === null || run.steps_per_s === undefined ? "–" : number(run.steps_per_s, 3), "run-rate"],
      ["In memory", run.live ? "live" : "on disk", "run-live"],
      ["Last snapshot", snapshotOf(run)],
      ["Durability", `${run.durability}, snapshot every ${run.snapshot_every}`],
      ["Workers", workersOf(run.spec)],
      ["State", bytes(run.state_bytes)],
      ["Skipped / refused steps", `${run.skipped_steps} / ${run.rejected_steps}`],
      ["Updated", ago(run.updated_at)],
    ];
    this.facts.replaceChildren(...rows.flatMap(([k, v, id]) => [el("dt", { text: k }), el("dd", { id, text: v })]));
  }

  points() {
    return Math.min(2000, Math.max(50, this.loss.width()));
  }

  async loadHistory(run) {
    if (run.t === 0) {
      this.history = { series: {} }; // nothing applied yet: nothing to ask for
      this.historyError = null;
      return;
    }
    // every name: the service's series and the worker's scalars (at most 32), each at most points= buckets
    const query = `start=0&stop=${run.t}&points=${this.points()}`;
    try {
      this.history = await api(runPath(this.name, `/history?${query}`));
      this.historyError = null;
    } catch (err) {
      this.history = null;
      this.historyError = err.message;
    }
  }

  async loadPreview(run) {
    try {
      this.preview = await api(runPath(this.name, `/schedule/preview?steps=${aheadOf(run)}`));
    } catch (err) {
      this.preview = null;
      this.lr.message(`LR preview unavailable: ${err.message}`);
    }
  }

  draw(run) {
    const series = (this.history && this.history.series) || {};
    const missing = this.historyError ? `history unavailable: ${this.historyError}` : "";
    const band = (key, label, chart) => {
      const s = series[key];
      const off = key === "update_norm" ? " (the service records it with OPTIM_HISTORY_NORMS=all)" : "";
      chart.message(s ? "" : missing || `no ${label} recorded${off}`);
      const parts = s ? [{ label, x: s.t, values: s.mean, band: [s.min, s.max], color: color(0) }] : [];
      const { x, lines } = align(parts.length ? parts : [{ label, x: [], values: [] }]);
      chart.set(x, lines);
    };
    band("loss", "loss", this.loss);
    for (const [key, chart] of this.norms) band(key, key, chart);
    this.drawLr(run, series);
    this.drawScalars(series);
    window.optimUI.drawnT = run.t;
  }

  drawLr(run, series) {
    const groups = (run.lr || []).length;
    const parts = [];
    for (let g = 0; g < groups; g += 1) {
      const s = series[`lr/${g}`];
      parts.push({ label: `group ${g}`, x: s ? s.t : [], values: s ? s.mean : [], color: color(g) });
    }
    const p = this.preview;
    const stepwise = p && p.interval !== "epoch";
    if (stepwise) {
      // lr[i] is the LR after i + 1 more steps from where the preview was asked (every PREVIEW_EVERY_MS, so the
      // run may have gone on since): the part still ahead, joined to the past by the LR of now
      const kept = thin(p.lr, this.points()).filter((i) => p.start + i + 1 > run.t);
      for (let g = 0; g < groups; g += 1) {
        parts.push({
          label: `group ${g} ahead`,
          x: [run.t, ...kept.map((i) => p.start + i + 1)],
          values: [(run.lr || [])[g] ?? null, ...kept.map((i) => p.lr[i][g])],
          color: color(g),
          dash: [6, 4],
        });
      }
    }
    const { x, lines } = align(parts.length ? parts : [{ label: "lr", x: [], values: [] }]);
    this.lr.set(x, lines);
    if (p && !stepwise) this.lr.message(`the scheduler steps per epoch: the next ${p.lr.length} epochs' LR, group 0: ${p.lr.slice(0, 8).map((r) => number(r[0])).join(", ")}…`);
    else if (!this.historyError) this.lr.message("");
  }

  drawScalars(series) {
    const names = Object.keys(series).filter((k) => !KNOWN.has(k) && !k.startsWith("lr/"));
    if (!names.length) return;
    if (!this.scalars) this.scalars = new Chart(this.charts, "scalars", "The worker's scalars");
    const { x, lines } = align(names.map((k, i) => ({ label: k, x: series[k].t, values: series[k].mean, color: color(i + 1) })));
    this.scalars.set(x, lines);
  }

  async loadCheckpoints() {
    const { checkpoints } = await api(runPath(this.name, "/checkpoints"));
    this.checkpoints.replaceChildren(
      ...checkpoints.map((c) =>
        el("tr", { dataset: { checkpoint: c.name } },
          el("td", { text: c.name }),
          el("td", { class: "num", text: String(c.t) }),
          el("td", { class: "num", text: String(c.epoch) }),
          el("td", { class: "num", text: bytes(c.size) }),
          el("td", { text: ago(c.created_at) }),
          el("td", { class: "actions" },
            el("button", { dataset: { action: "export" }, text: "Export", onclick: () => this.exportCheckpoint(c) }),
            el("button", { dataset: { action: "rollback" }, text: "Roll back", onclick: () => this.rollback(c) }),
            el("button", { dataset: { action: "fork" }, text: "Fork", onclick: () => this.fork(c) }),
          ),
        ),
      ),
    );
    if (!checkpoints.length) this.checkpoints.append(el("tr", {}, el("td", { colspan: 6, class: "empty", text: "No checkpoints." })));
  }

  async act(what, work) {
    try {
      setStatus(`${what}…`);
      await work();
      setStatus(`${what}: done`, "ok");
    } catch (err) {
      setStatus(`${what} failed: ${err.message}`, "error");
      this.notice.textContent = `${what} failed: ${err.message}`;
      this.notice.className = "notice error";
    }
  }

  async saveCheckpoint(name) {
    await this.act(`Saving checkpoint ${name}`, async () => {
      await api(runPath(this.name, "/checkpoints"), { method: "POST", json: { name } });
      await this.loadCheckpoints();
    });
  }

  async exportCheckpoint(c) {
    const ok = await confirmAction({
      title: `Export checkpoint ${c.name}`,
      text: `Download checkpoint ${c.name} (t=${c.t}, ${bytes(c.size)} of state) as a .pt file for torch.load(weights_only=True)?`,
      confirm: "Download",
    });
    if (ok === null) return;
    await this.act(`Exporting ${c.name}`, async () => {
      const response = await api(runPath(this.name, `/checkpoints/${encodeURIComponent(c.name)}/export`), {
        raw: true,
        accept: "application/octet-stream",
      });
      const url = URL.createObjectURL(await response.blob());
      const link = el("a", { href: url, download: `${this.name}-${c.name}.pt`, hidden: true });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    });
  }

  async rollback(c) {
    const t = this.run ? this.run.t : "?";
    const ok = await confirmAction({
      title: `Roll back ${this.name}`,
      text: `Return run ${this.name} from t=${t} to checkpoint ${c.name} at t=${c.t}? The steps after it leave the run's log; a worker still training it gets a 409 and resyncs.`,
      confirm: "Roll back",
    });
    if (ok === null) return;
    await this.act(`Rolling back to ${c.name}`, async () => {
      const run = await api(runPath(this.name, "/rollback"), { method: "POST", json: { checkpoint: c.name } });
      this.notice.replaceChildren(`Rolled back to ${c.name}: t=${run.t}.`);
      this.notice.className = "notice ok";
      this.dirty = true;
      await this.poll();
    });
  }

  async fork(c) {
    const name = await confirmAction({
      title: `Fork ${this.name} at ${c.name}`,
      text: `A new run starting from checkpoint ${c.name} (t=${c.t}), with the same spec; ${this.name} is left as it is.`,
      confirm: "Fork",
      field: { label: "New run's name", value: `${this.name}-${c.name}-fork` },
    });
    if (name === null) return;
    await this.act(`Forking into ${name}`, async () => {
      const run = await api(runPath(this.name, "/fork"), { method: "POST", json: { checkpoint: c.name, name } });
      this.notice.replaceChildren("Forked into ", el("a", { id: "fork-link", href: `#/runs/${encodeURIComponent(run.name)}`, text: run.name }), ` at t=${run.t}.`);
      this.notice.className = "notice ok";
    });
  }
}
