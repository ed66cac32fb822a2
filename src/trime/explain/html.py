"""The neighbour report as one self-contained HTML page: inline CSS, JS and data, no network.

The page draws the text from the report's data in one pass (a few thousand tokens stay fast),
colours each token by Δ log p = log p(with memory) − log p(without) or by the memories' share of the
softmax, and shows a token's details in a side panel on hover; a click pins it.
"""

from __future__ import annotations

import html
import json

from trime import io

CSS = r"""
:root { --ink:#1f2328; --muted:#656d76; --line:#d8dee4; --bg:#f6f8fa; --card:#fff;
  --local:#2f81f7; --long:#8250df; --ext:#d4761c; --tok:#8c959f; --good:#1a7f37; --bad:#cf222e; }
* { box-sizing:border-box; }
body { margin:0; font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;
  color:var(--ink); background:var(--bg); }
header { background:var(--card); border-bottom:1px solid var(--line); padding:18px 28px 14px; }
h1 { font-size:20px; margin:0 0 2px; font-weight:600; }
h1 small { font-weight:400; color:var(--muted); font-size:14px; }
.sub { color:var(--muted); font-size:13px; margin-bottom:12px; word-break:break-all; }
.cards { display:flex; gap:12px; flex-wrap:wrap; }
.card { background:var(--bg); border:1px solid var(--line); border-radius:8px; padding:8px 14px; min-width:130px; }
.card .k { font-size:12px; color:var(--muted); text-transform:uppercase; letter-spacing:.04em; }
.card .v { font-size:22px; font-weight:600; font-variant-numeric:tabular-nums; }
.card .v.good { color:var(--good); } .card .v.bad { color:var(--bad); }
.settings { margin-top:10px; font-size:12.5px; color:var(--muted); }
.settings code { display:inline-block; background:var(--bg); border:1px solid var(--line); border-radius:4px; padding:0 5px;
  margin:0 4px 4px 0; color:var(--ink); font-size:12px; max-width:100%; overflow-wrap:anywhere; }
.note { margin-top:10px; background:#fff8c5; border:1px solid #d4a72c66; border-radius:6px; padding:6px 10px; font-size:13px; }
.badge { display:inline-block; border-radius:10px; padding:0 8px; font-size:11.5px; font-weight:600; color:#fff; line-height:18px; }
.badge.local { background:var(--local); } .badge.long { background:var(--long); } .badge.ext { background:var(--ext); }
.badge.tok { background:var(--tok); }
.bar { display:flex; align-items:center; gap:14px; padding:10px 28px; background:var(--card);
  border-bottom:1px solid var(--line); position:sticky; top:0; z-index:2; flex-wrap:wrap; }
.seg button { border:1px solid var(--line); background:var(--card); padding:3px 10px; font:inherit; font-size:13px; cursor:pointer; }
.seg button:first-child { border-radius:6px 0 0 6px; } .seg button:last-child { border-radius:0 6px 6px 0; }
.seg button + button { border-left:none; }
.seg button.on { background:var(--ink); color:#fff; border-color:var(--ink); }
.legend { display:flex; align-items:center; gap:6px; font-size:12px; color:var(--muted); }
.legend .grad { width:180px; height:10px; border-radius:5px; border:1px solid var(--line); }
main { display:grid; grid-template-columns:minmax(0,1fr) 440px; gap:20px; padding:18px 28px; align-items:start; }
#text { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:18px 22px;
  max-height:calc(100vh - 76px); overflow-y:auto;
  font:15px/2.0 Georgia,"Times New Roman",serif; white-space:normal; word-wrap:break-word; }
#text.char { font:14px/1.9 ui-monospace,SFMono-Regular,Menlo,monospace; }
#text.hf { white-space:pre-wrap; }
#text.hf .t { padding:1px 0; }  /* pieces of one word sit together */
.t { border-radius:3px; padding:1px 1px; cursor:pointer; }
.t:hover { outline:2px solid #0969da88; }
.t.sel { outline:2px solid #0969da; }
.t.flash { outline:2px solid var(--ext); }
.ctx { color:var(--muted); }
.eol { color:#afb8c1; font-size:11px; user-select:none; }
aside { position:sticky; top:58px; background:var(--card); border:1px solid var(--line); border-radius:8px;
  padding:14px 16px; max-height:calc(100vh - 76px); overflow:auto; }
aside .empty { color:var(--muted); }
aside h2 { font-size:13px; text-transform:uppercase; letter-spacing:.04em; color:var(--muted); margin:16px 0 6px; font-weight:600; }
.tokhead { font-size:22px; font-family:Georgia,serif; }
.tokhead .pos { font:12px -apple-system,sans-serif; color:var(--muted); margin-left:6px; }
.stats { display:grid; grid-template-columns:auto 1fr; gap:1px 12px; margin-top:8px; font-variant-numeric:tabular-nums; }
.stats div:nth-child(odd) { color:var(--muted); }
.split { display:flex; height:12px; border-radius:6px; overflow:hidden; background:#eaeef2; margin:8px 0 2px; }
.split span { display:block; height:100%; }
.splitlab { font-size:11.5px; color:var(--muted); }
table { border-collapse:collapse; width:100%; font-size:12.5px; }
th { text-align:left; color:var(--muted); font-weight:500; border-bottom:1px solid var(--line); padding:3px 4px; }
th.num { text-align:right; white-space:nowrap; }
td { border-bottom:1px solid #eef1f4; padding:4px 4px; vertical-align:top; font-variant-numeric:tabular-nums; }
td.num { text-align:right; white-space:nowrap; }
td.snip { font-family:Georgia,serif; font-size:13px; }
.snip b { background:#fff1a8; font-weight:600; padding:0 2px; border-radius:2px; }
.snip .gap { color:var(--muted); }
a.jump { color:#0969da; cursor:pointer; text-decoration:none; font-size:11.5px; white-space:nowrap; }
.tiny { display:block; height:6px; background:#0969da; border-radius:2px; margin:2px 0; }
.tiny.off { background:#afb8c1; }
tr.target td { background:#dafbe1; }
"""

