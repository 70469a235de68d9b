// clipserve playground: plain ES module, no framework, no build step, no third-party requests.
// Every call goes to this server (the page's origin), with the API key typed into the page.

const KEY_STORAGE = "clipserve.apiKey";
const API_BASE = new URL("../", window.location.href); // the page lives at <server>/ui/
const LIVE_INTERVAL_MS = 3000;
const LIVE_POINTS = 40;
const MAX_LOGGED_CALLS = 30;

const $ = (id) => document.getElementById(id);

const state = {
  files: [], // {name, src (data URI, null while reading), kind: "file"}
  reading: Promise.resolve(),
  models: [],
  defaultModel: null,
  kinds: new Map(), // model name -> "softmax" | "sigmoid"
  collectionsLoaded: false,
  collectionSizes: new Map(), // collection name -> items (top_k may not exceed it)
};

// --- DOM helpers (text only: nothing from the API is ever parsed as HTML) --------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

function setStatus(id, text, isError = false) {
  const node = $(id);
  node.textContent = text;
  node.classList.toggle("error", isError);
}

function lines(text) {
  return text
    .split("\n")
    .map((line) => line.trim())
    .filter((line) => line.length > 0);
}

function formatMs(ms) {
  return ms >= 100 ? `${Math.round(ms)} ms` : `${ms.toFixed(1)} ms`;
}

function latencyText(result) {
  const server = result.data && result.data.timing && result.data.timing.total_ms;
  const client = formatMs(result.ms);
  return typeof server === "number" ? `${client} (server ${formatMs(server)})` : client;
}

async function busy(button, work) {
  button.disabled = true;
  try {
    await work();
  } finally {
    button.disabled = false;
  }
}

// --- the API -------------------------------------------------------------------------------

function errorMessage(data, status) {
  if (data && typeof data === "object") {
    if (typeof data.error === "string") return data.error;
    if (data.error && typeof data.error.message === "string") return data.error.message;
  }
  return `HTTP ${status}`;
}

function logCall(method, path, status, ms) {
  const log = $("call-log");
  const ok = status >= 200 && status < 400;
  log.prepend(
    el("li", { class: ok ? "good" : "bad" }, `${method} /${path} → ${status || "failed"} · ${formatMs(ms)}`),
  );
  while (log.children.length > MAX_LOGGED_CALLS) log.lastElementChild.remove();
}

/** One call to this server: {ok, status, data, error, ms}; never throws. */
async function api(method, path, body, { quiet = false } = {}) {
  const headers = { Accept: "application/json" };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const started = performance.now();
  let response;
  try {
    response = await fetch(new URL(path, API_BASE), init);
  } catch (exc) {
    const ms = performance.now() - started;
    if (!quiet) logCall(method, path, 0, ms);
    return { ok: false, status: 0, data: null, error: `network error: ${exc.message}`, ms };
  }
  const text = await response.text();
  const ms = performance.now() - started;
  let data = text;
  if ((response.headers.get("content-type") || "").includes("json")) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!quiet) logCall(method, path, response.status, ms);
  const error = response.ok ? null : errorMessage(data, response.status);
  return { ok: response.ok, status: response.status, data, error, ms };
}

function withHint(result) {
  return result.status === 401 ? `${result.error} (type the API key above)` : result.error;
}

// --- API key and models ----------------------------------------------------------------------

function setupKey() {
  const input = $("api-key");
  input.value = sessionStorage.getItem(KEY_STORAGE) || "";
  input.addEventListener("input", () => {
    const key = input.value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  });
  input.addEventListener("change", () => {
    loadModels();
    if (state.collectionsLoaded) loadCollections();
  });
}

function fillSelect(select, names, preferred) {
  const current = select.value;
  select.replaceChildren(...names.map((name) => el("option", { value: name, text: name })));
  if (names.includes(current)) select.value = current;
  else if (preferred && names.includes(preferred)) select.value = preferred;
}

