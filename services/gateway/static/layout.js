// The settings layout shared by the user's settings page and the admin page: tabs of channels,
// a search box, expandable categories of topic rows under column headers (one card per topic
// on a phone), switches labelled "topic — channel" for screen readers.
import { el } from "./common.js";
import { t } from "./i18n.js";

// A channel's and a tab's name in the page's language; the server's registry name otherwise.
export const channelName = (tab, channel) => t(`channel.${channel}`) === `channel.${channel}` ? tab.names[channel] : t(`channel.${channel}`);
export const tabName = (tab) => t(`tab.${tab.key}`) === `tab.${tab.key}` ? tab.label : t(`tab.${tab.key}`);

// The tabs, from ListTopics' channels (the server's channel registry: no copy here):
// [{key, label, channels: ["CHANNEL_EMAIL"], names: {CHANNEL_EMAIL: "Email"}}], in order.
export function tabsOf(channels) {
  const tabs = new Map();
  for (const c of channels || []) {
    if (!tabs.has(c.tab)) tabs.set(c.tab, { key: c.tab, label: c.tab_name, channels: [], names: {} });
    tabs.get(c.tab).channels.push(c.channel);
    tabs.get(c.tab).names[c.channel] = c.name;
  }
  return [...tabs.values()];
}

// A tab list with arrow-key movement (WAI-ARIA tabs pattern); the panel is `panelId`.
export function tabBar(tabs, current, onPick, panelId) {
  const buttons = tabs.map((tab) => el("button", {
    type: "button", role: "tab", id: `tab-${tab.key}`, "data-tab": tab.key, "aria-controls": panelId,
    "aria-selected": String(tab.key === current.key), tabindex: tab.key === current.key ? "0" : "-1",
    onclick: () => onPick(tab),
  }, tabName(tab)));
  const bar = el("div", { class: "tabs", role: "tablist", "aria-label": t("settings.tabs") }, ...buttons);
  bar.addEventListener("keydown", (event) => {
    const at = buttons.indexOf(document.activeElement);
    if (at < 0 || !["ArrowLeft", "ArrowRight", "Home", "End"].includes(event.key)) return;
    event.preventDefault();
    const next = event.key === "Home" ? 0 : event.key === "End" ? buttons.length - 1
      : (at + (event.key === "ArrowRight" ? 1 : -1) + buttons.length) % buttons.length;
    onPick(tabs[next]);
    document.getElementById(`tab-${tabs[next].key}`)?.focus();
  });
  return bar;
}

export function searchBox(value, onInput) {
  return el("input", {
    type: "search", id: "search", placeholder: t("settings.search"), "aria-label": t("settings.search"),
    value, oninput: (e) => onInput(e.target.value),
  });
}

// A checkbox drawn as a switch; `label` is what a screen reader says.
export function switchBox(attrs, label) {
  return el("input", { type: "checkbox", role: "switch", class: "switch", "aria-label": label, ...attrs });
}

// categories: [{key, name, topics: [{key, name, locked, channels: [{channel, enabled, source}]}]}]
// options.cell(topic, channel, label) → the control of one cell; options.describe(topic) → the
// row's note (where its value comes from); options.extra(topic) → the row's last column (or null);
// options.open: the Set of open category keys, kept as the user opens and closes them.
export function categoryList(categories, tab, query, options) {
  const { cell, describe = () => null, extra = null, open } = options;
  const needle = query.trim().toLowerCase();
  const blocks = [];
  const extraHead = extra ? extra.heading : null;
  for (const category of categories) {
    const topics = (category.topics || []).filter((topic) =>
      (topic.channels || []).some((c) => tab.channels.includes(c.channel)) &&
      (!needle || topic.name.toLowerCase().includes(needle) || category.name.toLowerCase().includes(needle)));
    if (!topics.length) continue;
    const columns = `grid cols-${tab.channels.length}${extra ? " with-extra" : ""}`;
    const head = el("div", { class: "topic head", "aria-hidden": "true" },
      el("span", {}, t("settings.notification")),
      ...tab.channels.map((channel) => el("span", { class: "cell" }, channelName(tab, channel))),
      extra ? el("span", { class: "cell" }, extraHead) : null);
    const rows = topics.map((topic) => {
      const allowed = new Set((topic.channels || []).map((c) => c.channel));
      return el("div", { class: topic.locked ? "topic locked" : "topic", "data-topic": topic.key },
        el("div", { class: "name" },
          el("span", { class: "topic-name" }, topic.name),
          topic.locked ? el("span", { class: "lock", title: t("settings.lockedHelp") }, `🔒 ${t("settings.locked")}`) : null,
          describe(topic)),
        ...tab.channels.map((channel) => el("div", { class: "cell" }, allowed.has(channel)
          ? el("label", { class: "switch-label" }, cell(topic, channel, `${topic.name} — ${channelName(tab, channel)}`),
            el("span", { class: "cell-label" }, channelName(tab, channel)))
          : el("span", { class: "none", "aria-hidden": "true" }, "—"))),
        extra ? el("div", { class: "cell extra" }, extra.cell(topic) || "") : null);
    });
    const details = el("details", { class: "category", open: Boolean(needle) || open.has(category.key), "data-category": category.key },
      el("summary", {}, category.name, el("span", { class: "muted" }, ` (${topics.length})`)),
      el("div", { class: columns }, head, ...rows));
    details.addEventListener("toggle", () => {
      if (needle) return;
      if (details.open) open.add(category.key);
      else open.delete(category.key);
    });
    blocks.push(details);
  }
  if (!blocks.length) blocks.push(el("p", { class: "muted" }, t("settings.noMatch")));
  return blocks;
}
