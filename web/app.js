// BUS-UNet page: uploads each dropped file to the local server (one request per file, processed in turn),
// shows the result, and lets the user change model, threshold and view, or drag a box for a box-prompted mask.
// Text from files and the server is only ever set with textContent (never parsed as HTML).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const state = { config: null, cards: [], queue: Promise.resolve(), threshold: -1 };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

const num = (v, digits = 2) => (v === null || v === undefined ? "n/a" : Number(v).toFixed(digits));
const enqueue = (task) => (state.queue = state.queue.then(task, task));

async function api(path, body, tries = 5) {
  const r = await fetch(path, { method: "POST", body: body || "", headers: { "Content-Type": "application/octet-stream" } });
  if (r.status === 503 && tries > 1 && r.headers.get("Retry-After")) {  // the server is busy: wait as it asks, then again
    await new Promise((done) => setTimeout(done, 1000 * Number(r.headers.get("Retry-After"))));
    return api(path, body, tries - 1);
  }
  let data = null;
  try { data = await r.json(); } catch (e) { data = { error: `server answered ${r.status} without a result` }; }
  if (!r.ok || data.error) throw new Error(data.error || `server answered ${r.status}`);
  return data;
}

function params(extra) {
  const q = new URLSearchParams({ model: $("#model").value, backend: $("#backend").value, threshold: String(state.threshold), ...extra });
  return q.toString();
}

// ---- cards ---------------------------------------------------------------------------------------------

function newCard(file) {
  const card = { file, result: null, box: null, frame: 0, node: el("article", { class: "card busy" }) };
  card.title = el("h2", {}, file.name, el("span", { class: "status", text: "waiting" }));
  card.node.append(card.title);
  $("#results").append(card.node);
  state.cards.push(card);
  return card;
}

function setStatus(card, text, cls) {
  $(".status", card.title).textContent = text;
  card.node.className = `card ${cls || ""}`;
}

function showError(card, message) {
  setStatus(card, "not processed", "error");
  const old = $(".message", card.node);
  if (old) old.remove();
  card.node.append(el("p", { class: "message", role: "alert", text: message }));
}

function currentView(card) {
  const r = card.result;
  const view = document.querySelector("input[name=view]:checked").value;
  return (view === "uncertainty" && !r.images.uncertainty) ? "outline" : view;
}

function draw(card) {
  const img = $("img.scan", card.node);
  if (img) img.src = card.result.images[currentView(card)];
}

function factsTable(r) {
  const rows = [];
  const add = (k, v, cls) => rows.push(el("tr", {}, el("th", { text: k }), el("td", cls ? { class: cls, text: v } : { text: v })));
  add("malignancy probability", num(r.malignancy));
  if (r.p_normal !== null) add("P(normal), classification head", num(r.p_normal));
  if (r.uncertainty !== null) {
    const flag = r.review === true ? "  REVIEW" : r.review === false ? "  ok" : "  (no cut-off stored)";
    add("uncertainty", num(r.uncertainty) + flag, r.review ? "review" : "");
  } else if (r.box) add("uncertainty", "n/a for a box-prompted mask");
  add("lesion area", `${r.lesion_area_px} px (${r.lesions.length} lesion${r.lesions.length === 1 ? "" : "s"})`);
  const ps = r.pixel_size;
  add("pixel size", ps ? `${num(ps.row_mm, 4)} x ${num(ps.col_mm, 4)} mm (${ps.source})` : "unknown: sizes in pixels");
  add("mask", r.mask_source);
  add("model, threshold", `${r.model}, ${num(r.threshold)}`);
  add("image", `${r.width} x ${r.height}` + (r.n_frames > 1 ? `, frame ${r.frame} of ${r.n_frames}` : ""));
  return el("table", { class: "facts" }, ...rows);
}

function lesionList(r) {
  const list = el("ol", { class: "lesions" });
  for (const x of r.lesions.slice(0, 8)) {
    const cue = (g, key, label) => `${x[g].term} (${label} ${num(x[g][key])})`;
    const area = x.area.mm2 !== null ? `${num(x.area.mm2, 1)} mm²` : `${x.area.px} px`;
    const words = x.shape.term === x.margin.term ? `${x.shape.term}` :  // e.g. "too small to describe"
      [cue("shape", "axis_ratio", "axis ratio"), cue("orientation", "height_width_ratio", "height/width"),
        cue("margin", "convexity", "convexity")].join(", ");
    list.append(el("li", {}, el("span", { class: "size", text: `#${x.lesion}  ${x.size_text}` }), `, area ${area}`,
      el("br"), el("span", { class: "cues", text: words })));
  }
  if (r.lesions.length > 8) list.append(el("li", { text: `+${r.lesions.length - 8} more in the JSON` }));
  return list;
}

