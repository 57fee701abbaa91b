// The genius search page: builds a query (text, image or both), POSTs it to /api/search and
// draws the hits. Plain DOM code, no framework and no build step; every string from the
// service goes in through textContent (never innerHTML).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, maxUpload: 20 * 1024 * 1024, searches: 0, pending: null };

function setImage(file) {
  state.image = file;
  const preview = $("preview");
  if (!file) {
    preview.hidden = true;
    $("drop-empty").hidden = false;
    $("preview-img").removeAttribute("src");
    $("image-input").value = "";
    return;
  }
  const img = $("preview-img");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.classList.remove("broken");
  img.src = URL.createObjectURL(file);
  $("preview-name").textContent = `${file.name || "image"} (${formatBytes(file.size)})`;
  preview.hidden = false;
  $("drop-empty").hidden = true;
}

function formatBytes(n) {
  if (n >= 1024 * 1024) return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  if (n >= 1024) return `${Math.round(n / 1024)} KiB`;
  return `${n} bytes`;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setBusy(busy) {
  $("submit").disabled = busy;
  $("submit").textContent = busy ? "Searching…" : "Search";
  $("results").setAttribute("aria-busy", String(busy));
}

function finish(stateName) {
  state.searches += 1;
  document.body.dataset.state = stateName;
  document.body.dataset.searches = String(state.searches);
}

async function search() {
  const text = $("text").value;
  if (!text.trim() && !state.image) {
    showError("Type some text or add an image to search with.");
    finish("error");
    return;
  }
  if (state.image && state.image.size > state.maxUpload) {
    showError(`The image is ${formatBytes(state.image.size)}: images up to ${formatBytes(state.maxUpload)} are accepted.`);
    finish("error");
    return;
  }
  const form = new FormData();
  form.append("text", text);
  if (state.image) form.append("image", state.image, state.image.name || "image");
  form.append("k", $("k").value);
  form.append("beam", $("beam").value);
  form.append("rerank", $("rerank").checked ? "1" : "0");
  for (const box of document.querySelectorAll('input[name="modality"]:checked')) form.append("modality", box.value);

  if (state.pending) state.pending.abort(); // the newest query wins
  const pending = new AbortController();
  state.pending = pending;
  document.body.dataset.state = "loading";
  setBusy(true);
  let reply, body;
  try {
    reply = await fetch("/api/search", { method: "POST", body: form, signal: pending.signal });
    body = await reply.json().catch(() => null);
  } catch (err) {
    if (err.name === "AbortError") return;
    setBusy(false);
    showError("Cannot reach the UI server: is `genius ui` still running?");
    finish("error");
    return;
  }
  if (state.pending !== pending) return;
  state.pending = null;
  setBusy(false);
  if (!reply.ok || !body || body.error) {
    showError(body && body.error ? body.error : `The UI server answered HTTP ${reply.status}.`);
    finish("error");
    return;
  }
  showError("");
  render(body);
  finish("done");
}

function render(body) {
  const partial = $("partial");
  if (body.partial) {
    const missing = (body.missing_shards || []).join(", ") || "some";
    partial.textContent = `Partial results: shards ${missing} did not answer, so their items are missing from this list.`;
    partial.hidden = false;
  } else {
    partial.hidden = true;
  }
  const n = body.hits.length;
  $("status").textContent = `index ${body.version || "?"} · ${n} hit${n === 1 ? "" : "s"} · ${Math.round(body.milliseconds || 0)} ms`;
  const grid = $("results");
  grid.replaceChildren(...body.hits.map(card));
  if (!n) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "No hits. Try other words, another image, or more target modalities.";
    grid.append(empty);
  }
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function card(hit, rank) {
  const article = el("article", `hit ${hit.modality}`);
  article.dataset.key = hit.key;
  article.dataset.modality = hit.modality;

  const media = el("div", hit.thumbnail_url ? "media" : "media textonly");
  if (hit.thumbnail_url) {
    const img = el("img", "thumb");
    img.alt = hit.key;
    img.loading = "lazy";
    img.src = hit.thumbnail_url;
    // Tiny images (e.g. 28 px Fashion-MNIST) stay sharp when scaled up.
    img.addEventListener("load", () => { if (img.naturalWidth < 96) img.classList.add("pixelated"); });
    img.addEventListener("error", () => img.classList.add("broken"));
    media.append(img);
  }
  if (hit.text) media.append(el("p", "snippet", hit.text));
  if (!hit.thumbnail_url && !hit.text) media.append(el("p", "nomedia", "no picture or text: the index stores none for this item, or the UI has no --shards"));
  article.append(media);

  const line = el("div", "line");
  line.append(el("span", "rank", `#${rank + 1}`), el("span", `badge ${hit.modality}`, hit.modality.replace("_", "+")),
              el("span", "score", hit.score.toFixed(4)));
  const key = el("div", "key", hit.key);
  key.title = hit.key;
  article.append(line, key, el("div", "id", `id ${hit.id}`));
  article.title = `item ${hit.item}${hit.source ? ` · ${hit.source}` : ""}`;

  const meta = metadataList(hit.metadata);
  if (meta) article.append(meta);

  if (hit.image_url || hit.text) {
    article.classList.add("clickable");
    article.tabIndex = 0;
    article.setAttribute("role", "button");
    article.setAttribute("aria-label", `more like ${hit.key}`);
    article.title += " · click: more like this";
    article.addEventListener("click", () => moreLikeThis(hit));
    article.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); moreLikeThis(hit); } });
  }
  return article;
}

