// The bell page: badge, inbox panel, pop-ups, in-tab browser notifications, live over the websocket.
import { api, boot, el, follows, getToken, prefs, safeUrl, showError, tokenExpiry } from "./common.js";
import { fullDate, relativeTime, t } from "./i18n.js";
import { subscribePush } from "./push.js";
import { play } from "./sounds.js";

const PAGE = 20;
const state = {
  lastId: null, unread: 0, items: new Map(), filter: "all", next: { main: null, archived: null }, archivedLoaded: false,
  topics: new Map(), redDot: false, muted: false, lastInput: Date.now(), socket: null,
  // What this page has been told of the user's follows ({following, muted} by object), from the answers
  // of its own Follow / Unfollow / Mute / Unmute calls: a row's menu offers the inverse of what it knows.
  follows: new Map(),
};
const ACTIVE_MS = 5 * 60 * 1000;
const RECENT_MS = 60 * 1000;

// A category's icon: its initial on a colour of its own (eight colours, picked from the key),
// drawn from text so it shows the same on every system (emoji fonts differ or are missing).
// Decoration only: the category's name is said beside it.
function categoryIcon(key, name) {
  let hash = 0;
  for (const char of key) hash = (hash * 31 + char.codePointAt(0)) >>> 0;
  return el("span", { class: `icon hue-${hash % 8}`, "aria-hidden": "true", "data-category": key },
    key ? [...name][0].toUpperCase() : "•");
}

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
  document.getElementById("bell").setAttribute("aria-label", count ? t("bell.label", { count }) : t("bell.labelNone"));
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

function topicOf(key) {
  return state.topics.get(key) || null;
}

function visible(item) {
  if (!item.in_feed) return false;
  if (state.filter === "archived") return item.archived;
  if (state.filter === "unread") return !item.archived && !item.read;
  return !item.archived;
}

// Rebuilds the list; `focus` names what keeps the keyboard: [item id, selector inside its row].
function render(focus = null) {
  const list = document.getElementById("feed");
  // A live item re-draws the list: the keyboard stays on the row it was on.
  const active = document.activeElement;
  const row = focus ? null : active?.closest?.("#feed li[data-id]");
  if (row) focus = [row.dataset.id, active.classList.contains("title") ? ".title" : ".more"];
  const items = [...state.items.values()].filter(visible).sort((a, b) => b.id - a.id);
  list.replaceChildren(...items.map(feedRow));
  if (!items.length) list.append(el("li", { class: "empty", id: "empty" }, t(`feed.empty.${state.filter}`)));
  const cursor = state.filter === "archived" ? state.next.archived : state.next.main;
  document.getElementById("older").hidden = cursor === null;
  for (const button of document.querySelectorAll("[data-filter]")) button.setAttribute("aria-pressed", String(button.dataset.filter === state.filter));
  if (focus) {
    const row = list.querySelector(`li[data-id="${focus[0]}"]`);
    (row?.querySelector(focus[1]) || list.querySelector("li[data-id] .more") || document.getElementById("panel-title")).focus();
  }
}

async function mark(item, what) {
  const answer = await api("/api/feed/mark", { ids: [item.id], what });
  if (what === "read") item.read = true;
  if (what === "unread") item.read = false;
  if (what === "archive") item.archived = true;
  if (what === "unarchive") item.archived = false;
  await setUnread(answer.unread);
}

// The one object a notification is about ({type, id, display_name}), or null for none or several.
function soleObject(item) {
  const objects = (item.items || []).filter((o) => o && o.type && o.id);
  if (!objects.length) return null;
  return objects.every((o) => o.type === objects[0].type && o.id === objects[0].id) ? objects[0] : null;
}

const followKey = (object) => `${object.type}\u001f${object.id}`;

// Follow, Unfollow, Mute or Unmute the object through the gateway's proxy of the dispatcher's FollowService;
// the answer (the user's relation to it) is remembered and the confirmation said in the status line.
async function setFollow(object, method) {
  const answer = await follows(method, { object: { type: object.type, id: object.id } });
  const follow = answer.follow || {};
  state.follows.set(followKey(object), { following: Boolean(follow.following), muted: Boolean(follow.muted) });
  const name = object.display_name || object.id;
  status(t({ Mute: "follow.muted", Unmute: "follow.unmuted", Follow: "follow.followed", Unfollow: "follow.unfollowed" }[method], { name }));
}

