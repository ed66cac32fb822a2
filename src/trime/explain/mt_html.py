"""The translation report as one self-contained HTML page (inline CSS, JS and data; no network).

The sentence on top (source, reference, the translation without memory when a beam hypothesis is
explained), the target tokens as chips coloured by Δ log p = log p(with memory) − log p(without) or by
the memory's share. Clicking a chip (or the arrow keys) shows the token's probabilities, the tokens it
competed with, and its k neighbours: each one's token, similarity, part of p, and the training pair
whose datastore entry it is, the target position it stores highlighted.
"""

from __future__ import annotations

from trime.explain.html import CSS, page, top

_MT_CSS = r"""
main.mt { display:block; padding:18px 28px; }
.sent { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 20px; margin-bottom:18px; }
.sent .row { display:grid; grid-template-columns:150px minmax(0,1fr); gap:10px; padding:6px 0; align-items:baseline; }
.sent .row + .row { border-top:1px solid #eef1f4; }
.sent .lab { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.sent .txt { font:16px/1.7 Georgia,"Times New Roman",serif; }
#tgt { line-height:2.5; }
#tgt .t { display:inline-block; border:1px solid var(--line); border-radius:5px; padding:0 7px; margin:0 3px 0 0;
  line-height:1.6; font:16px/1.6 Georgia,serif; }
#tgt .t.sel { outline:2px solid #0969da; border-color:#0969da; }
.detail { display:grid; grid-template-columns:380px minmax(0,1fr); gap:20px; align-items:start; }
.box { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px 16px; }
.box h2 { font-size:13px; text-transform:uppercase; letter-spacing:.04em; color:var(--muted); margin:16px 0 6px; font-weight:600; }
.box h2:first-child { margin-top:0; }
.box .empty { color:var(--muted); }
.pair { font:13px/1.5 Georgia,serif; }
.pair .src { color:var(--muted); }
.pair b { background:#fff1a8; padding:0 2px; border-radius:2px; }
.pair .after { color:#afb8c1; }
tr.vote td { background:#dafbe1; }
td.val { font:13.5px Georgia,serif; white-space:nowrap; }
.filter { font-size:12.5px; color:var(--muted); margin:0 0 6px; }
.filter label { cursor:pointer; }
#controls { display:flex; gap:10px; align-items:center; font-size:13px; }
#controls select { font:inherit; font-size:13px; padding:1px 4px; border:1px solid var(--line); border-radius:5px; background:var(--card); }
tr.beyond { opacity:.4; }
#alts br { display:none; }
"""

