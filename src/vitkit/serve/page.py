"""The web page served at `/`: one self-contained HTML file (inline CSS and JavaScript, no CDN).

A dropped or picked image is shown as the model sees it (resized, centre-cropped) and posted to
`/predict?attention=true`; the page draws the top-5 classes and, if served, the rollout map over it.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vitkit</title>
<style>
  :root { --fg: #1d2330; --muted: #667085; --line: #d9dee8; --accent: #3056d3; --bg: #f6f7fb; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg); }
  main { max-width: 860px; margin: 0 auto; padding: 24px 20px 40px; }
  h1 { font-size: 22px; margin: 0 0 2px; }
  #model { color: var(--muted); margin: 0 0 18px; font-size: 14px; }
  #drop { border: 2px dashed var(--line); border-radius: 12px; background: #fff; padding: 18px; text-align: center; }
  #drop.over { border-color: var(--accent); background: #eef2ff; }
  #drop p { margin: 0 0 10px; color: var(--muted); }
  .row { display: flex; gap: 24px; margin-top: 20px; flex-wrap: wrap; }
  .left { width: 320px; }
  .view { position: relative; width: 320px; height: 320px; background: #fff; border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
  .view canvas { position: absolute; left: 0; top: 0; }
  #results { flex: 1; min-width: 260px; }
  #predictions { list-style: none; padding: 0; margin: 0; }
  #predictions li { display: grid; grid-template-columns: 1fr auto; gap: 2px 10px; margin-bottom: 10px; }
  #predictions .label { font-weight: 600; overflow-wrap: anywhere; }
  #predictions .prob { font-variant-numeric: tabular-nums; color: var(--muted); }
  #predictions .bar { grid-column: 1 / 3; height: 8px; background: #e6e9f2; border-radius: 4px; overflow: hidden; }
  #predictions .bar span { display: block; height: 100%; background: var(--accent); }
  #predictions li:first-child .label { font-size: 18px; }
  #status { min-height: 1.5em; margin: 12px 0 0; }
  #status.error { color: #b42318; font-weight: 600; }
  .toggle { display: block; margin-top: 8px; color: var(--muted); font-size: 14px; }
</style>
</head>
<body>
<main>
  <h1>vitkit image classifier</h1>
  <p id="model">connecting&hellip;</p>
  <div id="drop">
    <p>Drop an image here, paste one, or choose a file.</p>
    <input type="file" id="file" accept="image/*">
  </div>
  <p id="status" role="status"></p>
  <div class="row">
    <div class="left">
      <div class="view"><canvas id="image" width="320" height="320"></canvas><canvas id="overlay" width="320" height="320"></canvas></div>
      <label class="toggle"><input type="checkbox" id="show-attention" checked> attention overlay (rollout)</label>
      <div id="attention-note" class="toggle"></div>
    </div>
    <div id="results"><ol id="predictions"></ol></div>
  </div>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let info = { max_upload_bytes: Infinity, img_size: [224, 224], attention: false };

fetch("/health").then((r) => r.json()).then((h) => {
  info = h;
  $("model").textContent = `${h.model} \\u00b7 ${h.backend} \\u00b7 ${h.classes} classes \\u00b7 ${h.img_size[0]}\\u00d7${h.img_size[1]} px`;
  $("attention-note").textContent = h.attention
    ? `The image as the model sees it (${h.img_size[0]}\u00d7${h.img_size[1]} px); bright = attended.`
    : "This model is served without attention maps.";
}).catch(() => { $("model").textContent = "server not reachable"; });

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// Show the image as the model sees it: shorter side resized, then centre-cropped to img_size.
function drawImage(img) {
  const [h, w] = info.img_size, canvas = $("image"), ctx = canvas.getContext("2d");
  const s = Math.min(h, w) / Math.min(img.naturalWidth, img.naturalHeight);
  const sw = w / s, sh = h / s, sx = (img.naturalWidth - sw) / 2, sy = (img.naturalHeight - sh) / 2;
  const scale = Math.min(320 / w, 320 / h);
  canvas.width = $("overlay").width = Math.round(w * scale);
  canvas.height = $("overlay").height = Math.round(h * scale);
  ctx.imageSmoothingEnabled = canvas.width < 4 * sw;  // keep tiny images crisp
  ctx.drawImage(img, sx, sy, sw, sh, 0, 0, canvas.width, canvas.height);
}

// Inferno-like colour map, values in [0, 1].
const STOPS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
function colour(v) {
  const x = Math.max(0, Math.min(1, v)) * (STOPS.length - 1), i = Math.min(Math.floor(x), STOPS.length - 2), t = x - i;
  return STOPS[i].map((c, k) => Math.round(c + t * (STOPS[i + 1][k] - c)));
}

let lastAttention = null;
function drawAttention() {
  const canvas = $("overlay"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!lastAttention || !$("show-attention").checked) return;
  const [gh, gw] = lastAttention.grid, small = document.createElement("canvas");
  small.width = gw; small.height = gh;
  const pixels = small.getContext("2d").createImageData(gw, gh);
  lastAttention.values.flat().forEach((v, i) => {
    const [r, g, b] = colour(v);
    pixels.data.set([r, g, b, Math.round(255 * (0.15 + 0.6 * v))], 4 * i);  // little attention: see-through
  });
  small.getContext("2d").putImageData(pixels, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
}
$("show-attention").addEventListener("change", drawAttention);

function showPredictions(top) {
  const list = $("predictions");
  list.replaceChildren(...top.map(({ class: name, prob }) => {
    const li = document.createElement("li"), label = document.createElement("span");
    const p = document.createElement("span"), bar = document.createElement("div"), fill = document.createElement("span");
    label.className = "label"; label.textContent = name;
    p.className = "prob"; p.textContent = (100 * prob).toFixed(1) + "%";
    bar.className = "bar"; fill.style.width = (100 * prob).toFixed(1) + "%";
    bar.append(fill); li.append(label, p, bar);
    return li;
  }));
}

async function classify(file) {
  if (!file) return;
  $("predictions").replaceChildren();
  lastAttention = null;
  drawAttention();
  if (file.size > info.max_upload_bytes) {
    setStatus(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MiB; the server accepts at most ${(info.max_upload_bytes / 2 ** 20).toFixed(1)} MiB.`, true);
    return;
  }
  const url = URL.createObjectURL(file), img = new Image();
  img.onload = () => { drawImage(img); drawAttention(); URL.revokeObjectURL(url); };
  img.src = url;  // a format the browser cannot show is still sent: the server may read it
  setStatus(`Classifying ${file.name}\\u2026`, false);
  const body = new FormData();
  body.append("file", file);
  const t0 = performance.now();
  try {
    const r = await fetch("/predict?topk=5&attention=true", { method: "POST", body });
    const result = await r.json().catch(() => ({ detail: r.statusText }));
    if (!r.ok) {
      setStatus(`Error ${r.status}: ${typeof result.detail === "string" ? result.detail : JSON.stringify(result.detail)}`, true);
      return;
    }
    showPredictions(result.top);
    lastAttention = result.attention;
    drawAttention();
    setStatus(`${file.name}: ${result.top[0].class} (${(performance.now() - t0).toFixed(0)} ms)`, false);
  } catch (e) {
    setStatus(`Request failed: ${e}`, true);
  }
}

$("file").addEventListener("change", (e) => classify(e.target.files[0]));
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => classify(e.dataTransfer.files[0]));
document.addEventListener("paste", (e) => classify([...e.clipboardData.files][0]));
</script>
</body>
</html>
"""