async function loadModels() {
  const result = await api("GET", "v1/system/models");
  if (!result.ok) {
    setStatus("global-status", `Could not list the models: ${withHint(result)}`, true);
    return;
  }
  state.models = result.data.models;
  state.defaultModel = result.data.default_model;
  // Image-text models only: caption models and text-only models cannot score images.
  const embed = state.models
    .filter((m) => m.task !== "caption" && m.backend !== "sentence-transformers")
    .map((m) => m.name);
  const captioners = state.models.filter((m) => m.task === "caption").map((m) => m.name);
  fillSelect($("model"), embed, state.defaultModel);
  fillSelect($("model-compare"), embed, embed.find((name) => name !== $("model").value));
  fillSelect($("collection-model"), embed, state.defaultModel);
  fillSelect($("caption-model"), captioners, captioners[0]);
  const captionTab = $("tab-caption");
  captionTab.hidden = captioners.length === 0;
  if (captionTab.hidden && captionTab.getAttribute("aria-selected") === "true") {
    selectTab($("tab-score"), false);
  }
  setStatus(
    "global-status",
    `${embed.length} image-text model(s), default ${state.defaultModel} · ${formatMs(result.ms)}`,
  );
}

/** "softmax" (CLIP) or "sigmoid" (SigLIP), from the model's runtime architecture. */
async function probabilityKind(model) {
  if (state.kinds.has(model)) return state.kinds.get(model);
  const result = await api("GET", `v1/system/models/${encodeURIComponent(model)}/info`);
  let architecture = result.ok && result.data.runtime ? result.data.runtime.architecture : null;
  if (!architecture && result.ok && result.data.spec) {
    const name = String(result.data.spec.model_name || "").toLowerCase();
    architecture = name.includes("siglip") ? "siglip" : null;
  }
  const kind = architecture === "siglip" ? "sigmoid" : "softmax";
  if (result.ok && result.data.runtime && result.data.runtime.architecture) state.kinds.set(model, kind);
  return kind;
}

// --- tabs (WAI-ARIA tabs pattern: arrows, Home, End) -------------------------------------------

function visibleTabs() {
  return [...document.querySelectorAll('[role="tab"]')].filter((tab) => !tab.hidden);
}

function selectTab(tab, focus = true) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
  if (tab.id === "tab-search" && !state.collectionsLoaded) loadCollections();
  updatePolling();
}

function setupTabs() {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const tabs = visibleTabs();
      const at = tabs.indexOf(tab);
      let next = null;
      if (event.key === "ArrowRight") next = tabs[(at + 1) % tabs.length];
      else if (event.key === "ArrowLeft") next = tabs[(at - 1 + tabs.length) % tabs.length];
      else if (event.key === "Home") next = tabs[0];
      else if (event.key === "End") next = tabs[tabs.length - 1];
      if (next) {
        event.preventDefault();
        selectTab(next);
      }
    });
  }
}

// --- images ------------------------------------------------------------------------------------

function readDataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function uniqueName(name) {
  const taken = new Set(images().map((image) => image.name));
  if (!taken.has(name)) return name;
  for (let n = 2; ; n += 1) if (!taken.has(`${name} (${n})`)) return `${name} (${n})`;
}

function addFiles(fileList) {
  const reads = [...fileList].map((file) => {
    const entry = { name: uniqueName(file.name || "image"), src: null, kind: "file", failed: null };
    state.files.push(entry);
    return readDataUri(file).then(
      (src) => {
        entry.src = src;
      },
      (exc) => {
        entry.failed = `could not read the file: ${exc}`;
      },
    );
  });
  renderImages();
  state.reading = Promise.all([state.reading, ...reads]).then(renderImages);
  return state.reading;
}

/** The images in use: files (read), then the URLs typed in, in order. */
function images() {
  const files = state.files.filter((entry) => entry.src !== null);
  const urls = lines($("image-urls").value).map((url) => ({ name: url, src: url, kind: "url" }));
  return [...files, ...urls];
}

function isShownInline(src) {
  // Only this server's images and inline data: the page never loads from another host.
  if (typeof src !== "string") return false;
  if (src.startsWith("data:image/")) return true;
  try {
    return new URL(src, window.location.href).origin === window.location.origin;
  } catch {
    return false;
  }
}

function thumb(image, alt = "") {
  if (!isShownInline(image.src)) {
    return el("span", { class: "thumb placeholder", "aria-hidden": "true", text: "URL" });
  }
  const img = el("img", { class: "thumb", src: image.src, alt, loading: "lazy", decoding: "async" });
  img.addEventListener("error", () => {
    img.replaceWith(el("span", { class: "thumb placeholder", text: "not an image" }));
  });
  return img;
}

