// The sdserve page: a form over POST /jobs, progress from GET /jobs/{id}/events, a gallery from GET /images
// (limit/offset paging, filter by model or prompt text).
// Plain browser JavaScript, no build step. Text from the server is only ever set with textContent.
// On a server with API keys, the key typed at the top is kept in localStorage and sent as a header with every
// request, the event stream and the gallery's image files included (so they are read with fetch, not by URL).
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["succeeded", "failed", "cancelled", "interrupted"]);
const GALLERY_PAGE_SIZE = 12;
const DEFAULT_STRENGTH = { img2img: 0.75, inpainting: 1.0 };
const MAX_CANVAS_HEIGHT = 380;
const KEY_STORAGE = "sdserve-api-key";

const state = {
  task: "text2img",
  jobId: null,
  events: null,
  pollTimer: null,
  inputImage: null, // data URL of the image img2img / inpainting starts from
  strengthTouched: false,
  submittedAt: 0,
  galleryPage: 1,
  galleryPages: 1,
};

// -- talking to the API ----------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(message, response) {
    super(message);
    this.status = response.status;
    this.retryAfter = response.headers.get("Retry-After");
    this.requestId = response.headers.get("X-Request-ID");
  }
}

function apiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage disabled: no key
  }
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: {
      Accept: "application/json",
      ...(options.body ? { "Content-Type": "application/json" } : {}),
      ...authHeaders(),
    },
  });
  if (response.status === 401) askForKey();
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = text;
  }
  if (!response.ok) {
    let detail = body && body.detail !== undefined ? body.detail : `${response.status} ${response.statusText}`;
    if (typeof detail !== "string") detail = JSON.stringify(detail);
    throw new ApiError(detail, response);
  }
  return body;
}

function askForKey() {
  $("api-key").classList.add("needed");
  $("server-status").textContent = apiKey()
    ? "server: this API key is not accepted"
    : "server: an API key is needed (enter it at the top)";
}

function saveKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    showError("This browser does not keep the key (storage is disabled).");
  }
  $("api-key").classList.remove("needed");
  loadServerState();
  loadGallery(1);
}

// A file the server serves (a saved image) as something an <img> or a link can show: with a key it is fetched
// with the key's header and shown from memory, since an <img src> cannot send a header.
async function fileSource(url) {
  if (!apiKey()) return url;
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
  return URL.createObjectURL(await response.blob());
}