_JS = r"""
const S = R.summary, T = R.tokens, SV = R.src_vocab, TV = R.tgt_vocab;
const ssym = t => (SV[t] === undefined ? '#' + t : SV[t]);
const tsym = t => (TV[t] === undefined ? '#' + t : TV[t]);
const words = (ids, sym) => ids.map(t => esc(sym(t))).join(' ');
const MODES = {knn: 'kNN-MT', trime: 'TrimeMT', trime_released: 'TrimeMT (released)', '': 'none'};
const G = R.grid;  // log p of every target token at other k, λ, T (the decoding combiner's numbers)
let LP = T.map(t => t.lp), K = S.settings.k, RUN = true;  // what "with memory" shows now, and at which k

function totals() {
  const f = x => x === null ? '\u2212\u221e' : x.toFixed(2);
  const sum = xs => xs.some(x => x === null) ? null : xs.reduce((a, b) => a + b, 0);
  const lp = sum(LP), lp0 = sum(T.map(t => t.lp0));
  document.getElementById('lp').textContent = f(lp);
  document.getElementById('lp0').textContent = f(lp0);
  const d = document.getElementById('dlp');
  const dv = (lp === null || lp0 === null) ? NaN : lp - lp0;
  d.textContent = isNaN(dv) ? '\u2013' : (dv >= 0 ? '+' : '') + dv.toFixed(2);
  d.className = 'v ' + (dv > 0 ? 'good' : dv < 0 ? 'bad' : '');
  const helped = T.filter((t, i) => (LP[i] ?? -Infinity) > (t.lp0 ?? -Infinity)).length;
  document.getElementById('helped').textContent = `${helped} / ${T.length}`;
}
function header() {
  totals();
  document.getElementById('mode').innerHTML = `<span class="badge ${S.mode ? 'ext' : 'tok'}">${MODES[S.mode]}</span>`;
  document.getElementById('settings').innerHTML = Object.entries(S.settings)
    .map(([k, v]) => `<code>${esc(k)}=${esc(v)}</code>`).join('');
  document.getElementById('notes').innerHTML = R.notes.map(n => `<div class="note">${esc(n)}</div>`).join('');
}

function sentence() {
  const rows = [['Source', `<span id="src">${words(R.src, ssym)}</span>`]];
  if (S.target !== 'reference') rows.push(['Reference', `<span id="ref">${words(R.ref, tsym)}</span>`]);
  if (R.baseline) rows.push(['Without memory', `<span id="baseline">${words(R.baseline, tsym)}</span>`]);
  const chips = T.map((t, i) => `<span class="t" data-i="${i}" title="p ${fmtp(Math.exp(t.lp ?? -Infinity))}">${esc(tsym(t.tok))}</span>`);
  rows.push([S.target === 'reference' ? 'Reference (scored)' : 'Translation (scored)', `<span id="tgt">${chips.join('')}</span>`]);
  document.getElementById('sent').innerHTML = rows
    .map(([l, h]) => `<div class="row"><div class="lab">${l}</div><div class="txt">${h}</div></div>`).join('');
}

let mode = 'delta';
function colour(i) {
  const t = T[i];
  if (mode === 'off') return '';
  if (mode === 'share') return `rgba(212,118,28,${(0.8 * Math.min(1, t.share || 0)).toFixed(3)})`;
  const d = (LP[i] === null ? -20 : LP[i]) - (t.lp0 === null ? -20 : t.lp0), a = Math.min(1, Math.abs(d) / 2) * 0.8;
  return d >= 0 ? `rgba(46,160,67,${a.toFixed(3)})` : `rgba(207,34,46,${a.toFixed(3)})`;
}
function paint() {
  for (const el of document.querySelectorAll('#tgt .t')) el.style.background = colour(+el.dataset.i);
  document.getElementById('legend-delta').style.display = mode === 'delta' ? '' : 'none';
  document.getElementById('legend-share').style.display = mode === 'share' ? '' : 'none';
  for (const b of document.querySelectorAll('.seg button')) b.classList.toggle('on', b.dataset.mode === mode);
}

function pair(e) {
  const p = R.sentences[String(e.sent)];
  if (!p) return `<span class="empty">row ${e.row} (its sentence pair is not available, see the note at the top)</span>`;
  const [src, tgt] = p;
  const before = words(tgt.slice(0, e.pos), tsym), after = words(tgt.slice(e.pos + 1), tsym);
  return `<div class="pair"><div class="src">${words(src, ssym)}</div>
    <div class="tg">${before} <b>${esc(tsym(tgt[e.pos]))}</b> <span class="after">${after}</span></div>
    <span class="splitlab">training pair ${e.sent}, target position ${e.pos} (row ${e.row})</span></div>`;
}
let onlyVotes = false;
function neighbours(t) {
  const box = document.getElementById('nbs');
  const sim = S.metric === 'l2' ? 'distance' : 'similarity';
  let h = `<h2>The ${t.nb.length} nearest datastore entries</h2>`;
  if (!S.mode) { box.innerHTML = h + '<div class="empty">No datastore in this run: pass --dstore-filename, --indexfile and --use-interp (kNN-MT) or --use-external (TrimeMT).</div>'; return; }
  const votes = t.nb.filter((e, j) => e.v === t.tok && j < K).length;
  h += `<div class="filter"><label><input type="checkbox" id="only" ${onlyVotes ? 'checked' : ''}> only the ${votes} that voted for \u201c${esc(tsym(t.tok))}\u201d</label></div>`;
  if (K < t.nb.length) h += `<div class="filter">k = ${K}: the first ${K} count, the rest are greyed.</div>`;
  if (!RUN) h += '<div class="filter">Their parts of p are at the run\u2019s k, \u03bb, T.</div>';
  h += `<table id="neighbours"><tr><th>#</th><th>token</th><th class="num">${sim}</th><th class="num">of p</th><th>training pair (source / target, the stored position highlighted)</th></tr>`;
  t.nb.forEach((e, j) => {
    if (onlyVotes && (e.v !== t.tok || j >= K)) return;
    const a = e.a === null ? '\u2013' : (S.metric === 'l2' ? (-e.a).toFixed(2) : e.a.toFixed(2));
    h += `<tr class="${j >= K ? 'beyond' : e.v === t.tok ? 'vote' : ''}" data-v="${e.v}"><td class="num">${j + 1}</td><td class="val">${esc(tsym(e.v))}</td>
      <td class="num a">${a}</td><td class="num w">${fmtp(e.w)}</td><td>${pair(e)}</td></tr>`;
  });
  box.innerHTML = h + '</table>';
  document.getElementById('only').onchange = ev => { onlyVotes = ev.target.checked; neighbours(t); };
}
function details(i) {
  const t = T[i], lp = LP[i], p = lp === null ? 0 : Math.exp(lp), p0 = t.lp0 === null ? 0 : Math.exp(t.lp0);
  const d = (lp === null || t.lp0 === null) ? NaN : lp - t.lp0;
  const tot = (t.p_tok || 0) + (t.p_mem || 0) || 1;
  const seg = (w, c) => w > 0 ? `<span style="width:${(100 * w / tot).toFixed(2)}%;background:${c}"></span>` : '';
  const shareName = S.mode === 'knn' ? '\u03bb (weight of the kNN distribution)' : 'memory share of softmax';
  let h = `<div class="tokhead">${esc(tsym(t.tok))}<span class="pos">target position ${i}</span></div>
  <div class="stats">
    <div>p with memory</div><div id="p-mem">${fmtp(p)}</div>
    <div>p without memory</div><div id="p-nomem">${fmtp(p0)}</div>
    <div>\u0394 log p</div><div id="dlp-tok" style="color:${d >= 0 ? 'var(--good)' : 'var(--bad)'}">${isNaN(d) ? '\u2013' : (d >= 0 ? '+' : '') + d.toFixed(3)} nats</div>
    ${S.mode ? `<div>${shareName}</div><div>${pct(t.share || 0)}</div>` : ''}
  </div>`;
  if (S.mode && !RUN) h += '<div class="splitlab">The parts below and the competing tokens are at the run\u2019s k, \u03bb, T.</div>';
  if (S.mode) h += `<div class="split">${seg(t.p_tok || 0, 'var(--tok)')}${seg(t.p_mem || 0, 'var(--ext)')}</div>
    <div class="splitlab">where p comes from: <span style="color:var(--tok)">\u25a0</span> model ${pct((t.p_tok || 0) / tot)} &nbsp;<span style="color:var(--ext)">\u25a0</span> neighbours ${pct((t.p_mem || 0) / tot)}</div>`;
  document.getElementById('panel').innerHTML = h + altsTable(t, tsym);
  neighbours(t);
}
let current = null;
function select(i) {
  if (i < 0 || i >= T.length) return;
  for (const s of document.querySelectorAll('#tgt .t.sel')) s.classList.remove('sel');
  document.querySelector(`#tgt .t[data-i="${i}"]`).classList.add('sel');
  current = i;
  details(i);
}

function controls() {
  const box = document.getElementById('controls');
  if (!G) { box.style.display = 'none'; return; }
  const sel = (id, name, vals, cur) => {
    const j = vals.indexOf(cur) < 0 ? vals.length - 1 : vals.indexOf(cur);
    return `<label>${name} <select id="${id}">${vals.map((v, i) => `<option value="${i}"${i === j ? ' selected' : ''}>${v}</option>`).join('')}</select></label>`;
  };
  box.innerHTML = 'Rescore with ' + sel('ctl-k', 'k', G.k, S.settings.k)
    + (S.mode === 'knn' ? sel('ctl-l', '\u03bb', G.lmbda, S.settings.lmbda) : '') + sel('ctl-t', 'T', G.T, S.settings.T);
  for (const s of box.querySelectorAll('select')) s.onchange = rescore;
}
function rescore() {
  const ix = id => { const e = document.getElementById(id); return e ? +e.value : 0; };
  const a = ix('ctl-k'), b = ix('ctl-l'), c = ix('ctl-t');
  LP = G.lp[a][b][c];
  K = G.k[a];
  RUN = K === S.settings.k && G.T[c] === S.settings.T && (S.mode !== 'knn' || G.lmbda[b] === S.settings.lmbda);
  totals();
  paint();
  if (current !== null) details(current);
}

header();
sentence();
controls();
paint();
document.getElementById('tgt').addEventListener('click', e => { const s = e.target.closest('.t'); if (s) select(+s.dataset.i); });
document.addEventListener('keydown', e => {
  if (current === null) return;
  if (e.key === 'ArrowRight') select(current + 1);
  if (e.key === 'ArrowLeft') select(current - 1);
});
ready();
"""

_CARDS = [("log p with memory", "lp"), ("without memory", "lp0"), ("change (nats)", "dlp"),
          ("tokens memory helped", "helped"), ("memory", "mode")]  # fmt: skip
_TAIL = """<span id="controls"></span>
  <span class="legend">Click a target token (then \u2190 \u2192) for its neighbours.</span>"""
_BODY = """<main class="mt">
  <section class="sent" id="sent"></section>
  <div class="detail">
    <div class="box" id="panel"><div class="empty">Click a target token above to see its probability with and
    without memory and the tokens it competed with.</div></div>
    <div class="box" id="nbs"><div class="empty">Its nearest datastore entries appear here: each one's token,
    similarity, part of p and the training sentence pair it comes from.</div></div>
  </div>
</main>"""


def render_translation(report: dict) -> str:
    """The HTML page of a translation report (trime.explain.translation.explain_translation)."""
    s = report["summary"]
    h1 = "How the datastore changed each target token <small>trime explain \u00b7 translation</small>"
    head = top(h1, f"{s['source']}, its {s['target']} \u00b7 model {s['model']}", _CARDS, share_colour="#d4761c",
               tail=_TAIL)  # fmt: skip
    return page(report, head + _BODY, css=CSS + _MT_CSS, js=_JS)