function renderImages() {
  const list = $("image-list");
  const items = state.files.map((entry) => {
    const remove = el("button", {
      type: "button",
      class: "link",
      "aria-label": `Remove ${entry.name}`,
      text: "remove",
    });
    remove.addEventListener("click", () => {
      state.files = state.files.filter((other) => other !== entry);
      renderImages();
    });
    const body = entry.src
      ? thumb(entry)
      : el("span", { class: "thumb placeholder", text: entry.failed ? "error" : "…" });
    return el(
      "li",
      { "data-name": entry.name },
      body,
      el("span", { class: "name", text: entry.name }),
      entry.failed ? el("span", { class: "error-text", text: entry.failed }) : null,
      remove,
    );
  });
  for (const image of images().filter((image) => image.kind === "url")) {
    items.push(el("li", { "data-name": image.name }, thumb(image), el("span", { class: "name", text: image.name })));
  }
  list.replaceChildren(...items);
  const select = $("search-image");
  const chosen = select.value;
  select.replaceChildren(
    el("option", { value: "", text: "(none)" }),
    ...images().map((image, i) => el("option", { value: String(i), text: image.name })),
  );
  if ([...select.options].some((option) => option.value === chosen)) select.value = chosen;
}

function setupImages() {
  const input = $("files");
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = "";
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer && event.dataTransfer.files.length) addFiles(event.dataTransfer.files);
  });
  $("image-urls").addEventListener("input", renderImages);
  $("clear-images").addEventListener("click", () => {
    state.files = [];
    $("image-urls").value = "";
    renderImages();
  });
}

async function inputs(statusId) {
  await state.reading;
  const list = images();
  if (list.length === 0) setStatus(statusId, "Add an image first (a file or a URL).", true);
  return list;
}

// --- Score: the image x prompt CLIP-score matrix as a heat map ---------------------------------

function heat(fraction) {
  const f = Math.min(Math.max(fraction, 0), 1);
  const lightness = 97 - f * 72; // 97 % (0) .. 25 % (100)
  return { background: `hsl(215 80% ${lightness}%)`, color: lightness < 50 ? "#ffffff" : "#111111" };
}

function legend() {
  const ramp = el("span", { class: "ramp", "aria-hidden": "true" });
  for (let i = 0; i < 10; i += 1) {
    const step = el("span");
    step.style.backgroundColor = heat((i + 0.5) / 10).background;
    ramp.append(step);
  }
  return el("div", { class: "legend" }, "0", ramp, "100");
}

/** A matrix table: rows and cols are [{label, image?, error?, note?}], values rows x cols. */
function matrixTable({ caption, kind, rows, cols, values, scale, digits }) {
  const head = el(
    "tr",
    {},
    el("th", { scope: "col", text: kind === "score" ? "image \\ prompt" : "" }),
    cols.map((col, j) =>
      el(
        "th",
        { scope: "col", "data-col": j },
        el("span", { text: col.label }),
        col.note ? el("div", { class: "note", text: col.note }) : null,
        col.error ? el("div", { class: "error-text", text: col.error }) : null,
      ),
    ),
  );
  const body = rows.map((row, i) =>
    el(
      "tr",
      { "data-row": i },
      el(
        "th",
        { scope: "row" },
        row.image ? thumb(row.image) : null,
        el("span", { text: row.label }),
        row.error ? el("div", { class: "error-text", text: row.error }) : null,
      ),
      cols.map((_, j) => {
        const value = values && values[i] ? values[i][j] : null;
        if (value === null || value === undefined) {
          return el("td", { class: "empty", "data-row": i, "data-col": j, title: "no value: an input failed", text: "—" });
        }
        const cell = el("td", { "data-row": i, "data-col": j, "data-score": String(value), text: value.toFixed(digits) });
        const colour = heat(value / scale);
        cell.style.backgroundColor = colour.background;
        cell.style.color = colour.color;
        return cell;
      }),
    ),
  );
  return el(
    "div",
    { class: "table-wrap" },
    el("table", { class: "heatmap", "data-kind": kind }, el("caption", { class: "visually-hidden", text: caption }), el("thead", {}, head), el("tbody", {}, body)),
  );
}

