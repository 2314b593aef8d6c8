// The page's training view: pick or upload a dataset (GET/POST /datasets), start a LoRA run (POST /train), follow
// it (GET /train/{id}/events?offset=...: progress bar, loss curve, validation images as they appear), cancel it
// (DELETE /train/{id}). When a run registers its LoRA, the generation form's LoRA list is loaded again.
// Uses app.js's helpers (api, authHeaders, fileSource, option, loadServerState); text from the server is only
// ever set with textContent.
"use strict";

const TRAIN_POLL_MS = 1000;
const LOSS_POINTS_WANTED = 200; // logging_steps is chosen so a run draws about this many points
const BASE_KINDS_SKIPPED = new Set(["lora", "controlnet"]);

const training = {
  runId: null,
  offset: 0,
  timer: null,
  losses: [], // [step, loss]
  shownImages: new Set(),
};

// -- datasets --------------------------------------------------------------------------------------------------
async function loadDatasets(selected) {
  const select = $("train-dataset");
  let list;
  try {
    list = await api("/datasets");
  } catch (error) {
    if (error.status === 401 || error.status === 403) {
      trainingUnavailable(error.status === 403 ? "Training needs an admin key." : "Training needs an API key.");
    }
    return;
  }
  const previous = selected || select.value;
  select.replaceChildren();
  const datasets = list.datasets || [];
  if (!datasets.length) select.append(option("", "no datasets yet: upload one"));
  for (const dataset of datasets) {
    const captions = dataset.layout === "images" ? "no captions" : `${dataset.captioned} captioned`;
    select.append(option(dataset.name, `${dataset.name} (${dataset.images} images, ${captions})`));
  }
  if (previous && datasets.some((dataset) => dataset.name === previous)) select.value = previous;
}

async function loadBases() {
  const select = $("train-base");
  try {
    const models = await api("/models");
    const previous = select.value;
    select.replaceChildren();
    for (const model of models.models || []) {
      if (!BASE_KINDS_SKIPPED.has(model.kind)) select.append(option(model.name, model.name));
    }
    select.value = previous || models.default;
  } catch {
    // the generation form says why the server cannot be read
  }
}