COMMON_JS = r"""
const R = JSON.parse(document.getElementById('report-data').textContent);
const esc = s => String(s).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const fmtp = p => p === null ? '0' : (p >= 0.01 ? p.toFixed(3) : p.toExponential(1));
const pct = p => (100 * p).toFixed(p >= 0.1 ? 0 : 1) + '%';
// the tokens a position competed with: rows [token, p with, p without], the target's marked; shown(token) its text
function altsTable(t, shown) {
  let h = '<h2>Most likely tokens here</h2><table id="alts"><tr><th>token</th><th class="num">with memory</th><th class="num">without</th><th></th></tr>';
  const top = Math.max(...t.alt.map(a => Math.max(a[1] || 0, a[2] || 0)), 1e-9);
  for (const [tok, pa, pb] of t.alt) {
    h += `<tr class="${tok === t.tok ? 'target' : ''}"><td class="snip">${esc(shown(tok))}</td><td class="num">${fmtp(pa)}</td><td class="num">${fmtp(pb)}</td>
      <td style="width:90px"><span class="tiny" style="width:${(80 * (pa || 0) / top).toFixed(1)}px"></span><br><span class="tiny off" style="width:${(80 * (pb || 0) / top).toFixed(1)}px"></span></td></tr>`;
  }
  return h + '</table>';
}
function ready() {
  for (const b of document.querySelectorAll('.seg button')) b.onclick = () => { mode = b.dataset.mode; paint(); };
  document.body.dataset.ready = '1';
}
"""

