// The labeling page: a prompt and K responses, ranked best first by drag and drop or keys, each
// with an optional 1-7 Likert score, as InstructGPT's labelers did (Ouyang et al. 2022).
// Keys on a focused response: ArrowUp/ArrowDown move it, 1-7 score it, 0 clears the score.
"use strict";

const PAGE = "label";
const STORE_KEY = "rlhf-label";

// index: the next prompt of the queue (a random start per session, so labelers spread over it);
// done: submissions saved this session; item: the prompt and its responses; order: the ranking
// (indices into item.responses, best first); likert: scores by response id; submission: the one
// sent for this item, kept with its event ids until it is saved.
let state = null;

function save() { sessionStorage.setItem(STORE_KEY, JSON.stringify(state)); }

function restore() {
  state = JSON.parse(sessionStorage.getItem(STORE_KEY) || "null") ||
          {index: Math.floor(Math.random() * 1e6), done: 0, item: null, order: [], likert: {}, submission: null};
  const s = state.submission;
  if (s && s.status === "sending") Object.assign(s, {status: "failed", retry: true, error: "the page was reloaded before the answer came"});
  if (s && s.status === "saved") { state.item = null; state.submission = null; }   // reloaded while the next one loaded
}

async function loadItem() {
  state.item = null;
  state.submission = null;
  save();
  render();
  const r = await postJSON("/api/label/item", {index: state.index});
  if (r.status === 401) { signInAgain(PAGE); return; }
  if (!r.ok) {
    document.getElementById("item").replaceChildren(el("div", {class: "notice error", role: "alert"},
      "No item: " + (r.data.error || "HTTP " + r.status) + " ", el("button", {class: "retry", onclick: loadItem}, "Try again")));
    return;
  }
  state.item = r.data;
  state.order = r.data.responses.map((_, i) => i);
  state.likert = {};
  save();
  render();
}

// a sent ranking is not changed (a retry sends the same), unless it was refused: then it may be skipped or redone
function locked() { return !!state.submission && !refused(state.submission); }

function move(from, to) {
  if (locked() || to < 0 || to >= state.order.length || from === to) return;
  const [x] = state.order.splice(from, 1);
  state.order.splice(to, 0, x);
  save();
  render();
  document.querySelectorAll("#ranking li")[to].focus();
}

function score(responseId, value) {
  if (locked()) return;
  if (value) state.likert[responseId] = value; else delete state.likert[responseId];
  save();
  render();
}

// One ranking (best first) plus one Likert rating per scored response, in one submission.
function submit() {
  if (!state.item || locked()) return;
  const it = state.item;
  const now = Date.now();
  const ids = state.order.map((i) => it.responses[i].response_id);
  const items = [{kind: "ranking", event_id: newEventId("rank"), prompt: it.prompt_text, response_ids: ids,
                  created_unix_ms: now}];
  for (const id of ids) {
    if (state.likert[id]) items.push({kind: "rating", event_id: newEventId("rate"), prompt: it.prompt_text,
                                      response_id: id, likert: state.likert[id], created_unix_ms: now});
  }
  state.submission = {items: items, status: "new"};
  send();
}

async function send() {
  const saved = await sendOnce(PAGE, state.submission, save, render);
  render();
  if (saved) {
    state.done += 1;
    state.index += 1;
    save();
    await loadItem();
  }
}

function skip() {
  if (locked() && !settled(state.submission)) return;
  state.index += 1;
  loadItem();
}

// ---- rendering ----
function likertView(id) {
  const name = "likert-" + id;
  return el("div", {class: "likert", title: "1 = very bad … 7 = very good (optional)"},
    el("span", {class: "small"}, "score"),
    ...[1, 2, 3, 4, 5, 6, 7].map((v) => el("label", {},
      el("input", {type: "radio", name: name, value: String(v), checked: state.likert[id] === v, disabled: locked(),
                   onchange: () => score(id, v)}), String(v))),
    el("button", {class: "clear", disabled: locked() || !state.likert[id], onclick: () => score(id, 0)}, "–"));
}

function cardView(respIndex, rank) {
  const r = state.item.responses[respIndex];
  const li = el("li", {class: "card", tabindex: "0", draggable: locked() ? "false" : "true", "data-response-id": r.response_id,
                       "data-rank": rank + 1},
    el("div", {class: "rank"}, String(rank + 1)),
    el("div", {class: "body"}, el("p", {class: "text"}, r.text || "(empty answer)"), likertView(r.response_id)),
    el("div", {class: "moves"},
      el("button", {class: "up", title: "Move up (ArrowUp)", disabled: locked() || rank === 0, onclick: () => move(rank, rank - 1)}, "▲"),
      el("button", {class: "down", title: "Move down (ArrowDown)", disabled: locked() || rank === state.order.length - 1,
                    onclick: () => move(rank, rank + 1)}, "▼")));
  li.addEventListener("keydown", (e) => {
    if (e.target !== li) return;
    if (e.key === "ArrowUp" || e.key === "ArrowDown") { e.preventDefault(); move(rank, rank + (e.key === "ArrowUp" ? -1 : 1)); }
    else if (/^[0-7]$/.test(e.key)) { score(r.response_id, Number(e.key)); document.querySelectorAll("#ranking li")[rank].focus(); }
  });
  li.addEventListener("dragstart", (e) => { e.dataTransfer.setData("text/plain", String(rank)); li.classList.add("dragging"); });
  li.addEventListener("dragend", () => li.classList.remove("dragging"));
  li.addEventListener("dragover", (e) => e.preventDefault());
  li.addEventListener("drop", (e) => { e.preventDefault(); move(Number(e.dataTransfer.getData("text/plain")), rank); });
  return li;
}

function render() {
  document.getElementById("count").textContent = String(state.done);
  const box = document.getElementById("item");
  if (!state.item) { box.replaceChildren(el("p", {class: "small"}, "Loading the next prompt…")); return; }
  const it = state.item;
  box.replaceChildren(
    el("div", {class: "prompt"}, el("div", {class: "who"}, "Prompt ", el("span", {class: "version"}, it.model_version)),
       el("p", {}, it.prompt)),
    el("p", {class: "small"}, "Rank the " + it.responses.length + " responses best first: drag them, or focus one and " +
       "use ArrowUp/ArrowDown; keys 1-7 score the focused one (optional)."),
    el("ol", {id: "ranking"}, ...state.order.map((ri, rank) => cardView(ri, rank))),
    el("div", {class: "actions"},
      el("button", {id: "submit", class: "primary", disabled: locked(), onclick: submit}, "Submit ranking"),
      el("button", {id: "skip", disabled: locked() && !settled(state.submission), onclick: skip}, "Skip")),
    submissionNotice(state.submission, "ranking", send) || "");
}

async function main() {
  restore();
  render();
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) submit();
  });
  if (!await showMe(PAGE)) return;
  if (!state.item) await loadItem();
}

main();