// Server-Sent Events read with fetch (EventSource cannot send a key header): calls onEvent(name, data) for each
// event, then resolves when the stream ends; rejects when it cannot be opened or breaks off.
async function readEvents(url, onEvent, signal) {
  const response = await fetch(url, { headers: { Accept: "text/event-stream", ...authHeaders() }, signal });
  if (!response.ok || !response.body) throw new ApiError(`${response.status} ${response.statusText}`, response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

// Base64 image text (the API's images and previews) as something an <img> can show. Not a URL test: base64
// of a JPEG starts with "/9j/".
function imageSource(data, format = "png") {
  return data.startsWith("data:") ? data : `data:image/${format};base64,${data}`;
}

// -- server state: health, models, schedulers, stats -----------------------------------------------------------
async function loadServerState() {
  try {
    const [health, models] = await Promise.all([api("/health").catch((e) => e), api("/models")]);
    fillModels(models);
    if (health instanceof Error) {
      $("server-status").textContent = `server: ${health.message}`;
      setTimeout(loadServerState, 2000);
    } else {
      const device = health.device ? `${health.device.device} ${health.device.dtype}` : "";
      $("server-status").textContent = `server ${health.status} · ${device}`;
      fillSchedulers(health.schedulers || []);
    }
  } catch (error) {
    if (error.status === 401) return askForKey(); // saving a key loads it again
    $("server-status").textContent = `server unreachable: ${error.message}`;
    setTimeout(loadServerState, 3000);
  }
}

function option(value, label) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = label;
  return element;
}

function fillModels(list) {
  const select = $("model");
  const galleryModel = $("gallery-model");
  const previous = select.value;
  select.replaceChildren();
  galleryModel.replaceChildren(option("", "all models"));
  const loras = $("lora-names");
  loras.replaceChildren();
  for (const model of list.models || []) {
    if (model.kind === "lora") {
      loras.append(option(model.name, model.description || model.name));
      continue;
    }
    if (model.kind === "controlnet") continue;
    const label = model.name + (model.loaded ? " (loaded)" : "") + (model.name === list.default ? " — default" : "");
    select.append(option(model.name, label));
    galleryModel.append(option(model.name, model.name));
  }
  select.value = previous || list.default;
}

function fillSchedulers(names) {
  const select = $("scheduler");
  if (select.options.length > 1) return;
  for (const name of names) select.append(option(name, name));
}

function formatBytes(bytes) {
  return `${(bytes / 2 ** 30).toFixed(1)} GiB`;
}

async function refreshStats() {
  if (document.hidden) return;
  try {
    const stats = await api("/stats");
    const ram = stats.cpu_ram;
    const parts = [`RAM ${ram.percent.toFixed(0)}% of ${formatBytes(ram.total)}`];
    for (const gpu of stats.gpu) {
      const load = gpu.load === null ? "" : ` ${(gpu.load * 100).toFixed(0)}%`;
      parts.push(`GPU${gpu.id}${load} ${(gpu.memoryUsed / 1024).toFixed(1)}/${(gpu.memoryTotal / 1024).toFixed(1)} GiB`);
    }
    $("system-stats").textContent = parts.join(" · ");
  } catch {
    $("system-stats").textContent = "";
  }
}

// -- the task switch and the input image with its mask ---------------------------------------------------------
function setTask(task) {
  state.task = task;
  const needsImage = task !== "text2img";
  $("input-image-section").hidden = !needsImage;
  $("strength").disabled = !needsImage;
  $("mask-canvas").hidden = task !== "inpainting";
  $("mask-tools").hidden = task !== "inpainting" || !state.inputImage;
  if (needsImage && !state.strengthTouched) setStrength(DEFAULT_STRENGTH[task]);
}

function setStrength(value) {
  $("strength").value = value;
  $("strength-value").textContent = Number(value).toFixed(2);
}

function loadImage(source) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("that file is not an image this browser can read"));
    image.src = source;
  });
}

async function setInputImage(source) {
  const image = await loadImage(source);
  const imageCanvas = $("image-canvas");
  const maskCanvas = $("mask-canvas");
  for (const canvas of [imageCanvas, maskCanvas]) {
    canvas.width = image.naturalWidth;
    canvas.height = image.naturalHeight;
  }
  imageCanvas.getContext("2d").drawImage(image, 0, 0);
  clearMask();
  state.inputImage = source;
  $("canvas-wrap").hidden = false;
  setTask(state.task);
  fitCanvas();
}

// Show the image as large as the column allows (small images too, so that they can be painted on).
function fitCanvas() {
  const canvas = $("image-canvas");
  if (!state.inputImage || !canvas.width) return;
  const maxWidth = $("input-image-section").clientWidth - 2;
  const scale = Math.min(maxWidth / canvas.width, MAX_CANVAS_HEIGHT / canvas.height);
  canvas.style.width = `${Math.floor(canvas.width * scale)}px`;
  canvas.style.height = `${Math.floor(canvas.height * scale)}px`;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

function setUpMaskPainting() {
  const canvas = $("mask-canvas");
  const context = canvas.getContext("2d", { willReadFrequently: true });
  let last = null;

  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return { x: ((event.clientX - box.left) * canvas.width) / box.width, y: ((event.clientY - box.top) * canvas.height) / box.height };
  };
  const paintTo = (to) => {
    const box = canvas.getBoundingClientRect();
    // The brush size is in screen pixels; the canvas holds the image at its own resolution.
    context.lineWidth = (Number($("brush-size").value) * canvas.width) / box.width;
    context.lineCap = "round";
    context.lineJoin = "round";
    context.strokeStyle = "rgb(255, 40, 40)";
    context.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
    context.beginPath();
    context.moveTo(last.x, last.y);
    context.lineTo(to.x + 0.01, to.y);
    context.stroke();
    last = to;
  };

  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = point(event);
    paintTo(last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (last) paintTo(point(event));
  });
  const stop = () => {
    last = null;
  };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
}