_JS = r"""
const S = R.summary, T = R.tokens, V = R.vocab, TEXT = R.text;
const nctx = TEXT.length - T.length;  // every position is scored; kept for safety
const word = S.level === 'word';  // words are joined by spaces; characters and tokenizer pieces (hf) carry their own
const sym = t => (V[t] === undefined ? '#' + t : V[t]);
function shown(t) { const s = sym(t); return s === '\n' ? '\u21b5' : s; }

// --- header ---------------------------------------------------------------------------------
function header() {
  const f2 = x => x === null ? '\u221e' : x.toFixed(2);
  const d = S.ppl !== null && S.ppl0 ? 100 * (S.ppl - S.ppl0) / S.ppl0 : 0;
  document.getElementById('ppl').textContent = f2(S.ppl);
  document.getElementById('ppl0').textContent = f2(S.ppl0);
  const dv = document.getElementById('dppl');
  dv.textContent = (d > 0 ? '+' : '') + d.toFixed(1) + '%';
  dv.className = 'v ' + (d < 0 ? 'good' : d > 0 ? 'bad' : '');
  document.getElementById('ntok').textContent = S.n_tokens.toLocaleString();
  const mems = S.memories.length ? S.memories.map(m => `<span class="badge ${m}">${m === 'ext' ? 'external' : m}</span>`).join(' ')
    : '<span class="badge tok">none</span>';
  document.getElementById('mems').innerHTML = mems;
  document.getElementById('settings').innerHTML = Object.entries(S.settings)
    .map(([k, v]) => `<code>${esc(k)}=${esc(v)}</code>`).join('');
  document.getElementById('notes').innerHTML = R.notes.map(n => `<div class="note">${esc(n)}</div>`).join('');
}

// --- the text -------------------------------------------------------------------------------
function drawText() {
  const parts = [];
  for (let i = 0; i < T.length; i++) {
    const s = sym(T[i].tok);
    if (s === '\n') { parts.push(`<span class="t" data-i="${i}"><span class="eol">\u21b5</span></span><br>`); continue; }
    parts.push(`<span class="t" data-i="${i}">${esc(s)}</span>`);
    if (word) parts.push(' ');
  }
  const el = document.getElementById('text');
  el.className = S.level;
  el.innerHTML = parts.join('');
}
let mode = 'delta';
function colour(i) {
  const t = T[i];
  if (mode === 'off') return '';
  if (mode === 'share') { const a = Math.min(1, t.share || 0); return `rgba(130,80,223,${(0.85 * a).toFixed(3)})`; }
  const d = (t.lp === null ? -20 : t.lp) - (t.lp0 === null ? -20 : t.lp0);
  const a = Math.min(1, Math.abs(d) / 2) * 0.8;
  return d >= 0 ? `rgba(46,160,67,${a.toFixed(3)})` : `rgba(207,34,46,${a.toFixed(3)})`;
}
function paint() {
  const spans = document.getElementById('text').children;
  for (const el of spans) if (el.dataset.i !== undefined) el.style.background = colour(+el.dataset.i);
  document.getElementById('legend-delta').style.display = mode === 'delta' ? '' : 'none';
  document.getElementById('legend-share').style.display = mode === 'share' ? '' : 'none';
  for (const b of document.querySelectorAll('.seg button')) b.classList.toggle('on', b.dataset.mode === mode);
}

// --- details --------------------------------------------------------------------------------
function snippetFromText(pos) {
  const w = R.config.snippet, a = Math.max(0, pos - w), b = Math.min(TEXT.length, pos + w + 1);
  return snip(TEXT.slice(a, pos), TEXT[pos], TEXT.slice(pos + 1, b), a > 0, b < TEXT.length);
}
function snippetFromDstore(row) {
  const sn = R.snippets[String(row)];
  if (!sn) return null;
  const [a, toks] = sn, k = row - a;
  return snip(toks.slice(0, k), toks[k], toks.slice(k + 1), a > 0, true);
}
function snip(left, mid, right, more0, more1) {
  const j = xs => xs.map(t => esc(shown(t))).join(word ? ' ' : '');
  return `<span class="snip">${more0 ? '<span class="gap">\u2026</span>' : ''}${j(left)}${word ? ' ' : ''}<b>${esc(shown(mid))}</b>${word ? ' ' : ''}${j(right)}${more1 ? '<span class="gap">\u2026</span>' : ''}</span>`;
}
function details(i) {
  const t = T[i], p = t.lp === null ? 0 : Math.exp(t.lp), p0 = t.lp0 === null ? 0 : Math.exp(t.lp0);
  const d = (t.lp === null || t.lp0 === null) ? NaN : t.lp - t.lp0;
  const byKind = {local: 0, long: 0, ext: 0};
  for (const e of t.mem) byKind[e.m] += e.w;
  const shownMem = byKind.local + byKind.long + byKind.ext, rest = Math.max(0, (t.p_mem || 0) - shownMem);
  const tot = (t.p_tok || 0) + (t.p_mem || 0) || 1;  // the bar shows where p comes from, as fractions of p
  const seg = (w, c, title) => w > 0 ? `<span style="width:${(100 * w / tot).toFixed(2)}%;background:${c}" title="${title}: ${pct(w / tot)}"></span>` : '';
  const lab = [['output layer', t.p_tok || 0, 'tok'], ['local', byKind.local, 'local'], ['long-term', byKind.long, 'long'],
    ['external', byKind.ext, 'ext'], ['other entries', rest, '']].filter(x => x[1] > 0)
    .map(([n, w, c]) => `<span style="color:var(--${c || 'muted'})">■</span> ${n} ${pct(w / tot)}`).join(' &nbsp;');
  let h = `<div class="tokhead">${esc(shown(t.tok))}<span class="pos">position ${i}</span></div>
  <div class="stats" id="stats">
    <div>p with memory</div><div id="p-mem">${fmtp(p)}</div>
    <div>p without memory</div><div id="p-nomem">${fmtp(p0)}</div>
    <div>\u0394 log p</div><div id="dlp" style="color:${d >= 0 ? 'var(--good)' : 'var(--bad)'}">${isNaN(d) ? '\u2013' : (d >= 0 ? '+' : '') + d.toFixed(3)} nats</div>
    <div>memory share of softmax</div><div id="share">${pct(t.share || 0)}</div>
  </div>
  <div class="split">${seg(t.p_tok || 0, 'var(--tok)', 'output layer')}${seg(byKind.local, 'var(--local)', 'local')}${seg(byKind.long, 'var(--long)', 'long-term')}${seg(byKind.ext, 'var(--ext)', 'external')}${seg(rest, '#d0d7de', 'other memory entries')}</div>
  <div class="splitlab">where p comes from: ${lab}</div>`;
  h += `<h2>Memory entries that voted for \u201c${esc(shown(t.tok))}\u201d</h2>`;
  if (!t.mem.length) h += `<div class="empty">${S.memories.length ? 'No memory entry stores this token.' : 'No memory in this run.'}</div>`;
  else {
    h += '<table id="neighbours"><tr><th>memory</th><th class="num">of p</th><th class="num">score</th><th>text around the entry</th></tr>';
    for (const e of t.mem) {
      let sn, where;
      if (e.m === 'ext') {
        sn = snippetFromDstore(e.pos);
        where = `row ${e.pos}` + (S.datastore_split ? ` of ${esc(S.datastore_split)}` : '');
        if (sn === null) sn = '<span class="empty">(text not available, see the note at the top)</span>';
      } else {
        sn = snippetFromText(e.pos);
        where = `<a class="jump" data-jump="${e.pos - nctx}">position ${e.pos} \u2197</a>`;
      }
      h += `<tr data-kind="${e.m}"><td><span class="badge ${e.m}">${e.m === 'ext' ? 'external' : e.m}</span></td>
        <td class="num w">${fmtp(e.w)}</td><td class="num s">${e.s === null ? '\u2013' : e.s.toFixed(2)}</td>
        <td class="snip">${sn}<br><span class="splitlab">${where}</span></td></tr>`;
    }
    h += '</table>';
  }
  h += altsTable(t, shown);
  const panel = document.getElementById('panel');
  panel.innerHTML = h;
  panel.dataset.i = i;
  for (const a of panel.querySelectorAll('a.jump')) a.onclick = () => jump(+a.dataset.jump);
}
let pinned = null;
function select(i) {
  const spans = document.getElementById('text').querySelectorAll('.t.sel');
  for (const s of spans) s.classList.remove('sel');
  pinned = i;
  if (i !== null) { tokenSpan(i).classList.add('sel'); details(i); }
}
function tokenSpan(i) { return document.querySelector(`#text .t[data-i="${i}"]`); }
function jump(i) {
  const el = tokenSpan(i);
  if (!el) return;
  const box = document.getElementById('text');
  const y = box.scrollTop + el.getBoundingClientRect().top - box.getBoundingClientRect().top - box.clientHeight / 2;
  box.scrollTo({top: y, behavior: 'smooth'});
  el.classList.add('flash');
  setTimeout(() => el.classList.remove('flash'), 1200);
}

header();
drawText();
paint();
const textEl = document.getElementById('text');
textEl.addEventListener('mouseover', e => { const s = e.target.closest('.t'); if (s && pinned === null) details(+s.dataset.i); });
textEl.addEventListener('click', e => { const s = e.target.closest('.t'); if (s) select(pinned === +s.dataset.i ? null : +s.dataset.i); });
ready();
"""

