"use strict";
// The search page: one form, POST /search as multipart, results drawn with textContent only (data is never HTML).

const $ = (id) => document.getElementById(id);
const state = { indexes: [], image: null, imageUrl: null };

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function getJson(response) {
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON: described below */ }
  if (!response.ok) {
    throw new Error(body && body.error ? body.error : `the server answered ${response.status} ${response.statusText}`);
  }
  return body;
}

function currentIndex() {
  return state.indexes.find((x) => x.name === $("index").value);
}

function showIndex() {
  const index = currentIndex();
  if (!index) return;
  const enc = index.encoder;
  $("about").textContent = `${index.count.toLocaleString()} items · ${enc.name} (${enc.family}, dim ${enc.dim}) · `
    + `${index.index_kind || "exact"}${index.search_params ? " " + index.search_params : ""}`;
  const fusion = $("fusion");
  fusion.replaceChildren();
  for (const mode of index.fusion_modes) fusion.append(new Option(mode, mode, false, mode === index.fusion_default));
  $("fusion-label").hidden = index.fusion_modes.length < 2;
  const columns = Object.entries(index.columns).filter(([name]) => name !== "embedding");
  $("columns").textContent = "filter columns: " + columns.map(([name, type]) => `${name} ${type}`).join(", ");
}

function setImage(blob) {
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.image = blob;
  state.imageUrl = blob ? URL.createObjectURL(blob) : null;
  $("preview").hidden = !blob;
  $("clear-image").hidden = !blob;
  if (blob) $("preview").src = state.imageUrl; else $("preview").removeAttribute("src");
  $("file").value = "";
}

function card(hit) {
  const li = document.createElement("li");
  li.className = "hit";
  li.dataset.rank = hit.rank;
  li.dataset.id = hit.id;
  if (hit.image_url) {
    const img = document.createElement("img");
    img.className = "thumb";
    img.loading = "lazy";
    img.alt = hit.id;
    img.title = "search with this image";
    img.src = hit.image_url + "?size=256";
    img.addEventListener("click", () => searchWithItem(hit));
    li.append(img);
  } else {
    const text = document.createElement("div");
    text.className = "textonly";
    text.textContent = hit.text || "";
    li.append(text);
  }
  const head = document.createElement("div");
  head.className = "head";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = `#${hit.rank}`;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(4);
  head.append(rank, score);
  const id = document.createElement("div");
  id.className = "id";
  id.textContent = hit.id;
  li.append(head, id);
  if (hit.image_url && hit.text) {
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = hit.text;
    li.append(caption);
  }
  const skip = new Set(["rank", "score", "id", "row", "image", "text", "image_url"]);
  const dl = document.createElement("dl");
  for (const [key, value] of Object.entries(hit)) {
    if (skip.has(key) || value === null || value === undefined) continue;
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
    dl.append(dt, dd);
  }
  li.append(dl);
  return li;
}

async function search() {
  const form = new FormData();
  form.append("index", $("index").value);
  form.append("k", $("k").value || "10");
  if ($("text").value.trim()) form.append("text", $("text").value);
  if ($("where").value.trim()) form.append("where", $("where").value);
  if (!$("fusion-label").hidden && $("fusion").value) form.append("fusion", $("fusion").value);
  if (state.image) form.append("image", state.image, state.image.name || "query-image");
  $("search").disabled = true;
  $("status").textContent = "searching…";
  try {
    const answer = await getJson(await fetch("/search", { method: "POST", body: form }));
    showError("");
    $("results").replaceChildren(...answer.hits.map(card));
    const t = answer.timings_ms;
    $("status").textContent = `${answer.hits.length} results from ${answer.index} in ${t.total.toFixed(1)} ms `
      + `(encode ${t.encode.toFixed(1)}, search ${t.search.toFixed(1)})`;
  } catch (e) {
    showError(e.message);
    $("status").textContent = "";
    $("results").replaceChildren();
  } finally {
    $("search").disabled = false;
  }
}

async function searchWithItem(hit) {
  try {
    const response = await fetch(hit.image_url);
    if (!response.ok) await getJson(response);
    const blob = await response.blob();
    setImage(new File([blob], hit.id, { type: blob.type }));
    $("text").value = "";
    await search();
  } catch (e) {
    showError(e.message);
  }
}

function takeFile(file) {
  if (!file) return;
  setImage(file);
}

async function start() {
  $("query").addEventListener("submit", (event) => { event.preventDefault(); search(); });
  $("file").addEventListener("change", () => takeFile($("file").files[0]));
  $("clear-image").addEventListener("click", () => setImage(null));
  $("index").addEventListener("change", showIndex);
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    takeFile(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const file = [...event.clipboardData.files].find((f) => f.type.startsWith("image/"));
    if (file) takeFile(file);
  });
  try {
    state.indexes = (await getJson(await fetch("/indexes"))).indexes;
    for (const index of state.indexes) $("index").append(new Option(index.name, index.name));
    showIndex();
  } catch (e) {
    showError(`cannot list the indexes: ${e.message}`);
  }
}

start();