// The row's menu (WAI-ARIA menu button): arrows move, Escape closes and returns to the button.
function rowMenu(item) {
  const topic = topicOf(item.topic);
  const button = el("button", {
    type: "button", class: "more", "aria-haspopup": "menu", "aria-expanded": "false",
    "aria-label": t("feed.actionsFor", { title: item.title }), id: `more-${item.id}`,
  }, "⋯");
  const act = (label, name, run) => el("li", { role: "none" },
    el("button", { type: "button", role: "menuitem", tabindex: "-1", "data-action": name, onclick: async () => {
      close(false);
      try { await run(); } catch (error) { showError(error); }
    } }, label));
  const entries = [
    item.read ? act(t("feed.markUnread"), "unread", async () => { await mark(item, "unread"); render([item.id, ".more"]); })
      : act(t("feed.markRead"), "read", async () => { await mark(item, "read"); render([item.id, ".more"]); }),
    item.archived ? act(t("feed.unarchive"), "unarchive", async () => { await mark(item, "unarchive"); render([item.id, ".more"]); })
      : act(t("feed.archive"), "archive", async () => { await mark(item, "archive"); render([item.id, ".more"]); }),
  ];
  const object = soleObject(item);
  if (object) {
    // Before any choice on this page, the menu offers the common case (mute, unfollow); after one, its inverse.
    const known = state.follows.get(followKey(object)) || { following: true, muted: false };
    const follow = (method) => async () => { await setFollow(object, method); render([item.id, ".more"]); };
    entries.push(known.muted ? act(t("feed.unmuteThread"), "unmute", follow("Unmute"))
      : act(t("feed.muteThread"), "mute", follow("Mute")));
    entries.push(known.following ? act(t("feed.unfollow"), "unfollow", follow("Unfollow"))
      : act(t("feed.follow"), "follow", follow("Follow")));
  }
  const popupAllowed = topic && !topic.locked && topic.channels.includes("CHANNEL_POPUP");
  if (popupAllowed) {
    entries.push(act(t("feed.mutePopups"), "mute-popups", async () => {
      await prefs("SetPreference", { choice: { topic: item.topic, channel: "CHANNEL_POPUP", enabled: false } });
      status(t("feed.popupsOff", { topic: topic.name }));
      button.focus();
    }));
  }
  if (topic && !topic.locked) {
    entries.push(act(t("feed.dontShow"), "dont-show", async () => { await dontShow(item, "CHANNEL_BELL"); button.focus(); }));
  }
  entries.push(el("li", { role: "none" }, el("a", { role: "menuitem", tabindex: "-1", "data-action": "preferences", href: `/settings?topic=${encodeURIComponent(item.topic)}` }, t("feed.preferences"))));
  const menu = el("ul", { role: "menu", class: "menu", hidden: true, "aria-labelledby": button.id }, ...entries);
  const items = () => [...menu.querySelectorAll("[role=menuitem]")];
  function close(focusButton = true) {
    menu.hidden = true;
    button.setAttribute("aria-expanded", "false");
    if (focusButton) button.focus();
  }
  function open() {
    for (const other of document.querySelectorAll(".menu:not([hidden])")) other.dispatchEvent(new Event("close"));
    menu.hidden = false;
    button.setAttribute("aria-expanded", "true");
    items()[0].focus();
  }
  menu.addEventListener("close", () => close(false));
  button.addEventListener("click", () => (menu.hidden ? open() : close()));
  button.addEventListener("keydown", (event) => {
    if (event.key === "ArrowDown" || event.key === "ArrowUp") { event.preventDefault(); open(); }
  });
  menu.addEventListener("keydown", (event) => {
    const all = items();
    const at = all.indexOf(document.activeElement);
    if (event.key === "Escape") { event.preventDefault(); event.stopPropagation(); close(); }
    else if (event.key === "ArrowDown") { event.preventDefault(); all[(at + 1) % all.length].focus(); }
    else if (event.key === "ArrowUp") { event.preventDefault(); all[(at - 1 + all.length) % all.length].focus(); }
    else if (event.key === "Home") { event.preventDefault(); all[0].focus(); }
    else if (event.key === "End") { event.preventDefault(); all[all.length - 1].focus(); }
    else if (event.key === "Tab") close(false);
  });
  return el("div", { class: "menu-wrap" }, button, menu);
}

