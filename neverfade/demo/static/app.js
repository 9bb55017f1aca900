// neverfade demo page: pick or upload an image, choose methods, stream each method's caption into its pane.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { file: null, sample: null, info: null };

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

function choose(file, sample, src, name) {
  state.file = file;
  state.sample = sample;
  $("#preview").src = src;
  $("#chosen-name").textContent = name;
  document.querySelectorAll("#samples img").forEach((img) => img.classList.toggle("selected", img.dataset.id === sample));
  showError("");
}

async function init() {
  const info = await (await fetch("/api/info")).json();
  state.info = info;
  $("#model").textContent = `${info.model} · up to ${info.max_new_tokens} new tokens · "${info.prompt}"`;
  for (const s of info.samples) {
    const img = document.createElement("img");
    img.src = s.url;
    img.alt = s.id;
    img.title = s.id;
    img.dataset.id = s.id;
    img.addEventListener("click", () => choose(null, s.id, s.url, s.id));
    $("#samples").append(img);
  }
  for (const m of info.methods) {
    const label = document.createElement("label");
    const box = Object.assign(document.createElement("input"), { type: "checkbox", value: m, name: "method" });
    box.checked = m === "baseline" || m === "sparc";
    label.append(box, " " + m);
    $("#methods").append(label);
  }
  $("#file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) choose(file, null, URL.createObjectURL(file), file.name);
  });
  $("#run").addEventListener("click", run);
}

function makePane(run, label) {
  const pane = document.createElement("div");
  pane.className = "pane running";
  pane.dataset.run = run;
  pane.innerHTML = `<h3><span class="label"></span><span class="status">writing…</span></h3><div class="caption"></div>`;
  pane.querySelector(".label").textContent = label;
  $("#panes").append(pane);
  return pane;
}

async function run() {
  showError("");
  const methods = [...document.querySelectorAll("#methods input:checked")].map((b) => b.value).join(",");
  const query = new URLSearchParams({ methods });
  if (state.sample) query.set("sample", state.sample);
  const options = { method: "POST" };
  if (state.file) options.body = state.file;
  $("#run").disabled = true;
  $("#panes").textContent = "";
  $("#legend").hidden = true;
  try {
    const response = await fetch(`/api/caption?${query}`, options);
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try { message = (await response.json()).error; } catch (_) { /* not JSON */ }
      showError(message);
      return;
    }
    await readEvents(response);
  } catch (err) {
    showError(`The request failed: ${err.message}`);
  } finally {
    $("#run").disabled = false;
  }
}

async function readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const panes = {};
  let image = null, buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const event = JSON.parse(buffer.slice(0, newline));
      buffer = buffer.slice(newline + 1);
      if (event.event === "image") {
        document.querySelectorAll("#legend .present, #legend .hallucinated").forEach((e) => { e.hidden = !event.ground_truth; });
        $("#legend .unknown").hidden = event.ground_truth;
        image = new Image();
        image.src = event.src;
        await image.decode();
      } else if (event.event === "run") {
        panes[event.run] = makePane(event.run, event.label);
      } else if (event.event === "text") {
        panes[event.run].querySelector(".caption").textContent += event.text;
      } else if (event.event === "done") {
        finish(panes[event.run], event, image);
      } else if (event.event === "error") {
        const pane = panes[event.run];
        pane.className = "pane failed";
        pane.querySelector(".status").textContent = "failed";
        pane.querySelector(".caption").textContent = event.message;
      }
    }
  }
}

function finish(pane, event, image) {
  pane.className = "pane done";
  pane.querySelector(".status").textContent = `${event.new_tokens} tokens`;
  const caption = pane.querySelector(".caption");
  caption.textContent = "";
  const marks = event.mentions;
  let last = 0;
  event.words.forEach((word, i) => {
    caption.append(event.caption.slice(last, word.start));
    const span = Object.assign(document.createElement("span"), { className: "w", textContent: event.caption.slice(word.start, word.end) });
    span.dataset.word = i;
    const mention = marks.find((m) => m.start >= word.start && m.end <= word.end);
    if (mention) {
      span.classList.add("obj", mention.present === null ? "unknown" : mention.present ? "present" : "hallucinated");
      span.title = mention.present === null ? mention.kind : mention.present ? `${mention.kind}: in the scene` : `${mention.kind}: not in the scene`;
    }
    caption.append(span);
    last = word.end;
  });
  caption.append(event.caption.slice(last));
  $("#legend").hidden = false;
  if (event.missed !== null) {
    const missed = Object.assign(document.createElement("div"), { className: "missed" });
    missed.textContent = event.missed.length ? `Missed: ${event.missed.join(", ")}` : "Missed: none";
    pane.append(missed);
  }
  if (event.heatmap && image) addHeatmap(pane, event, image);
}

function addHeatmap(pane, event, image) {
  const { rows, cols, counts } = event.heatmap;
  const width = 288, height = Math.round(288 * image.height / image.width);
  const box = Object.assign(document.createElement("div"), { className: "heat" });
  const base = Object.assign(document.createElement("canvas"), { className: "heat-image", width, height });
  const overlay = Object.assign(document.createElement("canvas"), { className: "heat-overlay", width, height });
  base.getContext("2d").drawImage(image, 0, 0, width, height);
  const note = Object.assign(document.createElement("div"), { className: "heat-caption" });
  box.append(base, overlay);
  pane.append(box, note);
  const total = counts.reduce((a, b) => a + b, 0);
  const draw = (cells, color, label) => {
    const ctx = overlay.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    const top = Math.max(1, ...cells.map((c) => c[1]));
    for (const [cell, value] of cells) {
      const r = Math.floor(cell / cols), c = cell % cols;
      ctx.fillStyle = `rgba(${color}, ${0.25 + 0.6 * value / top})`;
      ctx.fillRect(c * width / cols, r * height / rows, width / cols, height / rows);
    }
    note.textContent = label;
  };
  const showAll = () => draw(counts.map((n, i) => [i, n]).filter(([, n]) => n > 0), "255, 40, 0",
    `SPARC selected image tokens ${total} times over the caption (darker: more often). Hover a word.`);
  showAll();
  pane.querySelectorAll(".caption .w").forEach((span) => {
    const word = event.words[+span.dataset.word];
    span.addEventListener("mouseenter", () => {
      span.classList.add("active");
      draw(word.cells.map((c) => [c, 1]), "255, 200, 0",
        `While writing “${span.textContent}”: ${word.cells.length} image tokens selected (reinforced from the next token on).`);
    });
    span.addEventListener("mouseleave", () => { span.classList.remove("active"); showAll(); });
  });
}

init().catch((err) => showError(`Could not load the demo: ${err.message}`));
