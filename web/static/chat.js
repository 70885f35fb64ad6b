// The chat page: a conversation with the live policy. Each assistant turn streams two samples of
// one request side by side; the person picks one (with a strength), a tie, or "both bad", and the
// chosen answer continues the conversation, as the crowdworkers did in Bai et al. 2022.
"use strict";

const PAGE = "chat";
const STORE_KEY = "rlhf-chat";
const PICKS = [  // [choice, strength, label]: one click says which and by how much
  ["a", "clearly", "A is clearly better"], ["a", "slightly", "A is slightly better"], ["tie", "", "Tie"],
  ["b", "slightly", "B is slightly better"], ["b", "clearly", "B is clearly better"], ["bad", "", "Both are bad"],
];

// messages: the conversation as the policy sees it, assistant turns with the response they came from.
// turn: the open pair of samples. ratings: thumbs given, by response id. Kept in sessionStorage, so a
// reload keeps the conversation and any submission still waiting for a retry (with its event ids).
let state = {messages: [], turn: null, ratings: {}};

function save() { sessionStorage.setItem(STORE_KEY, JSON.stringify(state)); }

// Returns the request of a turn whose stream the reload cut, to be asked again.
function restore() {
  const saved = JSON.parse(sessionStorage.getItem(STORE_KEY) || "null");
  if (!saved) return null;
  state = saved;
  const subs = [state.turn && state.turn.submission, ...Object.values(state.ratings)];
  for (const s of subs) {   // an answer that never came back: unknown, so offered for a retry
    if (s && s.status === "sending") Object.assign(s, {status: "failed", retry: true, error: "the page was reloaded before the answer came"});
  }
  // a stream cut by the reload is asked again
  return state.turn && state.turn.streaming ? state.turn.request : null;
}

// ---- a turn ----
async function ask(request) {
  state.turn = {request: request, samples: [newSample(), newSample()], streaming: true, error: "", submission: null};
  render();
  const turn = state.turn;
  try {
    await streamEvents("/api/chat/stream", {messages: request}, (name, d) => onStreamEvent(turn, name, d));
  } catch (e) {
    turn.error = "the stream broke off (" + e.message + ")";
  }
  turn.streaming = false;
  if (!turn.error && !turn.samples.every((s) => s.done)) turn.error = "the stream ended early";
  save();
  render();
}

function newSample() { return {text: "", response_id: "", model_version: "", prompt_text: "", finish: "", done: false}; }

function onStreamEvent(turn, name, d) {
  if (name === "delta" || name === "done") {
    const s = turn.samples[d.index];
    Object.assign(s, {response_id: d.response_id, model_version: d.model_version});
    if (name === "delta") s.text += d.text;
    else Object.assign(s, {done: true, prompt_text: d.prompt_text, finish: d.finish_reason});
  } else if (name === "error") {
    if (d.status === 401) signInAgain(PAGE);
    turn.error = d.error;
  }
  render();
}

function send(ev) {
  ev.preventDefault();
  const box = document.getElementById("message");
  const text = box.value.trim();
  if (!text || state.turn) return;
  box.value = "";
  state.messages.push({role: "user", content: text});
  ask(state.messages.map((m) => ({role: m.role, content: m.content})));
}

// The pick: a comparison (A, B or tie, with its strength), or "both bad" as a thumbs-down on each
// sample. It is fixed once sent: a retry resends the same items with the same event ids.
function pick(choice, strength) {
  const turn = state.turn;
  if (!turn || (turn.submission && !refused(turn.submission))) return;
  const [a, b] = turn.samples;
  const now = Date.now();
  // "both bad" rates down each sample not rated yet: a thumb already given stays the one rating of it
  const items = choice === "bad"
    ? [a, b].filter((s) => !state.ratings[s.response_id]).map((s) => ({kind: "rating", event_id: newEventId("rate"),
        prompt: s.prompt_text, response_id: s.response_id, thumbs_up: false, created_unix_ms: now}))
    : [{kind: "comparison", event_id: newEventId("cmp"), prompt: a.prompt_text, a: a.response_id,
        b: b.response_id, choice: choice, strength: strength, created_unix_ms: now}];
  if (!items.length) { ask(turn.request); return; }   // both rated already: nothing to add, ask again
  turn.submission = {choice: choice, strength: strength, items: items, status: "new"};
  sendPick();
}

async function sendPick() {
  const turn = state.turn;
  const sub = turn.submission;
  const saved = await sendOnce(PAGE, sub, save, render);
  if (state.turn !== turn) return;   // "New conversation" while it was on its way: that turn is gone
  if (!saved) { render(); return; }
  if (sub.choice === "bad") {   // neither answer goes on: the same question is asked again
    ask(turn.request);
    return;
  }
  const chosen = turn.samples[sub.choice === "b" ? 1 : 0];   // a tie goes on with A
  state.messages.push({role: "assistant", content: chosen.text.trim(), response_id: chosen.response_id,
                       model_version: chosen.model_version, prompt_text: chosen.prompt_text});
  state.turn = null;
  save();
  render();
}