function renderScore(model, result, imageList, texts) {
  const box = el("div", { class: "matrix", "data-model": model });
  if (!result.ok) {
    box.append(
      el("h3", {}, model, " ", el("span", { class: "latency", text: formatMs(result.ms) })),
      el("p", { class: "error-text", role: "alert", text: withHint(result) }),
    );
    return box;
  }
  const data = result.data;
  box.setAttribute("data-model", data.model);
  box.append(el("h3", {}, data.model, " ", el("span", { class: "latency", text: latencyText(result) })));
  const imageRows = imageList.map((image, i) => ({
    label: image.name,
    image,
    error: data.images[i] ? data.images[i].error : null,
  }));
  const textCols = texts.map((text, j) => {
    const info = data.texts[j] || {};
    return { label: text, error: info.error, note: info.truncated ? "truncated to the model's context" : null };
  });
  if (data.scores) {
    box.append(
      matrixTable({ caption: `CLIP scores, ${data.model}`, kind: "score", rows: imageRows, cols: textCols, values: data.scores, scale: 100, digits: 2 }),
      legend(),
    );
  } else if (imageRows.some((row) => row.error)) {
    box.append(
      el("ul", {}, imageRows.filter((r) => r.error).map((r) => el("li", { class: "error-text", text: `${r.label}: ${r.error}` }))),
    );
  }
  if (data.image_similarity) {
    box.append(
      el("h4", { text: "image × image cosine" }),
      matrixTable({ caption: "image similarity", kind: "image_similarity", rows: imageRows, cols: imageRows, values: data.image_similarity, scale: 1, digits: 3 }),
    );
  }
  if (data.text_similarity) {
    box.append(
      el("h4", { text: "text × text cosine" }),
      matrixTable({ caption: "text similarity", kind: "text_similarity", rows: textCols, cols: textCols, values: data.text_similarity, scale: 1, digits: 3 }),
    );
  }
  return box;
}

async function runScore() {
  await state.reading;
  const imageList = images();
  const texts = lines($("score-prompts").value);
  if (imageList.length === 0 && texts.length === 0) {
    setStatus("score-status", "Add images or prompts first.", true);
    return;
  }
  const models = [$("model").value];
  const second = $("model-compare").value;
  if ($("compare").checked && second && second !== models[0]) models.push(second);
  setStatus("score-status", "Scoring…");
  const results = await Promise.all(
    models.map((model) =>
      api("POST", "v1/score", { model: model || null, images: imageList.map((i) => i.src), texts }),
    ),
  );
  $("score-results").replaceChildren(...results.map((r, k) => renderScore(models[k], r, imageList, texts)));
  const failed = results.find((r) => !r.ok);
  setStatus(
    "score-status",
    failed ? `Failed: ${withHint(failed)}` : `Scored ${imageList.length} × ${texts.length} in ${results.map(latencyText).join(" and ")}.`,
    Boolean(failed),
  );
}

// --- Classify: probability bars ------------------------------------------------------------------

async function runClassify() {
  const imageList = await inputs("classify-status");
  if (imageList.length === 0) return;
  const labels = lines($("classify-labels").value);
  if (labels.length === 0) {
    setStatus("classify-status", "Type at least one label.", true);
    return;
  }
  const model = $("model").value || null;
  const template = $("classify-template").value || "a photo of a {}";
  setStatus("classify-status", "Classifying…");
  const result = await api("POST", "v1/classify", { model, input: imageList.map((i) => i.src), labels, template });
  const box = $("classify-results");
  if (!result.ok) {
    box.replaceChildren();
    setStatus("classify-status", `Failed: ${withHint(result)} · ${formatMs(result.ms)}`, true);
    return;
  }
  const kind = await probabilityKind(result.data.model);
  const kindText = kind === "sigmoid" ? "sigmoid per label (SigLIP)" : "softmax over the labels (CLIP)";
  box.replaceChildren(
    ...result.data.data.map((item) => {
      const image = imageList[item.index];
      const header = el(
        "header",
        {},
        thumb(image),
        el("strong", { text: image.name }),
        item.top_label ? el("span", { text: `→ ${item.top_label}` }) : null,
        el("span", { class: "kind", "data-kind": kind, text: kindText }),
      );
      const bars = el(
        "ul",
        { class: "bars" },
        item.labels.map((label) => {
          const fill = el("span", { class: "fill" });
          fill.style.width = `${(label.probability * 100).toFixed(2)}%`;
          return el(
            "li",
            { "data-label": label.label, "data-probability": String(label.probability), title: `cosine ${label.score.toFixed(4)}` },
            el("span", { class: "label", text: label.label }),
            el("span", { class: "track", "aria-hidden": "true" }, fill),
            el("span", { class: "value", text: `${(label.probability * 100).toFixed(1)} %` }),
          );
        }),
      );
      return el(
        "article",
        { class: "classification", "data-index": item.index, "data-model": result.data.model },
        header,
        item.error ? el("p", { class: "error-text", text: item.error }) : bars,
      );
    }),
  );
  setStatus("classify-status", `${result.data.model}: ${kindText} · ${latencyText(result)}`);
}