function metadataList(metadata) {
  if (metadata === null || metadata === undefined || metadata === "") return null;
  const list = el("dl", "metadata");
  const entries = typeof metadata === "object" && !Array.isArray(metadata) ? Object.entries(metadata) : [["metadata", metadata]];
  for (const [name, value] of entries.slice(0, 6)) {
    const shown = typeof value === "object" ? JSON.stringify(value) : String(value);
    list.append(el("dt", null, name), el("dd", null, shown.length > 80 ? `${shown.slice(0, 80)}…` : shown));
  }
  return list;
}

// "More like this": the hit becomes the query (its original image and/or its text).
async function moreLikeThis(hit) {
  $("text").value = hit.text || "";
  if (hit.image_url) {
    try {
      const reply = await fetch(hit.image_url);
      if (!reply.ok) throw new Error((await reply.json().catch(() => ({}))).error || `HTTP ${reply.status}`);
      const blob = await reply.blob();
      setImage(new File([blob], `${hit.key}`, { type: blob.type }));
    } catch (err) {
      showError(`Cannot read the picture of ${hit.key}: ${err.message}`);
      finish("error");
      return;
    }
  } else {
    setImage(null);
  }
  window.scrollTo({ top: 0, behavior: "smooth" });
  search();
}

function firstImage(files) {
  for (const file of files || []) if (file) return file;
  return null;
}

function wireDropZone() {
  const drop = $("drop");
  const input = $("image-input");
  input.addEventListener("change", () => { const f = firstImage(input.files); if (f) setImage(f); });
  $("clear-image").addEventListener("click", (e) => { e.stopPropagation(); setImage(null); });
  drop.addEventListener("click", (e) => { if (e.target === drop || e.target.closest(".drop-empty")) input.click(); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  // A file dropped anywhere on the page is the query image (the browser would otherwise
  // leave the page to show the file).
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = firstImage(e.dataTransfer && e.dataTransfer.files);
    if (file) setImage(file);
  });
  // A pasted image (e.g. a screenshot) becomes the query image too.
  document.addEventListener("paste", (e) => {
    const file = firstImage(Array.from((e.clipboardData && e.clipboardData.items) || [])
      .filter((item) => item.kind === "file").map((item) => item.getAsFile()));
    if (file) setImage(file);
  });
  $("preview-img").addEventListener("error", () => $("preview-img").classList.add("broken"));
}

async function loadInfo() {
  try {
    const info = await (await fetch("/api/info")).json();
    state.maxUpload = info.max_upload_bytes || state.maxUpload;
    const pictures = info.shards ? `pictures and texts from ${info.shards} shard${info.shards === 1 ? "" : "s"}` : "no --shards: keys and metadata only";
    $("service").textContent = `search replicas at ${info.address} · ${pictures}`;
  } catch (err) {
    $("service").textContent = "cannot reach the UI server";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  wireDropZone();
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); search(); });
  $("text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); search(); } // Shift+Enter: a new line
  });
  loadInfo();
});