// Merged notifications list each member once (the same record named twice is one line).
function members(item) {
  const seen = new Set();
  const unique = (item.items || []).filter((o) => {
    const key = `${o.type}|${o.id}|${o.url}`;
    if (seen.has(key)) return false;
    seen.add(key);
    return true;
  });
  return unique.length > 1 ? el("ul", { class: "merged" }, ...unique.map((o) => el("li", {}, el("a", { href: safeUrl(o.url) }, o.display_name)))) : null;
}

function feedRow(item) {
  const topic = topicOf(item.topic);
  const category = topic?.category || "";
  const time = el("time", { datetime: item.created_at, title: fullDate(item.created_at) }, relativeTime(item.created_at));
  return el("li", { class: item.read ? "item read" : "item unread", "data-id": item.id, "data-topic": item.topic },
    categoryIcon(category, topic?.categoryName || ""),
    el("div", { class: "content" },
      el("div", { class: "meta" },
        item.read ? null : el("span", { class: "unread-dot" }, el("span", { class: "sr-only" }, t("feed.unreadMark"))),
        topic ? el("span", { class: "category" }, topic.categoryName) : null,
        topic ? " · " : null, time),
      el("a", { class: "title", href: safeUrl(item.url), onclick: () => { if (!item.read) mark(item, "read").catch(showError); } }, item.title),
      item.count > 1 ? el("span", { class: "count", title: t("feed.merged", { count: item.count }) }, item.count) : null,
      el("div", { class: "body" }, item.body),
      members(item)),
    rowMenu(item));
}

function status(text) {
  document.getElementById("connection").textContent = text;
}

async function dontShow(item, channel) {
  await prefs("DontShowAgain", { topic: item.topic, channel });
  status(t("feed.noLonger", { title: item.title }));
}

function toast(item) {
  const topic = topicOf(item.topic);
  const object = soleObject(item);
  const box = el("div", { class: "toast", role: "status", "data-id": item.id, "data-topic": item.topic });
  const close = () => box.remove();
  box.append(
    el("div", { class: "title" }, item.title, item.count > 1 ? el("span", { class: "count" }, item.count) : null),
    el("div", {}, item.body),
    el("div", { class: "row" },
      topic && !topic.locked ? el("button", { type: "button", class: "dont-show", onclick: async () => {
        try { await dontShow(item, "CHANNEL_POPUP"); close(); } catch (error) { showError(error); }
      } }, t("toast.dontShow")) : null,
      object ? el("button", { type: "button", class: "mute-thread", onclick: async () => {
        try { await setFollow(object, "Mute"); close(); render(); } catch (error) { showError(error); }
      } }, t("toast.muteThread")) : null,
      el("button", { type: "button", class: "mute", onclick: async () => {
        try { await prefs("SetMuted", { muted: true }); state.muted = true; close(); } catch (error) { showError(error); }
      } }, t("toast.mute")),
      el("a", { href: `/settings?topic=${encodeURIComponent(item.topic)}` }, t("toast.preferences")),
      el("button", { type: "button", class: "close", onclick: close }, t("toast.close"))));
  document.getElementById("toasts").append(box);
  setTimeout(close, 15000);
}

async function browserNotification(item) {
  if (Notification.permission !== "granted") return;
  const registration = await navigator.serviceWorker.ready;
  // The notification id is the tag: a web push of the same notification replaces it, never doubles it.
  // The feed id comes back when it is clicked (sw.js): the tab that showed it marks it read.
  await registration.showNotification(item.title, {
    body: item.body, tag: item.notification_id, data: { url: item.url, feedId: item.id },
  });
}

// A click on an OS notification this tab showed (relayed by sw.js): opened, so read, in every channel.
function onNotificationOpened(event) {
  if (!event.data || event.data.type !== "notification-opened") return;
  const item = state.items.get(event.data.feedId);
  if (item && !item.read) mark(item, "read").catch(showError);
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
  const page = await api(`/api/feed?limit=${PAGE}`);
  state.items.clear();
  state.archivedLoaded = false;
  state.next = { main: page.next_before, archived: null };
  for (const item of page.items) state.items.set(item.id, item);
  state.lastId = page.last_id;
  await setUnread(page.unread);
  if (state.filter === "archived") await loadPage(true);
  render();
}

// One more page of the list the filter shows (archived items are a list of their own).
async function loadPage(archived, before = null) {
  const query = `limit=${PAGE}${archived ? "&archived=1" : ""}${before ? `&before=${before}` : ""}`;
  const page = await api(`/api/feed?${query}`);
  for (const item of page.items) state.items.set(item.id, item);
  if (archived) {
    state.archivedLoaded = true;
    state.next.archived = page.next_before;
  } else {
    state.next.main = page.next_before;
  }
  await setUnread(page.unread);
  return page.items;
}

