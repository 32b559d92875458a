// The bell page: badge, feed, pop-ups, in-tab browser notifications, live over the websocket.
import { api, el, getToken, prefs, safeUrl, showError, tokenExpiry } from "./common.js";
import { play } from "./sounds.js";

const state = { lastId: null, unread: 0, items: new Map(), redDot: false, muted: false, lastInput: Date.now(), socket: null };
const ACTIVE_MS = 5 * 60 * 1000;
const RECENT_MS = 60 * 1000;

for (const kind of ["pointerdown", "keydown", "pointermove", "focus"]) {
  window.addEventListener(kind, () => { state.lastInput = Date.now(); }, { passive: true });
}
document.addEventListener("visibilitychange", () => { if (!document.hidden) state.lastInput = Date.now(); });

// Looking at the tab: visible and focused. Focus is the second signal because a
// tab behind another window (or any headless tab) can still report "visible".
function lookingAtTab() {
  return document.visibilityState === "visible" && document.hasFocus();
}

function userActive() {
  return lookingAtTab() && Date.now() - state.lastInput < ACTIVE_MS;
}

// The favicon gets a red dot while bell items are unread (if the user chose it).
const plainIcon = "/static/favicon.svg";
let dotIcon = null;
async function drawDotIcon() {
  const img = new Image();
  img.src = plainIcon;
  await img.decode();
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 32;
  const g = canvas.getContext("2d");
  g.drawImage(img, 0, 0, 32, 32);
  g.fillStyle = "#d92d20";
  g.beginPath();
  g.arc(25, 7, 7, 0, Math.PI * 2);
  g.fill();
  return canvas.toDataURL("image/png");
}

async function setUnread(count) {
  state.unread = count;
  const badge = document.getElementById("badge");
  badge.textContent = count > 99 ? "99+" : String(count);
  badge.hidden = count === 0;
  const icon = document.getElementById("favicon");
  if (state.redDot && count > 0) {
    dotIcon = dotIcon || (await drawDotIcon());
    icon.href = dotIcon;
    icon.dataset.dot = "on";
  } else {
    icon.href = plainIcon;
    icon.dataset.dot = "off";
  }
}

function render() {
  const list = document.getElementById("feed");
  const items = [...state.items.values()].filter((i) => i.in_feed && !i.archived).sort((a, b) => b.id - a.id);
  list.replaceChildren(...items.map(feedRow));
  if (!items.length) list.append(el("li", { class: "muted" }, "No notifications yet."));
}

function feedRow(item) {
  const mark = (what) => async () => {
    try {
      const answer = await api("/api/feed/mark", { ids: [item.id], what });
      if (what === "read") item.read = true;
      if (what === "archive") item.archived = true;
      await setUnread(answer.unread);
      render();
    } catch (error) { showError(error); }
  };
  const merged = item.count > 1
    ? el("ul", { class: "merged" }, ...item.items.map((o) => el("li", {}, el("a", { href: safeUrl(o.url) }, o.display_name))))
    : null;
  return el("li", { class: item.read ? "read" : "unread", "data-id": item.id, "data-topic": item.topic },
    el("a", { class: "title", href: safeUrl(item.url), onclick: mark("read") }, item.title),
    item.count > 1 ? el("span", { class: "count" }, item.count) : null,
    el("div", { class: "body" }, item.body),
    merged,
    el("div", { class: "actions" },
      item.read ? null : el("button", { type: "button", onclick: mark("read") }, "Mark read"),
      el("button", { type: "button", onclick: mark("archive") }, "Archive"),
      el("button", { type: "button", onclick: () => dontShow(item, "CHANNEL_BELL") }, "Don't show me these again")));
}

async function dontShow(item, channel) {
  try {
    await prefs("DontShowAgain", { topic: item.topic, channel });
    document.getElementById("connection").textContent = `You will no longer get “${item.title}” notifications here.`;
  } catch (error) { showError(error); }
}

function toast(item) {
  const box = el("div", { class: "toast", role: "status", "data-id": item.id, "data-topic": item.topic });
  const close = () => box.remove();
  box.append(
    el("div", { class: "title" }, item.title, item.count > 1 ? el("span", { class: "count" }, item.count) : null),
    el("div", {}, item.body),
    el("div", { class: "row" },
      el("button", { type: "button", class: "dont-show", onclick: async () => { await dontShow(item, "CHANNEL_POPUP"); close(); } }, "Don't show me these again"),
      el("button", { type: "button", class: "mute", onclick: async () => {
        try { await prefs("SetMuted", { muted: true }); state.muted = true; close(); } catch (error) { showError(error); }
      } }, "Mute"),
      el("a", { href: "/settings" }, "Go to notification preferences"),
      el("button", { type: "button", onclick: close }, "Close")));
  document.getElementById("toasts").append(box);
  setTimeout(close, 15000);
}

async function browserNotification(item) {
  if (Notification.permission !== "granted") return;
  const registration = await navigator.serviceWorker.ready;
  // The notification id is the tag: a web push of the same notification replaces it, never doubles it.
  await registration.showNotification(item.title, { body: item.body, tag: item.notification_id, data: { url: item.url } });
}

