//! The HTML pages. `/` picks an image and a piece (named, or uploaded), follows the
//! preparation over SSE (fetching → preparing → ready), starts the download and shows the
//! image's plain sha256 with a copy button, the checksum file, and how to write the image to a
//! USB stick. Without JavaScript the form is a GET to `/get`, which redirects to
//! `/os/{image}/{piece}`: the same facts and a plain download link, rendered on the server.
//!
//! Everything the pages use is served from this origin (`/assets/…`, content-hashed names,
//! immutable), so a strict Content-Security-Policy holds: no inline script or style, no
//! external fonts, images or scripts.

use std::fmt::Write as _;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::catalog::Image;
use crate::state::{AppState, Prepared};

const CSS: &str = include_str!("../assets/page.css");
const JS: &str = include_str!("../assets/page.js");

/// The Content-Security-Policy every page is served with.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; \
     frame-ancestors 'none'";

fn hashed(name: &str, ext: &str, body: &str) -> String {
    let h = hex::encode(&Sha256::digest(body.as_bytes())[..6]);
    format!("{name}-{h}.{ext}")
}

fn names() -> &'static (String, String) {
    static N: OnceLock<(String, String)> = OnceLock::new();
    N.get_or_init(|| (hashed("page", "css", CSS), hashed("page", "js", JS)))
}

/// A static asset by file name (`page-<hash>.css`): content type and bytes. The names change
/// with the content, so responses may be cached forever.
pub fn asset(file: &str) -> Option<(&'static str, &'static str)> {
    let (css, js) = names();
    if file == css {
        Some(("text/css; charset=utf-8", CSS))
    } else if file == js {
        Some(("text/javascript; charset=utf-8", JS))
    } else {
        None
    }
}

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// `16.8 MB (16,777,216 bytes)`: decimal units, as file managers and Etcher show them.
pub fn human_size(n: u64) -> String {
    let mut digits = n.to_string();
    let mut grouped = String::new();
    while digits.len() > 3 {
        let tail = digits.split_off(digits.len() - 3);
        grouped = format!(",{tail}{grouped}");
    }
    grouped = format!("{digits}{grouped}");
    let short = match n {
        0..=999 => return format!("{n} bytes"),
        1_000..=999_999 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    };
    format!("{short} ({grouped} bytes)")
}

fn layout(title: &str, body: &str, script: bool) -> String {
    let (css, js) = names();
    let script = if script {
        format!("<script src=\"/assets/{js}\" defer></script>\n")
    } else {
        String::new()
    };
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<link rel=\"stylesheet\" href=\"/assets/{css}\">\n{script}</head>\n\
         <body>\n{body}<footer><p>Served by kiln. Every image is the same base with your piece \
         written into it; nothing else changes.</p></footer>\n</body>\n</html>\n",
        esc(title)
    )
}

/// How to write the image, for `.img` and `.iso` alike. `file` is the download's name when
/// known; otherwise spans of class `fname` hold a placeholder the script fills in.
fn flash_help(file: Option<&str>, ext: &str) -> String {
    let f = esc(file.unwrap_or(&format!("FILE.{ext}")));
    let f = format!("<span class=\"fname\">{f}</span>");
    format!(
        r##"<section aria-labelledby="flash-h">
<h2 id="flash-h">Write the image to a USB stick</h2>
<p>The file is a complete disk image (<code>.<span class="ext">{ext}</span></code>). Write it
byte for byte to the <em>whole</em> stick — not to a partition, and not by copying the file
onto the stick. Everything on the stick is erased. A <code>.iso</code> is written the same way
as a <code>.img</code>, and can also be burned to a DVD.</p>
<h3>With balenaEtcher (Windows, macOS, Linux)</h3>
<ol><li>Install balenaEtcher from its website.</li>
<li>Choose <strong>Flash from file</strong> and pick {f}.</li>
<li>Choose the USB stick as the target, then <strong>Flash</strong>. Etcher checks what it
wrote.</li></ol>
<h3>With <code>dd</code> (Linux, macOS)</h3>
<p>Find the stick's device with <code>lsblk</code> (Linux) or <code>diskutil list</code>
(macOS) and double-check it: <code>dd</code> overwrites whatever you name.</p>
<pre>sudo dd if={f} of=/dev/sdX bs=4M conv=fsync status=progress</pre>
<p>On macOS use <code>/dev/rdiskN</code> after <code>diskutil unmountDisk /dev/diskN</code>,
and <code>bs=4m</code>.</p>
<h3>On Windows without Etcher</h3>
<p>Use Rufus: select the stick, then the file ({f}); for a <code>.iso</code>, choose
<strong>Write in DD Image mode</strong> when Rufus asks.</p>
<h3>Check the download first</h3>
<p>The checksum must equal the SHA-256 shown on this page:</p>
<ul><li>Linux: <code>sha256sum {f}</code></li>
<li>macOS: <code>shasum -a 256 {f}</code></li>
<li>Windows: <code>certutil -hashfile {f} SHA256</code></li></ul>
<p>Or download the <code>.sha256</code> file next to the image and run
<code>sha256sum -c {f}.sha256</code>.</p>
</section>
"##
    )
}

