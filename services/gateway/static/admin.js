// Super admins of enterprise accounts: account defaults and role profiles, in the settings layout.
import { clearError, el, prefs, showError } from "./common.js";
import { categoryList, searchBox, tabBar, tabsOf } from "./layout.js";

const view = { tabs: [], tab: null, query: "", topics: null, target: "", choices: [], profiles: [] };

function key(topic, channel) {
  return `${topic}|${channel}`;
}

async function load() {
  view.topics = await prefs("ListTopics", {});
  view.tabs = tabsOf(view.topics.channels);
  view.tab = view.tabs.find((t) => t.key === view.tab?.key) || view.tabs[0];
  view.profiles = (await prefs("ListRoleProfiles", {})).profiles || [];
  if (view.target) {
    const profile = view.profiles.find((p) => p.permission_set === view.target);
    view.choices = profile ? profile.choices || [] : [];
  } else {
    view.choices = (await prefs("GetAccountDefaults", {})).choices || [];
  }
  render();
}

async function saveChoices(choices, what) {
  try {
    if (view.target) await prefs("UpdateRoleProfile", { profile: { permission_set: view.target, choices } });
    else await prefs("SetAccountDefaults", { choices });
    clearError();
    document.getElementById("saved").textContent = `Saved: ${what}`;
  } catch (error) {
    showError(error);
  }
  await load().catch(showError);
}

function render() {
  const picked = new Map(view.choices.map((c) => [key(c.topic, c.channel), Boolean(c.enabled)]));
  const isOn = (topic, channel) => {
    const own = picked.get(key(topic.key, channel));
    if (own !== undefined) return own;
    return Boolean((topic.channels || []).find((c) => c.channel === channel)?.product_default);
  };
  const toggle = (topic, channel, enabled) => {
    const rest = view.choices.filter((c) => key(c.topic, c.channel) !== key(topic.key, channel));
    saveChoices([...rest, { topic: topic.key, channel, enabled }], `${topic.name} (${view.tab.names[channel]})`);
  };
  const target = document.getElementById("target");
  target.replaceChildren(el("option", { value: "" }, "Account defaults"),
    ...view.profiles.map((p) => el("option", { value: p.permission_set, selected: p.permission_set === view.target }, `Role profile: ${p.permission_set}`)));
  const list = el("div", { id: "categories" }, ...categoryList(view.topics.categories || [], view.tab, view.query, isOn, toggle));
  document.getElementById("settings").replaceChildren(
    tabBar(view.tabs, view.tab, (tab) => { view.tab = tab; render(); }),
    searchBox(view.query, (q) => { view.query = q; list.replaceChildren(...categoryList(view.topics.categories || [], view.tab, view.query, isOn, toggle)); }),
    list);
}

document.getElementById("target").addEventListener("change", (e) => { view.target = e.target.value; load().catch(showError); });
document.getElementById("create-profile").addEventListener("click", async () => {
  const name = document.getElementById("new-profile").value.trim();
  try {
    await prefs("CreateRoleProfile", { profile: { permission_set: name, choices: [] } });
    view.target = name;
    clearError();
  } catch (error) { showError(error); }
  await load().catch(showError);
});

load().catch(showError);
