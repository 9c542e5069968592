// Bide's web UI: live refresh of the part of a page that changes, and a confirm before a cancel.
// Every page works without this script; it only saves reloading.
"use strict";

const REFRESH_MS = 2000;

async function refresh(live) {
  // Not while the user selects text in it or the tab is hidden.
  if (document.hidden || String(window.getSelection()).length > 0) return;
  try {
    const resp = await fetch(live.dataset.live, { credentials: "same-origin", headers: { Accept: "text/html" } });
    if (resp.redirected || !resp.ok) return;  // logged out, or the server is away: keep what is shown
    const html = await resp.text();
    if (html !== live.dataset.last) {
      live.dataset.last = html;
      // Keep open what the user opened (a timeline only grows, so an index stays the same row).
      const open = [...live.querySelectorAll("details")].map((d) => d.open);
      live.innerHTML = html;
      live.querySelectorAll("details").forEach((d, i) => { if (open[i]) d.open = true; });
    }
  } catch (e) {
    // A network hiccup: try again at the next tick.
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  if (live && live.dataset.live) {
    setInterval(() => refresh(live), REFRESH_MS);
  }
});

// On the document: a form inside the live part is replaced at every refresh.
document.addEventListener("submit", (ev) => {
  const form = ev.target;
  if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
    ev.preventDefault();
  }
});