async function uploadDataset() {
  const files = $("dataset-files").files;
  const name = $("dataset-name").value.trim();
  const status = $("dataset-status");
  if (!files.length || !name) {
    status.textContent = "Choose files and a name.";
    return;
  }
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  const caption = $("dataset-caption").value.trim();
  if (caption) form.append("caption", caption);
  $("dataset-send").disabled = true;
  status.textContent = "uploading…";
  try {
    // Not api(): the browser sets the multipart Content-Type (with its boundary) itself.
    const response = await fetch(`/datasets/${encodeURIComponent(name)}`, {
      method: "POST", body: form, headers: { Accept: "application/json", ...authHeaders() },
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(typeof body.detail === "string" ? body.detail : `${response.status}`);
    status.textContent = `stored ${body.name}: ${body.images} images`;
    await loadDatasets(body.name);
  } catch (error) {
    status.textContent = `refused: ${error.message}`;
  } finally {
    $("dataset-send").disabled = false;
  }
}

// -- starting and cancelling -----------------------------------------------------------------------------------
function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function trainingRequest() {
  const steps = numberField("train-steps");
  const args = {
    dataset: $("train-dataset").value,
    base: $("train-base").value || undefined,
    max_train_steps: steps,
    resolution: numberField("train-resolution"),
    rank: numberField("train-rank"),
    learning_rate: numberField("train-lr"),
    train_batch_size: numberField("train-batch"),
    checkpointing_steps: numberField("train-checkpoint"),
    validation_steps: numberField("train-validation-steps"),
    seed: numberField("train-seed"),
    logging_steps: steps ? Math.max(1, Math.round(steps / LOSS_POINTS_WANTED)) : undefined,
  };
  const register = $("train-register").value.trim();
  if (register) args.register = register;
  const prompt = $("train-validation-prompt").value.trim();
  if (prompt) args.validation_prompts = [prompt];
  for (const key of Object.keys(args)) if (args[key] === undefined) delete args[key];
  return { kind: "lora", args };
}

async function startTraining(event) {
  event.preventDefault();
  trainError("");
  if (!$("train-dataset").value) {
    trainError("Pick a dataset, or upload one first.");
    return;
  }
  $("train-start").disabled = true;
  try {
    const run = await api("/train", { method: "POST", body: JSON.stringify(trainingRequest()) });
    followRun(run);
  } catch (error) {
    trainError(error.message);
    $("train-start").disabled = false;
  }
}

async function cancelTraining() {
  if (!training.runId) return;
  $("train-cancel").disabled = true;
  $("train-status").textContent = "stopping (it saves a checkpoint first)…";
  try {
    await api(`/train/${encodeURIComponent(training.runId)}`, { method: "DELETE" });
    await pollRun(); // reads the last lines (the step it stopped at), then shows how it ended
  } catch (error) {
    trainError(error.message);
    $("train-cancel").disabled = false;
  }
}

// -- following a run -------------------------------------------------------------------------------------------
function followRun(run) {
  stopPolling();
  training.runId = run.id;
  training.offset = 0;
  training.losses = [];
  training.shownImages = new Set();
  $("train-validation").replaceChildren();
  $("train-id").textContent = run.id;
  $("train-cancel").disabled = false;
  $("train-start").disabled = true;
  showRunState(run);
  drawLoss();
  pollRun();
}

function stopPolling() {
  clearTimeout(training.timer);
  training.timer = null;
}

async function pollRun() {
  stopPolling();
  const runId = training.runId;
  try {
    for (;;) { // read every new line; a long run's history comes in pages
      const page = await api(`/train/${encodeURIComponent(runId)}/events?offset=${training.offset}`);
      if (runId !== training.runId) return;
      training.offset = page.offset;
      for (const event of page.events) handleEvent(event);
      if (page.events.length) continue;
      if (TERMINAL.has(page.state)) {
        finishRun(await api(`/train/${encodeURIComponent(runId)}`));
        return;
      }
      if (page.state === "queued") $("train-status").textContent = "queued behind another run…";
      break;
    }
  } catch (error) {
    trainError(error.message);
  }
  if (runId === training.runId) training.timer = setTimeout(pollRun, TRAIN_POLL_MS);
}

function handleEvent(event) {
  switch (event.event) {
    case "start":
      $("train-status").textContent = event.resume_from ? "resumed from a checkpoint" : "started: loading the model…";
      break;
    case "step":
      setTrainProgress(event.step, event.max_steps);
      $("train-status").textContent =
        `step ${event.step} of ${event.max_steps} · loss ${event.loss.toFixed(4)} · ${event.steps_per_s.toFixed(2)} steps/s`;
      if (typeof event.loss === "number" && Number.isFinite(event.loss)) {
        training.losses.push([event.step, event.loss]);
        drawLoss();
      }
      break;
    case "validation":
      for (const url of event.urls || []) showValidationImage(url, event.step);
      break;
    default:
      break;
  }
}

function showRunState(run) {
  if (run.progress) setTrainProgress(run.progress.step, run.progress.max_steps);
  else $("train-progress").removeAttribute("value"); // indeterminate until the first step
  $("train-status").textContent = run.state === "queued" ? `queued (position ${run.queue_position})` : run.state;
}

function setTrainProgress(step, total) {
  const bar = $("train-progress");
  bar.max = Math.max(total || 1, 1);
  bar.value = step;
}

function finishRun(run) {
  stopPolling();
  $("train-cancel").disabled = true;
  $("train-start").disabled = false;
  if (run.progress) setTrainProgress(run.progress.step, run.progress.max_steps);
  let text = `${run.state}`;
  if (run.progress) text += ` at step ${run.progress.step} of ${run.progress.max_steps}`;
  if (run.registered_as) text += ` · LoRA "${run.registered_as}" is in the LoRA list`;
  else if (run.state === "cancelled" && run.resumable) text += " · resumable (POST /train/{id}/resume)";
  $("train-status").textContent = text;
  if (run.state === "failed" && run.error) trainError(run.error);
  if (run.registered_as) loadServerState(); // fills the generation form's LoRA list again
  loadDatasets();
}

async function showValidationImage(url, step) {
  if (training.shownImages.has(url)) return;
  training.shownImages.add(url);
  const figure = document.createElement("figure");
  const image = document.createElement("img");
  image.alt = `validation image at step ${step}`;
  const caption = document.createElement("figcaption");
  caption.textContent = `step ${step}`;
  figure.append(image, caption);
  $("train-validation").prepend(figure); // newest first
  try {
    image.src = await fileSource(url);
  } catch (error) {
    caption.textContent = `step ${step}: ${error.message}`;
  }
}

// -- the loss curve --------------------------------------------------------------------------------------------
function drawLoss() {
  const canvas = $("loss-chart");
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  const pad = { left: 48, right: 10, top: 18, bottom: 22 };
  context.clearRect(0, 0, width, height);
  context.font = "12px system-ui, sans-serif";
  context.fillStyle = "#6b7383";
  const points = training.losses;
  canvas.dataset.points = String(points.length);
  if (!points.length) {
    context.fillText("loss per step appears here", pad.left, height / 2);
    return;
  }
  const steps = points.map(([step]) => step);
  const losses = points.map(([, loss]) => loss);
  const [minStep, maxStep] = [Math.min(...steps), Math.max(...steps, Math.min(...steps) + 1)];
  let [low, high] = [Math.min(...losses), Math.max(...losses)];
  if (high - low < 1e-9) [low, high] = [low - 0.5, high + 0.5];
  const x = (step) => pad.left + ((step - minStep) / (maxStep - minStep)) * (width - pad.left - pad.right);
  const y = (loss) => pad.top + (1 - (loss - low) / (high - low)) * (height - pad.top - pad.bottom);
  context.strokeStyle = "#d9dde4";
  context.strokeRect(pad.left, pad.top, width - pad.left - pad.right, height - pad.top - pad.bottom);
  context.fillText(high.toPrecision(3), 4, pad.top + 4);
  context.fillText(low.toPrecision(3), 4, height - pad.bottom);
  context.fillText(`step ${minStep}`, pad.left, height - 6);
  context.fillText(`step ${maxStep}`, width - pad.right - 60, height - 6);
  context.fillText("loss", pad.left + 4, 13);
  context.strokeStyle = "#3558d4";
  context.lineWidth = 1.5;
  context.beginPath();
  points.forEach(([step, loss], index) => {
    if (index === 0) context.moveTo(x(step), y(loss));
    else context.lineTo(x(step), y(loss));
  });
  context.stroke();
  if (points.length === 1) context.fillRect(x(steps[0]) - 2, y(losses[0]) - 2, 4, 4);
}

function trainError(message) {
  const element = $("train-error");
  element.textContent = message;
  element.hidden = !message;
}

function trainingUnavailable(message) {
  $("train-start").disabled = true;
  $("dataset-send").disabled = true;
  $("train-status").textContent = message;
}

// A run already going when the page opens (started by another tab, curl, or before a reload) is followed.
async function followCurrentRun() {
  try {
    const list = await api("/train");
    const current = (list.runs || []).filter((run) => run.state === "running" || run.state === "queued").pop();
    if (current && !training.runId) followRun(current);
  } catch {
    // loadDatasets says when training needs a key
  }
}

function startTrainingView() {
  $("train-form").addEventListener("submit", startTraining);
  $("train-cancel").addEventListener("click", cancelTraining);
  $("dataset-send").addEventListener("click", uploadDataset);
  $("save-key").addEventListener("click", () => setTimeout(() => { loadDatasets(); loadBases(); }, 0));
  drawLoss();
  loadDatasets();
  loadBases();
  followCurrentRun();
}

document.addEventListener("DOMContentLoaded", startTrainingView);
