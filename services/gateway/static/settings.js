// The user's notification settings: every change is saved at once through the preferences service.
import { clearError, el, prefs, showError } from "./common.js";
import { categoryList, searchBox, tabBar, tabsOf } from "./layout.js";
import { play } from "./sounds.js";

const view = { tabs: [], tab: null, query: "", data: null };

async function load() {
  view.data = await prefs("ListTopics", {});
  view.tabs = tabsOf(view.data.channels);
  view.tab = view.tabs.find((t) => t.key === view.tab?.key) || view.tabs[0];
  render();
}

// Every change goes through here: saved, reloaded, and any error shown.
async function save(method, body, what) {
  try {
    await prefs(method, body);
    clearError();
    document.getElementById("saved").textContent = `Saved: ${what}`;
  } catch (error) {
    showError(error);
  }
  await load().catch(showError);
}

function settingsBlock() {
  return structuredClone(view.data.settings || {});
}

function updateSettings(change, what) {
  const settings = settingsBlock();
  change(settings);
  return save("UpdateSettings", { settings }, what);
}

function switchOn(channel) {
  const found = (view.data.settings?.switches || []).find((s) => s.channel === channel);
  return found ? Boolean(found.enabled) : true;
}

function setSwitch(settings, channel, enabled) {
  settings.switches = (settings.switches || []).filter((s) => s.channel !== channel);
  settings.switches.push({ channel, enabled });
}

function soundPicker(value, onPick, id) {
  const sounds = view.data.sounds || [];
  const select = el("select", { id, onchange: (e) => onPick(e.target.value) },
    ...(id === "default-sound" ? [] : [el("option", { value: "" }, "Default sound")]),
    ...sounds.map((s) => el("option", { value: s, selected: s === value }, s)));
  const button = el("button", { type: "button", class: "play", onclick: () => play(select.value || view.data.settings?.default_sound || sounds[0]) }, "▶ Play");
  return el("span", { class: "row" }, select, button);
}

function channelCard() {
  const s = view.data.settings || {};
  const card = el("div", { class: "card" },
    el("div", { class: "row" }, ...view.tab.channels.map((channel) => el("label", {},
      el("input", { type: "checkbox", "data-switch": channel, checked: switchOn(channel),
        onchange: (e) => updateSettings((x) => setSwitch(x, channel, e.target.checked), `${view.tab.names[channel]} switched ${e.target.checked ? "on" : "off"}`) }),
      ` ${view.tab.names[channel]} notifications`))));
  if (view.tab.key === "desktop") {
    card.append(
      el("div", { class: "row" }, "Pop-up sound: ",
        soundPicker(s.default_sound || "", (v) => updateSettings((x) => { x.default_sound = v; }, "default sound"), "default-sound"),
        el("label", {}, el("input", { type: "checkbox", id: "muted", checked: Boolean(s.muted),
          onchange: (e) => updateSettings((x) => { x.muted = e.target.checked; }, "mute") }), " Mute pop-up sounds")),
      el("div", { class: "row" }, el("label", {}, el("input", { type: "checkbox", id: "red-dot", checked: Boolean(s.red_dot),
        onchange: (e) => updateSettings((x) => { x.red_dot = e.target.checked; }, "red dot") }),
      " Display a red dot in the browser tab when there are unread bell notifications")));
  }
  card.append(el("div", { class: "row" }, el("button", { type: "button", id: "clear-all",
    onclick: () => save("ClearChannel", { channels: view.tab.channels }, `every ${view.tab.label} notification off`) }, "Clear all preferences")));
  return card;
}

function quietCard() {
  const q = view.data.settings?.quiet_hours || {};
  const days = new Set(q.days || []);
  const names = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
  const current = () => ({
    enabled: document.getElementById("quiet-on").checked,
    days: names.map((_, i) => i + 1).filter((d) => document.getElementById(`quiet-day-${d}`).checked),
    start: document.getElementById("quiet-start").value,
    end: document.getElementById("quiet-end").value,
  });
  const saveQuiet = () => updateSettings((x) => { x.quiet_hours = current(); }, "quiet hours");
  return el("div", { class: "card" },
    el("div", { class: "row" }, el("label", {}, el("input", { type: "checkbox", id: "quiet-on", checked: Boolean(q.enabled), onchange: saveQuiet }), " Quiet hours"),
      " from ", el("input", { type: "time", id: "quiet-start", value: q.start || "22:00", onchange: saveQuiet }),
      " to ", el("input", { type: "time", id: "quiet-end", value: q.end || "07:00", onchange: saveQuiet })),
    el("div", { class: "row" }, ...names.map((n, i) => el("label", {},
      el("input", { type: "checkbox", id: `quiet-day-${i + 1}`, checked: days.has(i + 1), onchange: saveQuiet }), ` ${n}`))));
}

function render() {
  const root = document.getElementById("settings");
  const isOn = (topic, channel) => Boolean((topic.channels || []).find((c) => c.channel === channel)?.enabled);
  const toggle = (topic, channel, enabled) =>
    save("SetPreference", { choice: { topic: topic.key, channel, enabled } }, `${topic.name} (${view.tab.names[channel]})`);
  const topicSound = (topic) => view.tab.key === "desktop" && (topic.channels || []).some((c) => c.channel === "CHANNEL_POPUP")
    ? soundPicker(topic.sound || "", (v) => save("SetTopicSound", { topic: topic.key, sound: v }, `${topic.name} sound`), `sound-${topic.key}`)
    : null;
  const list = el("div", { id: "categories" }, ...categoryList(view.data.categories || [], view.tab, view.query, isOn, toggle, topicSound));
  root.replaceChildren(
    quietCard(),
    tabBar(view.tabs, view.tab, (tab) => { view.tab = tab; render(); }),
    channelCard(),
    searchBox(view.query, (q) => {
      view.query = q;
      list.replaceChildren(...categoryList(view.data.categories || [], view.tab, view.query, isOn, toggle, topicSound));
    }),
    list);
}

load().catch(showError);