// The painted strokes become the mask the API expects: white = repaint, black = keep, at the image's size.
function maskAsDataUrl() {
  const canvas = $("mask-canvas");
  const painted = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const output = document.createElement("canvas");
  output.width = canvas.width;
  output.height = canvas.height;
  const outputContext = output.getContext("2d");
  const mask = outputContext.createImageData(canvas.width, canvas.height);
  let paintedPixels = 0;
  for (let i = 0; i < painted.length; i += 4) {
    const value = painted[i + 3] > 0 ? 255 : 0;
    paintedPixels += value ? 1 : 0;
    mask.data[i] = mask.data[i + 1] = mask.data[i + 2] = value;
    mask.data[i + 3] = 255;
  }
  if (!paintedPixels) return null;
  outputContext.putImageData(mask, 0, 0);
  return output.toDataURL("image/png");
}

// -- the request -------------------------------------------------------------------------------------------------
function buildRequest() {
  const form = $("generate-form").elements;
  const text = (name) => form[name].value.trim();
  const number = (name) => Number(form[name].value);
  const prompt = text("prompt");
  if (!prompt) throw new Error("Write a prompt first.");
  const body = {
    task: state.task,
    prompt,
    negative_prompt: text("negative_prompt") || null,
    model: form.model.value || null,
    steps: number("steps"),
    number_of_images: number("number_of_images"),
    seed: text("seed") === "" || number("seed") < 0 ? null : number("seed"),
  };
  // Blank guidance and size: the model family's own (SDXL 5 and 1024x1024, FLUX 3.5, ...).
  if (text("cfg_scale")) body.cfg_scale = number("cfg_scale");
  if (text("width")) body.width = number("width");
  if (text("height")) body.height = number("height");
  if (form.scheduler.value) body.scheduler = form.scheduler.value;
  if (state.task !== "text2img") {
    if (!state.inputImage) throw new Error(`Choose an input image for ${state.task}.`);
    body.image = state.inputImage;
    body.strength = Number($("strength").value);
  }
  if (state.task === "inpainting") {
    body.mask_image = maskAsDataUrl();
    if (!body.mask_image) throw new Error("Paint the area to repaint on the image first.");
  }
  const loras = [];
  for (const index of [1, 2]) {
    const name = text(`lora_name_${index}`);
    if (!name) continue;
    loras.push({ name, weight_name: text(`lora_weight_${index}`) || null, scale: number(`lora_scale_${index}`) });
  }
  if (loras.length) body.loras = loras;
  return body;
}

// -- following a job ---------------------------------------------------------------------------------------------
function setStatus(text) {
  $("job-status").textContent = text;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
  $("generate-form").dataset.busy = busy ? "true" : "false";
}

function setProgress(step, total) {
  const bar = $("progress");
  if (step === null) {
    bar.removeAttribute("value"); // indeterminate while queued
    return;
  }
  bar.max = Math.max(total, 1);
  bar.value = step;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  let body;
  try {
    body = buildRequest();
  } catch (error) {
    showError(error.message);
    return;
  }
  stopFollowing();
  setBusy(true);
  setStatus("Submitting…");
  state.submittedAt = performance.now();
  setProgress(null);
  $("results").replaceChildren();
  $("preview").hidden = true;
  try {
    const job = await api("/jobs", { method: "POST", body: JSON.stringify(body) });
    state.jobId = job.id;
    $("job-id").textContent = `job ${job.id}`;
    setStatus(job.status === "running" ? "Running…" : "Queued");
    follow(job);
  } catch (error) {
    setBusy(false);
    setProgress(0, 1);
    setStatus("Ready.");
    if (error.status === 429) {
      showError(`The queue is full; try again in ${error.retryAfter || "a few"} seconds.`);
    } else {
      showError(error.message);
    }
  }
}

