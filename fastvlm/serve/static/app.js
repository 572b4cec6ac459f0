// FastVLM web page: one image + a question -> a streamed answer from /v1/chat/completions.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  model: $("model"), form: $("ask"), drop: $("drop"), file: $("file"), preview: $("preview"),
  hint: $("drop-hint"), clear: $("clear-image"), question: $("question"), send: $("send"),
  stop: $("stop"), maxTokens: $("max-tokens"), temperature: $("temperature"), apiKey: $("api-key"),
  answer: $("answer"), stats: $("stats"), error: $("error"),
};
let modelId = null;
let imageURL = null; // data: URI of the chosen image
let controller = null;

els.apiKey.value = localStorage.getItem("fastvlm-api-key") || "";
els.apiKey.addEventListener("change", () => { localStorage.setItem("fastvlm-api-key", els.apiKey.value); loadModel(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  if (els.apiKey.value) h["Authorization"] = "Bearer " + els.apiKey.value;
  return h;
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `HTTP ${resp.status}`;
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const data = (await resp.json()).data[0];
    modelId = data.id;
    els.model.textContent = `${data.id} · ${data.image_size}px · ${data.image_tokens} image tokens`;
  } catch (e) {
    els.model.textContent = "model unavailable: " + e.message;
  }
}

// ---- image: click, drop or paste -------------------------------------------------------
function setImage(file) {
  if (!file || !file.type.startsWith("image/")) { showError("That is not an image file."); return; }
  const reader = new FileReader();
  reader.onload = () => {
    imageURL = reader.result;
    els.preview.src = imageURL;
    els.preview.hidden = false;
    els.clear.hidden = false;
    els.hint.hidden = true;
  };
  reader.readAsDataURL(file);
}
function clearImage() {
  imageURL = null;
  els.preview.hidden = true; els.preview.removeAttribute("src");
  els.clear.hidden = true; els.hint.hidden = false; els.file.value = "";
}
els.drop.addEventListener("click", (e) => { if (e.target !== els.clear) els.file.click(); });
els.drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); els.file.click(); } });
els.file.addEventListener("change", () => els.file.files[0] && setImage(els.file.files[0]));
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

// ---- asking ---------------------------------------------------------------------------
function showError(msg) { els.error.textContent = msg; }

function fmt(x, digits = 0) { return Number(x).toFixed(digits); }

function showStats(clientTTFT, nChunks, t0, timings, usage) {
  const parts = [];
  const ttft = timings ? timings.ttft_s * 1000 : clientTTFT;
  if (ttft != null) parts.push(`TTFT ${fmt(ttft)} ms`);
  if (timings && timings.decode_tokens_per_s) parts.push(`${fmt(timings.decode_tokens_per_s, 1)} tokens/s`);
  else if (clientTTFT != null && nChunks > 1) {
    const secs = (performance.now() - t0 - clientTTFT) / 1000;
    if (secs > 0) parts.push(`${fmt((nChunks - 1) / secs, 1)} tokens/s`);
  }
  if (usage) parts.push(`${usage.completion_tokens} tokens · prompt ${usage.prompt_tokens}`);
  if (timings) parts.push(`encode ${fmt(timings.encode_s * 1000)} ms · prefill ${fmt(timings.prefill_s * 1000)} ms`);
  els.stats.textContent = parts.join(" · ");
}

async function ask(e) {
  e.preventDefault();
  const question = els.question.value.trim();
  if (!question && !imageURL) return;
  if (!modelId) await loadModel();
  showError(""); els.answer.textContent = ""; els.stats.textContent = "";
  const content = [];
  if (imageURL) content.push({ type: "image_url", image_url: { url: imageURL } });
  content.push({ type: "text", text: question || "Describe the image." });
  const body = {
    model: modelId, stream: true, stream_options: { include_usage: true },
    max_tokens: Number(els.maxTokens.value) || 256, temperature: Number(els.temperature.value) || 0,
    messages: [{ role: "user", content }],
  };
  controller = new AbortController();
  els.send.disabled = true; els.stop.disabled = false;
  els.answer.classList.add("streaming");
  const t0 = performance.now();
  let clientTTFT = null, nChunks = 0, timings = null, usage = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let sep;
      while ((sep = buffer.indexOf("\n\n")) !== -1) {
        const event = buffer.slice(0, sep);
        buffer = buffer.slice(sep + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) throw new Error(msg.error.message);
          if (msg.timings) timings = msg.timings;
          if (msg.usage) usage = msg.usage;
          const delta = msg.choices && msg.choices[0] && msg.choices[0].delta;
          if (delta && delta.content) {
            if (clientTTFT === null) clientTTFT = performance.now() - t0;
            nChunks += 1;
            els.answer.textContent += delta.content;
          }
        }
        showStats(clientTTFT, nChunks, t0, timings, usage);
      }
    }
    if (!els.answer.textContent) els.answer.textContent = "(empty answer)";
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message);
  } finally {
    els.answer.classList.remove("streaming");
    els.send.disabled = false; els.stop.disabled = true; controller = null;
  }
}

els.form.addEventListener("submit", ask);
els.stop.addEventListener("click", () => controller && controller.abort());
loadModel();
