// kiln serve's page: upload or name a piece, follow the preparation over server-sent events,
// then start the download and show its sha256. Without JavaScript the form is a plain GET to
// /get, which leads to the piece's own page with a download link.
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  const form = $('form');
  const go = $('go');
  const STEPS = ['fetching', 'preparing', 'ready'];
  let current = null;
  window.kilnSteps = [];

  function setStep(step, cls, state) {
    const li = $('step-' + step);
    li.className = cls;
    li.querySelector('.state').textContent = state ? ' — ' + state : '';
  }

  function mark(step) {
    const i = STEPS.indexOf(step);
    STEPS.forEach((s, j) => {
      if (j < i || (j === i && s === 'ready')) setStep(s, 'done', 'done');
      else if (j === i) setStep(s, 'active', 'in progress');
      else setStep(s, 'pending', '');
    });
    current = step;
  }

  function announce(text) {
    $('status').textContent = text;
  }

  function busy(on) {
    go.disabled = on;
    form.setAttribute('aria-busy', on ? 'true' : 'false');
    go.textContent = on ? 'Working…' : 'Make my image';
  }

  function fail(message) {
    setStep(current || 'fetching', 'failed', 'failed');
    $('error').textContent = message;
    announce('');
    busy(false);
  }

  function showInfo() {
    const o = $('image').selectedOptions[0];
    if (!o) return;
    const parts = [o.dataset.version ? 'version ' + o.dataset.version : '', o.dataset.size,
      '.' + o.dataset.ext + ' file'].filter(Boolean);
    $('image-info').textContent = parts.join(' · ');
    document.querySelectorAll('.ext').forEach((e) => { e.textContent = o.dataset.ext; });
  }

  function ready(d) {
    $('r-title').textContent = d.title;
    $('r-version').textContent = d.version || '—';
    $('r-file').textContent = d.filename;
    $('r-size').textContent = d.size_text;
    $('r-sha256').textContent = d.sha256;
    $('result').dataset.sha256 = d.sha256;
    const link = $('r-link');
    link.href = d.url;
    link.setAttribute('download', d.filename);
    const sum = $('r-sumfile');
    sum.href = d.sha256_url;
    sum.textContent = d.filename + '.sha256';
    const sig = $('r-sig');
    if (d.minisig_url) {
      $('r-siglink').href = d.minisig_url;
      $('r-siglink').textContent = d.filename + '.sha256.minisig';
      sig.hidden = false;
    } else {
      sig.hidden = true;
    }
    document.querySelectorAll('.fname').forEach((e) => { e.textContent = d.filename; });
    $('result').hidden = false;
    announce('Your image is ready. The download of ' + d.filename + ' starts now.');
    busy(false);
    $('result-h').focus();
    window.location.href = d.url;
  }

  $('upload').hidden = false;
  $('image').addEventListener('change', showInfo);
  showInfo();

  $('copy').addEventListener('click', async () => {
    const text = $('r-sha256').textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch (_) {
      const r = document.createRange();
      r.selectNodeContents($('r-sha256'));
      const s = window.getSelection();
      s.removeAllRanges();
      s.addRange(r);
      document.execCommand('copy');
    }
    $('copy').textContent = 'Copied';
    announce('SHA-256 copied to the clipboard.');
    setTimeout(() => { $('copy').textContent = 'Copy'; }, 2000);
  });

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    if (go.disabled) return;
    busy(true);
    current = null;
    STEPS.forEach((s) => setStep(s, 'pending', ''));
    $('error').textContent = '';
    $('result').hidden = true;
    $('progress').hidden = false;
    const image = $('image').value;
    let piece = $('piece').value.trim();
    const file = $('file').files[0];
    let name = '';
    mark('fetching');
    if (file) {
      announce('Uploading your page…');
      try {
        const r = await fetch('/os/' + encodeURIComponent(image), {
          method: 'POST', body: file, headers: { 'content-type': file.type || 'text/html' },
        });
        if (!r.ok) throw new Error('Upload refused: ' + (await r.text()).trim());
        piece = (await r.json()).id;
        name = file.name;
      } catch (e) {
        fail(e.message);
        return;
      }
    }
    if (!piece) {
      fail('Name a piece or choose a file to upload.');
      return;
    }
    let url = '/api/prepare/' + encodeURIComponent(image) + '/' + encodeURIComponent(piece);
    if (name) url += '?name=' + encodeURIComponent(name);
    const es = new EventSource(url);
    let finished = false;
    es.addEventListener('step', (e) => {
      const d = JSON.parse(e.data);
      window.kilnSteps.push(d.step);
      if (d.step === 'error') {
        finished = true;
        es.close();
        fail(d.message);
        return;
      }
      mark(d.step);
      if (d.step === 'fetching') announce('Step 1 of 3: fetching the piece…');
      if (d.step === 'preparing') announce('Step 2 of 3: preparing your image…');
      if (d.step === 'ready') {
        finished = true;
        es.close();
        ready(d);
      }
    });
    es.onerror = () => {
      es.close();
      if (!finished) fail('The connection to the server was lost. Please try again.');
    };
  });
})();