function follow(job) {
  const url = (job.links && job.links.events) || `/jobs/${job.id}/events`;
  const stream = new AbortController();
  state.events = stream;
  const handlers = {
    queued: (data) => {
      setStatus(data.position ? `Queued: position ${data.position}` : "Queued");
      setProgress(null);
    },
    started: () => {
      setStatus("Running…");
      setProgress(0, 1);
    },
    progress: (data) => {
      setStatus(`Step ${data.step} of ${data.total_steps}`);
      setProgress(data.step, data.total_steps);
      if (data.preview) {
        $("preview").src = imageSource(data.preview, "jpeg");
        $("preview").hidden = false;
      }
    },
    done: (data) => succeeded(data.result || data),
    cancelled: () => finish("Cancelled."),
    error: (data) => {
      // The server's own `error` event: the job failed.
      finish("Failed.");
      showError(data.detail || "the job failed");
    },
  };
  const onEvent = (name, data) => {
    if (state.events === stream && handlers[name]) handlers[name](data);
  };
  readEvents(url, onEvent, stream.signal)
    .catch(() => {})
    .then(() => {
      // A stream that could not be opened, broke off or ended without a final event: read the job's state.
      if (state.events !== stream) return;
      state.events = null;
      poll(job.id);
    });
}

async function poll(jobId) {
  if (state.jobId !== jobId) return;
  try {
    const job = await api(`/jobs/${jobId}`);
    if (job.status === "succeeded") return succeeded(job.result);
    if (TERMINAL.has(job.status)) {
      finish(job.status === "cancelled" ? "Cancelled." : "Failed.");
      if (job.error && job.status !== "cancelled") showError(job.error);
      return;
    }
    if (job.status === "queued") setStatus(job.queue_position ? `Queued: position ${job.queue_position}` : "Queued");
    else if (job.total_steps) {
      setStatus(`Step ${job.step} of ${job.total_steps}`);
      setProgress(job.step, job.total_steps);
    }
  } catch (error) {
    showError(error.message);
  }
  state.pollTimer = setTimeout(() => poll(jobId), 500);
}

function stopFollowing() {
  if (state.events) state.events.abort();
  state.events = null;
  clearTimeout(state.pollTimer);
}

function finish(status) {
  stopFollowing();
  state.jobId = null;
  setBusy(false);
  setStatus(status);
  $("preview").hidden = true; // a preview of a job that is over would pass for its result
}

function succeeded(result) {
  const bar = $("progress");
  setProgress(Number(bar.max) || 1, Number(bar.max) || 1);
  const seconds = (performance.now() - state.submittedAt) / 1000;
  finish(`Done in ${seconds.toFixed(1)} s${result.cached ? " (from the result cache)" : ""}.`);
  showResults(result);
  refreshGalleryWith(result.job_id);
}

