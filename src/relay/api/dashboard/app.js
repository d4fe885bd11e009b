// relay's dashboard. Everything shown comes from GET /v1/stats and GET /v1/emails/{id}.
// Mail's words (remote replies, addresses, subjects) are attacker-controlled: they are only
// ever set as textContent, never parsed as HTML. The key lives in sessionStorage and goes out
// as a Bearer header (no cookie, so no CSRF); the page's CSP forbids inline script.
"use strict";

const KEY = "relay.dashboard.key";
const REFRESH_MS = 10000;
const SVG = "http://www.w3.org/2000/svg";
let timer = null;

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function show(node, on) { node.hidden = !on; }

function say(node, text) { node.textContent = text || ""; show(node, Boolean(text)); }

function when(iso) { return iso ? iso.replace("T", " ").replace(/\.\d+Z$/, "") : ""; }

function fill(tableId, rows, empty) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren();
  if (!rows.length) {
    const tr = el("tr", null, "empty");
    const td = el("td", empty || "nothing");
    td.colSpan = $(tableId).tHead.rows[0].cells.length;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const cells of rows) {
    const tr = el("tr");
    for (const c of cells) tr.append(c instanceof Node ? c : el("td", c));
    body.append(tr);
  }
}

function num(n) { return el("td", n, "num"); }

// "550 5.1.1 text", without saying the enhanced code twice when the text starts with it
function replyText(code, enhanced, text) {
  const said = text || "";
  const status = enhanced && !said.startsWith(enhanced) ? enhanced : null;
  return [code, status, said].filter(Boolean).join(" ");
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function call(path, key) {
  let resp;
  try {
    resp = await fetch(path, {headers: {Authorization: "Bearer " + key}, cache: "no-store"});
  } catch (e) {
    throw new HttpError(0, "relay did not answer; is it running?");
  }
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) {
    const said = body && body.error && body.error.message;
    throw new HttpError(resp.status, said || "relay answered " + resp.status);
  }
  return body;
}

function loginMessage(err) {
  if (err.status === 401) return "That key is not valid (or was revoked). Check it and try again.";
  if (err.status === 403) return "This key may not use the dashboard: " + err.message;
  return err.message;
}

// -- the board ------------------------------------------------------------------------------

function renderQueue(queue) {
  fill("queue", Object.entries(queue).map(([state, n]) => [el("td", state), num(n)]));
}

function renderDestinations(dests) {
  fill("destinations", dests.map((d) => {
    const q = d.counts.queued || 0, df = d.counts.deferred || 0;
    return [el("td", d.domain), num(q), num(df), num(d.total - q - df), num(d.total)];
  }), "the queue is empty");
}

function messageLink(id) {
  const td = el("td");
  const a = el("a", id, "msg");
  a.href = "#message=" + encodeURIComponent(id);
  a.addEventListener("click", (ev) => { ev.preventDefault(); openMessage(id); });
  td.append(a);
  return td;
}

function renderFailures(failures) {
  fill("failures", failures.map((f) => [
    el("td", when(f.at), "nowrap"), messageLink(f.messageId), el("td", f.recipient),
    el("td", f.outcome, "tag " + f.outcome), el("td", [f.code, f.enhanced].filter(Boolean).join(" ")),
    el("td", f.reply, "reply"),
  ]), "no failures in the last 24 hours");
}

function renderReasons(reasons) {
  fill("reasons", reasons.map((r) => [el("td", r.reason), num(r.count)]), "no bounces");
}

function renderWebhooks(w) {
  $("wh-pending").textContent = String(w.pending);
  $("wh-oldest").textContent = w.oldestPendingAt ? "oldest waiting since " + when(w.oldestPendingAt) : "";
  fill("endpoints", w.failingEndpoints.map((e) => [
    el("td", e.url, "reply"), el("td", e.enabled ? "failing" : "disabled", e.enabled ? "tag deferred" : "tag bounced"),
    el("td", when(e.failingSince), "nowrap"), num(e.pending),
  ]), "all endpoints healthy");
}

const SERIES = [["delivered", "delivered"], ["deferred", "deferred"], ["bounced", "bounced"],
                ["expired", "bounced"]];

function renderChart(hours) {
  const W = 960, H = 260, left = 44, right = 10, top = 14, bottom = 40;
  const plotW = W - left - right, plotH = H - top - bottom;
  const totals = hours.map((h) => SERIES.reduce((s, [k]) => s + (h[k] || 0), 0));
  const max = Math.max(1, ...totals);
  const step = plotW / hours.length, barW = Math.max(2, step * 0.7);
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img",
                           "aria-label": "delivery outcomes per hour, last 24 hours"});
  for (const frac of [0, 0.5, 1]) {
    const y = top + plotH - frac * plotH;
    root.append(svg("line", {x1: left, x2: W - right, y1: y, y2: y, class: "grid"}));
    root.append(svg("text", {x: left - 6, y: y + 4, class: "axis", "text-anchor": "end"},
                    Math.round(frac * max)));
  }
  hours.forEach((h, i) => {
    let y = top + plotH;
    const x = left + i * step + (step - barW) / 2;
    for (const [key, cls] of SERIES) {
      const n = h[key] || 0;
      if (!n) continue;
      const height = (n / max) * plotH;
      y -= height;
      const rect = svg("rect", {x: x.toFixed(1), y: y.toFixed(1), width: barW.toFixed(1),
                                height: Math.max(height, 1).toFixed(1), class: "bar " + cls,
                                "data-kind": key, "data-count": n});
      rect.append(svg("title", {}, `${when(h.hour).slice(11, 16)} UTC: ${n} ${key}`));
      root.append(rect);
    }
    if (i % 3 === 0 || i === hours.length - 1) {
      root.append(svg("text", {x: (left + i * step + step / 2).toFixed(1), y: H - bottom + 16,
                               class: "axis", "text-anchor": "middle"}, when(h.hour).slice(11, 16)));
    }
  });
  let lx = left;
  for (const [label, cls] of [["delivered", "delivered"], ["deferred", "deferred"],
                               ["bounced / expired", "bounced"]]) {
    root.append(svg("rect", {x: lx, y: H - 14, width: 10, height: 10, class: "bar " + cls}));
    root.append(svg("text", {x: lx + 14, y: H - 5, class: "legend"}, label));
    lx += 24 + label.length * 7;
  }
  const sum = totals.reduce((a, b) => a + b, 0);
  root.append(svg("text", {x: W - right, y: H - 5, class: "legend", "text-anchor": "end"},
                  `${sum} outcomes in 24 h`));
  $("chart").replaceChildren(root);
}

