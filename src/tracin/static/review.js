// tracin review: keyboard and click decisions, posted with the page's token; no network asset.
"use strict";
(function () {
  const token = document.querySelector('meta[name="tracin-token"]').content;
  const list = document.getElementById("list");
  const page = document.getElementById("page");
  const status = document.getElementById("status");
  const rows = list ? Array.from(list.querySelectorAll("tr.item")) : [];
  let sel = list ? Number(list.dataset.selected || 0) : 0;

  function say(text) { if (status) status.textContent = text; }

  function select(i) {
    if (!rows.length) return;
    sel = Math.max(0, Math.min(rows.length - 1, i));
    rows.forEach((r, j) => r.classList.toggle("selected", j === sel));
    rows[sel].scrollIntoView({ block: rows.length > 1 ? "center" : "nearest" });
    const url = new URL(window.location.href);
    if (list.dataset.next !== undefined && !page) {
      url.searchParams.set("sel", String(sel));
      history.replaceState(null, "", url.toString());
    }
  }

  function show(state) {
    const tr = rows.find((r) => Number(r.dataset.row) === state.row);
    if (!tr) return;
    tr.classList.remove("keep", "remove", "relabel");
    if (state.decision) tr.classList.add(state.decision);
    tr.querySelector(".badge").textContent = state.badge;
  }

  function progress(decided) {
    const el = document.getElementById("progress");
    if (el) el.textContent = decided + " of " + el.dataset.total + " rows decided";
  }

  async function decide(row, decision, label) {
    try {
      const res = await fetch("/api/decision", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-Tracin-Token": token },
        body: JSON.stringify({ row: row, decision: decision, label: label }),
      });
      const body = await res.json();
      if (!res.ok) { say(body.error || ("error " + res.status)); return false; }
      show(body);
      say("");
      refresh();
      return true;
    } catch (err) {
      say("not saved: " + err);
      return false;
    }
  }

  async function refresh() {
    if (!rows.length) return;
    try {
      const ids = rows.map((r) => r.dataset.row).join(",");
      const res = await fetch("/api/decisions?rows=" + ids, { cache: "no-store" });
      if (!res.ok) return;
      const body = await res.json();
      body.rows.forEach(show);
      progress(body.decided);
    } catch (err) { /* offline: try again later */ }
  }

  function next() {
    if (sel + 1 < rows.length) { select(sel + 1); return; }
    const url = list && list.dataset.next;
    if (url) window.location.href = url;
    else if (page && page.dataset.next) window.location.href = page.dataset.next;
  }

  function prev() {
    if (sel > 0) { select(sel - 1); return; }
    const url = list && list.dataset.prev;
    if (url) window.location.href = url;
    else if (page && page.dataset.prev) window.location.href = page.dataset.prev;
  }

  async function act(decision, label) {
    if (!rows.length) return;
    const row = Number(rows[sel].dataset.row);
    if (await decide(row, decision, label) && decision !== "clear") next();
  }

  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const tag = (ev.target && ev.target.tagName) || "";
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA") return;
    const key = ev.key;
    const classes = list ? Number(list.dataset.classes || 0) : 0;
    if (key === "j" || key === "ArrowDown") next();
    else if (key === "k" || key === "ArrowUp") prev();
    else if (key === "a") act("keep", null);
    else if (key === "x" || key === "Delete") act("remove", null);
    else if (key === "u") act("clear", null);
    else if (/^[0-9]$/.test(key)) {
      if (classes && Number(key) >= classes) { say("no class " + key); return; }
      act("relabel", Number(key));
    } else if (key === "Enter" && rows.length && rows[sel].dataset.href) {
      window.location.href = rows[sel].dataset.href;
    } else if (key === "b" || key === "Escape") {
      if (page && page.dataset.back) window.location.href = page.dataset.back;
    } else if (key === "n") {
      const a = document.getElementById("next"); if (a) window.location.href = a.href;
    } else if (key === "p") {
      const a = document.getElementById("prev"); if (a) window.location.href = a.href;
    } else return;
    ev.preventDefault();
  });

  rows.forEach((tr, i) => {
    tr.addEventListener("click", () => select(i));
    tr.querySelectorAll("button.do").forEach((b) => b.addEventListener("click", (ev) => {
      ev.stopPropagation();
      select(i);
      decide(Number(tr.dataset.row), b.dataset.decision, null);
    }));
    const menu = tr.querySelector("select.relabel");
    if (menu) menu.addEventListener("change", () => {
      if (menu.value === "") return;
      select(i);
      decide(Number(tr.dataset.row), "relabel", Number(menu.value));
      menu.value = "";
      menu.blur();
    });
  });

  select(sel);
  window.addEventListener("focus", refresh);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  setInterval(refresh, 4000);
})();
