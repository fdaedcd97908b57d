// The service's API as the page calls it: JSON over fetch, with the API key (when the server asks for one) in
// the Authorization header. The key is asked for once, kept in this tab's sessionStorage, and never put in a URL.

const KEY = "optim-service-key";
let asking = null; // the prompt being shown: every request that met a 401 waits for the same one

export class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
  }
}

export function hasKey() {
  return sessionStorage.getItem(KEY) !== null;
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
}

function askForKey(refused) {
  if (asking) return asking;
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  const error = document.getElementById("key-error");
  error.hidden = !refused;
  error.textContent = refused ? `The service refused that key: ${refused}` : "";
  input.value = "";
  asking = new Promise((resolve) => {
    const submitted = (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY, key);
      form.removeEventListener("submit", submitted);
      dialog.close();
      asking = null;
      document.dispatchEvent(new CustomEvent("optim:key"));
      resolve();
    };
    form.addEventListener("submit", submitted);
    dialog.addEventListener("cancel", (event) => event.preventDefault()); // Escape: the page cannot go on without it
    dialog.showModal();
    input.focus();
  });
  return asking;
}

async function detailOf(response) {
  try {
    const body = await response.json();
    return body.detail || body.error || response.statusText;
  } catch {
    return response.statusText;
  }
}

// api("/runs") -> the parsed JSON; {raw: true} -> the Response (a download); {json: body} -> a JSON request body
export async function api(path, { method = "GET", json, raw = false, accept = "application/json" } = {}) {
  for (;;) {
    const headers = { Accept: accept };
    const key = sessionStorage.getItem(KEY);
    if (key !== null) headers.Authorization = `Bearer ${key}`;
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    }
    const response = await fetch(path, { method, headers, body, cache: "no-store", credentials: "omit" });
    if (response.status === 401) {
      const detail = await detailOf(response);
      if (key !== null && sessionStorage.getItem(KEY) === key) forgetKey();
      await askForKey(key !== null ? detail : null);
      continue;
    }
    if (!response.ok) throw new ApiError(response.status, await detailOf(response));
    return raw ? response : response.json();
  }
}

export const runPath = (name, rest = "") => `/runs/${encodeURIComponent(name)}${rest}`;