// The server writes image files and their records just after a job ends: look again a few times until they show.
async function refreshGalleryWith(jobId, attempts = 20) {
  for (let attempt = 0; attempt < attempts; attempt++) {
    const items = await loadGallery(1);
    if (!items || items.some((item) => item.job_id === jobId)) return;
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

function showResults(result) {
  const format = (result.parameters && result.parameters.output_format) || "png";
  const figures = (result.images || []).map((data, index) => {
    const seed = result.seeds ? result.seeds[index] : undefined;
    const source = imageSource(data, format);
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    image.src = source;
    image.alt = `generated image ${index + 1}${seed === undefined ? "" : `, seed ${seed}`}`;
    image.className = "result-image";
    const caption = document.createElement("figcaption");
    const label = document.createElement("span");
    label.textContent = seed === undefined ? result.model || "" : `seed ${seed}`;
    const download = document.createElement("a");
    download.href = source;
    download.download = `sdserve-${seed ?? index}.${format === "jpeg" ? "jpg" : format}`;
    download.textContent = "download";
    const reuseSeed = button("reuse seed", () => {
      $("seed").value = seed;
    });
    const useAsInput = button("use as input", async () => {
      if (state.task === "text2img") selectTask("img2img");
      await setInputImage(source);
    });
    caption.append(label, download, reuseSeed, useAsInput);
    figure.append(image, caption);
    return figure;
  });
  $("results").replaceChildren(...figures);
}

function button(text, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = text;
  element.addEventListener("click", onClick);
  return element;
}

function selectTask(task) {
  document.querySelector(`input[name=task][value=${task}]`).checked = true;
  setTask(task);
}

async function cancel() {
  const jobId = state.jobId;
  if (!jobId) return;
  $("cancel").disabled = true;
  setStatus("Cancelling…");
  try {
    const job = await api(`/jobs/${jobId}`, { method: "DELETE" });
    // The `cancelled` event normally says so; this covers a stream that has already ended.
    if (job && job.status === "cancelled" && state.jobId === jobId) finish("Cancelled.");
  } catch (error) {
    showError(error.message);
    $("cancel").disabled = false;
  }
}

// -- the gallery -----------------------------------------------------------------------------------------------
async function loadGallery(page = state.galleryPage) {
  page = Math.max(1, page);
  const parameters = new URLSearchParams({ limit: GALLERY_PAGE_SIZE, offset: (page - 1) * GALLERY_PAGE_SIZE });
  const query = $("gallery-q").value.trim();
  const model = $("gallery-model").value;
  if (query) parameters.set("prompt", query);
  if (model) parameters.set("model", model);
  const empty = $("gallery-empty");
  let data;
  try {
    data = await api(`/images?${parameters}`);
  } catch (error) {
    empty.textContent =
      error.status === 404
        ? "This server keeps no image gallery."
        : error.status === 401
          ? "Enter the server's API key at the top to see its images."
          : `Could not load images: ${error.message}`;
    empty.hidden = false;
    return null;
  }
  const items = data.images || [];
  state.galleryPage = page;
  state.galleryPages = Math.max(1, Math.ceil(data.total / GALLERY_PAGE_SIZE));
  const tiles = items.map((item) => {
    const link = document.createElement("a");
    link.href = item.url || `/images/${item.id}`;
    link.target = "_blank";
    link.rel = "noopener";
    link.title = [item.prompt, `seed ${item.seed}`, item.model, `${item.width}x${item.height}`].join(" · ");
    const image = document.createElement("img");
    image.alt = item.prompt || "generated image";
    image.loading = "lazy";
    fileSource(link.href)
      .then((source) => {
        image.src = source;
        link.href = source;
      })
      .catch(() => {
        image.alt = "(could not load this image)";
      });
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = item.prompt || "";
    link.append(image, caption);
    return link;
  });
  $("gallery").replaceChildren(...tiles);
  empty.textContent = query || model ? "No saved image matches." : "No saved images yet.";
  empty.hidden = tiles.length > 0;
  $("gallery-page").textContent = `page ${state.galleryPage} of ${state.galleryPages}`;
  $("gallery-prev").disabled = state.galleryPage <= 1;
  $("gallery-next").disabled = state.galleryPage >= state.galleryPages;
  return items;
}

// -- wiring ----------------------------------------------------------------------------------------------------
function start() {
  for (const radio of document.querySelectorAll("input[name=task]")) {
    radio.addEventListener("change", () => setTask(radio.value));
  }
  $("strength").addEventListener("input", (event) => {
    state.strengthTouched = true;
    setStrength(event.target.value);
  });
  $("input-image").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    showError("");
    try {
      await setInputImage(await readFile(file));
    } catch (error) {
      showError(error.message);
    }
  });
  $("clear-mask").addEventListener("click", clearMask);
  setUpMaskPainting();
  window.addEventListener("resize", fitCanvas);
  $("generate-form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", saveKey);
  $("gallery-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    loadGallery(1);
  });
  $("gallery-prev").addEventListener("click", () => loadGallery(state.galleryPage - 1));
  $("gallery-next").addEventListener("click", () => loadGallery(state.galleryPage + 1));
  setTask(document.querySelector("input[name=task]:checked").value);
  setBusy(false);
  loadServerState();
  refreshStats();
  setInterval(refreshStats, 5000);
  loadGallery(1);
}

document.addEventListener("DOMContentLoaded", start);
