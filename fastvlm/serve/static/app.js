// FastVLM web page: one image + a question -> a streamed answer from /v1/chat/completions.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  model: $("model"), form: $("ask"), drop: $("drop"), file: $("file"), preview: $("preview"),
  hint: $("drop-hint"), clear: $("clear-image"), question: $("question"), send: $("send"),
  stop: $("stop"), settings: $("settings"), maxTokens: $("max-tokens"), temperature: $("temperature"),
  apiKey: $("api-key"), output: $("output"), answer: $("answer"), stats: $("stats"), error: $("error"),
};
let modelId = null;
let limits = {};       // the server's published limits (GET /v1/models)
let imageURL = null;   // data: URI of the chosen image
let imageSeq = 0;      // the latest image chosen: a slower read of an earlier one must not replace it
let busy = false;      // one request at a time: Ask, Enter and Ctrl+Enter do nothing while one runs
let controller = null; // aborts the request in flight

els.apiKey.value = localStorage.getItem("fastvlm-api-key") || "";
els.apiKey.addEventListener("change", () => { localStorage.setItem("fastvlm-api-key", els.apiKey.value); loadModel(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  if (els.apiKey.value) h["Authorization"] = "Bearer " + els.apiKey.value;
  return h;
}

// The message of an OpenAI-style error body ({"error": {"message": ...}} or {"error": "..."}), if any.
function errorText(body) {
  if (!body || body.error == null) return null;
  if (typeof body.error === "string") return body.error;
  return body.error.message || JSON.stringify(body.error);
}

async function responseError(resp) {
  let text = null;
  try { text = errorText(await resp.json()); } catch (_) { /* not JSON */ }
  const err = new Error(text || `the server answered HTTP ${resp.status}`);
  err.status = resp.status;
  return err;
}

// fetch() rejects with a bare TypeError ("Failed to fetch") when the server cannot be reached.
function networkError(err, midStream) {
  if (err instanceof TypeError) {
    return midStream ? "The connection to the server was lost; the answer above is incomplete."
      : "Cannot reach the server: is it still running?";
  }
  return err.message || String(err);
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) throw await responseError(resp);
    const data = (await resp.json()).data[0];
    modelId = data.id;
    limits = data.limits || {};
    els.model.textContent = `${data.id} · ${data.image_size}px · ${data.image_tokens} image tokens`;
  } catch (e) {
    modelId = null;
    els.model.textContent = "model unavailable: " + networkError(e, false);
    if (e.status === 401) askForKey();
  }
}

function askForKey() {
  els.settings.open = true;
  els.apiKey.focus();
}

// ---- image: click, drop or paste -------------------------------------------------------
// A refused file also drops the image chosen before it, so that Ask cannot send an image the user replaced.
function refuseImage(msg) { clearImage(); showError(msg); }

function setImage(file) {
  const seq = ++imageSeq;
  if (!file || !file.type.startsWith("image/")) { refuseImage("That is not an image file."); return; }
  if (file.type === "image/svg+xml") { refuseImage("SVG images are not supported: use PNG, JPEG, WebP, GIF or BMP."); return; }
  if (file.size === 0) { refuseImage("That image file is empty."); return; }
  if (limits.max_image_bytes && file.size > limits.max_image_bytes) {
    refuseImage(`That image is ${mb(file.size)}, more than the server's limit of ${mb(limits.max_image_bytes)}.`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    if (seq !== imageSeq) return; // another image was chosen meanwhile
    const url = reader.result;
    const probe = new Image();    // the browser must be able to decode it, or the preview would be blank
    probe.onload = () => {
      if (seq !== imageSeq) return;
      const pixels = probe.naturalWidth * probe.naturalHeight;
      if (limits.max_image_pixels && pixels > limits.max_image_pixels) {
        refuseImage(`That image is ${probe.naturalWidth}x${probe.naturalHeight} pixels, more than the server's ` +
                    `limit of ${limits.max_image_pixels} pixels.`);
        return;
      }
      imageURL = url;
      els.preview.src = url;
      els.preview.alt = `chosen image: ${file.name || "pasted"} (${probe.naturalWidth}x${probe.naturalHeight})`;
      els.preview.hidden = false;
      els.clear.hidden = false;
      els.hint.hidden = true;
      showError("");
    };
    probe.onerror = () => { if (seq === imageSeq) refuseImage("That file is not an image the browser can read."); };
    probe.src = url;
  };
  reader.onerror = () => { if (seq === imageSeq) refuseImage("The image file could not be read."); };
  reader.readAsDataURL(file);
}
function clearImage() {
  imageSeq++;
  imageURL = null;
  els.preview.hidden = true; els.preview.removeAttribute("src"); els.preview.alt = "";
  els.clear.hidden = true; els.hint.hidden = false; els.file.value = "";
}
function mb(bytes) { return `${(bytes / 1048576).toFixed(1)} MiB`; }

els.drop.addEventListener("click", (e) => { if (e.target !== els.clear) els.file.click(); });
els.drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); els.file.click(); } });
els.file.addEventListener("change", () => {
  const file = els.file.files[0];
  els.file.value = ""; // choosing the same file again fires "change" again
  if (file) setImage(file);
});
els.clear.addEventListener("click", (e) => { e.stopPropagation(); clearImage(); });
els.drop.addEventListener("dragover", (e) => { e.preventDefault(); els.drop.classList.add("over"); });
els.drop.addEventListener("dragleave", () => els.drop.classList.remove("over"));
els.drop.addEventListener("drop", (e) => {
  e.preventDefault(); els.drop.classList.remove("over");
  if (e.dataTransfer.files[0]) setImage(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  for (const item of e.clipboardData.items) {
    if (item.kind === "file" && item.type.startsWith("image/")) { setImage(item.getAsFile()); e.preventDefault(); return; }
  }
});
els.question.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); els.form.requestSubmit(); }
});
// A setting out of range blocks the form; the browser can only point at it when Settings is open.
els.form.addEventListener("invalid", () => { els.settings.open = true; }, true);