// --- Search: collections ---------------------------------------------------------------------------

async function loadCollections(select) {
  const result = await api("GET", "v1/collections");
  const menu = $("search-collection");
  if (!result.ok) {
    setStatus("search-status", `Could not list the collections: ${withHint(result)}`, true);
    return;
  }
  state.collectionsLoaded = true;
  const current = select || menu.value;
  const collections = result.data.collections;
  state.collectionSizes = new Map(collections.map((c) => [c.name, c.size]));
  if (collections.length === 0) {
    menu.replaceChildren(el("option", { value: "", text: "(no collections yet: create one)" }));
    return;
  }
  menu.replaceChildren(
    ...collections.map((c) =>
      el("option", { value: c.name, text: `${c.name} · ${c.model || "default model"} · ${c.size} item(s)` }),
    ),
  );
  if (collections.some((c) => c.name === current)) menu.value = current;
}

async function createCollection(event) {
  event.preventDefault();
  const name = $("collection-name").value.trim();
  const model = $("collection-model").value || null;
  const result = await api("POST", "v1/collections", { name, model });
  if (!result.ok) {
    setStatus("search-status", `Could not create ${name}: ${withHint(result)} · ${formatMs(result.ms)}`, true);
    return;
  }
  setStatus("search-status", `Created ${result.data.name} (${result.data.model}, ${result.data.dim} dims) · ${formatMs(result.ms)}`);
  await loadCollections(result.data.name);
}

function smallThumbnail(src) {
  // A 96 px JPEG of an inline image, kept in the item's metadata for the results list.
  return new Promise((resolve) => {
    if (!src.startsWith("data:image/")) {
      resolve(null);
      return;
    }
    const img = new Image();
    img.onload = () => {
      const scale = 96 / Math.max(img.naturalWidth, img.naturalHeight, 1);
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
      canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
      canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
      resolve(canvas.toDataURL("image/jpeg", 0.7));
    };
    img.onerror = () => resolve(null);
    img.src = src;
  });
}

async function addToCollection() {
  const name = $("search-collection").value;
  if (!name) {
    setStatus("search-status", "Create or pick a collection first.", true);
    return;
  }
  const imageList = await inputs("search-status");
  if (imageList.length === 0) return;
  const items = await Promise.all(
    imageList.map(async (image) => {
      const metadata = { name: image.name };
      const small = await smallThumbnail(image.src);
      if (small) metadata.thumbnail = small;
      return { id: image.name.slice(0, 512), image: image.src, metadata };
    }),
  );
  setStatus("search-status", `Adding ${items.length} image(s) to ${name}…`);
  const result = await api("POST", `v1/collections/${encodeURIComponent(name)}/items`, { items });
  if (!result.ok) {
    setStatus("search-status", `Could not add: ${withHint(result)} · ${formatMs(result.ms)}`, true);
    return;
  }
  const errors = result.data.errors.map((e) => `${e.id}: ${e.error}`);
  setStatus(
    "search-status",
    `Added ${result.data.added} to ${name} · ${formatMs(result.ms)}${errors.length ? ` · failed: ${errors.join("; ")}` : ""}`,
    errors.length > 0,
  );
  await loadCollections(name);
}

function resultThumbnail(metadata) {
  for (const key of ["thumbnail", "image", "image_url", "url"]) {
    const value = metadata[key];
    if (isShownInline(value) && (key !== "url" || value.startsWith("data:image/"))) {
      return thumb({ src: value }, "");
    }
  }
  return el("span", { class: "thumb placeholder", "aria-hidden": "true", text: "—" });
}

