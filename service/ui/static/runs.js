// The runs list: one GET /runs a poll (the service answers it from its database, loading no run).

import { api } from "./api.js";
import { ago, el, number, optimizerOf, snapshotOf, workersOf } from "./page.js";

const COLUMNS = ["Run", "Optimizer", "t", "Steps/s", "Last snapshot", "Live", "Workers", "Durability", "Updated"];

export class RunsView {
  constructor(root) {
    this.body = el("tbody");
    this.empty = el("p", { class: "empty", hidden: true, text: "No runs yet: a worker creates one (see the README's quickstart)." });
    root.append(
      el("h1", { text: "Runs" }),
      el("table", { class: "runs", id: "runs" }, el("thead", {}, el("tr", {}, ...COLUMNS.map((c) => el("th", { text: c })))), this.body),
      this.empty,
    );
  }

  async poll() {
    const { runs } = await api("/runs");
    this.empty.hidden = runs.length > 0;
    this.body.replaceChildren(
      ...runs.map((run) =>
        el(
          "tr",
          { dataset: { run: run.name } },
          el("td", {}, el("a", { href: `#/runs/${encodeURIComponent(run.name)}`, text: run.name })),
          el("td", { text: optimizerOf(run.spec) }),
          el("td", { class: "num", dataset: { field: "t" }, text: String(run.t) }),
          el("td", { class: "num", text: run.steps_per_s === null || run.steps_per_s === undefined ? "–" : number(run.steps_per_s, 3) }),
          el("td", { text: snapshotOf(run) }),
          el("td", {}, el("span", { class: run.live ? "badge live" : "badge", text: run.live ? "live" : "on disk" })),
          el("td", { text: workersOf(run.spec) }),
          el("td", { text: run.durability }),
          el("td", { text: ago(run.updated_at) }),
        ),
      ),
    );
  }

  stop() {}
}