// ---- asking ---------------------------------------------------------------------------
function showError(msg) { els.error.textContent = msg; }

function fmt(x, digits = 0) { return Number(x).toFixed(digits); }
function finite(x) { return typeof x === "number" && Number.isFinite(x); }

function showStats(clientTTFT, nChunks, t0, timings, usage) {
  const parts = [];
  const ttft = timings && finite(timings.ttft_s) ? timings.ttft_s * 1000 : clientTTFT;
  if (ttft != null) parts.push(`TTFT ${fmt(ttft)} ms`);
  if (timings && finite(timings.decode_tokens_per_s) && timings.decode_tokens_per_s > 0) {
    parts.push(`${fmt(timings.decode_tokens_per_s, 1)} tokens/s`);
  } else if (clientTTFT != null && nChunks > 1) {
    const secs = (performance.now() - t0 - clientTTFT) / 1000;
    if (secs > 0) parts.push(`${fmt((nChunks - 1) / secs, 1)} tokens/s`);
  }
  if (usage && finite(usage.completion_tokens)) parts.push(`${usage.completion_tokens} tokens · prompt ${usage.prompt_tokens}`);
  if (timings && finite(timings.encode_s) && finite(timings.prefill_s)) {
    parts.push(`encode ${fmt(timings.encode_s * 1000)} ms · prefill ${fmt(timings.prefill_s * 1000)} ms`);
  }
  els.stats.textContent = parts.join(" · ");
}

// Server-sent events as the spec frames them: events end at a blank line (LF, CRLF or CR line ends), and the
// data lines of one event are joined with newlines. Returns [events, rest of the buffer].
function splitEvents(buffer) {
  const events = [];
  const re = /\r\n\r\n|\n\n|\r\r/g;
  let start = 0, m;
  while ((m = re.exec(buffer)) !== null) {
    const data = [];
    for (const line of buffer.slice(start, m.index).split(/\r\n|\n|\r/)) {
      if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
    }
    if (data.length) events.push(data.join("\n"));
    start = m.index + m[0].length;
  }
  return [events, buffer.slice(start)];
}

function appendAnswer(text) {
  const box = els.answer;
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
  box.textContent += text;
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function setBusy(on) {
  busy = on;
  els.send.disabled = on; els.stop.disabled = !on;
  els.output.setAttribute("aria-busy", on ? "true" : "false");
  els.answer.classList.toggle("streaming", on);
}

async function ask(e) {
  e.preventDefault();
  if (busy) return;
  const question = els.question.value.trim();
  if (!question && !imageURL) { showError("Choose an image or write a question."); return; }
  const hadFocus = document.activeElement;
  setBusy(true); // before anything that waits, so a second click cannot send twice
  if (hadFocus === els.send) els.stop.focus();
  showError(""); els.answer.textContent = ""; els.stats.textContent = "";
  const ctl = new AbortController();
  controller = ctl;
  const t0 = performance.now();
  let clientTTFT = null, nChunks = 0, timings = null, usage = null, finished = false, streaming = false;
  try {
    if (!modelId) {
      await loadModel();
      if (!modelId) throw new Error("The server has no model to answer with: " + els.model.textContent);
    }
    const content = [];
    if (imageURL) content.push({ type: "image_url", image_url: { url: imageURL } });
    content.push({ type: "text", text: question || "Describe the image." });
    const body = {
      model: modelId, stream: true, stream_options: { include_usage: true },
      max_tokens: Number(els.maxTokens.value) || 256, temperature: Number(els.temperature.value) || 0,
      messages: [{ role: "user", content }],
    };
    const payload = JSON.stringify(body);
    const size = new Blob([payload]).size;
    if (limits.max_request_bytes && size > limits.max_request_bytes) {
      throw new Error(`The request is ${mb(size)} (the image, base64-encoded), more than the server's ` +
                      `limit of ${mb(limits.max_request_bytes)}: choose a smaller image.`);
    }
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: payload, signal: ctl.signal,
    });
    if (!resp.ok) throw await responseError(resp);
    streaming = true;
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let events;
      [events, buffer] = splitEvents(buffer);
      for (const data of events) {
        if (data === "[DONE]") { finished = true; continue; }
        const msg = JSON.parse(data);
        const err = errorText(msg);
        if (err) throw new Error(err);
        if (msg.timings) timings = msg.timings;
        if (msg.usage) usage = msg.usage;
        const choice = msg.choices && msg.choices[0];
        if (choice && choice.finish_reason) finished = true;
        if (choice && choice.delta && choice.delta.content) {
          if (clientTTFT === null) clientTTFT = performance.now() - t0;
          nChunks += 1;
          appendAnswer(choice.delta.content);
        }
      }
      if (events.length) showStats(clientTTFT, nChunks, t0, timings, usage);
    }
    if (!finished) showError("The stream ended before the answer did: the answer above is incomplete.");
    if (!els.answer.textContent) els.answer.textContent = "(empty answer)";
  } catch (err) {
    if (err.name === "AbortError") {
      if (els.answer.textContent) appendAnswer(" [stopped]");
    } else {
      showError(networkError(err, streaming));
      if (err.status === 401) askForKey();
    }
  } finally {
    if (controller === ctl) controller = null;
    const focusLost = document.activeElement === els.stop || document.activeElement === document.body;
    setBusy(false);
    if (focusLost && document.activeElement !== els.apiKey) els.question.focus();
  }
}

els.form.addEventListener("submit", ask);
els.stop.addEventListener("click", () => controller && controller.abort());
loadModel();