async function runSearch() {
  const name = $("search-collection").value;
  if (!name) {
    setStatus("search-status", "Create or pick a collection first.", true);
    return;
  }
  const size = state.collectionSizes.get(name);
  if (size === 0) {
    setStatus("search-status", `${name} is empty: add images to it first.`, true);
    return;
  }
  await state.reading;
  const wanted = Math.max(1, Number($("search-top-k").value) || 5);
  const body = { top_k: size === undefined ? wanted : Math.min(wanted, size) };
  const text = $("search-text").value.trim();
  if (text) body.text = text;
  const chosen = $("search-image").value;
  if (chosen !== "") {
    const image = images()[Number(chosen)];
    if (image) body.image = image.src;
  }
  if (!body.text && !body.image) {
    setStatus("search-status", "Type a text query or pick an image query.", true);
    return;
  }
  const result = await api("POST", `v1/collections/${encodeURIComponent(name)}/search`, body);
  const list = $("search-results");
  if (!result.ok) {
    list.replaceChildren();
    setStatus("search-status", `Search failed: ${withHint(result)} · ${formatMs(result.ms)}`, true);
    return;
  }
  list.replaceChildren(
    ...result.data.results.map((hit) => {
      const shown = Object.fromEntries(Object.entries(hit.metadata).filter(([key]) => key !== "thumbnail"));
      let meta = JSON.stringify(shown, null, 1);
      if (meta.length > 400) meta = `${meta.slice(0, 400)}…`;
      return el(
        "li",
        { "data-id": hit.id, "data-score": String(hit.score) },
        resultThumbnail(hit.metadata),
        el(
          "div",
          { class: "text" },
          el("strong", { text: hit.id }),
          " ",
          el("span", { class: "score", text: hit.score.toFixed(4) }),
          el("pre", { class: "meta", text: meta }),
        ),
      );
    }),
  );
  setStatus("search-status", `${result.data.results.length} result(s) from ${name} (${result.data.model}) · ${formatMs(result.ms)}`);
}

// --- Caption: captions, each with its CLIP score --------------------------------------------------

async function runCaption() {
  const imageList = await inputs("caption-status");
  if (imageList.length === 0) return;
  const body = { images: imageList.map((i) => i.src) };
  if ($("caption-model").value) body.model = $("caption-model").value;
  const prompt = $("caption-prompt").value.trim();
  if (prompt) body.prompt = prompt;
  setStatus("caption-status", "Captioning…");
  const result = await api("POST", "api/v1/caption", body);
  const list = $("caption-results");
  if (!result.ok) {
    list.replaceChildren();
    setStatus("caption-status", `Failed: ${withHint(result)} · ${formatMs(result.ms)}`, true);
    return;
  }
  const captions = result.data.captions;
  const done = captions.filter((c) => c.caption);
  let scores = new Map();
  let scoreNote = "";
  if (done.length > 0) {
    const scoreModel = $("model").value || null;
    const scored = await api("POST", "v1/score", {
      model: scoreModel,
      images: done.map((c) => imageList[c.index].src),
      texts: done.map((c) => c.caption),
    });
    if (scored.ok && scored.data.scores) {
      scores = new Map(done.map((c, k) => [c.index, scored.data.scores[k][k]]));
      scoreNote = ` · CLIP scores by ${scored.data.model} in ${latencyText(scored)}`;
    } else if (!scored.ok) {
      scoreNote = ` · scoring failed: ${withHint(scored)}`;
    }
  }
  list.replaceChildren(
    ...captions.map((c) => {
      const image = imageList[c.index];
      const score = scores.get(c.index);
      return el(
        "li",
        { "data-index": c.index },
        thumb(image),
        el(
          "div",
          { class: "text" },
          el("strong", { text: image.name }),
          c.caption ? el("p", { class: "caption", text: c.caption }) : null,
          c.error ? el("p", { class: "error-text", text: c.error }) : null,
          typeof score === "number"
            ? el("span", { class: "score", "data-score": String(score), text: `CLIP score ${score.toFixed(2)}` })
            : null,
        ),
      );
    }),
  );
  setStatus("caption-status", `${result.data.model} · ${latencyText(result)}${scoreNote}`);
}

// --- Live: Prometheus text, parsed here, drawn as small SVG charts ---------------------------------

function toNumber(text) {
  if (text === "+Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text);
}

/** Prometheus text exposition -> [{name, labels, value}] (comments and blank lines skipped). */
function parseMetrics(text) {
  const samples = [];
  const lineRe = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$/;
  const labelRe = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const match = lineRe.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(labelRe)) {
      labels[key] = value.replace(/\\n/g, "\n").replace(/\\"/g, '"').replace(/\\\\/g, "\\");
    }
    samples.push({ name: match[1], labels, value: toNumber(match[3]) });
  }
  return samples;
}

const SCRAPE_ENDPOINTS = new Set(["/metrics", "/evaluator/metrics"]);

function total(samples, name, keep = () => true) {
  return samples.filter((s) => s.name === name && keep(s.labels)).reduce((sum, s) => sum + s.value, 0);
}

