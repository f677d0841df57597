// Drives kiln serve's page in headless Chromium (Debian's, through playwright-core) the way a
// person would, and prints what it saw as one JSON line for crates/kiln/tests/browser.rs to
// judge. It measures; it does not decide.
//
// usage: node download.mjs URL OUTDIR MODE ARG WIDTH HEIGHT SHOTS
//   MODE upload FILE   upload FILE through the form, follow the progress, download
//   MODE piece NAME    name a piece, follow the progress, download
//   MODE fail NAME     name a piece the server does not have; the run ends in the error state
//   MODE nojs NAME     JavaScript off: the form leads to the piece's page, whose link downloads
// SHOTS is a path prefix for the screenshots (PNG, full page).
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [url, outDir, mode, arg, width, height, shots] = process.argv.slice(2);
const viewport = { width: Number(width), height: Number(height) };

// Runs in the page: every visible text's colour against the background it is drawn on
// (ancestors' backgrounds composited over white), with the WCAG 2.1 contrast ratio.
function measure() {
  const parse = (c) => {
    const m = c.match(/rgba?\(([^)]+)\)/);
    if (!m) return null;
    const p = m[1].split(/[ ,/]+/).filter(Boolean).map(Number);
    return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 };
  };
  const over = (top, under) => ({
    r: top.r * top.a + under.r * (1 - top.a),
    g: top.g * top.a + under.g * (1 - top.a),
    b: top.b * top.a + under.b * (1 - top.a),
    a: 1,
  });
  const lum = (c) => {
    const f = (v) => {
      const s = v / 255;
      return s <= 0.03928 ? s / 12.92 : Math.pow((s + 0.055) / 1.055, 2.4);
    };
    return 0.2126 * f(c.r) + 0.7152 * f(c.g) + 0.0722 * f(c.b);
  };
  const hex = (c) => '#' + [c.r, c.g, c.b].map((v) => Math.round(v).toString(16).padStart(2, '0')).join('');
  const background = (el) => {
    const chain = [];
    for (let e = el; e; e = e.parentElement) chain.push(e);
    let bg = { r: 255, g: 255, b: 255, a: 1 };
    for (const e of chain.reverse()) {
      const c = parse(getComputedStyle(e).backgroundColor);
      if (c && c.a > 0) bg = over(c, bg);
    }
    return bg;
  };
  const visible = (el) => {
    const s = getComputedStyle(el);
    return s.visibility !== 'hidden' && s.display !== 'none' && el.getClientRects().length > 0;
  };
  const out = [];
  const add = (el, colour, text) => {
    const s = getComputedStyle(el);
    const bg = background(el);
    const fg = over(parse(colour), bg);
    const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
    const size = parseFloat(s.fontSize);
    const bold = Number(s.fontWeight) >= 700;
    out.push({
      text: text.trim().slice(0, 40),
      element: el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') + (el.className ? '.' + el.className : ''),
      color: hex(fg),
      background: hex(bg),
      ratio: Math.round(((hi + 0.05) / (lo + 0.05)) * 100) / 100,
      large: size >= 24 || (size >= 18.66 && bold),
    });
  };
  for (const el of document.body.querySelectorAll('*')) {
    if (!visible(el) || el.tagName === 'OPTION' || el.tagName === 'SCRIPT') continue;
    const own = [...el.childNodes].filter((n) => n.nodeType === 3).map((n) => n.textContent).join('');
    if (own.trim()) add(el, getComputedStyle(el).color, own);
    if (el.tagName === 'SELECT' && el.selectedOptions[0]) add(el, getComputedStyle(el).color, el.selectedOptions[0].text);
    if (el.tagName === 'INPUT' && el.placeholder && !el.value) {
      add(el, getComputedStyle(el, '::placeholder').color, el.placeholder);
    }
  }
  const doc = document.documentElement;
  const wide = [...document.body.querySelectorAll('*')]
    .filter((e) => visible(e) && e.getBoundingClientRect().right > doc.clientWidth + 0.5)
    .map((e) => e.tagName.toLowerCase() + (e.id ? '#' + e.id : ''));
  return { texts: out, scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth, wide };
}

// The step list in every state the page can put it in, and the busy button, measured too:
// a state that is on screen only for a few milliseconds still has to be readable.
async function measureStates(page) {
  return page.evaluate((measureSrc) => {
    const measure = eval('(' + measureSrc + ')');
    const results = [];
    const progress = document.getElementById('progress');
    const wasHidden = progress.hidden;
    progress.hidden = false;
    const lis = [...document.querySelectorAll('#steps li')];
    const saved = lis.map((li) => li.className);
    for (const cls of ['pending', 'active', 'done', 'failed']) {
      lis.forEach((li) => { li.className = cls; });
      results.push(...measure().texts.filter((t) => t.element.startsWith('li')).map((t) => ({ ...t, state: cls })));
    }
    lis.forEach((li, i) => { li.className = saved[i]; });
    progress.hidden = wasHidden;
    const go = document.getElementById('go');
    const was = go.disabled;
    go.disabled = true;
    results.push(...measure().texts.filter((t) => t.element.startsWith('button#go')).map((t) => ({ ...t, state: 'disabled' })));
    go.disabled = was;
    return results;
  }, measure.toString());
}

