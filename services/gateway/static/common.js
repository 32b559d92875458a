// Shared by every page: the user's token, JSON calls to the gateway, errors shown to the user.
// The token lives in sessionStorage and travels only in the Authorization header:
// no cookies, so another site cannot make the browser act for the user.

import { setLanguage, t, translatePage } from "./i18n.js";

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
  throw new ApiError("no valid sign-in", 401, "UNAUTHENTICATED");
}

// An error from the gateway or a service: its HTTP status and gRPC code name travel with it,
// so the page can say it in the user's language (errorText) rather than in the service's.
export class ApiError extends Error {
  constructor(message, status, code, field) {
    super(message);
    this.status = status;
    this.code = code || "";
    this.field = field || "";
  }
}

export async function api(path, body) {
  const token = await getToken();
  const init = { method: body === undefined ? "GET" : "POST", headers: { authorization: `Bearer ${token}` } };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let answer;
  try {
    answer = await fetch(path, init);
  } catch {
    throw new ApiError("network error", 0, "NETWORK");
  }
  const data = await answer.json().catch(() => ({ error: answer.statusText }));
  if (!answer.ok) throw new ApiError(data.error || `request failed (HTTP ${answer.status})`, answer.status, data.code, data.field);
  return data;
}

export const prefs = (method, body = {}) => api(`/api/preferences/${method}`, body);
export const webpush = (method, body = {}) => api(`/api/webpush/${method}`, body);
// The dispatcher's FollowService, the caller's own follows and mutes (Follow, Unfollow, Mute, Unmute, ListFollows).
export const follows = (method, body = {}) => api(`/api/follows/${method}`, body);

// A short sentence in the user's language for what went wrong.
export function errorText(error) {
  if (!(error instanceof ApiError)) return t("error.generic");
  if (error.code === "NETWORK" || error.status === 503 || error.status === 504 || error.status === 502) return t("error.unavailable");
  if (error.status === 401) return t("error.signin");
  if (error.status === 429) return t("error.busy");
  if (error.code === "ABORTED") return t("error.conflict");
  if (error.status === 403) return t("error.forbidden");
  if (error.code === "FAILED_PRECONDITION" && /locked/.test(error.message)) return t("error.locked");
  return t("error.generic");
}

// Errors are shown, never swallowed: the page's box says it in the user's language;
// the service's own words stay available to whoever inspects the box (its title).
export function showError(error) {
  const box = document.getElementById("error");
  if (!box) return;
  box.textContent = error instanceof ApiError ? errorText(error) : (error instanceof Error ? error.message : String(error));
  box.title = error instanceof Error ? error.message : String(error);
  box.hidden = false;
}

export function clearError() {
  const box = document.getElementById("error");
  if (box) box.hidden = true;
}

// The catalogue in the user's language: the profile's, else the browser's, else English.
export const listTopics = () => prefs("ListTopics", { fallback_locale: navigator.language || "" });

// Every page starts here: the user's catalogue (for the language, the topics and whether
// they administer the account), the page's words, the admin link for admins only.
export async function boot() {
  let topics = null;
  let failure = null;
  try {
    topics = await listTopics();
  } catch (error) {
    failure = error;
  }
  try {
    await setLanguage(topics?.language);
    translatePage();
  } finally {
    for (const link of document.querySelectorAll("[data-admin-link]")) link.hidden = !topics?.account_admin;
    document.documentElement.dataset.ready = "yes";
  }
  if (failure) showError(failure);
  return topics;
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