/** A histogram's cumulative buckets summed over its label sets: [[le, count]] sorted by le. */
function buckets(samples, name, keep = () => true) {
  const byLe = new Map();
  for (const s of samples) {
    if (s.name !== `${name}_bucket` || !keep(s.labels)) continue;
    const le = toNumber(s.labels.le);
    byLe.set(le, (byLe.get(le) || 0) + s.value);
  }
  return [...byLe.entries()].sort((a, b) => a[0] - b[0]);
}

/** histogram_quantile over cumulative buckets (linear within a bucket); null when empty. */
function quantile(q, cumulative) {
  if (cumulative.length === 0) return null;
  const count = cumulative[cumulative.length - 1][1];
  if (!(count > 0)) return null;
  const rank = q * count;
  let lower = 0;
  let below = 0;
  for (const [le, cum] of cumulative) {
    if (cum >= rank) {
      if (le === Infinity) return lower;
      return cum === below ? le : lower + ((le - lower) * (rank - below)) / (cum - below);
    }
    lower = le;
    below = cum;
  }
  return lower;
}

function minus(now, before) {
  if (!before) return now;
  const old = new Map(before);
  const delta = now.map(([le, cum]) => [le, cum - (old.get(le) || 0)]);
  return delta.some(([, c]) => c < 0) ? now : delta; // a counter reset: use the totals
}

const live = { timer: null, busy: false, previous: null, history: [] };

function liveActive() {
  return !document.hidden && $("tab-live").getAttribute("aria-selected") === "true";
}

function updatePolling() {
  if (liveActive() && live.timer === null) {
    pollMetrics();
    live.timer = window.setInterval(pollMetrics, LIVE_INTERVAL_MS);
  } else if (!liveActive() && live.timer !== null) {
    window.clearInterval(live.timer);
    live.timer = null;
    live.previous = null; // a gap: the next rate starts afresh
  }
}

async function pollMetrics() {
  if (live.busy) return;
  live.busy = true;
  try {
    const result = await api("GET", "metrics", undefined, { quiet: true });
    if (!result.ok || typeof result.data !== "string") {
      setStatus("live-status", `GET /metrics failed: ${result.error || "not Prometheus text"}`, true);
      return;
    }
    const samples = parseMetrics(result.data);
    const at = performance.now() / 1000;
    const served = (labels) => !SCRAPE_ENDPOINTS.has(labels.endpoint);
    const now = {
      at,
      requests: total(samples, "http_requests_total", served),
      latency: buckets(samples, "http_request_duration_seconds", served),
    };
    const previous = live.previous;
    const recent = previous ? minus(now.latency, previous.latency) : []; // the last interval
    const rate = previous ? Math.max(0, now.requests - previous.requests) / Math.max(at - previous.at, 1e-3) : null;
    const p50 = quantile(0.5, recent);
    const p99 = quantile(0.99, recent);
    live.previous = now;
    live.history.push({
      queue: total(samples, "batcher_queue_size"),
      inflight: total(samples, "batcher_inflight_batches"),
      rate,
      p50: p50 === null ? null : p50 * 1000,
      p99: p99 === null ? null : p99 * 1000,
    });
    if (live.history.length > LIVE_POINTS) live.history.shift();
    renderCharts(samples);
    setStatus("live-status", `${samples.length} samples · scraped in ${formatMs(result.ms)} · ${new Date().toLocaleTimeString()}`);
  } finally {
    live.busy = false;
  }
}

