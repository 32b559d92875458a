// The user's notification settings. Every change is saved at once and in place: the page keeps
// its open categories, the keyboard focus and the scroll position, and patches the rows from the
// server's answer instead of rebuilding them. An error is a short sentence beside its control.
import { ApiError, boot, el, errorText, listTopics, prefs, showError } from "./common.js";
import { clock, list, t, weekdays } from "./i18n.js";
import { categoryList, channelName, searchBox, switchBox, tabBar, tabName, tabsOf } from "./layout.js";
import { subscribePush } from "./push.js";
import { play } from "./sounds.js";

// How long "Clear all preferences" can be undone before it is sent.
const UNDO_MS = 8000;
const view = { tabs: [], tab: null, query: "", data: null, open: new Set(), rows: new Map(), pending: null };

function announce(text) {
  document.getElementById("saved").textContent = text;
}

// --- errors beside their control ---------------------------------------------------------
function errorSlot(control) {
  return control.closest(".topic, .row, fieldset, .card");
}

function fieldError(control, text) {
  const slot = errorSlot(control);
  let note = slot.querySelector(":scope > .field-error");
  if (!note) {
    note = el("p", { class: "field-error", role: "alert", id: `error-${control.id || Math.random().toString(36).slice(2)}` });
    slot.append(note);
  }
  note.textContent = text;
  control.setAttribute("aria-describedby", note.id);
  control.setAttribute("aria-invalid", "true");
}

function clearFieldError(control) {
  const note = errorSlot(control)?.querySelector(":scope > .field-error");
  if (note) note.remove();
  control.removeAttribute("aria-describedby");
  control.removeAttribute("aria-invalid");
}

// Every change goes through here. On success the rows are patched from the server's state;
// on failure the control goes back to what is saved and says why, beside it.
// Changes are sent one after another, each built when its turn comes (`body` may be a function),
// so two quick changes of the settings block never overwrite each other.
// The rows are patched from the server once no other change waits (patching in between would
// flip back a switch the user has already changed again).
let queue = Promise.resolve();
let waiting = 0;
function save(method, body, options) {
  waiting += 1;
  const turn = queue.then(() => send(method, typeof body === "function" ? body() : body, options))
    .finally(() => { waiting -= 1; });
  queue = turn.catch(() => {});
  return turn;
}

async function send(method, body, { control, what, revert }) {
  await flushClear();
  try {
    await prefs(method, body);
    if (method === "UpdateSettings") view.data.settings = body.settings;
    clearFieldError(control);
    announce(t("saved", { what }));
  } catch (error) {
    if (revert) revert();
    fieldError(control, errorText(error));
    if (!(error instanceof ApiError)) showError(error);
    return false;
  }
  if (waiting <= 1) await refresh().catch(showError);
  return true;
}

async function refresh() {
  view.data = await listTopics();
  patch();
}

// --- where a value comes from ------------------------------------------------------------
function tabStates(topic) {
  return view.tab.channels.map((channel) => (topic.channels || []).find((c) => c.channel === channel)).filter(Boolean);
}

function sourceText(topic) {
  if (topic.locked) return t("source.locked");
  const states = tabStates(topic);
  const kinds = [...new Set(states.map((s) => s.source))];
  if (kinds.length === 1) return t(`source.${kinds[0]}`, { channel: channelName(view.tab, states[0].channel) });
  return states.map((s) => `${channelName(view.tab, s.channel)}: ${t(`source.${s.source}`, { channel: channelName(view.tab, s.channel) })}`).join(" · ");
}

function rowOf(topic) {
  if (!view.rows.has(topic.key)) view.rows.set(topic.key, { inputs: new Map() });
  return view.rows.get(topic.key);
}

function describe(topic) {
  const row = rowOf(topic);
  row.source = el("span", { class: "source", "data-source": "" });
  row.reset = el("button", {
    type: "button", class: "link reset", "data-reset": topic.key, "aria-label": t("settings.resetTopic", { topic: topic.name }),
    onclick: () => resetTopic(topic, row),
  }, t("settings.reset"));
  return el("span", { class: "note" }, row.source, row.reset);
}

