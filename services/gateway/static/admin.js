// Super admins of enterprise accounts: account defaults and role profiles, in the settings layout.
// A change saves in place (the rows are patched, the open categories and focus stay).
import { boot, el, errorText, prefs, showError } from "./common.js";
import { t } from "./i18n.js";
import { categoryList, channelName, searchBox, switchBox, tabBar, tabName, tabsOf } from "./layout.js";

const view = { tabs: [], tab: null, query: "", topics: null, target: "", choices: [], profiles: [], sets: [], open: new Set(), rows: new Map() };

const key = (topic, channel) => `${topic}|${channel}`;

function announce(text) {
  document.getElementById("saved").textContent = text;
}

function productDefault(topic, channel) {
  return Boolean((topic.channels || []).find((c) => c.channel === channel)?.product_default);
}

function picked() {
  return new Map(view.choices.map((c) => [key(c.topic, c.channel), Boolean(c.enabled)]));
}

function isOn(topic, channel) {
  const own = picked().get(key(topic.key, channel));
  return own !== undefined ? own : productDefault(topic, channel);
}

async function loadProfiles() {
  const answer = await prefs("ListRoleProfiles", {});
  view.profiles = answer.profiles || [];
  view.sets = answer.permission_sets || [];
}

async function loadTarget() {
  if (view.target) {
    const profile = view.profiles.find((p) => p.permission_set === view.target);
    view.choices = profile ? profile.choices || [] : [];
  } else {
    view.choices = (await prefs("GetAccountDefaults", {})).choices || [];
  }
}

async function saveChoices(choices, what, control, revert) {
  try {
    if (view.target) await prefs("UpdateRoleProfile", { profile: { permission_set: view.target, choices } });
    else await prefs("SetAccountDefaults", { choices });
    view.choices = choices;
    if (view.target) {
      const profile = view.profiles.find((p) => p.permission_set === view.target);
      if (profile) profile.choices = choices;
    }
    control.removeAttribute("aria-invalid");
    control.closest(".topic")?.querySelector(".field-error")?.remove();
    announce(t("saved", { what }));
    patch();
  } catch (error) {
    revert();
    const row = control.closest(".topic");
    row?.querySelector(".field-error")?.remove();
    row?.append(el("p", { class: "field-error", role: "alert" }, errorText(error)));
    control.setAttribute("aria-invalid", "true");
  }
}

function differences(topic) {
  return view.tab.channels.filter((channel) => (topic.channels || []).some((c) => c.channel === channel) &&
    picked().has(key(topic.key, channel)) && picked().get(key(topic.key, channel)) !== productDefault(topic, channel));
}

function patch() {
  let count = 0;
  for (const category of view.topics.categories || []) {
    for (const topic of category.topics || []) {
      const all = (topic.channels || []).filter((c) => picked().has(key(topic.key, c.channel)) && picked().get(key(topic.key, c.channel)) !== c.product_default);
      count += all.length;
      const row = view.rows.get(topic.key);
      if (!row) continue;
      for (const [channel, input] of row.inputs) input.checked = topic.locked || isOn(topic, channel);
      const differ = differences(topic);
      row.note.hidden = !differ.length;
      row.note.textContent = differ.length ? t("admin.differs", { channels: differ.map((c) => `${channelName(view.tab, c)} ${isOn(topic, c) ? t("admin.on") : t("admin.off")}`).join(", ") }) : "";
      row.reset.hidden = !view.tab.channels.some((c) => picked().has(key(topic.key, c)));
    }
  }
  document.getElementById("differ-count").textContent = count ? t("admin.differCount", { count }) : t("admin.differNone");
}

