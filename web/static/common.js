// Shared by the chat and labeling pages: ids, calls to the gateway, the page header.
"use strict";

// An event id for one submission, made here and reused on every retry, so the trainer's store
// keeps it once however often it is sent (crypto.randomUUID needs a secure context; this does not).
function newEventId(prefix) {
  const b = crypto.getRandomValues(new Uint8Array(16));
  return prefix + "-" + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

function signInAgain(page) {
  window.location.assign("/signin?next=" + page);
}

// POST JSON -> {ok, status, data}; a network failure reads as a retryable error, never as success.
async function postJSON(url, body) {
  let resp;
  try {
    resp = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                             body: JSON.stringify(body), credentials: "same-origin"});
  } catch (e) {
    return {ok: false, status: 0, data: {retry: true, error: "the gateway did not answer (" + e.message + ")"}};
  }
  let data = {};
  try { data = await resp.json(); } catch (e) { data = {error: "HTTP " + resp.status}; }
  return {ok: resp.ok, status: resp.status, data: data};
}

// Sends one submission (a list of feedback items) for a page. Saved only when the gateway says so,
// which it does only when the feedback service said Kafka acknowledged every item.
async function submitFeedback(page, submission) {
  submission.status = "sending";
  const r = await postJSON("/api/feedback/" + page, {items: submission.items});
  if (r.status === 401) signInAgain(page);
  submission.status = r.ok && r.data.saved === true ? "saved" : "failed";
  submission.error = submission.status === "saved" ? "" : (r.data.error || "HTTP " + r.status);
  submission.retry = submission.status === "failed" && r.data.retry !== false;
  submission.partial = submission.status === "failed" && r.data.partial === true;
  return submission.status === "saved";
}

// Sends a submission unless it is on its way or already saved (a retry resends the same event ids),
// persisting and redrawing the page around the wait. True when it is saved now.
async function sendOnce(page, sub, persist, redraw) {
  if (sub.status === "sending" || sub.status === "saved") return false;
  sub.status = "sending";
  persist();
  redraw();
  const saved = await submitFeedback(page, sub);
  persist();
  return saved;
}

// POST JSON and read the answer as server-sent events: onEvent(name, data) for each.
async function streamEvents(url, body, onEvent) {
  const resp = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                 body: JSON.stringify(body), credentials: "same-origin"});
  if (!resp.ok) {
    let data = {};
    try { data = await resp.json(); } catch (e) { data = {error: "HTTP " + resp.status}; }
    onEvent("error", {status: resp.status, error: data.error || "HTTP " + resp.status});
    return;
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const name = (block.match(/^event: (.*)$/m) || [])[1] || "message";
      const data = (block.match(/^data: (.*)$/m) || [])[1];
      onEvent(name, data ? JSON.parse(data) : {});
    }
  }
}

// The header: who is signed in, and a sign-out button when tokens are in use. Returns /api/me's answer.
async function showMe(page) {
  const resp = await fetch("/api/me?page=" + page, {credentials: "same-origin"});
  if (resp.status === 401 || resp.status === 403) { signInAgain(page); return null; }
  const me = await resp.json();
  document.getElementById("who").textContent = me.auth ? me.role + " · " + me.person : "no sign-in (open gateway)";
  document.getElementById("signout").hidden = !me.auth;
  return me;
}

// A small element builder: el("div", {class: "x", onclick: f}, child, "text", ...).
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v === true) e.setAttribute(k, "");
    else if (v !== false && v !== null && v !== undefined) e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

// A submission the gateway or the feedback service refused (bad input, an unknown response id): resending
// it would be refused again, so the page lets the person go on (settled). When nothing of it was stored
// (refused), the person may also redo it, with new event ids; a batch partly stored is not redone.
function settled(sub) { return !!sub && sub.status === "failed" && !sub.retry; }
function refused(sub) { return settled(sub) && !sub.partial; }

// What a submission's state says to the person: saved, sending, not saved with a retry, or refused.
function submissionNotice(sub, what, onRetry) {
  if (!sub) return null;
  if (sub.status === "saved") return el("div", {class: "notice saved"}, what + " saved.");
  if (sub.status === "sending") return el("div", {class: "notice sending"}, "Saving " + what + "…");
  if (settled(sub)) return el("div", {class: "notice error refused", role: "alert"},
                              (sub.partial ? "Partly saved; the rest was refused: " : "Not saved: ") + sub.error + ".");
  return el("div", {class: "notice error", role: "alert"},
            "Not saved: " + sub.error + ". Your " + what + " is kept; retry when the service is back. ",
            el("button", {class: "retry", onclick: onRetry}, "Retry"));
}