async function resetTopic(topic, row) {
  const done = await save("ResetToDefaults", { topic: topic.key, channels: view.tab.channels },
    { control: row.reset, what: t("saved.reset", { topic: topic.name }) });
  // The button goes away with the choices it forgot: keep the keyboard in the row.
  if (done) [...row.inputs.values()].find((input) => !input.disabled)?.focus();
}

function patchRow(topic) {
  const row = view.rows.get(topic.key);
  if (!row) return;
  for (const state of topic.channels || []) {
    const input = row.inputs.get(state.channel);
    if (!input) continue;
    input.checked = Boolean(state.enabled);
    input.disabled = Boolean(topic.locked) || state.source === "master_off";
    input.dataset.source = state.source;
  }
  if (row.source) row.source.textContent = sourceText(topic);
  if (row.source) row.source.dataset.source = [...new Set(tabStates(topic).map((s) => s.source))].join(" ");
  if (row.reset) row.reset.hidden = !tabStates(topic).some((s) => s.source === "user");
  if (row.sound) row.sound.value = topic.sound || "";
}

function patch() {
  for (const category of view.data.categories || []) for (const topic of category.topics || []) patchRow(topic);
}

// --- controls ----------------------------------------------------------------------------
function settingsBlock() {
  return structuredClone(view.data.settings || {});
}

function updateSettings(change, control, what, revert) {
  return save("UpdateSettings", () => {
    const settings = settingsBlock();
    change(settings);
    return { settings };
  }, { control, what, revert });
}

function switchOn(channel) {
  const found = (view.data.settings?.switches || []).find((s) => s.channel === channel);
  return found ? Boolean(found.enabled) : true;
}

function setSwitch(settings, channel, enabled) {
  settings.switches = (settings.switches || []).filter((s) => s.channel !== channel);
  settings.switches.push({ channel, enabled });
}

// One line: the sound menu and its Play preview button.
function soundPicker(value, onPick, id, name) {
  const sounds = view.data.sounds || [];
  const select = el("select", { id, "aria-label": name ? t("settings.soundFor", { topic: name }) : t("settings.defaultSound"), onchange: (e) => onPick(e.target, e.target.value) },
    ...(id === "default-sound" ? [] : [el("option", { value: "" }, t("settings.soundDefault"))]),
    ...sounds.map((s) => el("option", { value: s, selected: s === value }, t(`sound.${s}`))));
  const button = el("button", {
    type: "button", class: "play", "aria-label": name ? t("settings.playFor", { topic: name }) : t("settings.play"), title: t("settings.play"),
    onclick: () => play(select.value || view.data.settings?.default_sound || sounds[0]),
  }, "▶");
  return el("span", { class: "sound-picker" }, select, button);
}

function checkbox(id, checked, text, onchange) {
  return el("label", { class: "switch-label" }, switchBox({ id, checked, onchange }, text), el("span", {}, text));
}

function browserSection() {
  const box = el("div", { id: "browser-permission", class: "permission" });
  const update = () => {
    const state = "Notification" in window ? Notification.permission : "unsupported";
    box.dataset.state = state;
    const allow = el("button", {
      type: "button", id: "allow-notifications",
      onclick: async () => {
        const answer = await Notification.requestPermission();
        update();
        if (answer === "granted") await subscribePush().catch(showError);
        document.getElementById("allow-notifications")?.focus();
      },
    }, t("browser.allow"));
    const help = el("div", { id: "permission-help", class: "help" },
      el("p", {}, t("browser.blockedIntro")),
      el("ol", {}, el("li", {}, t("browser.step1")), el("li", {}, t("browser.step2")), el("li", {}, t("browser.step3"))),
      el("p", { class: "muted" }, t("browser.osHint")));
    box.replaceChildren(...[
      el("h3", {}, t("browser.title")),
      el("p", { id: "permission-state" }, el("strong", {}, t(`browser.state.${state}`)), " ", t(`browser.explain.${state}`)),
      state === "default" ? allow : null,
      state === "denied" ? help : null,
    ].filter(Boolean));
  };
  update();
  navigator.permissions?.query({ name: "notifications" }).then((status) => { status.onchange = update; }).catch(() => {});
  return box;
}

