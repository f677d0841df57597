//! The HTML page at `/`: pick an image, name a piece or upload one, watch the preparation over
//! SSE (fetching → preparing → ready), then the download starts.

use crate::state::AppState;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The page.
pub fn render(st: &AppState) -> String {
    let mut options = String::new();
    for im in st.images.values() {
        let title = im.config.title.as_deref().unwrap_or(&im.config.name);
        options.push_str(&format!(
            "<option value=\"{}\">{} ({} MB)</option>",
            esc(&im.config.name),
            esc(title),
            im.len() / 1_000_000
        ));
    }
    let mut pieces = String::new();
    for p in st.sources.list() {
        pieces.push_str(&format!("<option value=\"{}\">", esc(&p)));
    }
    PAGE.replace("{{OPTIONS}}", &options)
        .replace("{{PIECES}}", &pieces)
}

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>kiln — personalised OS images</title>
<style>
body { font: 16px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }
label { display: block; margin-top: 1rem; }
input, select, button { font: inherit; }
#steps li { color: #888; }
#steps li.done { color: #070; }
#steps li.active { color: #000; font-weight: bold; }
#error { color: #b00; }
</style>
</head>
<body>
<h1>Personalised OS image</h1>
<form id="form">
<label>Image <select id="image">{{OPTIONS}}</select></label>
<label>Piece <input id="piece" list="pieces" placeholder="name of a piece" autocomplete="off"></label>
<datalist id="pieces">{{PIECES}}</datalist>
<label>…or upload a page <input id="file" type="file" accept=".html,.htm,.txt,text/html,text/plain"></label>
<p><button id="go" type="submit">Make my image</button></p>
</form>
<ol id="steps">
<li id="step-fetching">fetching the piece</li>
<li id="step-preparing">preparing the image</li>
<li id="step-ready">ready — downloading</li>
</ol>
<p id="error" role="alert"></p>
<p id="result"></p>
<script>
const $ = (id) => document.getElementById(id);
function mark(step) {
  const order = ["fetching", "preparing", "ready"];
  const i = order.indexOf(step);
  order.forEach((s, j) => {
    const li = $("step-" + s);
    li.className = j < i ? "done" : (j === i ? (s === "ready" ? "done" : "active") : "");
  });
}
$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("error").textContent = "";
  $("result").textContent = "";
  const image = $("image").value;
  let piece = $("piece").value.trim();
  const file = $("file").files[0];
  if (file) {
    const r = await fetch("/os/" + encodeURIComponent(image), {
      method: "POST", body: file, headers: { "content-type": file.type || "text/html" } });
    if (!r.ok) { $("error").textContent = "upload refused: " + (await r.text()); return; }
    piece = (await r.json()).id;
  }
  if (!piece) { $("error").textContent = "name a piece or choose a file"; return; }
  const es = new EventSource("/api/prepare/" + encodeURIComponent(image) + "/" + encodeURIComponent(piece));
  es.addEventListener("step", (e) => {
    const d = JSON.parse(e.data);
    (window.kilnSteps = window.kilnSteps || []).push(d.step);
    if (d.step === "error") {
      es.close();
      $("error").textContent = d.message;
      return;
    }
    mark(d.step);
    if (d.step === "ready") {
      es.close();
      $("result").textContent = "size " + d.size + " bytes, " + d.chunked_digest;
      $("result").dataset.digest = d.chunked_digest;
      window.location.href = d.url;
    }
  });
  es.onerror = () => { es.close(); };
});
</script>
</body>
</html>
"#;