function downloads(r) {
  const blob = (text, type) => URL.createObjectURL(new Blob([text], { type }));
  const box = el("div", { class: "downloads" },
    el("a", { href: r.images.mask, download: r.files.mask, text: "mask PNG" }),
    el("a", { href: r.images.outline, download: r.files.overlay, text: "overlay PNG" }),
    el("a", { href: blob(r.csv, "text/csv"), download: `${r.stem}_predictions.csv`, text: "CSV row" }),
    el("a", { href: blob(JSON.stringify(r.report, null, 1), "application/json"), download: r.files.lesions_json, text: "JSON" }));
  // DICOM uploads: the Segmentation and measurement report (dicom_out.py), for OHIF, 3D Slicer or a PACS
  if (r.dicom && r.dicom.seg) {
    box.append(el("a", { href: r.dicom.seg, download: r.dicom.seg_file, text: "DICOM SEG", title: "carries the scan's patient and study identification" }),
      el("a", { href: r.dicom.sr, download: r.dicom.sr_file, text: "DICOM SR", title: "carries the scan's patient and study identification" }));
  } else if (r.dicom && r.dicom.error) {
    box.append(el("span", { class: "small", text: `no DICOM SEG/SR: ${r.dicom.error}` }));
  }
  return box;
}

function frameChooser(card) {
  const r = card.result;
  if (r.n_frames <= 1) return null;
  const input = el("input", { type: "number", min: "0", max: String(r.n_frames - 1), value: String(r.frame) });
  input.addEventListener("change", () => { card.frame = Number(input.value) || 0; card.box = null; enqueue(() => upload(card)); });
  return el("p", { class: "frames" }, `Frame (0 to ${r.n_frames - 1}): `, input);
}

function render(card) {
  const r = card.result;
  for (const n of card.node.querySelectorAll(".body, .message")) n.remove();
  const scan = el("div", { class: "scanbox" }, el("img", { class: "scan", alt: `result for ${r.name}`, draggable: "false" }));
  if (r.box) {  // the box that made this mask, drawn where it was dragged
    const [x0, y0, x1, y1] = r.box, pct = (v, n) => `${(100 * v) / n}%`;
    const rect = el("div", { class: "rect" });
    Object.assign(rect.style, { left: pct(x0, r.width), top: pct(y0, r.height), width: pct(x1 - x0, r.width),
      height: pct(y1 - y0, r.height) });
    scan.append(rect);
  }
  const label = el("p", { class: `label ${r.label}` }, r.label, el("span", { class: "conf", text: `  confidence ${num(r.confidence)}` }));
  const side = el("div", { class: "readout" }, label, factsTable(r), lesionList(r), frameChooser(card),
    el("p", { class: "note", text: r.note }), downloads(r));
  if (r.box) {
    const back = el("button", { type: "button", class: "unbox", text: "Back to the model's mask" });
    back.addEventListener("click", () => { card.box = null; enqueue(() => refresh(card)); });
    side.append(back);
  }
  card.node.append(el("div", { class: "body" }, scan, side));
  setStatus(card, r.box ? "box prompt" : "done", "done");
  if (state.threshold < 0) { state.modelThreshold = r.model_threshold; $("#threshold").value = r.model_threshold; showThreshold(); }
  draw(card);
  if (state.config.box_prompt) attachBoxDrawing(card, scan);
}

// ---- box drawing ---------------------------------------------------------------------------------------

function attachBoxDrawing(card, scan) {
  const img = $("img", scan);
  let start = null, rect = null;
  const local = (e) => {
    const b = img.getBoundingClientRect();
    return { x: Math.min(Math.max(e.clientX - b.left, 0), b.width), y: Math.min(Math.max(e.clientY - b.top, 0), b.height) };
  };
  scan.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    start = local(e);
    rect = el("div", { class: "rect" });
    scan.append(rect);
    scan.setPointerCapture(e.pointerId);
    e.preventDefault();
  });
  scan.addEventListener("pointermove", (e) => {
    if (!start) return;
    const p = local(e);
    Object.assign(rect.style, { left: `${Math.min(p.x, start.x)}px`, top: `${Math.min(p.y, start.y)}px`,
      width: `${Math.abs(p.x - start.x)}px`, height: `${Math.abs(p.y - start.y)}px` });
  });
  scan.addEventListener("pointerup", (e) => {
    if (!start) return;
    const p = local(e), s = start;
    start = null;
    if (Math.abs(p.x - s.x) < 5 || Math.abs(p.y - s.y) < 5) { rect.remove(); return; }
    const k = card.result.width / img.getBoundingClientRect().width;  // full-size pixels (the picture may be smaller)
    card.box = [Math.min(s.x, p.x), Math.min(s.y, p.y), Math.max(s.x, p.x), Math.max(s.y, p.y)].map((v) => Math.round(v * k));
    enqueue(() => refresh(card));
  });
}