let backoff = 500;
async function connect() {
  const token = await getToken();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/ws`);
  state.socket = socket;
  socket.addEventListener("open", () => socket.send(JSON.stringify({ type: "auth", token, last_id: state.lastId })));
  socket.addEventListener("message", async (event) => {
    const frame = JSON.parse(event.data);
    if (frame.type === "item") await arrive(frame);
    else if (frame.type === "unread") await setUnread(frame.unread);
    else if (frame.type === "reset") { await loadFeed(); status(t("connection.on")); }
    else if (frame.type === "ready") {
      backoff = 500;
      if (state.lastId === null) await loadFeed();
      await setUnread(frame.unread);
      status(t("connection.on"));
      document.body.dataset.connected = "yes";
    }
  });
  socket.addEventListener("close", (event) => {
    document.body.dataset.connected = "no";
    status(t("connection.off", { code: event.code }));
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
  const close = (returnFocus) => {
    if (panel.hidden) return;
    panel.hidden = true;
    bell.setAttribute("aria-expanded", "false");
    if (returnFocus) bell.focus();
  };
  const open = async () => {
    // Just under the bell, wherever the header's lines put it (CSSOM: the CSP allows no style attribute).
    const fixed = getComputedStyle(panel).position === "fixed";
    panel.style.top = `${Math.round(bell.getBoundingClientRect().bottom + 8 + (fixed ? 0 : window.scrollY))}px`;
    panel.hidden = false;
    bell.setAttribute("aria-expanded", "true");
    document.getElementById("panel-title").focus();
    const unseen = [...state.items.values()].filter((i) => !i.seen).map((i) => i.id);
    if (unseen.length) {
      await api("/api/feed/mark", { ids: unseen, what: "seen" }).catch(showError);
      for (const id of unseen) state.items.get(id).seen = true;
    }
  };
  bell.addEventListener("click", () => (panel.hidden ? open() : close(true)));
  // Escape (outside an open row menu, which closes first) and a click outside close the panel.
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !panel.hidden) close(true);
  });
  document.addEventListener("pointerdown", (event) => {
    for (const menu of document.querySelectorAll(".menu:not([hidden])")) {
      if (!menu.parentElement.contains(event.target)) menu.dispatchEvent(new Event("close"));
    }
  });
  // After the click, so the browser's own focus move (to the page, for a click on text) comes first:
  // the keyboard then goes back to the bell, unless the click landed on something that takes focus.
  document.addEventListener("click", (event) => {
    if (!panel.hidden && event.target instanceof Node && event.target.isConnected && !panel.contains(event.target) && !bell.contains(event.target)) {
      const focusable = document.activeElement && document.activeElement !== document.body;
      close(!focusable || panel.contains(document.activeElement));
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
  for (const button of document.querySelectorAll("[data-filter]")) {
    button.addEventListener("click", async () => {
      state.filter = button.dataset.filter;
      try {
        if (state.filter === "archived" && !state.archivedLoaded) await loadPage(true);
      } catch (error) { showError(error); }
      render();
    });
  }
  document.getElementById("older").addEventListener("click", async () => {
    const archived = state.filter === "archived";
    const before = archived ? state.next.archived : state.next.main;
    try {
      const added = await loadPage(archived, before);
      const first = added.find(visible);
      render(first ? [first.id, ".title"] : null);
      if (!first) document.getElementById("older").focus();
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
  // Relative times stay true while the page stays open.
  setInterval(() => {
    for (const time of document.querySelectorAll("#feed time")) time.textContent = relativeTime(time.getAttribute("datetime"));
  }, 30000);
}

async function main() {
  const topics = await boot();
  for (const category of topics?.categories || []) {
    for (const topic of category.topics || []) {
      state.topics.set(topic.key, {
        name: topic.name, locked: Boolean(topic.locked), category: category.key, categoryName: category.name,
        channels: (topic.channels || []).map((c) => c.channel),
      });
    }
  }
  await setUnread(0);
  setupBell();
  if ("serviceWorker" in navigator) {
    navigator.serviceWorker.addEventListener("message", onNotificationOpened);
    await navigator.serviceWorker.register("/sw.js").catch(showError);
  }
  if ("PushManager" in window && "Notification" in window && Notification.permission === "granted") {
    subscribePush({ onlyIfRotated: true }).catch(showError);
  }
  await loadSettings();
  await connect();
}

main().catch(showError);
