// The review page: keyboard first. Everything shown comes from the queue API
// and is set with textContent, never parsed as HTML.
"use strict";

const IDLE_BEFORE_REFRESH_MS = 30000;
const SHOWN = 300; // items on the page at once; the rest follow as these are decided
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const $ = (id) => document.getElementById(id);
let queue = [];
let screen = []; // {item, answer, typing, unreadable, postponed, el}
let focus = 0;
const later = new Set(); // postponed this session: shown after everything else
let busy = false;

function age(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} days`;
}

function say(text) { $("message").textContent = text; }

async function load() {
  const r = await fetch("/api/queue", { credentials: "same-origin" });
  if (!r.ok) { say(`the queue could not be read (${r.status})`); return; }
  const data = await r.json();
  queue = data.items;
  $("left").textContent = String(data.left);
  $("oldest").textContent = data.left ? age(data.oldest_age_s) : "—";
  pick();
}

function pick() {
  // Items grouped by proposed reading, the biggest group first (one glance
  // checks them all); postponed items last. Each group is a screen: Enter
  // confirms the group the focused item is in.
  const groups = new Map();
  for (const item of queue.slice(0, SHOWN)) {
    const key = later.has(item.id) ? "\u0000later" : item.proposed;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(item);
  }
  const keys = [...groups.keys()].sort((a, b) =>
    (a === "\u0000later") - (b === "\u0000later") || groups.get(b).length - groups.get(a).length || (a < b ? -1 : 1));
  render(keys.map((key) => ({ key, items: groups.get(key) })));
}

function title(key, n) {
  if (key === "\u0000later") return `postponed (${n})`;
  return key === "" ? `read as nothing (${n})` : `read as “${key}” (${n})`;
}

function render(groups) {
  const grid = $("grid");
  grid.replaceChildren();
  screen = [];
  for (const [g, group] of groups.entries()) {
    const section = document.createElement("section");
    section.className = "group";
    const h = document.createElement("h2");
    h.textContent = title(group.key, group.items.length);
    const cells = document.createElement("div");
    cells.className = "cells";
    section.append(h, cells);
    grid.append(section);
    for (const item of group.items) {
      const s = { item, group: g, answer: item.proposed, typing: false, unreadable: false, postponed: false, el: null };
      const i = screen.length;
      const el = document.createElement("div");
      el.className = "item";
      el.setAttribute("role", "gridcell");
      el.dataset.id = item.id;
      const img = document.createElement("img");
      img.src = `/api/items/${encodeURIComponent(item.id)}/crop.png`;
      img.alt = `the digits read from ${item.name}`;
      img.loading = "lazy";
      const answer = document.createElement("div");
      answer.className = "answer";
      const conf = document.createElement("div");
      conf.className = "conf";
      const digits = (ds) => ds.map((d) => `${d.digit}: ${d.confidence.toFixed(2)}`).join("  ");
      conf.textContent = item.digits.length ? digits(item.digits)
        : (item.confidence === null ? "" : `confidence ${item.confidence.toFixed(2)}`);
      if (!item.digits.length) {  // a CSV results line carries no per-digit confidences: ask the server
        fetch(`/api/items/${encodeURIComponent(item.id)}/reading.json`, { credentials: "same-origin" })
          .then((r) => (r.ok ? r.json() : null))
          .then((r) => { if (r && r.digits.length) conf.textContent = digits(r.digits); })
          .catch(() => {});
      }
      const meta = document.createElement("div");
      meta.className = "meta";
      meta.textContent = `${item.name} · ${item.reason || "low confidence"} · ${age(item.age_s)}`;
      el.append(img, answer, conf, meta);
      el.addEventListener("click", () => { focus = i; paint(); });
      cells.append(el);
      s.el = el;
      screen.push(s);
    }
  }
  $("empty").hidden = screen.length > 0;
  focus = 0;
  paint();
}

function paint() {
  const current = screen[focus] ? screen[focus].group : -1;
  for (const [i, s] of screen.entries()) {
    s.el.classList.toggle("focus", i === focus);
    s.el.classList.toggle("current", s.group === current);
    s.el.classList.toggle("postponed", s.postponed);
    s.el.classList.toggle("unreadable", s.unreadable);
    const a = s.el.querySelector(".answer");
    a.textContent = s.unreadable ? "unreadable" : (s.answer || "·");
    a.classList.toggle("changed", !s.unreadable && s.answer !== s.item.proposed);
  }
  const f = screen[focus];
  if (f) f.el.scrollIntoView({ block: "nearest" });
}

function columns() {
  // Items per row in the focused item's group, from the layout.
  const f = screen[focus];
  if (!f) return 1;
  const row = screen.filter((s) => s.group === f.group && s.el.offsetTop === f.el.offsetTop);
  return Math.max(1, row.length);
}

function showPage(on) {
  const f = screen[focus];
  $("pageview").hidden = !on || !f;
  if (on && f) {
    $("pageimg").src = `/api/items/${encodeURIComponent(f.item.id)}/page.png`;
    $("pagename").textContent = f.item.name;
  }
}

async function confirmScreen() {
  if (busy) return;
  busy = true;
  const who = $("reviewer").value;
  localStorage.setItem("digitwatch-reviewer", who);
  let done = 0, taken = 0, failed = 0;
  const current = screen[focus] ? screen[focus].group : -1;
  for (const s of screen.filter((x) => x.group === current)) {
    if (s.postponed) { later.add(s.item.id); continue; }
    if (!s.unreadable && !s.answer) { later.add(s.item.id); continue; }
    const r = await fetch(`/api/items/${encodeURIComponent(s.item.id)}/decision`, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ text: s.answer, unreadable: s.unreadable, reviewer: who }),
    });
    if (r.status === 200) done += 1; else if (r.status === 409) taken += 1; else failed += 1;
  }
  say(`${done} decided` + (taken ? `, ${taken} already decided by someone else` : "") +
      (failed ? `, ${failed} not committed (try again)` : ""));
  busy = false;
  await load();
}

document.addEventListener("keydown", (e) => {
  if (e.target instanceof HTMLInputElement) { if (e.key === "Enter") e.target.blur(); return; }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (!$("pageview").hidden) { if (e.key === "Escape" || e.key === "p") { showPage(false); e.preventDefault(); } return; }
  const s = screen[focus];
  if (e.key === "Enter") { e.preventDefault(); confirmScreen(); return; }
  if (!s) return;
  const cols = columns();
  if (e.key === "ArrowRight") focus = Math.min(screen.length - 1, focus + 1);
  else if (e.key === "ArrowLeft") focus = Math.max(0, focus - 1);
  else if (e.key === "ArrowDown") focus = Math.min(screen.length - 1, focus + cols);
  else if (e.key === "ArrowUp") focus = Math.max(0, focus - cols);
  else if (/^[0-9]$/.test(e.key)) {
    s.answer = s.typing ? s.answer + e.key : e.key;
    s.typing = true; s.unreadable = false; s.postponed = false;
  } else if (e.key === "Backspace") { s.answer = s.answer.slice(0, -1); s.typing = true; }
  else if (e.key === "x" || e.key === "X") { s.unreadable = !s.unreadable; s.postponed = false; }
  else if (e.key === " ") s.postponed = !s.postponed;
  else if (e.key === "p") { showPage(true); }
  else return;
  e.preventDefault();
  paint();
});

$("reviewer").value = localStorage.getItem("digitwatch-reviewer") || "";
load();
// New files arrive while people work: refresh, but never under someone's
// fingers (nothing typed or marked, and no key for a while): a page rebuilt
// between looking and typing would put the answer on another file.
let lastKey = 0;
document.addEventListener("keydown", () => { lastKey = Date.now(); }, true);
setInterval(() => {
  const idle = Date.now() - lastKey > IDLE_BEFORE_REFRESH_MS;
  if (!busy && idle && screen.every((s) => !s.typing && !s.postponed && !s.unreadable)) load();
}, 15000);