// ---- requests ------------------------------------------------------------------------------------------

async function upload(card) {
  setStatus(card, "working...", "busy");
  try {
    const extra = { name: card.file.name, pixel_mm: $("#pixel-mm").value, frame: String(card.frame) };
    card.result = await api(`/api/predict?${params(extra)}`, card.file);
    render(card);
  } catch (e) {
    showError(card, e.message);
  }
}

async function refresh(card) {
  if (!card.result) return;
  setStatus(card, "working...", "busy");
  try {
    const extra = { id: card.result.id };
    if (card.box) extra.box = card.box.join(",");
    card.result = await api(`/api/${card.box ? "box" : "update"}?${params(extra)}`);
    render(card);
  } catch (e) {
    const r = card.result;
    render(card);
    showError(card, e.message);
    card.result = r;
  }
}

function addFiles(files) {
  const cfg = state.config;
  [...files].forEach((file, i) => {
    const card = newCard(file);
    if (i >= cfg.max_files) {
      showError(card, `${file.name}: not sent: at most ${cfg.max_files} files at once (setting max_files); drop it again after these`);
    } else if (file.size > cfg.max_upload_mb * 1024 * 1024) {
      showError(card, `${file.name}: ${(file.size / 1e6).toFixed(1)} MB is over the limit of ${cfg.max_upload_mb} MB (setting max_upload_mb)`);
    } else {
      enqueue(() => upload(card));
    }
  });
}

// ---- controls ------------------------------------------------------------------------------------------

function refreshAll() {
  for (const card of state.cards) if (card.result) enqueue(() => refresh(card));
}

function showThreshold() {
  const own = state.modelThreshold === undefined ? "" : `${Number(state.modelThreshold).toFixed(2)} `;
  $("#thr-out").textContent = state.threshold < 0 ? `${own}(model's)` : Number(state.threshold).toFixed(2);
}

function setupControls() {
  const drop = $("#drop"), input = $("#files");
  $("#pick").addEventListener("click", () => input.click());
  input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addFiles(e.dataTransfer.files); });
  const thr = $("#threshold");
  thr.addEventListener("input", () => { state.threshold = Number(thr.value); showThreshold(); });
  thr.addEventListener("change", refreshAll);
  $("#thr-reset").addEventListener("click", () => { state.threshold = -1; showThreshold(); refreshAll(); });
  $("#model").addEventListener("change", () => { state.threshold = -1; showThreshold(); showCard(); refreshAll(); });
  $("#backend").addEventListener("change", refreshAll);
  for (const r of document.querySelectorAll("input[name=view]")) r.addEventListener("change", () => state.cards.forEach((c) => c.result && draw(c)));
}

function showCard() {
  // the chosen model's card (checkpoints/<model>.md), served by app.py at /card?model=<name>
  const name = $("#model").value;
  const has = (state.config.cards || []).includes(name);
  $("#card").href = `/card?${new URLSearchParams({ model: name })}`;
  $("#card").classList.toggle("off", !has);
}

async function init() {
  const cfg = await (await fetch("/api/config")).json();
  state.config = cfg;
  for (const name of cfg.models) $("#model").append(el("option", { value: name, text: name }));
  $("#model").value = cfg.model;
  for (const name of cfg.backends || []) $("#backend").append(el("option", { value: name, text: name }));
  $("#backend").value = cfg.backend;
  showCard();
  if (cfg.pixel_mm) $("#pixel-mm").value = cfg.pixel_mm;
  $("#limits").textContent = `${cfg.kinds}; up to ${cfg.max_files} files at once, ${cfg.max_upload_mb} MB and ` +
    `${(cfg.max_pixels / 1e6).toFixed(0)} megapixels each.`;
  if (cfg.box_prompt) $("#box-model").textContent = cfg.box_model; else $("#box-hint").classList.add("off");
  if (!cfg.uncertainty) $("input[name=view][value=uncertainty]").disabled = true;
  showThreshold();
  setupControls();
  document.body.dataset.ready = "1";
}

init();