function channelCard() {
  const s = view.data.settings || {};
  const card = el("section", { class: "card", "aria-labelledby": "how-title" },
    el("h2", { id: "how-title" }, t("settings.how", { tab: tabName(view.tab) })),
    el("div", { class: "row" }, ...view.tab.channels.map((channel) => {
      const text = t("settings.channelSwitch", { channel: channelName(view.tab, channel) });
      return el("label", { class: "switch-label" },
        switchBox({ "data-switch": channel, id: `switch-${channel}`, checked: switchOn(channel),
          onchange: (e) => updateSettings((x) => setSwitch(x, channel, e.target.checked), e.target,
            t(e.target.checked ? "saved.switchOn" : "saved.switchOff", { channel: channelName(view.tab, channel) }),
            () => { e.target.checked = !e.target.checked; }) }, text),
        el("span", {}, text));
    })));
  if (view.tab.key === "desktop") {
    card.append(
      browserSection(),
      el("h3", {}, t("settings.popupTitle")),
      el("div", { class: "row" }, el("span", { id: "default-sound-label" }, t("settings.defaultSound")),
        soundPicker(s.default_sound || "", (control, v) => updateSettings((x) => { x.default_sound = v; }, control, t("saved.defaultSound")), "default-sound"),
        checkbox("muted", Boolean(s.muted), t("settings.mute"), (e) =>
          updateSettings((x) => { x.muted = e.target.checked; }, e.target, t("saved.mute"), () => { e.target.checked = !e.target.checked; }))),
      el("div", { class: "row" }, checkbox("red-dot", Boolean(s.red_dot), t("settings.redDot"), (e) =>
        updateSettings((x) => { x.red_dot = e.target.checked; }, e.target, t("saved.redDot"), () => { e.target.checked = !e.target.checked; }))));
  }
  return card;
}

// Quiet hours: on at the first click (every night, 22:00 → 07:00, unless the user chose otherwise).
function quietCard() {
  const q = view.data.settings?.quiet_hours || {};
  const days = new Set(q.days || []);
  const names = weekdays("short");
  const long = weekdays("long");
  const summary = el("p", { id: "quiet-summary", class: "muted" });
  const current = () => ({
    enabled: document.getElementById("quiet-on").checked,
    days: names.map((_, i) => i + 1).filter((d) => document.getElementById(`quiet-day-${d}`).checked),
    start: document.getElementById("quiet-start").value,
    end: document.getElementById("quiet-end").value,
  });
  const describeQuiet = (value) => {
    if (!value.enabled) return t("quiet.off");
    const when = value.days.length === 7 ? t("quiet.everyDay") : list(value.days.map((d) => long[d - 1]));
    return t("quiet.on", { start: clock(value.start), end: clock(value.end), days: when });
  };
  const saveQuiet = async (event) => {
    const control = event.target;
    const value = current();
    if (control.id === "quiet-on" && value.enabled && !value.days.length) {
      for (let d = 1; d <= 7; d++) document.getElementById(`quiet-day-${d}`).checked = true;
      value.days = [1, 2, 3, 4, 5, 6, 7];
    }
    if (value.enabled && !value.days.length) {
      control.checked = true;
      fieldError(control, t("error.quietDays"));
      return;
    }
    if (value.start === value.end || !value.start || !value.end) {
      fieldError(control, t("error.quietTimes"));
      return;
    }
    const saved = view.data.settings?.quiet_hours || {};
    const ok = await updateSettings((x) => { x.quiet_hours = value; }, control, t("saved.quiet"), () => {
      if (control.type === "checkbox") control.checked = !control.checked;
      else control.value = control.id === "quiet-start" ? saved.start || "22:00" : saved.end || "07:00";
    });
    if (ok) {
      for (const other of document.querySelectorAll("#quiet .field-error")) other.remove();
      summary.textContent = describeQuiet(value);
    }
  };
  summary.textContent = describeQuiet({ enabled: Boolean(q.enabled), days: [...days].sort(), start: q.start || "22:00", end: q.end || "07:00" });
  return el("section", { class: "card", id: "quiet", "aria-labelledby": "quiet-title" },
    el("h2", { id: "quiet-title" }, t("quiet.title")),
    el("p", { class: "muted" }, t("quiet.explain")),
    el("div", { class: "row" }, checkbox("quiet-on", Boolean(q.enabled), t("quiet.switch"), saveQuiet)),
    el("div", { class: "row" },
      el("label", {}, t("quiet.from"), " ", el("input", { type: "time", id: "quiet-start", value: q.start || "22:00", onchange: saveQuiet })),
      el("label", {}, t("quiet.to"), " ", el("input", { type: "time", id: "quiet-end", value: q.end || "07:00", onchange: saveQuiet }))),
    el("fieldset", { class: "row days" }, el("legend", {}, t("quiet.days")),
      ...names.map((n, i) => el("label", { class: "day" },
        el("input", { type: "checkbox", id: `quiet-day-${i + 1}`, checked: days.has(i + 1), "aria-label": long[i], onchange: saveQuiet }), ` ${n}`))),
    summary);
}

