// FISEdit studio: generate an image, edit its prompt, see what each edit changed and cost.
// Plain browser JavaScript over the HTTP API (/v1); generations and edits run as jobs whose
// Server-Sent Events drive the progress bar.
"use strict";

const KEY_STORAGE = "fisedit.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  sessionId: null,
  versions: [], // the session's Version objects, indexed by version number
  viewed: null, // the version number on show
  draft: false, // whether the edit box holds text typed since a version's prompt was put there
  job: null, // the running job: {id, cancelling}
  objectUrls: new Map(), // API path -> promise of the fetched file's object URL
};

// The API

class ApiFailure extends Error {
  constructor(status, detail, retryAfter) {
    super(detail.map((d) => d.msg).join("; ") || `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
    this.retryAfter = retryAfter;
  }
}

function authHeaders(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

async function failureOf(response) {
  let detail;
  try {
    detail = (await response.json()).detail;
  } catch {
    detail = response.statusText;
  }
  if (!Array.isArray(detail)) detail = [{ loc: [], msg: String(detail || "") }];
  return new ApiFailure(response.status, detail, response.headers.get("Retry-After"));
}

const BUSY = [429, 503];
const READ_PATIENCE_S = 30;

// Reads (GETs) refused as busy are retried after the Retry-After the service names, for up
// to READ_PATIENCE_S: a page reloading a long history must not fail on the tenant's bound.
async function api(method, path, { body, headers = {} } = {}) {
  const init = { method, headers: authHeaders(headers) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  for (let waited = 0; ; ) {
    const response = await fetch(path, init);
    if (response.ok) return response;
    const wait = Number(response.headers.get("Retry-After")) || 1;
    const retry = method === "GET" && BUSY.includes(response.status);
    if (!retry || waited + wait > READ_PATIENCE_S) throw await failureOf(response);
    await new Promise((resolve) => setTimeout(resolve, 1000 * wait));
    waited += wait;
  }
}

// Files behind the API key: <img> and <a> cannot send a header, so fetch them as blobs.
// Version files never change: each is fetched once (the promise is kept, so the strip and
// the view asking at the same time share one request).
function objectUrl(path) {
  if (!state.objectUrls.has(path)) {
    const url = api("GET", path)
      .then((response) => response.blob())
      .then((blob) => URL.createObjectURL(blob));
    url.catch(() => state.objectUrls.delete(path)); // a failed fetch is tried again next time
    state.objectUrls.set(path, url);
  }
  return state.objectUrls.get(path);
}

// Server-Sent Events read with fetch (EventSource cannot send the API key).
async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n/g, "\n"); // a CRLF may span two chunks
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      let id;
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("id:")) id = line.slice(3).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")), id };
    }
  }
}

// Messages

function fieldOf(loc) {
  const [where, ...rest] = loc.map(String);
  if (where === "header") return `${rest.join(".")} header`;
  return ["body", "path", "query"].includes(where) ? rest.join(".") : [where, ...rest].join(".");
}

function describe(error) {
  if (!(error instanceof ApiFailure)) return `Could not reach the service: ${error.message}`;
  const retry = error.retryAfter ? ` Retry in ${error.retryAfter} s.` : "";
  const reasons = error.detail
    .map((d) => (fieldOf(d.loc || []) ? `${fieldOf(d.loc)}: ${d.msg}` : d.msg))
    .join("; ");
  switch (error.status) {
    case 401:
      return "The API key is missing or unknown (401): enter a valid key above.";
    case 409:
      return `Stale version (409): ${reasons}. The history was reloaded: look at the newest version and submit again.`;
    case 413:
      return `Too large (413): ${reasons}.`;
    case 422:
      return `Invalid input (422): ${reasons}.`;
    case 429:
      return `Too many requests in flight for your key (429).${retry}`;
    case 503:
      return `The service is busy or unavailable (503): ${reasons}.${retry}`;
    default:
      return `Error ${error.status}: ${reasons}`;
  }
}

function showError(error, form) {
  const box = $("error");
  box.textContent = typeof error === "string" ? error : describe(error);
  box.hidden = false;
  if (error instanceof ApiFailure && error.status === 401) $("api-key").focus();
  if (error instanceof ApiFailure && error.status === 422 && form) {
    let first = null;
    for (const d of error.detail) {
      const name = (d.loc || []).at(-1);
      const input = form.elements.namedItem(String(name));
      if (input && input.setAttribute) {
        input.setAttribute("aria-invalid", "true");
        first = first || input;
      }
    }
    if (first) first.focus();
  }
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
  for (const input of document.querySelectorAll("[aria-invalid]")) {
    input.removeAttribute("aria-invalid");
  }
}

function say(text) {
  $("status").textContent = text;
}

// Progress

function setProgress(fraction) {
  const bar = $("progress");
  bar.hidden = false;
  if (fraction === null) bar.removeAttribute("value"); // indeterminate
  else bar.value = Math.max(0, Math.min(1, fraction));
}

function setBusy(busy) {
  document.body.dataset.busy = String(busy);
  $("generate-button").disabled = busy;
  $("edit-button").disabled = busy || state.sessionId === null;
  $("cancel-button").disabled = !busy;
  if (!busy) $("progress").hidden = true;
}

// Jobs

// Runs a generation or an edit as a job: `submit` queues it and returns the job's id; the
// job's events drive the progress bar until its end state, which this returns.
async function runJob(what, submit) {
  const job = { id: null, cancelling: false };
  state.job = job;
  setBusy(true);
  setProgress(null);
  say(`${what}: submitting`);
  let steps = false; // per-step events seen; otherwise progress counts finished items
  const update = (text) => job.cancelling || say(`${what}: ${text}`);
  try {
    job.id = await submit();
    if (job.cancelling) await requestCancel(job); // Escape came before the job had an id
    update("queued");
    let lastId = null; // the id of the last event seen, to go on from after a `continue`
    for (let open = true; open; ) {
      open = false;
      const headers = { Accept: "text/event-stream" };
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      const response = await api("GET", `/v1/jobs/${job.id}/events`, { headers });
      for await (const { event, data, id } of serverEvents(response)) {
        if (id !== undefined) lastId = id;
        if (event === "continue") {
          open = true; // the service ends a long stream: the next one goes on from lastId
        } else if (event === "step") {
          steps = true;
          setProgress(data.step / data.steps);
          update(`step ${data.step} of ${data.steps}`);
        } else if (event === "started") {
          update("running");
        } else if (event === "retry") {
          update(`retrying (${data.message})`);
        } else if (event === "generated" || event === "edited") {
          if (!steps) setProgress(data.total ? data.done / data.total : 1);
          await addVersion(data.version, true);
        } else if (event === "error") {
          throw new ApiFailure(data.status, data.detail); // the job went, or the queue did
        } else if (event === "end") {
          return { ...data, cancelling: job.cancelling };
        }
      }
    }
    throw new Error("the event stream closed before the job ended");
  } finally {
    state.job = null;
    setBusy(false);
  }
}

function cancelJob() {
  const job = state.job;
  if (!job || job.cancelling) return;
  job.cancelling = true;
  say("Cancelling…");
  if (job.id !== null) requestCancel(job);
}

async function requestCancel(job) {
  try {
    await api("POST", `/v1/jobs/${job.id}/cancel`);
  } catch (error) {
    showError(error);
  }
}

function reportEnd(end, what, before) {
  const newest = state.versions.length - 1;
  if (end.state === "failed") {
    showError(`${what} failed: ${end.error}`);
    say(`${what} failed.`);
  } else if (end.state === "cancelled") {
    say(`${what} cancelled.`);
  } else if (newest === before) {
    say(`No change: the new prompt reads the same to the model (v${state.viewed}).`);
  } else {
    const late = end.cancelling ? "Too late to cancel: it had finished. " : "";
    say(`${late}${what} done: version ${newest}.`);
  }
}

// Versions

const percent = (x) => `${(100 * x).toFixed(1)} %`;
const seconds = (x) => (x < 10 ? `${x.toFixed(2)} s` : `${x.toFixed(1)} s`);

async function addVersion(version, show) {
  if (version.session_id !== state.sessionId) startSession(version.session_id);
  const known = state.versions[version.version] !== undefined;
  state.versions[version.version] = version;
  if (!known) renderStripItem(version);
  if (show) await viewVersion(version.version);
}

function startSession(sessionId) {
  state.sessionId = sessionId;
  state.versions = [];
  state.viewed = null;
  for (const url of state.objectUrls.values()) url.then(URL.revokeObjectURL, () => {});
  state.objectUrls.clear();
  $("version-strip").replaceChildren();
  history.replaceState(null, "", `#session=${sessionId}`);
}

function renderStripItem(version) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "version";
  button.dataset.version = version.version;
  const from = version.parent === null ? "" : `, from version ${version.parent}`;
  button.setAttribute("aria-label", `Version ${version.version}${from}: ${version.prompt}`);
  button.setAttribute("aria-pressed", "false");
  const thumb = document.createElement("img");
  thumb.alt = ""; // the button's label says what it shows
  const label = document.createElement("span");
  label.textContent = `v${version.version}`;
  if (version.parent !== null && version.parent !== version.version - 1) {
    label.textContent += ` from v${version.parent}`; // a branch off an older version
  }
  const cost = document.createElement("span");
  cost.className = "hint";
  cost.textContent = version.version === 0 ? "base" : `${percent(version.mask_ratio)} mask`;
  button.append(thumb, label, cost);
  button.addEventListener("click", () => viewVersion(version.version));
  item.append(button);
  const strip = $("version-strip");
  const after = [...strip.children].find((li) => +li.firstChild.dataset.version > version.version);
  strip.insertBefore(item, after || null);
  objectUrl(version.image_url).then((url) => (thumb.src = url), showError);
}

async function viewVersion(number) {
  const version = state.versions[number];
  state.viewed = number;
  const [image, mask, recipe] = await Promise.all([
    objectUrl(version.image_url),
    version.mask_url && objectUrl(version.mask_url),
    objectUrl(`/v1/sessions/${version.session_id}/versions/${number}/recipe.json`),
  ]);
  if (state.viewed !== number) return; // another version was picked meanwhile

  for (const button of document.querySelectorAll("#version-strip .version")) {
    button.setAttribute("aria-pressed", String(+button.dataset.version === number));
  }
  $("view-version").textContent = `v${number}`;
  const shown = $("current-image");
  shown.src = image;
  shown.alt = `Version ${number}: ${version.prompt}`;
  shown.hidden = false;
  $("caption").textContent = version.prompt;

  $("m-mask-ratio").textContent = percent(version.mask_ratio);
  $("m-mac-fraction").textContent = percent(version.mac_fraction);
  $("m-latency").textContent = seconds(version.latency_s);
  const dense = version.dense_estimate_s;
  $("m-dense").textContent = dense == null ? "n/a" : seconds(dense);
  $("m-cache-path").textContent = version.cache_path;

  const name = `fisedit-${version.session_id.slice(0, 8)}-v${number}`;
  setDownload($("download-image"), image, `${name}.png`);
  setDownload($("download-mask"), mask, `${name}-mask.png`);
  setDownload($("download-recipe"), recipe, `${name}-recipe.json`);
  $("overlay-toggle").disabled = !mask;

  const newest = state.versions.length - 1;
  $("edit-prompt").disabled = false;
  // The box holds the prompt of the version on show, to edit a few words of, unless the
  // person typed a draft there: that stays while they look through older versions.
  if (number === newest || !state.draft || !$("edit-prompt").value) {
    $("edit-prompt").value = version.prompt;
    state.draft = false;
  }
  // An older version's edit branches off it; the later versions stay.
  $("edit-extends").textContent =
    number === newest ? `(extends v${newest})` : `(branches off v${number})`;
  $("edit-button").disabled = state.job !== null;
  await drawOverlay();
}

function setDownload(anchor, url, filename) {
  if (url) {
    anchor.href = url;
    anchor.download = filename;
    anchor.setAttribute("aria-disabled", "false");
  } else {
    anchor.removeAttribute("href");
    anchor.setAttribute("aria-disabled", "true");
  }
}

// The edited region in a translucent colour over the image, drawn from the mask's pixels.
async function drawOverlay() {
  const canvas = $("mask-overlay");
  const number = state.viewed;
  const version = state.versions[number];
  if (!$("overlay-toggle").checked || !version || version.mask_url === null) {
    canvas.hidden = true;
    return;
  }
  const mask = new Image();
  mask.src = await objectUrl(version.mask_url);
  await mask.decode();
  if (state.viewed !== number) return; // another version is on show now
  canvas.width = mask.naturalWidth;
  canvas.height = mask.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(mask, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < pixels.data.length; i += 4) {
    const inside = pixels.data[i] > 127;
    pixels.data.set([255, 0, 110, inside ? 150 : 0], i);
  }
  context.putImageData(pixels, 0, 0);
  canvas.hidden = false;
}

async function loadSession(sessionId) {
  const history = await (await api("GET", `/v1/sessions/${sessionId}`)).json();
  startSession(history.session_id);
  for (const version of history.versions) await addVersion(version, false);
  if (history.versions.length) await viewVersion(history.versions.length - 1);
  setBusy(false);
}

// Forms

function numberField(form, name) {
  const text = form.elements.namedItem(name).value.trim();
  if (text === "") return undefined; // the service's default
  const value = Number(text);
  if (!Number.isFinite(value)) return text; // the service names what is wrong
  // Integers past 2^53 lose digits as numbers here: the service reads the text exactly.
  return Number.isInteger(value) && !Number.isSafeInteger(value) ? text : value;
}

async function generate(event) {
  event.preventDefault();
  if (state.job) return;
  clearError();
  const form = event.target;
  const body = {
    prompt: form.elements.namedItem("prompt").value,
    negative_prompt: form.elements.namedItem("negative_prompt").value,
    seed: numberField(form, "seed"),
    steps: numberField(form, "steps"),
    guidance: numberField(form, "guidance"),
    scheduler: form.elements.namedItem("scheduler").value || undefined,
  };
  const submit = async () => (await (await api("POST", "/v1/jobs", { body })).json()).job_id;
  try {
    reportEnd(await runJob("Generation", submit), "Generation", -1);
  } catch (error) {
    showError(error, form);
    say("No new image: see the message below.");
  }
}

async function edit(event) {
  event.preventDefault();
  if (state.job || state.sessionId === null) return;
  clearError();
  const form = event.target;
  const before = state.versions.length - 1;
  const body = { prompt: form.elements.namedItem("prompt").value, extends: before };
  if (state.viewed !== before) body.from_version = state.viewed;
  const submit = async () => {
    const path = `/v1/sessions/${state.sessionId}/edits`;
    const headers = { Prefer: "respond-async" };
    return (await (await api("POST", path, { body, headers })).json()).job_id;
  };
  try {
    reportEnd(await runJob("Edit", submit), "Edit", before);
  } catch (error) {
    if (error instanceof ApiFailure && error.status === 409) {
      await loadSession(state.sessionId).catch(() => {});
      form.elements.namedItem("prompt").value = body.prompt; // to submit again, unretyped
    }
    showError(error, form);
    say("No new version: see the message below.");
  }
}

function submitOnEnter(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    event.target.form.requestSubmit();
  }
}

function showKeyState() {
  $("key-state").textContent = sessionStorage.getItem(KEY_STORAGE)
    ? "A key is set for this tab."
    : "No key: anonymous (fisedit serve on localhost).";
}

function init() {
  $("generate-form").addEventListener("submit", generate);
  $("edit-form").addEventListener("submit", edit);
  $("prompt").addEventListener("keydown", submitOnEnter);
  $("edit-prompt").addEventListener("keydown", submitOnEnter);
  $("edit-prompt").addEventListener("input", () => (state.draft = true));
  $("cancel-button").addEventListener("click", cancelJob);
  $("overlay-toggle").addEventListener("change", () => drawOverlay().catch(showError));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.job) {
      event.preventDefault();
      cancelJob();
    }
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    showKeyState();
  });
  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    showKeyState();
  });
  showKeyState();
  setBusy(false);
  const match = /session=([A-Za-z0-9_-]+)/.exec(location.hash);
  if (match) {
    loadSession(match[1]).then(
      () => say("Session loaded."),
      (error) => showError(error),
    );
  }
}

init();
