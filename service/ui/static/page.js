// What the views share: building elements, formatting, the confirmation dialog, the status line.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "onclick") node.addEventListener("click", value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

export function optimizerOf(spec) {
  const opt = spec && spec.optimizer;
  return typeof opt === "string" ? opt : (opt && opt.name) || "?";
}

export function schedulerOf(spec) {
  const s = spec && spec.scheduler;
  return typeof s === "string" ? s : (s && s.name) || null;
}

export function workersOf(spec) {
  const w = spec && spec.workers;
  if (!w) return "1";
  return `${w.world_size} ${w.mode || "sync"}`;
}

export function number(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  return Number(v.toPrecision(digits)).toString();
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

// the service's times are UTC; one stored without a zone (SQLite) is read as UTC too
export function when(iso) {
  if (!iso) return null;
  return new Date(/[zZ]|[+-]\d\d:?\d\d$/.test(iso) ? iso : `${iso}Z`);
}

export function ago(iso) {
  const at = when(iso);
  if (!at) return "–";
  const s = Math.max(0, (Date.now() - at.getTime()) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} d ago`;
}

export function snapshotOf(run) {
  if (run.last_snapshot_t === null || run.last_snapshot_t === undefined) return "–";
  return `t=${run.last_snapshot_t} · ${ago(run.last_snapshot_at)}`;
}

export function setStatus(text, kind = "") {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = kind;
}

// Asks before an action: resolves to null when cancelled, else to the text field's value ("" without a field).
export function confirmAction({ title, text, confirm = "Confirm", field = null }) {
  const dialog = document.getElementById("confirm-dialog");
  const form = document.getElementById("confirm-form");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-ok").textContent = confirm;
  const label = document.getElementById("confirm-field");
  const input = document.getElementById("confirm-input");
  label.hidden = !field;
  input.required = Boolean(field);
  input.disabled = !field;
  if (field) {
    document.getElementById("confirm-field-label").textContent = field.label;
    input.value = field.value || "";
  }
  return new Promise((resolve) => {
    const done = (value) => {
      form.removeEventListener("submit", submitted);
      dialog.removeEventListener("cancel", cancelled);
      dialog.close();
      resolve(value);
    };
    const submitted = (event) => {
      event.preventDefault();
      if (event.submitter && event.submitter.value === "cancel") return done(null);
      if (field && !input.reportValidity()) return;
      done(field ? input.value.trim() : "");
    };
    const cancelled = (event) => {
      event.preventDefault();
      done(null);
    };
    form.addEventListener("submit", submitted);
    dialog.addEventListener("cancel", cancelled);
    dialog.showModal();
    (field ? input : document.getElementById("confirm-cancel")).focus();
  });
}