// --- Clear all preferences: confirmed, then undoable for a few seconds ---------------------
function askClear(button) {
  const tab = view.tab;
  const close = () => { dialog.close(); dialog.remove(); };
  const dialog = el("dialog", { class: "confirm", id: "clear-dialog", "aria-labelledby": "clear-title", "aria-describedby": "clear-body" },
    el("h2", { id: "clear-title" }, t("clear.title", { tab: tabName(tab) })),
    el("p", { id: "clear-body" }, t("clear.body", { tab: tabName(tab) })),
    el("div", { class: "row" },
      el("button", { type: "button", id: "clear-confirm", class: "danger", onclick: () => { close(); startClear(tab); } }, t("clear.confirm")),
      el("button", { type: "button", id: "clear-cancel", onclick: () => { close(); button.focus(); } }, t("cancel"))));
  dialog.addEventListener("cancel", () => { dialog.remove(); button.focus(); });
  document.body.append(dialog);
  dialog.showModal();
  document.getElementById("clear-cancel").focus();
}

function startClear(tab) {
  const snapshot = structuredClone(view.data);
  for (const category of view.data.categories || []) {
    for (const topic of category.topics || []) {
      if (topic.locked) continue;
      for (const state of topic.channels || []) {
        if (tab.channels.includes(state.channel) && state.source !== "master_off") Object.assign(state, { enabled: false, source: "user" });
      }
    }
  }
  patch();
  const undo = el("button", { type: "button", id: "undo-clear", onclick: () => undoClear() }, t("clear.undo"));
  const bar = el("div", { class: "undo-bar", id: "undo-bar" }, el("span", {}, t("clear.done", { tab: tabName(tab) })), undo);
  document.getElementById("undo").replaceChildren(bar);
  view.pending = { tab, snapshot, timer: setTimeout(() => flushClear().catch(showError), UNDO_MS) };
  undo.focus();
}

function undoClear() {
  const pending = view.pending;
  if (!pending) return;
  view.pending = null;
  clearTimeout(pending.timer);
  view.data = pending.snapshot;
  patch();
  document.getElementById("undo").replaceChildren();
  announce(t("clear.undone"));
  document.getElementById("clear-all")?.focus();
}

async function flushClear() {
  const pending = view.pending;
  if (!pending) return;
  view.pending = null;
  clearTimeout(pending.timer);
  const hadFocus = document.activeElement?.id === "undo-clear";
  document.getElementById("undo").replaceChildren();
  if (hadFocus) document.getElementById("clear-all")?.focus();
  const button = document.getElementById("clear-all");
  try {
    await prefs("ClearChannel", { channels: pending.tab.channels });
    announce(t("saved", { what: t("saved.cleared", { tab: tabName(pending.tab) }) }));
  } catch (error) {
    view.data = pending.snapshot;
    patch();
    if (button) fieldError(button, errorText(error));
  }
  await refresh().catch(showError);
}

