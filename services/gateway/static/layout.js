// The settings layout shared by the user's settings page and the admin page:
// tabs of channels, a search box, expandable categories, topic checkboxes.
import { el } from "./common.js";

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

export function tabBar(tabs, current, onPick) {
  return el("div", { class: "tabs", role: "tablist" },
    ...tabs.map((tab) => el("button", {
      type: "button", role: "tab", "data-tab": tab.key, "aria-selected": String(tab.key === current.key),
      onclick: () => onPick(tab),
    }, tab.label)));
}

export function searchBox(value, onInput) {
  return el("input", { type: "search", id: "search", placeholder: "Search notifications", value, oninput: (e) => onInput(e.target.value) });
}

// categories: [{key, name, topics: [{key, name, locked, channels: [{channel, enabled, source}], sound}]}]
// isOn(topic, channel) → bool; onToggle(topic, channel, enabled); extra(topic) → optional node per row.
export function categoryList(categories, tab, query, isOn, onToggle, extra = () => null) {
  const needle = query.trim().toLowerCase();
  const blocks = [];
  for (const category of categories) {
    const topics = (category.topics || []).filter((t) =>
      (t.channels || []).some((c) => tab.channels.includes(c.channel)) &&
      (!needle || t.name.toLowerCase().includes(needle) || category.name.toLowerCase().includes(needle)));
    if (!topics.length) continue;
    const rows = topics.map((topic) => {
      const allowed = new Set((topic.channels || []).map((c) => c.channel));
      return el("div", { class: topic.locked ? "topic locked" : "topic", "data-topic": topic.key },
        el("span", {}, topic.name, topic.locked ? el("span", { class: "count", title: "Always on" }, "🔒 Locked") : null),
        ...tab.channels.map((channel) => allowed.has(channel)
          ? el("label", {},
            el("input", {
              type: "checkbox", "data-channel": channel, checked: isOn(topic, channel), disabled: Boolean(topic.locked),
              onchange: (e) => onToggle(topic, channel, e.target.checked),
            }), ` ${tab.names[channel]}`)
          : el("span", {})),
        ...(tab.channels.length === 1 ? [el("span", {}), el("span", {})] : []),
        extra(topic) || el("span", {}));
    });
    blocks.push(el("details", { class: "category", open: Boolean(needle), "data-category": category.key },
      el("summary", {}, category.name, el("span", { class: "muted" }, ` (${topics.length})`)), ...rows));
  }
  if (!blocks.length) blocks.push(el("p", { class: "muted" }, "No notification matches your search."));
  return blocks;
}