function lineChart(id, title, series, unit, note = "") {
  const width = 300;
  const height = 100;
  const values = series.flatMap((s) => s.points.filter((v) => v !== null && Number.isFinite(v)));
  const top = Math.max(1, ...values) * 1.1;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height + 4}`, role: "img", "aria-label": title });
  chart.append(svg("line", { class: "axis", x1: 0, y1: height, x2: width, y2: height }));
  chart.append(svg("line", { class: "axis", x1: 0, y1: 0, x2: 0, y2: height }));
  const tick = svg("text", { class: "tick", x: 4, y: 11 });
  tick.textContent = `${Number(top.toPrecision(3))} ${unit}`;
  chart.append(tick);
  const step = width / Math.max(LIVE_POINTS - 1, 1);
  for (const s of series) {
    const points = s.points
      .map((v, i) => (v === null || !Number.isFinite(v) ? null : `${(i * step).toFixed(1)},${(height - (v / top) * height).toFixed(1)}`))
      .filter((p) => p !== null);
    if (points.length) chart.append(svg("polyline", { class: s.className, points: points.join(" ") }));
  }
  const last = series.map((s) => {
    const v = s.points[s.points.length - 1];
    const shown = v === null || v === undefined ? "—" : Number(v).toFixed(v < 10 ? 2 : 0);
    const suffix = shown === "—" ? "" : s.unit === undefined ? ` ${unit}` : s.unit;
    return `${s.name} ${shown}${suffix}`;
  });
  return el(
    "figure",
    { class: "chart", id },
    el("h3", { text: title }),
    el("p", { class: "now", text: last.join(" · ") + note }),
    chart,
  );
}

function barChart(id, title, cumulative, samples) {
  const width = 300;
  const height = 100;
  const counts = cumulative.map(([le, cum], i) => [le, cum - (i ? cumulative[i - 1][1] : 0)]);
  const top = Math.max(1, ...counts.map(([, c]) => c));
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height + 14}`, role: "img", "aria-label": title });
  const slot = width / Math.max(counts.length, 1);
  counts.forEach(([le, c], i) => {
    const h = (c / top) * height;
    chart.append(svg("rect", { class: "bar", x: i * slot + 1, y: height - h, width: Math.max(slot - 2, 1), height: h }));
    const label = svg("text", { class: "tick", x: i * slot + slot / 2, y: height + 11, "text-anchor": "middle" });
    label.textContent = le === Infinity ? "+" : le >= 1000 ? `${Math.round(le / 1000)}k` : String(le);
    chart.append(label);
  });
  const count = total(samples, "batcher_batch_size_count");
  const sum = total(samples, "batcher_batch_size_sum");
  return el(
    "figure",
    { class: "chart", id },
    el("h3", { text: title }),
    el("p", { class: "now", text: count ? `${count} batches · mean ${(sum / count).toFixed(2)} items` : "no batches yet" }),
    chart,
  );
}

function latencySinceStart(samples) {
  const all = buckets(samples, "http_request_duration_seconds", (labels) => !SCRAPE_ENDPOINTS.has(labels.endpoint));
  const p50 = quantile(0.5, all);
  const p99 = quantile(0.99, all);
  if (p50 === null) return " (no requests yet)";
  return ` (since start: p50 ${formatMs(p50 * 1000)}, p99 ${formatMs(p99 * 1000)})`;
}

function renderCharts(samples) {
  const h = live.history;
  $("live-charts").replaceChildren(
    lineChart("chart-queue", "Queue depth (batcher_queue_size)", [
      { name: "queued", className: "series-a", points: h.map((p) => p.queue) },
      { name: "batches in flight", className: "series-b", points: h.map((p) => p.inflight), unit: "" },
    ], "items"),
    barChart("chart-batches", "Batch sizes (batcher_batch_size)", buckets(samples, "batcher_batch_size"), samples),
    lineChart("chart-throughput", "Throughput (http_requests_total)", [
      { name: "now", className: "series-a", points: h.map((p) => p.rate) },
    ], "req/s"),
    lineChart("chart-latency", "Latency (http_request_duration_seconds)", [
      { name: "p50", className: "series-a", points: h.map((p) => p.p50) },
      { name: "p99", className: "series-b", points: h.map((p) => p.p99) },
    ], "ms", latencySinceStart(samples)),
  );
}

// --- start ---------------------------------------------------------------------------------------

function setup() {
  setupKey();
  setupTabs();
  setupImages();
  $("compare").addEventListener("change", () => {
    $("compare-field").hidden = !$("compare").checked;
  });
  $("score-run").addEventListener("click", (e) => busy(e.currentTarget, runScore));
  $("classify-run").addEventListener("click", (e) => busy(e.currentTarget, runClassify));
  $("search-run").addEventListener("click", (e) => busy(e.currentTarget, runSearch));
  $("search-text").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      busy($("search-run"), runSearch);
    }
  });
  $("collections-refresh").addEventListener("click", (e) => busy(e.currentTarget, () => loadCollections()));
  $("collection-add").addEventListener("click", (e) => busy(e.currentTarget, addToCollection));
  $("collection-create").addEventListener("submit", (event) => busy($("collection-create-run"), () => createCollection(event)));
  $("caption-run").addEventListener("click", (e) => busy(e.currentTarget, runCaption));
  document.addEventListener("visibilitychange", updatePolling);
  renderImages();
  loadModels().then(() => document.body.setAttribute("data-ready", "true"));
}

setup();