async function arrive(frame) {
  const item = frame.item;
  state.items.set(item.id, item);
  state.lastId = Math.max(state.lastId ?? 0, item.id);
  await setUnread(frame.unread);
  render();
  if (frame.resumed) {
    // Missed during a short disconnect: no late pop-up, but a browser notification still
    // shows if it is recent (web push skipped it while this tab counted as live; the tag
    // keeps it from showing twice if a push did arrive).
    const recent = Date.now() - Date.parse(item.created_at) < RECENT_MS;
    if (item.browser && recent && !userActive()) await browserNotification(item).catch(showError);
    return;
  }
  if (item.popup && userActive()) {
    toast(item);
    if (item.sound && !state.muted) await play(item.sound);
  } else if (item.browser && !userActive()) {
    await browserNotification(item).catch(showError);
  }
}

async function loadFeed() {
  const page = await api("/api/feed?limit=20");
  state.items.clear();
  for (const item of page.items) state.items.set(item.id, item);
  state.lastId = page.last_id;
  await setUnread(page.unread);
  render();
}

let backoff = 500;
async function connect() {
  const status = document.getElementById("connection");
  const token = await getToken();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/ws`);
  state.socket = socket;
  socket.addEventListener("open", () => socket.send(JSON.stringify({ type: "auth", token, last_id: state.lastId })));
  socket.addEventListener("message", async (event) => {
    const frame = JSON.parse(event.data);
    if (frame.type === "item") await arrive(frame);
    else if (frame.type === "unread") await setUnread(frame.unread);
    else if (frame.type === "reset") { await loadFeed(); status.textContent = "Connected"; }
    else if (frame.type === "ready") {
      backoff = 500;
      if (state.lastId === null) await loadFeed();
      await setUnread(frame.unread);
      status.textContent = "Connected";
      document.body.dataset.connected = "yes";
    }
  });
  socket.addEventListener("close", (event) => {
    document.body.dataset.connected = "no";
    status.textContent = `Disconnected (${event.code}); reconnecting…`;
    setTimeout(() => connect().catch(showError), backoff);
    backoff = Math.min(backoff * 2, 30000);
  });
  // Refresh the token on the open socket before it expires.
  const refreshIn = Math.max(5000, tokenExpiry(token) - Date.now() - 60000);
  setTimeout(async () => {
    if (state.socket !== socket || socket.readyState !== WebSocket.OPEN) return;
    sessionStorage.removeItem("belfry.token");
    try { socket.send(JSON.stringify({ type: "refresh", token: await getToken() })); } catch (error) { showError(error); }
  }, refreshIn);
}

async function loadSettings() {
  try {
    const answer = await prefs("GetPreferences");
    state.redDot = Boolean(answer.settings?.red_dot);
    state.muted = Boolean(answer.settings?.muted);
  } catch (error) {
    showError(error);
  }
}

function setupBell() {
  const bell = document.getElementById("bell");
  const panel = document.getElementById("panel");
  bell.addEventListener("click", async () => {
    panel.hidden = !panel.hidden;
    bell.setAttribute("aria-expanded", String(!panel.hidden));
    const unseen = [...state.items.values()].filter((i) => !i.seen).map((i) => i.id);
    if (!panel.hidden && unseen.length) {
      await api("/api/feed/mark", { ids: unseen, what: "seen" }).catch(showError);
      for (const id of unseen) state.items.get(id).seen = true;
    }
  });
  document.getElementById("read-all").addEventListener("click", async () => {
    try {
      await api("/api/feed/read-all", {});
      for (const item of state.items.values()) item.read = true;
      await setUnread(0);
      render();
    } catch (error) { showError(error); }
  });
  const enable = document.getElementById("enable-browser");
  if ("Notification" in window && Notification.permission === "default") {
    enable.hidden = false;
    enable.addEventListener("click", async () => {
      const granted = (await Notification.requestPermission()) === "granted";
      enable.hidden = granted;
      if (granted) await subscribePush().catch(showError);
    });
  }
}

// Web push for when no tab is open: subscribe with the VAPID key and register the subscription.
// A subscription made with another key (the server rotated its key) is replaced by one with the
// current key: push services accept only pushes signed with the key a subscription was made with.
export async function subscribePush({ onlyIfRotated = false } = {}) {
  const registration = await navigator.serviceWorker.ready;
  let subscription = await registration.pushManager.getSubscription();
  if (onlyIfRotated && !subscription) return;
  const { public_key: key } = await api("/api/webpush/GetVapidPublicKey", {});
  const raw = Uint8Array.from(atob(key.replace(/-/g, "+").replace(/_/g, "/")), (c) => c.charCodeAt(0));
  const bound = subscription && new Uint8Array(subscription.options.applicationServerKey || []);
  const same = bound && bound.length === raw.length && bound.every((byte, i) => byte === raw[i]);
  if (subscription && same && onlyIfRotated) return;
  if (subscription && !same) {
    await subscription.unsubscribe();
    subscription = null;
  }
  subscription = subscription || (await registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: raw }));
  const json = subscription.toJSON();
  await api("/api/webpush/RegisterSubscription", {
    endpoint: json.endpoint,
    p256dh: json.keys.p256dh,
    auth: json.keys.auth,
    application_server_key: key,
  });
}

async function main() {
  setupBell();
  if ("serviceWorker" in navigator) await navigator.serviceWorker.register("/sw.js").catch(showError);
  if ("PushManager" in window && "Notification" in window && Notification.permission === "granted") {
    subscribePush({ onlyIfRotated: true }).catch(showError);
  }
  await loadSettings();
  await connect();
}

main().catch(showError);