function render(stats) {
  renderQueue(stats.queue);
  renderDestinations(stats.destinations);
  renderChart(stats.outcomes);
  renderFailures(stats.failures);
  renderReasons(stats.bounceReasons);
  renderWebhooks(stats.webhooks);
  $("updated").textContent = "updated " + when(stats.at) + " UTC";
}

async function refresh() {
  const key = sessionStorage.getItem(KEY);
  if (!key) return;
  try {
    render(await call("/v1/stats", key));
    say($("board-error"), "");
  } catch (err) {
    if (err.status === 401 || err.status === 403) { logout(loginMessage(err)); return; }
    say($("board-error"), "Could not refresh: " + err.message);
  }
}

// -- one message ----------------------------------------------------------------------------

function summaryItem(list, term, value) {
  list.append(el("dt", term), el("dd", value));
}

async function openMessage(id) {
  const key = sessionStorage.getItem(KEY);
  if (!key) return;
  $("msg-id").textContent = id;
  show($("board"), false);
  show($("message"), true);
  say($("msg-error"), "");
  $("msg-summary").replaceChildren();
  for (const t of ["msg-recipients", "msg-attempts", "msg-events"]) fill(t, [], "loading…");
  let m;
  try {
    m = await call("/v1/emails/" + encodeURIComponent(id), key);
  } catch (err) {
    const hint = err.status === 403 ? " (the message view needs the emails:read scope too)" : "";
    say($("msg-error"), err.message + hint);
    for (const t of ["msg-recipients", "msg-attempts", "msg-events"]) fill(t, [], "—");
    return;
  }
  const dl = $("msg-summary");
  summaryItem(dl, "Status", m.status);
  summaryItem(dl, "Created", when(m.createdAt) + " UTC");
  summaryItem(dl, "From", m.headerFrom || m.from);
  summaryItem(dl, "Subject", m.subject);
  summaryItem(dl, "Size", m.size + " octets");
  fill("msg-recipients", m.recipients.map((r) => [
    el("td", r.email), el("td", r.status, "tag " + r.status), num(r.attempts),
    el("td", r.lastReply || "", "reply")]));
  fill("msg-attempts", (m.attempts || []).map((a) => [
    el("td", when(a.at), "nowrap"), el("td", a.email || a.recipient),
    el("td", [a.mxHost, a.ip].filter(Boolean).join(" ")), el("td", a.tls || "none"),
    el("td", a.outcome, "tag " + a.outcome),
    el("td", replyText(a.code, a.enhanced, a.reply), "reply")]),
    "no attempts yet");
  fill("msg-events", (m.events || []).map((e) => {
    const d = e.data || {};
    const details = d.reply || d.diagnostic || d.reason || d.error || "";
    return [el("td", when(e.at), "nowrap"), el("td", e.type), el("td", d.email || ""),
            el("td", details, "reply")];
  }), "no events");
}

function closeMessage() {
  show($("message"), false);
  show($("board"), true);
  if (location.hash) history.replaceState(null, "", location.pathname);
}

// -- logging in and out ---------------------------------------------------------------------

function start() {
  show($("login"), false);
  show($("board"), true);
  show($("logout"), true);
  clearInterval(timer);
  timer = setInterval(refresh, REFRESH_MS);
}

function logout(message) {
  sessionStorage.removeItem(KEY);
  clearInterval(timer);
  timer = null;
  for (const t of ["queue", "destinations", "failures", "reasons", "endpoints"]) {
    $(t).tBodies[0].replaceChildren();
  }
  $("chart").replaceChildren();
  $("updated").textContent = "";
  show($("board"), false);
  show($("message"), false);
  show($("logout"), false);
  show($("login"), true);
  say($("login-error"), typeof message === "string" ? message : "");
  $("key").value = "";
  $("key").focus();
}

async function login(ev) {
  ev.preventDefault();
  const key = $("key").value.trim();
  say($("login-error"), "");
  if (!key) { say($("login-error"), "Type an admin API key."); return; }
  try {
    const stats = await call("/v1/stats", key);
    sessionStorage.setItem(KEY, key);
    $("key").value = "";
    start();
    render(stats);
  } catch (err) {
    say($("login-error"), loginMessage(err));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", () => logout(""));
  $("msg-close").addEventListener("click", closeMessage);
  if (sessionStorage.getItem(KEY)) {
    start();
    refresh();
    const linked = location.hash.match(/^#message=(.+)$/);  // a link to one message
    if (linked) openMessage(decodeURIComponent(linked[1]));
  } else {
    $("key").focus();
  }
});
