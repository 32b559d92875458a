import { api } from "./common.js";

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