const ABOUT_PIECE: &str = r##"<section aria-labelledby="piece-h">
<h2 id="piece-h">What is a piece?</h2>
<p>A piece is the web page the machine shows, fullscreen, when it boots from the stick: one
HTML (or plain text) file. Name one this server knows, or upload your own. It is written into
a space reserved for it in the image; the rest of the image is the same for everyone, which is
why your image is ready in a moment and why its checksum is your file's own.</p>
</section>
"##;

fn image_options(st: &AppState) -> String {
    let mut options = String::new();
    for im in st.images.values() {
        let version = im.version.as_deref().unwrap_or("");
        let size = human_size(im.len());
        let label = if version.is_empty() {
            format!("{} — {size}", im.title())
        } else {
            format!("{} {version} — {size}", im.title())
        };
        let _ = write!(
            options,
            "<option value=\"{}\" data-version=\"{}\" data-size=\"{}\" data-ext=\"{}\">{}</option>",
            esc(&im.config.name),
            esc(version),
            esc(&size),
            esc(&im.config.extension),
            esc(&label)
        );
    }
    options
}

/// The page at `/`.
pub fn index(st: &AppState) -> String {
    let mut pieces = String::new();
    for p in st.sources.list() {
        let _ = write!(pieces, "<option value=\"{}\">", esc(&p));
    }
    let ext = st
        .images
        .values()
        .next()
        .map_or("img", |im| im.config.extension.as_str());
    // The first image's limit (the page starts with it selected); the server checks the
    // chosen image's own.
    let cap = st
        .images
        .values()
        .next()
        .and_then(|im| im.slot().map(|s| s.capacity))
        .unwrap_or(u64::MAX);
    let upload_max = human_size(st.limits.upload_max.0.min(cap));
    let uploads = st.sources.uploads().is_some();
    let upload = if uploads {
        format!(
            r##"<div id="upload" hidden>
<label for="file" class="or">…or upload your own page</label>
<input id="file" type="file" accept=".html,.htm,.txt,text/html,text/plain" aria-describedby="file-hint">
<p class="hint" id="file-hint">An HTML or plain text file of at most {upload_max}.</p>
</div>
<noscript><p class="hint">Uploading a page needs JavaScript; naming a piece works without it.</p></noscript>
"##
        )
    } else {
        String::new()
    };
    let body = format!(
        r##"<header><h1>Make your OS image</h1>
<p class="lead">Choose an image and the piece it should show. You get a disk image to write to a
USB stick, with a checksum to verify it.</p></header>
<main>
<form id="form" action="/get" method="get">
<label for="image">Image</label>
<select id="image" name="image" aria-describedby="image-info">{options}</select>
<p class="hint" id="image-info"></p>
<label for="piece">Piece</label>
<input id="piece" name="piece" type="text" list="pieces" placeholder="name of a piece" autocomplete="off" aria-describedby="piece-hint">
<datalist id="pieces">{pieces}</datalist>
<p class="hint" id="piece-hint">The page the machine shows — see “What is a piece?” below.</p>
{upload}<p class="actions"><button id="go" type="submit">Make my image</button></p>
</form>
<section id="progress" aria-labelledby="progress-h" hidden>
<h2 id="progress-h">Progress</h2>
<ol id="steps">
<li id="step-fetching" class="pending">Fetching the piece<span class="state"></span></li>
<li id="step-preparing" class="pending">Preparing your image<span class="state"></span></li>
<li id="step-ready" class="pending">Ready — download starts<span class="state"></span></li>
</ol>
<p id="status" role="status" aria-live="polite"></p>
<p id="error" role="alert"></p>
</section>
<section id="result" class="box" aria-labelledby="result-h" hidden>
<h2 id="result-h" tabindex="-1">Your image is ready</h2>
<dl class="facts">
<dt>Image</dt><dd id="r-title"></dd>
<dt>Version</dt><dd id="r-version"></dd>
<dt>File</dt><dd id="r-file"></dd>
<dt>Size</dt><dd id="r-size"></dd>
<dt>SHA-256</dt><dd><code id="r-sha256" class="digest"></code> <button type="button" id="copy" class="small">Copy</button></dd>
</dl>
<p class="big">Download didn't start? <a id="r-link" href="#">Click here</a>.</p>
<p>Checksum file: <a id="r-sumfile" href="#"></a><span id="r-sig" hidden>, signed:
<a id="r-siglink" href="#"></a></span></p>
</section>
{flash}{about}</main>
"##,
        options = image_options(st),
        flash = flash_help(None, ext),
        about = ABOUT_PIECE,
    );
    layout("Make your OS image", &body, true)
}