// Leaving the page inside the undo window still clears: the request outlives the page.
window.addEventListener("pagehide", () => {
  const pending = view.pending;
  const token = sessionStorage.getItem("belfry.token");
  if (!pending || !token) return;
  view.pending = null;
  fetch("/api/preferences/ClearChannel", {
    method: "POST", keepalive: true,
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: JSON.stringify({ channels: pending.tab.channels }),
  });
});

// --- the page ----------------------------------------------------------------------------
function render() {
  const root = document.getElementById("settings");
  view.rows.clear();
  const cell = (topic, channel, label) => {
    const input = switchBox({
      "data-channel": channel, id: `t-${topic.key}-${channel}`,
      onchange: (e) => save("SetPreference", { choice: { topic: topic.key, channel, enabled: e.target.checked } },
        { control: e.target, what: `${topic.name} (${channelName(view.tab, channel)})`, revert: () => { e.target.checked = !e.target.checked; } }),
    }, label);
    rowOf(topic).inputs.set(channel, input);
    return input;
  };
  const popup = view.tab.key === "desktop";
  const extra = popup ? {
    heading: t("settings.sound"),
    cell: (topic) => {
      if (!(topic.channels || []).some((c) => c.channel === "CHANNEL_POPUP")) return null;
      const picker = soundPicker(topic.sound || "", (control, v) => save("SetTopicSound", { topic: topic.key, sound: v },
        { control, what: t("saved.topicSound", { topic: topic.name }) }), `sound-${topic.key}`, topic.name);
      rowOf(topic).sound = picker.querySelector("select");
      return picker;
    },
  } : null;
  const options = { cell, describe, extra, open: view.open };
  const list = el("div", { id: "categories" }, ...categoryList(view.data.categories || [], view.tab, view.query, options));
  const panel = el("div", { role: "tabpanel", id: "tab-panel", "aria-labelledby": `tab-${view.tab.key}` },
    channelCard(),
    el("section", { class: "card what", "aria-labelledby": "what-title" },
      el("div", { class: "what-head" },
        el("h2", { id: "what-title" }, t("settings.what")),
        searchBox(view.query, (q) => {
          view.query = q;
          view.rows.clear();
          list.replaceChildren(...categoryList(view.data.categories || [], view.tab, view.query, options));
          patch();
        }),
        el("button", { type: "button", id: "clear-all", class: "danger-outline", onclick: (e) => askClear(e.target) }, t("clear.button"))),
      el("div", { id: "undo", "aria-live": "polite" }),
      list));
  root.replaceChildren(
    quietCard(),
    tabBar(view.tabs, view.tab, (tab) => {
      if (tab.key === view.tab.key) return;
      flushClear().catch(showError);
      view.tab = tab;
      const y = window.scrollY;
      render();
      window.scrollTo(0, y);
    }, "tab-panel"),
    panel);
  patch();
}

// /settings?topic=<key> (from the bell's row menu): that topic's row, open and focused.
function focusTopicFromUrl() {
  const key = new URLSearchParams(location.search).get("topic");
  if (!key) return;
  const category = (view.data.categories || []).find((c) => (c.topics || []).some((tp) => tp.key === key));
  if (!category) return;
  const topic = category.topics.find((tp) => tp.key === key);
  const channels = new Set((topic.channels || []).map((c) => c.channel));
  view.tab = view.tabs.find((tab) => tab.key === "desktop" && tab.channels.some((c) => channels.has(c)))
    || view.tabs.find((tab) => tab.channels.some((c) => channels.has(c))) || view.tab;
  view.open.add(category.key);
  render();
  const row = document.querySelector(`.topic[data-topic="${CSS.escape(key)}"]`);
  row.classList.add("highlight");
  row.scrollIntoView({ block: "center" });
  row.querySelector("input:not([disabled]), select")?.focus();
}

async function main() {
  const data = await boot();
  if (!data) return;
  view.data = data;
  view.tabs = tabsOf(view.data.channels);
  view.tab = view.tabs[0];
  render();
  focusTopicFromUrl();
  document.body.dataset.ready = "yes";
}

main().catch(showError);
