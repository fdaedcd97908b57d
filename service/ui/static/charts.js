// Charts over steps, drawn by the vendored uPlot (a global of its IIFE build, loaded before the modules).
// Each chart's element says what it drew: data-points (x positions where its first series has a value),
// data-x-min / data-x-max, and for a series drawn dashed, data-dashed-from / data-dashed-to; the same numbers and
// the data are in window.optimUI.charts[name], for tests and for whoever opens the console.

const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#65a30d"];
const HEIGHT = 220;

export const color = (i) => PALETTE[i % PALETTE.length];

function fade(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

function formatValue(v) {
  if (v === null || v === undefined) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(3);
  return Number(v.toPrecision(5)).toString();
}

// A chart of named lines over a shared x axis. lines: [{label, values, color, dash, band: [lowerValues, upperValues]}]
export class Chart {
  constructor(parent, name, title, { unit = "" } = {}) {
    this.name = name;
    this.figure = document.createElement("figure");
    this.figure.className = "chart";
    this.figure.dataset.chart = name;
    const caption = document.createElement("figcaption");
    caption.textContent = unit ? `${title} (${unit})` : title;
    this.body = document.createElement("div");
    this.body.className = "chart-body";
    this.note = document.createElement("p");
    this.note.className = "chart-note";
    this.figure.append(caption, this.body, this.note);
    parent.append(this.figure);
    this.plot = null;
    this.shape = "";
    this.resize = new ResizeObserver(() => {
      if (this.plot) this.plot.setSize({ width: this.width(), height: HEIGHT });
    });
    this.resize.observe(this.body);
  }

  width() {
    return Math.max(240, Math.floor(this.body.clientWidth || 600));
  }

  message(text) {
    this.note.textContent = text || "";
  }

  destroy() {
    this.resize.disconnect();
    if (this.plot) this.plot.destroy();
    this.plot = null;
  }

  // x: the steps; lines as above. Rebuilds uPlot when the set of series changes, else only its data.
  set(x, lines) {
    const data = [x];
    const series = [{ label: "step" }];
    const bands = [];
    lines.forEach((line, i) => {
      const stroke = line.color || color(i);
      if (line.band) {
        const lower = data.length;
        data.push(line.band[0], line.values, line.band[1]);
        series.push(
          { label: `${line.label} min`, class: "band-edge", stroke: fade(stroke, 0.35), width: 1, value: (u, v) => formatValue(v) },
          { label: line.label, stroke, width: 1.5, dash: line.dash, value: (u, v) => formatValue(v) },
          { label: `${line.label} max`, class: "band-edge", stroke: fade(stroke, 0.35), width: 1, value: (u, v) => formatValue(v) },
        );
        bands.push({ series: [lower + 2, lower], fill: fade(stroke, 0.15) });
      } else {
        data.push(line.values);
        series.push({ label: line.label, stroke, width: 1.5, dash: line.dash, value: (u, v) => formatValue(v) });
      }
    });
    const shape = JSON.stringify(series.map((s) => [s.label, s.dash || null]));
    if (!this.plot || shape !== this.shape) {
      if (this.plot) this.plot.destroy();
      const options = {
        width: this.width(),
        height: HEIGHT,
        series,
        bands,
        scales: { x: { time: false } },
        axes: [{ label: "step" }, { size: 60, values: (u, ticks) => ticks.map(formatValue) }],
        legend: { live: true },
        cursor: { drag: { x: true, y: false } },
      };
      this.plot = new uPlot(options, data, this.body);
      this.shape = shape;
    } else {
      this.plot.setData(data);
    }
    this.describe(x, lines);
  }

  describe(x, lines) {
    const first = lines.length ? lines[0].values : [];
    const drawn = x.filter((_, i) => first[i] !== null && first[i] !== undefined);
    const fig = this.figure.dataset;
    fig.points = String(drawn.length);
    fig.xMin = x.length ? String(x[0]) : "";
    fig.xMax = x.length ? String(x[x.length - 1]) : "";
    const dashed = lines.find((line) => line.dash);
    if (dashed) {
      const at = x.filter((_, i) => dashed.values[i] !== null && dashed.values[i] !== undefined);
      fig.dashedFrom = at.length ? String(at[0]) : "";
      fig.dashedTo = at.length ? String(at[at.length - 1]) : "";
    }
    const seen = (window.optimUI.charts[this.name] = { points: drawn.length, x, lines: {} });
    for (const line of lines) seen.lines[line.label] = { values: line.values, dashed: Boolean(line.dash), band: line.band || null };
  }
}

// Lines given on x axes of their own, on one sorted x axis (a value is null where its line has none).
export function align(parts) {
  const xs = [...new Set(parts.flatMap((p) => p.x))].sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const spread = (px, values) => {
    const out = new Array(xs.length).fill(null);
    px.forEach((x, i) => {
      out[index.get(x)] = values[i];
    });
    return out;
  };
  return {
    x: xs,
    lines: parts.map((p) => ({ ...p, values: spread(p.x, p.values), band: p.band ? p.band.map((b) => spread(p.x, b)) : undefined })),
  };
}