// Polls `fn` in the page until it returns true. (page.waitForFunction compiles its predicate
// with new Function, which the page's Content-Security-Policy rightly forbids.)
async function until(page, fn, timeout = 60000) {
  const t0 = Date.now();
  while (!(await page.evaluate(fn))) {
    if (Date.now() - t0 > timeout) throw new Error('timed out waiting for ' + fn);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// A persistent context on a fresh profile directory: Chromium gets its own --user-data-dir.
// It is removed when the context closes.
const profile = mkdtempSync(join(tmpdir(), 'kiln-chromium-'));
const ctx = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run'],
  acceptDownloads: true,
  viewport,
  javaScriptEnabled: mode !== 'nojs',
});
const result = { mode, viewport, requests: [], screenshots: [], checks: [] };
try {
  if (mode !== 'nojs') {
    await ctx.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: new URL(url).origin });
  }
  const page = await ctx.newPage();
  page.on('request', (r) => result.requests.push(r.url()));
  await page.goto(url);
  const shot = async (name) => {
    const path = `${shots}-${name}.png`;
    await page.screenshot({ path, fullPage: true });
    result.screenshots.push(path);
  };
  result.checks.push({ state: 'start', ...(await page.evaluate(measure)) });
  await shot('start');

  if (mode === 'nojs') {
    await page.fill('#piece', arg);
    await Promise.all([page.waitForNavigation(), page.click('#go')]);
    result.pageUrl = page.url();
    result.checks.push({ state: 'piece-page', ...(await page.evaluate(measure)) });
    await shot('piece-page');
    result.shown = await page.textContent('#r-sha256');
    const downloading = page.waitForEvent('download', { timeout: 60000 });
    await page.click('#r-link');
    const download = await downloading;
    result.name = download.suggestedFilename();
    result.file = `${outDir}/${result.name}`;
    await download.saveAs(result.file);
  } else {
    // Record the button's disabled flag and the live region's announcements as they change.
    await page.evaluate(() => {
      window.kilnBusy = [];
      window.kilnAnnounced = [];
      const go = document.getElementById('go');
      const status = document.getElementById('status');
      new MutationObserver(() => window.kilnBusy.push(go.disabled))
        .observe(go, { attributes: true, attributeFilter: ['disabled'] });
      new MutationObserver(() => { if (status.textContent) window.kilnAnnounced.push(status.textContent); })
        .observe(status, { childList: true, characterData: true, subtree: true });
    });
    if (mode === 'upload') await page.setInputFiles('#file', arg);
    else await page.fill('#piece', arg);
    if (mode === 'fail') {
      await page.click('#go');
      await until(page, () => document.getElementById('error').textContent !== '');
      result.error = await page.textContent('#error');
      result.errorRole = await page.getAttribute('#error', 'role');
    } else {
      const downloading = page.waitForEvent('download', { timeout: 60000 });
      await page.click('#go');
      const download = await downloading;
      result.name = download.suggestedFilename();
      result.file = `${outDir}/${result.name}`;
      await download.saveAs(result.file);
      await until(page, () => !document.getElementById('result').hidden);
      result.shown = await page.textContent('#r-sha256');
      result.linkHref = await page.getAttribute('#r-link', 'href');
      result.linkText = await page.textContent('#r-link');
      await page.click('#copy');
      result.copied = await page.evaluate(() => navigator.clipboard.readText());
    }
    result.steps = await page.evaluate(() => window.kilnSteps || []);
    result.classes = await page.evaluate(() =>
      ['fetching', 'preparing', 'ready'].map((s) => document.getElementById('step-' + s).className));
    result.busy = await page.evaluate(() => window.kilnBusy);
    result.announced = await page.evaluate(() => window.kilnAnnounced);
    result.live = await page.evaluate(() => {
      const s = document.getElementById('status');
      return { role: s.getAttribute('role'), live: s.getAttribute('aria-live') };
    });
    result.buttonEnabledAfter = await page.evaluate(() => !document.getElementById('go').disabled);
    result.checks.push({ state: mode === 'fail' ? 'failed' : 'ready', ...(await page.evaluate(measure)) });
    result.states = await measureStates(page);
    await shot(mode === 'fail' ? 'failed' : 'ready');
  }
} finally {
  await ctx.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