/// URLs of a prepared download, with the friendly `label` carried along.
pub struct Links {
    /// The image.
    pub url: String,
    /// `sha256sum` file.
    pub sha256_url: String,
    /// Its minisign signature, when a key is configured.
    pub minisig_url: Option<String>,
    /// The download's file name.
    pub filename: String,
}

/// The links of `p` for a client that named it with `label`.
pub fn links(st: &AppState, p: &Prepared, label: Option<&str>) -> Links {
    let im = &p.image;
    let q = label.map_or(String::new(), |l| format!("?name={l}"));
    let base = format!("/os/{}/{}.{}", im.config.name, p.piece, im.config.extension);
    Links {
        url: format!("{base}{q}"),
        sha256_url: format!("{base}.sha256{q}"),
        minisig_url: st
            .signer
            .as_ref()
            .map(|_| format!("{base}.sha256.minisig{q}")),
        filename: im.filename(&p.piece, label),
    }
}

fn facts(im: &Image, filename: &str, size: u64, sha256: &str) -> String {
    format!(
        r##"<dl class="facts">
<dt>Image</dt><dd id="r-title">{}</dd>
<dt>Version</dt><dd id="r-version">{}</dd>
<dt>File</dt><dd id="r-file">{}</dd>
<dt>Size</dt><dd id="r-size">{}</dd>
<dt>SHA-256</dt><dd><code id="r-sha256" class="digest">{}</code></dd>
</dl>
"##,
        esc(im.title()),
        esc(im.version.as_deref().unwrap_or("—")),
        esc(filename),
        esc(&human_size(size)),
        esc(sha256)
    )
}

/// The page of one prepared piece (`/os/{image}/{piece}`): works without JavaScript.
pub fn piece_page(st: &AppState, p: &Prepared, label: Option<&str>) -> String {
    let l = links(st, p, label);
    let sha = hex::encode(p.sha256);
    let sig = match &l.minisig_url {
        Some(u) => format!(
            ", signed: <a href=\"{}\">{}.sha256.minisig</a>",
            esc(u),
            esc(&l.filename)
        ),
        None => String::new(),
    };
    let body = format!(
        r##"<header><h1>Your image is ready</h1>
<p class="lead"><a href="/">Make another image</a></p></header>
<main>
<section id="result" class="box" aria-labelledby="result-h" data-sha256="{sha}">
<h2 id="result-h">{title}</h2>
{facts}<p class="big"><a id="r-link" class="button" href="{url}" download="{file}">Download {file}</a></p>
<p>Checksum file: <a id="r-sumfile" href="{sum}">{file}.sha256</a>{sig}</p>
</section>
{flash}{about}</main>
"##,
        title = esc(p.image.title()),
        facts = facts(&p.image, &l.filename, p.composed.len(), &sha),
        url = esc(&l.url),
        file = esc(&l.filename),
        sum = esc(&l.sha256_url),
        flash = flash_help(Some(&l.filename), &p.image.config.extension),
        about = ABOUT_PIECE,
    );
    layout(
        &format!("{} — {}", l.filename, p.image.title()),
        &body,
        false,
    )
}

/// A page for an error on the no-JavaScript path.
pub fn error_page(message: &str) -> String {
    let body = format!(
        r##"<header><h1>That did not work</h1></header>
<main>
<section class="box problem" aria-labelledby="error-h">
<h2 id="error-h">What went wrong</h2>
<p id="error" role="alert">{}</p>
<p><a href="/">Back to the start</a></p>
</section>
{}</main>
"##,
        esc(message),
        ABOUT_PIECE
    );
    layout("That did not work", &body, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_escaping() {
        for (n, want) in [
            (0, "0 bytes"),
            (999, "999 bytes"),
            (16_777_216, "16.8 MB (16,777,216 bytes)"),
            (3_221_225_472, "3.22 GB (3,221,225,472 bytes)"),
            (1_000, "1.0 kB (1,000 bytes)"),
        ] {
            assert_eq!(human_size(n), want);
        }
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn assets_are_found_by_their_hashed_names_only() {
        let (css, js) = names();
        assert!(css.starts_with("page-") && css.ends_with(".css"), "{css}");
        assert_eq!(asset(css).map(|a| a.1), Some(CSS));
        assert_eq!(asset(js).map(|a| a.1), Some(JS));
        assert_eq!(asset("page.css"), None);
        assert_eq!(asset("../Cargo.toml"), None);
    }
}
