// Opens kiln serve's page in headless Chromium, names a piece (or uploads a file), waits for
// the download and prints what happened as JSON.
// usage: node download.mjs URL OUTDIR piece NAME | node download.mjs URL OUTDIR upload FILE
import { chromium } from 'playwright-core';

const [url, outDir, mode, arg] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--no-first-run'],
});
try {
  const ctx = await browser.newContext({ acceptDownloads: true });
  const page = await ctx.newPage();
  await page.goto(url);
  if (mode === 'upload') {
    await page.setInputFiles('#file', arg);
  } else {
    await page.fill('#piece', arg);
  }
  const downloading = page.waitForEvent('download', { timeout: 60000 });
  await page.click('#go');
  const download = await downloading;
  const name = download.suggestedFilename();
  const file = `${outDir}/${name}`;
  await download.saveAs(file);
  const steps = await page.evaluate(() => window.kilnSteps || []);
  const classes = await page.evaluate(() =>
    ['fetching', 'preparing', 'ready'].map((s) => document.getElementById('step-' + s).className));
  const digest = await page.getAttribute('#result', 'data-digest');
  console.log(JSON.stringify({ name, file, steps, classes, digest }));
} finally {
  await browser.close();
}