_SHELL = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{generator}
<title>{title}</title>
<style>{css}</style></head>
<body>
{body}
<script type="application/json" id="report-data">{data}</script>
<script>{js}</script>
</body></html>
"""

_TOP = """<header>
  <h1>{h1}</h1>
  <div class="sub">{sub}</div>
  <div class="cards">{cards}
  </div>
  <div class="settings" id="settings"></div>
  <div id="notes"></div>
</header>
<div class="bar">
  <span>Colour by</span>
  <span class="seg"><button data-mode="delta" class="on">\u0394 log p</button><button data-mode="share">memory share</button><button data-mode="off">off</button></span>
  <span class="legend" id="legend-delta">memory hurt <span class="grad" style="background:linear-gradient(90deg,rgba(207,34,46,.8),rgba(207,34,46,0) 50%,rgba(46,160,67,0) 50%,rgba(46,160,67,.8))"></span> helped (\u00b12 nats)</span>
  <span class="legend" id="legend-share" style="display:none">0% <span class="grad" style="background:linear-gradient(90deg,{share_colour}00,{share_colour}cc)"></span> 100%{share_label}</span>
  {tail}
</div>
"""


def top(h1: str, sub: str, cards: list[tuple[str, str]], *, share_colour: str, share_label: str = "", tail: str) -> str:
    """A page's header (``h1`` HTML, the ``sub`` line, number cards (label, id) filled by the script, the last one
    holding badges, the settings and notes) and its bar: colour by Δ log p | memory share (in ``share_colour``,
    #rrggbb) | off, then ``tail`` (HTML)."""
    big = '<div class="v" id="{}"></div>'
    small = '<div class="v" style="font-size:15px;padding-top:6px" id="{}"></div>'
    html_cards = "".join(
        f'\n    <div class="card"><div class="k">{html.escape(k)}</div>{(small if j == len(cards) - 1 else big).format(i)}</div>'
        for j, (k, i) in enumerate(cards)
    )
    return _TOP.format(h1=h1, sub=html.escape(sub), cards=html_cards, share_colour=share_colour,
                       share_label=share_label, tail=tail)  # fmt: skip


_CARDS = [("Perplexity with memory", "ppl"), ("without memory", "ppl0"), ("change", "dppl"), ("tokens scored", "ntok"),
          ("memories", "mems")]  # fmt: skip
_HINT = '<span class="legend">Hover a token for details, click to pin it.</span>'
_BODY = """<main>
  <div id="text"></div>
  <aside id="panel"><div class="empty">Hover over a token to see its probability with and without memory,
  the memory entries that voted for it and the tokens it competed with.</div></aside>
</main>"""


def page(report: dict, body: str, *, css: str, js: str) -> str:
    """A self-contained page: ``body`` (HTML), the report as JSON data, ``css`` and ``js`` after COMMON_JS."""
    data = json.dumps(report, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return _SHELL.format(
        title=html.escape(f"trime explain: {report['summary']['source']}"),
        generator=io.HTML_MARKER,  # how the next run recognises this page as ours (trime.io.output_file)
        css=css,
        js=COMMON_JS + js,
        body=body,
        data=data,
    )


def render(report: dict) -> str:
    """The HTML page of a report (trime.explain.report.explain_tokens)."""
    s = report["summary"]
    head = top("How memory changed each token <small>trime explain</small>", f"{s['source']} · model {s['model']}",
               _CARDS, share_colour="#8250df", share_label=" of the softmax's mass on memory entries", tail=_HINT)  # fmt: skip
    return page(report, head + _BODY, css=CSS, js=_JS)