function render() {
  const target = document.getElementById("target");
  target.replaceChildren(el("option", { value: "" }, t("admin.accountDefaults")),
    ...view.profiles.map((p) => el("option", { value: p.permission_set, selected: p.permission_set === view.target }, t("admin.profileOption", { set: p.permission_set }))));
  const missing = view.sets.filter((s) => !view.profiles.some((p) => p.permission_set === s));
  document.getElementById("new-profile").replaceChildren(...missing.map((s) => el("option", { value: s }, s)));
  document.getElementById("create-row").hidden = !missing.length;
  document.getElementById("delete-profile").hidden = !view.target;
  view.rows.clear();
  const cell = (topic, channel, label) => {
    const input = switchBox({
      "data-channel": channel, id: `t-${topic.key}-${channel}`, disabled: Boolean(topic.locked),
      onchange: (e) => {
        const rest = view.choices.filter((c) => key(c.topic, c.channel) !== key(topic.key, channel));
        saveChoices([...rest, { topic: topic.key, channel, enabled: e.target.checked }], `${topic.name} (${channelName(view.tab, channel)})`,
          e.target, () => { e.target.checked = !e.target.checked; });
      },
    }, label);
    if (!view.rows.has(topic.key)) view.rows.set(topic.key, { inputs: new Map() });
    view.rows.get(topic.key).inputs.set(channel, input);
    return input;
  };
  const describe = (topic) => {
    const row = view.rows.get(topic.key) || { inputs: new Map() };
    view.rows.set(topic.key, row);
    row.note = el("span", { class: "source differs" });
    row.reset = el("button", {
      type: "button", class: "link reset", "aria-label": t("settings.resetTopic", { topic: topic.name }),
      onclick: (e) => {
        const rest = view.choices.filter((c) => !(c.topic === topic.key && view.tab.channels.includes(c.channel)));
        saveChoices(rest, t("saved.reset", { topic: topic.name }), e.target, () => {});
        [...row.inputs.values()].find((i) => !i.disabled)?.focus();
      },
    }, t("admin.reset"));
    return el("span", { class: "note" }, row.note, row.reset);
  };
  const options = { cell, describe, open: view.open };
  const list = el("div", { id: "categories" }, ...categoryList(view.topics.categories || [], view.tab, view.query, options));
  document.getElementById("settings").replaceChildren(
    tabBar(view.tabs, view.tab, (tab) => { view.tab = tab; render(); }, "tab-panel"),
    el("div", { role: "tabpanel", id: "tab-panel", "aria-labelledby": `tab-${view.tab.key}` },
      searchBox(view.query, (q) => { view.query = q; view.rows.clear(); list.replaceChildren(...categoryList(view.topics.categories || [], view.tab, view.query, options)); patch(); }),
      list));
  patch();
}

function confirmDelete() {
  const name = view.target;
  const button = document.getElementById("delete-profile");
  const close = () => { dialog.close(); dialog.remove(); };
  const dialog = el("dialog", { class: "confirm", "aria-labelledby": "delete-title" },
    el("h2", { id: "delete-title" }, t("admin.deleteTitle", { set: name })),
    el("p", {}, t("admin.deleteBody", { set: name })),
    el("div", { class: "row" },
      el("button", { type: "button", id: "delete-confirm", class: "danger", onclick: async () => {
        close();
        try {
          await prefs("DeleteRoleProfile", { permission_set: name });
          view.target = "";
          await loadProfiles();
          await loadTarget();
          announce(t("admin.deleted", { set: name }));
          render();
          document.getElementById("target").focus();
        } catch (error) { showError(error); }
      } }, t("admin.delete")),
      el("button", { type: "button", id: "delete-cancel", onclick: () => { close(); button.focus(); } }, t("cancel"))));
  dialog.addEventListener("cancel", () => { dialog.remove(); button.focus(); });
  document.body.append(dialog);
  dialog.showModal();
  document.getElementById("delete-cancel").focus();
}

async function main() {
  view.topics = await boot();
  if (!view.topics) return;
  if (!view.topics.account_admin) {
    document.getElementById("admin-tools").hidden = true;
    document.getElementById("not-admin").hidden = false;
    return;
  }
  view.tabs = tabsOf(view.topics.channels);
  view.tab = view.tabs[0];
  await loadProfiles();
  await loadTarget();
  render();
  document.getElementById("target").addEventListener("change", async (e) => {
    view.target = e.target.value;
    try { await loadTarget(); } catch (error) { showError(error); }
    render();
  });
  document.getElementById("create-profile").addEventListener("click", async () => {
    const name = document.getElementById("new-profile").value;
    if (!name) return;
    try {
      await prefs("CreateRoleProfile", { profile: { permission_set: name, choices: [] } });
      view.target = name;
      await loadProfiles();
      await loadTarget();
      announce(t("admin.created", { set: name }));
      render();
    } catch (error) { showError(error); }
  });
  document.getElementById("delete-profile").addEventListener("click", confirmDelete);
  document.body.dataset.ready = "yes";
}

main().catch(showError);
