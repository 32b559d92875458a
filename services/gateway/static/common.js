// Shared by every page: the user's token, JSON calls to the gateway, errors shown to the user.
// The token lives in sessionStorage and travels only in the Authorization header:
// no cookies, so another site cannot make the browser act for the user.

const KEY = "belfry.token";

function claims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part));
  } catch {
    return null;
  }
}

export function tokenExpiry(token) {
  const c = claims(token);
  return c && typeof c.exp === "number" ? c.exp * 1000 : 0;
}

// The host application hands the page a token in the URL fragment (#token=...),
// which never reaches a server log; the local demo asks the dev login instead.
export async function getToken() {
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("token")) {
    sessionStorage.setItem(KEY, hash.get("token"));
    history.replaceState(null, "", location.pathname + location.search);
  }
  const stored = sessionStorage.getItem(KEY);
  if (stored && tokenExpiry(stored) > Date.now() + 30000) return stored;
  const answer = await fetch("/api/dev/login", { method: "POST" });
  if (answer.ok) {
    const { token } = await answer.json();
    sessionStorage.setItem(KEY, token);
    return token;
  }
  if (stored && tokenExpiry(stored) > Date.now()) return stored;
  throw new Error("No valid sign-in: open this page from your application.");
}

export async function api(path, body) {
  const token = await getToken();
  const init = { method: body === undefined ? "GET" : "POST", headers: { authorization: `Bearer ${token}` } };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const answer = await fetch(path, init);
  const data = await answer.json().catch(() => ({ error: answer.statusText }));
  if (!answer.ok) throw new Error(data.error || `request failed (HTTP ${answer.status})`);
  return data;
}

export const prefs = (method, body = {}) => api(`/api/preferences/${method}`, body);
export const webpush = (method, body = {}) => api(`/api/webpush/${method}`, body);

// Errors are shown, never swallowed.
export function showError(error) {
  const box = document.getElementById("error");
  if (!box) return;
  box.textContent = error instanceof Error ? error.message : String(error);
  box.hidden = false;
}

export function clearError() {
  const box = document.getElementById("error");
  if (box) box.hidden = true;
}

// Build elements with text content only: producer text is never parsed as HTML.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value === true) node.setAttribute(name, "");
    else if (value !== false && value !== undefined && value !== null) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Only http(s) links from producers are followed (no javascript: URLs).
export function safeUrl(url) {
  try {
    const parsed = new URL(url, location.href);
    return parsed.protocol === "https:" || parsed.protocol === "http:" ? parsed.href : "#";
  } catch {
    return "#";
  }
}