// Thumbs up or down on one response (a rating); one per response.
async function thumbs(sample, up) {
  if (state.ratings[sample.response_id]) return;
  const sub = {items: [{kind: "rating", event_id: newEventId("rate"), prompt: sample.prompt_text,
                        response_id: sample.response_id, thumbs_up: up, created_unix_ms: Date.now()}],
               thumbs_up: up, status: "new"};
  state.ratings[sample.response_id] = sub;
  await resendRating(sub);
}

async function resendRating(sub) {
  if (sub.status === "sending") return;
  sub.status = "sending";
  save();
  render();
  await submitFeedback(PAGE, sub);
  save();
  render();
}

// ---- rendering ----
function thumbsBar(sample) {
  const sub = state.ratings[sample.response_id];
  const given = sub ? (sub.thumbs_up ? "up" : "down") : "";
  return el("div", {class: "thumbs"},
    el("button", {class: "thumb up" + (given === "up" ? " given" : ""), title: "Thumbs up: a good answer", disabled: !!sub,
                  onclick: () => thumbs(sample, true)}, "▲ good"),
    el("button", {class: "thumb down" + (given === "down" ? " given" : ""), title: "Thumbs down: a bad answer", disabled: !!sub,
                  onclick: () => thumbs(sample, false)}, "▼ bad"),
    sub && sub.status !== "saved" ? submissionNotice(sub, "rating", () => resendRating(sub)) : null,
    sub && sub.status === "saved" ? el("span", {class: "small saved"}, "rating saved") : null);
}

function messageView(m) {
  if (m.role === "user") return el("div", {class: "msg user"}, el("div", {class: "who"}, "You"), el("p", {}, m.content));
  return el("div", {class: "msg assistant", "data-response-id": m.response_id},
    el("div", {class: "who"}, "Assistant ", el("span", {class: "version"}, m.model_version)),
    el("p", {}, m.content), thumbsBar(m));
}

function sampleView(s, i, turn) {
  const label = i === 0 ? "A" : "B";
  const chosen = turn.submission && turn.submission.choice === (i === 0 ? "a" : "b");
  return el("div", {class: "sample" + (chosen ? " chosen" : ""), "data-index": i, "data-response-id": s.response_id},
    el("div", {class: "who"}, "Response " + label + " ", el("span", {class: "version"}, s.model_version),
       s.done ? null : el("span", {class: "small"}, " writing…")),
    el("p", {class: "text"}, s.text),
    s.done ? thumbsBar(s) : null);
}

function pickBar(turn) {
  const sub = turn.submission;
  return el("div", {class: "picks"},
    ...PICKS.map(([c, s, label]) => el("button", {
      class: "pick" + (sub && sub.choice === c && sub.strength === s ? " given" : ""), "data-choice": c,
      "data-strength": s, disabled: !!sub && !refused(sub), onclick: () => pick(c, s)}, label)),
    sub ? submissionNotice(sub, "choice", sendPick) : null,
    settled(sub) ? el("button", {class: "retry", onclick: () => ask(turn.request)}, "Ask again") : null);
}

function render() {
  const log = document.getElementById("log");
  log.replaceChildren(...state.messages.map(messageView));
  const turn = state.turn;
  const open = document.getElementById("turn");
  open.replaceChildren();
  if (turn) {
    open.append(el("div", {class: "pair"}, ...turn.samples.map((s, i) => sampleView(s, i, turn))));
    if (turn.error) {
      open.append(el("div", {class: "notice error", role: "alert"}, "No answer: " + turn.error + " ",
                     el("button", {class: "retry", onclick: () => ask(turn.request)}, "Ask again")));
    } else if (turn.samples.every((s) => s.done)) {
      open.append(pickBar(turn));
    }
  }
  document.getElementById("send").disabled = !!state.turn;
}

async function main() {
  const cut = restore();
  render();
  if (cut) ask(cut);
  document.getElementById("composer").addEventListener("submit", send);
  document.getElementById("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
  document.getElementById("new").addEventListener("click", () => {
    const unsaved = [state.turn && state.turn.submission, ...Object.values(state.ratings)]
      .some((sub) => sub && sub.status !== "saved" && !settled(sub));
    if (unsaved && !confirm("A choice or rating of yours is not saved yet. Start over anyway?")) return;
    state = {messages: [], turn: null, ratings: {}};
    save();
    render();
  });
  await showMe(PAGE);
}

main();
