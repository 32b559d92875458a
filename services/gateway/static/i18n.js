// The interface's words, one JSON file per language in /static/lang/<language>.json:
// adding a language is adding its file. The language is the one the server writes
// the user's topic names in (ListTopics' `language`: the profile locale's, else the
// browser's), so no screen mixes two languages; without a profile, the browser's.

const texts = { current: {}, english: {} };
export const locale = { lang: "en" };

async function load(lang) {
  const answer = await fetch(`/static/lang/${encodeURIComponent(lang)}.json`);
  if (!answer.ok) throw new Error(`no ${lang} texts`);
  return answer.json();
}

function primary(tag) {
  return String(tag || "").trim().replace("_", "-").split("-")[0].toLowerCase();
}

// The first language of `preferred`, then the browser's, that has a file; English otherwise.
export async function setLanguage(preferred) {
  if (!Object.keys(texts.english).length) texts.english = await load("en");
  const candidates = [preferred, ...(navigator.languages || [navigator.language])].map(primary).filter(Boolean);
  for (const lang of [...new Set(candidates), "en"]) {
    try {
      texts.current = lang === "en" ? texts.english : await load(lang);
      locale.lang = lang;
      break;
    } catch {
      continue;
    }
  }
  document.documentElement.lang = locale.lang;
  return locale.lang;
}

// t("feed.unread", {count: 3}): the text, with {name} placeholders filled and a plural
// form ("key.one", "key.other", per Intl.PluralRules) chosen when `count` is given.
export function t(key, vars = {}) {
  let name = key;
  if (typeof vars.count === "number") {
    const form = `${key}.${new Intl.PluralRules(locale.lang).select(vars.count)}`;
    if (form in texts.current || form in texts.english) name = form;
    else if (`${key}.other` in texts.current) name = `${key}.other`;
  }
  const text = texts.current[name] ?? texts.english[name] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, k) => (vars[k] === undefined ? "" : String(vars[k])));
}

// Static text of the page: data-i18n (text), data-i18n-label (aria-label), data-i18n-placeholder.
export function translatePage(root = document) {
  for (const node of root.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
  for (const node of root.querySelectorAll("[data-i18n-label]")) node.setAttribute("aria-label", t(node.dataset.i18nLabel));
  for (const node of root.querySelectorAll("[data-i18n-placeholder]")) node.setAttribute("placeholder", t(node.dataset.i18nPlaceholder));
  const title = document.querySelector("title[data-i18n]");
  if (title) document.title = title.textContent;
}

export function fullDate(iso) {
  return new Intl.DateTimeFormat(locale.lang, { dateStyle: "full", timeStyle: "short" }).format(new Date(iso));
}

// "5 min ago" / "il y a 5 min"; the full date past a week.
export function relativeTime(iso, now = Date.now()) {
  const seconds = Math.round((Date.parse(iso) - now) / 1000);
  const rtf = new Intl.RelativeTimeFormat(locale.lang, { numeric: "auto", style: "short" });
  const abs = Math.abs(seconds);
  if (abs < 45) return t("time.now");
  if (abs < 3600) return rtf.format(Math.round(seconds / 60), "minute");
  if (abs < 86400) return rtf.format(Math.round(seconds / 3600), "hour");
  if (abs < 7 * 86400) return rtf.format(Math.round(seconds / 86400), "day");
  return new Intl.DateTimeFormat(locale.lang, { dateStyle: "medium" }).format(new Date(iso));
}

// Monday-first weekday names (ISO 1..7) in the page's language.
export function weekdays(style = "short") {
  const monday = new Date(Date.UTC(2024, 0, 1));
  return [0, 1, 2, 3, 4, 5, 6].map((i) =>
    new Intl.DateTimeFormat(locale.lang, { weekday: style, timeZone: "UTC" }).format(new Date(monday.getTime() + i * 86400000)));
}

export function list(items) {
  return new Intl.ListFormat(locale.lang, { style: "long", type: "conjunction" }).format(items);
}

// "22:00" as the language writes a time of day ("10:00 PM", "22:00").
export function clock(value) {
  const [hours, minutes] = String(value || "").split(":").map(Number);
  if (!Number.isInteger(hours) || !Number.isInteger(minutes)) return value;
  return new Intl.DateTimeFormat(locale.lang, { hour: "numeric", minute: "2-digit", timeZone: "UTC" })
    .format(new Date(Date.UTC(1970, 0, 1, hours, minutes)));
}
