// The service worker: shows web pushes when no tab is open, and opens the link on click.
// The notification id is the tag, so a push and an in-tab notification never show twice.
self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

self.addEventListener("push", (event) => {
  let data = {};
  try {
    data = event.data ? event.data.json() : {};
  } catch {
    data = { title: event.data ? event.data.text() : "New notification" };
  }
  const title = String(data.title || "New notification");
  const options = {
    body: String(data.body || ""),
    tag: String(data.notification_id || data.tag || ""),
    data: { url: String(data.url || "/") },
  };
  event.waitUntil(self.registration.showNotification(title, options));
});

// Origins a notification may open besides the app's own: the gateway fills this line in from
// BELFRY_GATEWAY_LINK_ORIGINS when it serves this file.
const LINK_ORIGINS = [];

// The app's own pages and the configured origins only; anything else opens the app.
function openable(url) {
  try {
    const parsed = new URL(url, self.location.origin);
    if (parsed.origin === self.location.origin || LINK_ORIGINS.includes(parsed.origin)) return parsed.href;
  } catch {
    // not a URL: fall through
  }
  return "/";
}

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const data = event.notification.data || {};
  const opening = self.clients.openWindow(openable(String(data.url || "/")));
  // Shown by a live tab: the tabs hold the user's token, so they mark it read (app.js). A web push needs
  // no help: its URL is the gateway's signed /open link, which marks it read before redirecting.
  const telling = data.feedId
    ? self.clients.matchAll({ type: "window" }).then((tabs) => {
      for (const tab of tabs) tab.postMessage({ type: "notification-opened", feedId: data.feedId });
    })
    : Promise.resolve();
  event.waitUntil(Promise.all([opening, telling]));
});
