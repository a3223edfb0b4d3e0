// One session: the net with its marking (live, or as of a chosen seq), chat with streamed replies, what
// waits for the user, adding markers, files, failures with their traceback and inputs, and the timeline
// of every event, from which a past state is shown and a fork is made.
//
// The truth is the gateway's: every event that arrives on the stream triggers one (debounced) read of the
// session's state as of the newest seq seen (`?at=SEQ&events=false`), so nothing is folded here. The
// timeline is read page by page from /history (1,000 steps a page) and drawn virtualised; a chosen step's
// state is `?at=SEQ&events=false` too.

import { api, download, enc, follow, get, post, sessionPath } from './api.js';
import { fill, h, json, short, time } from './dom.js';
import { draw } from './graph.js';
import { failed, go, notice, statusBadge } from './shell.js';
import { Timeline, summary } from './timeline.js';

const PAGE = 1000;
const CHAT_TURNS = 200;
const MARKERS_SHOWN = 200;
const REFRESH_MS = 150;

/** Open the session page in `main`; returns what to do when the page is left. */
export async function openSession(main, bot, id) {
  const base = sessionPath(bot, id);
  let botInfo, net, live;
  try {
    [botInfo, net, live] = await Promise.all([
      // Under deployments, both as the session's own version has them (?session_id=).
      get(`/bots/${enc(bot)}?session_id=${enc(id)}`),
      get(`/bots/${enc(bot)}/net?session_id=${enc(id)}`),
      get(`${base}?events=false`),
    ]);
  } catch (err) {
    fill(main, h('p.muted', 'This session cannot be shown.'));
    failed(err);
    return () => {};
  }
  const S = {
    live, seen: live.last_seq,  // the live state, and the newest seq the stream brought
    past: null, at: null,  // the state shown from the timeline, and its seq (null: live)
    last: null, errors: new Map(), deltas: new Map(), place: null,
    loaded: false, buffered: [], closed: false,  // the timeline's pages all read; live events held till then
  };

  // ------------------------------------------------------------------ skeleton
  const statusEl = h('span#session-status');
  const modeEl = h('span#view-mode.mode');
  const streamEl = h('span#stream-state.muted', 'connecting…');
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.id = 'net';
  const graphScroll = h('div.graph-scroll', svg);
  const pendingEl = h('div#pending');
  const chatLog = h('div#chat-log.chat-log');
  const chatInput = h('input#chat-input', { type: 'text', placeholder: 'Say something…', autocomplete: 'off' });
  const locSelect = h('select#marker-location');
  const markerData = h('textarea#marker-data', { rows: 4, spellcheck: false });
  const filesEl = h('div#files');
  const errorsEl = h('div#errors');
  const tlScroll = h('div#timeline.tl-scroll');
  const tlCount = h('span#timeline-count.muted');
  const jumpInput = h('input#jump-seq', { type: 'number', min: 1, placeholder: 'seq' });
  const inspector = h('div#inspector.inspector', h('p.muted', 'Click a place for its markers, or an event for ' +
    'the state at it.'));
  const forkedEl = h('span#forked-from');

  fill(main, h('div.session', { dataset: { bot, session: id } },
    h('div.session-head',
      h('h2.mono', short(id, 40)), statusEl, modeEl, forkedEl, streamEl),
    h('div.session-grid',
      h('section.panel.graph-panel',
        h('div.panel-head', h('h3', 'Net'),
          h('span.legend', h('span.key-firing', 'running'), h('span.key-awaiting', 'awaits confirmation')),
          h('span.row.zoom',
            h('button', { type: 'button', title: 'Zoom out', onclick: () => zoom(zoomed / 1.25) }, '−'),
            h('button', { type: 'button', title: 'Actual size', onclick: () => zoom(1) }, '1:1'),
            h('button', { type: 'button', title: 'The whole net in view', onclick: () => fit() }, 'Fit'),
            h('button', { type: 'button', title: 'Zoom in', onclick: () => zoom(zoomed * 1.25) }, '+'))),
        graphScroll),
      h('section.panel.side',
        h('h3', 'Waiting for you'), pendingEl,
        h('h3', 'Chat'), chatLog,
        h('form#chat-form.row', { onsubmit: sendChat }, chatInput, h('button', { type: 'submit' }, 'Send')),
        h('h3', 'Add a marker'),
        h('form#marker-form', { onsubmit: addMarker }, locSelect, markerData,
          h('button', { type: 'submit' }, 'Add marker')),
        h('h3', 'Files'), filesEl,
        h('h3', 'Failures'), errorsEl),
      h('section.panel.timeline-panel',
        h('div.panel-head', h('h3', 'Timeline'), tlCount,
          h('form#jump-form.row', { onsubmit: jump }, jumpInput, h('button', { type: 'submit' }, 'Go')),
          h('button#back-live', { type: 'button', onclick: () => choose(null) }, 'Latest')),
        tlScroll),
      h('section.panel.inspector-panel', h('h3', 'Inspector'), inspector))));

  // ------------------------------------------------------------------ graph
  const graph = draw(svg, net, { onPlace: inspectPlace });
  let zoomed = 1;
  const fit = () => zoom(Math.min(1, (graphScroll.clientWidth - 4) / net.width));
  const zoom = (z) => { zoomed = Math.min(3, Math.max(0.2, z)); graph.zoom(zoomed); };
  const shown = () => (S.at === null ? S.live : S.past) || S.live;

  function renderState() {
    graph.update(shown());
    modeEl.textContent = S.at === null ? 'live' : `as of seq ${S.past ? S.past.last_seq : S.at}`;
    modeEl.className = `mode ${S.at === null ? 'live' : 'past'}`;
    graphScroll.classList.toggle('past', S.at !== null);
    const st = S.live;
    const waiting = st.pending_requests.length || st.in_flight.some((f) => f.status === 'awaiting_confirmation');
    // As the home list has it (ui.py status_of): failed only while the newest event is a failure for good.
    const failedForGood = S.last && S.last.type === 'transition_failed' && S.last.value && S.last.value.final;
    const status = waiting ? 'waiting' : st.in_flight.length ? 'running' : failedForGood ? 'failed' : 'idle';
    fill(statusEl, statusBadge(status));
    renderPending();
    renderChat();
    renderFiles();
    if (S.place) inspectPlace(S.place, { keep: true });
  }

  // ------------------------------------------------------------------ live state
  let refreshTimer = 0;
  let refreshing = false;
  function scheduleRefresh() {
    if (refreshTimer) return;
    refreshTimer = setTimeout(refresh, REFRESH_MS);
  }
  async function refresh() {
    refreshTimer = 0;
    if (refreshing) { scheduleRefresh(); return; }
    refreshing = true;
    try {
      // As of the newest event seen: the gateway answers that from its timeline cache, reading only what
      // was appended since it last looked (without `at` it would read the whole log each time).
      S.live = await get(`${base}?at=${S.seen}&events=false`);
      if (!S.closed) renderState();
    } catch (err) {
      failed(err);
    } finally {
      refreshing = false;
    }
  }

  function onEvent(ev) {
    if (S.closed) return;
    if (ev.type === 'agent_message_delta') {
      const m = ev.metadata;
      const text = S.deltas.get(m.event_id) || '';
      S.deltas.set(m.event_id, text.slice(0, m.offset) + ev.value);
      renderChat();
      return;
    }
    if (ev.type === 'error') {
      notice(`${ev.value && ev.value.code}: ${ev.value && ev.value.message}`);
      return;
    }
    if (!ev.metadata || !ev.metadata.seq) return;
    S.seen = Math.max(S.seen, ev.metadata.seq);
    S.last = ev;
    noteFailure(ev);
    if (S.loaded) {
      timeline.push([ev]);
      tlCount.textContent = `${timeline.rows.length} events`;
    } else S.buffered.push(ev);
    scheduleRefresh();
  }

  const stream = follow(bot, id, live.last_seq, onEvent, (state) => { streamEl.textContent = state; });

  // ------------------------------------------------------------------ timeline
  const timeline = new Timeline(tlScroll, (seq) => choose(seq));
  async function loadTimeline() {
    let after = 0;
    for (;;) {
      let page;
      try {
        page = await get(`${base}/history?after=${after}&limit=${PAGE}`);
      } catch (err) {
        failed(err);
        return;
      }
      if (S.closed) return;
      const events = page.steps.map((st) => st.event);
      for (const ev of events) noteFailure(ev);
      if (after === 0 && events.length && events[0].type === 'session_forked' && events[0].value) {
        const from = events[0].value.source_session;
        const fromBot = events[0].value.source_bot || bot;
        fill(forkedEl, 'forked from ', h('a', { href: `#/bots/${enc(fromBot)}/sessions/${enc(from)}` },
          short(from, 12)), ` at seq ${events[0].value.source_seq}`);
      }
      timeline.push(events);
      if (events.length) S.last = events[events.length - 1];
      tlCount.textContent = `${timeline.rows.length} events${page.next ? '…' : ''}`;
      if (page.next === null || page.next === undefined) break;
      after = page.next;
    }
    S.loaded = true;
    timeline.push(S.buffered);
    if (S.buffered.length) S.last = S.buffered[S.buffered.length - 1];
    S.buffered = [];
    tlCount.textContent = `${timeline.rows.length} events`;
    tlScroll.dataset.loaded = 'true';
    renderState();
  }

  async function choose(seq) {
    S.at = seq;
    timeline.select(seq);
    if (seq === null) {
      S.past = null;
      renderState();
      fill(inspector, h('p.muted', 'Showing the live state.'));
      return;
    }
    try {
      const [past, page] = await Promise.all([
        get(`${base}?at=${seq}&events=false`),
        get(`${base}/history?after=${seq - 1}&limit=1`),
      ]);
      if (S.at !== seq || S.closed) return;
      S.past = past;
      S.place = null;
      graph.select(null);
      renderState();
      showStep(page.steps[0], past);
    } catch (err) {
      failed(err);
    }
  }

  function jump(e) {
    e.preventDefault();
    const want = Number(jumpInput.value);
    const i = timeline.indexAt(want);
    if (i >= 0) choose(timeline.rows[i].seq);
    else notice(`no event at or before seq ${want}`);
  }

  function showStep(step, past) {
    const ev = step.event;
    const counts = Object.entries(past.marking).map(([p, ms]) => `${p}: ${ms.length}`).join(', ') || 'empty';
    fill(inspector, 
      h('div.step', { dataset: { seq: step.seq, type: ev.type } },
        h('p', h('strong', `seq ${step.seq}`), ` · ${ev.type} · ${time(ev.metadata.ts)}`,
          ev.metadata.transition_name ? ` · ${ev.metadata.transition_name}` : ''),
        h('p', summary(ev)),
        ev.type === 'transition_failed' ? failureBlock(ev) : null,
        h('p.muted', `Marking at this seq: ${counts}`),
        step.added.length ? [h('h4', 'Added'), h('pre.json', json(step.added))] : null,
        step.consumed.length ? [h('h4', 'Consumed'), h('pre.json', json(step.consumed))] : null,
        h('details', h('summary', 'Event as JSON'), h('pre.json', json(ev))),
        h('div.row',
          h('button#fork-here.primary', { type: 'button', onclick: () => forkAt(step.seq) }, 'Fork here'),
          h('button', { type: 'button', onclick: () => choose(null) }, 'Back to live'))));
  }

  async function forkAt(seq) {
    try {
      const made = await post(`${base}/fork`, { at: seq });
      go(`#/bots/${enc(made.bot)}/sessions/${enc(made.session_id)}`);
    } catch (err) {
      failed(err);
    }
  }

  // ------------------------------------------------------------------ failures
  function noteFailure(ev) {
    if (ev.type !== 'transition_failed' || S.errors.has(ev.metadata.seq)) return;
    S.errors.set(ev.metadata.seq, ev);
    renderErrors();
  }

  function failureBlock(ev) {
    const v = ev.value;
    return h('div.failure', { dataset: { seq: ev.metadata.seq } },
      h('p', h('strong.error-type', v.error_type), ': ', h('span.error-message', v.error),
        v.final ? '' : ` (attempt ${v.attempt}; retried${v.retry_in_s ? ` in ${v.retry_in_s.toFixed(1)} s` : ''})`),
      v.traceback ? [h('h4', 'Traceback'), h('pre.traceback', v.traceback)]
        : h('p.muted', 'No traceback (the run was killed).'),
      h('h4', 'Inputs of the failed firing'), h('pre.json.inputs', json(v.inputs || [])));
  }

  function renderErrors() {
    const shownErrors = [...S.errors.values()].slice(-20).reverse();
    fill(errorsEl, shownErrors.length ? shownErrors.map((ev) => h('details.error-item', { open: true },
      h('summary', `seq ${ev.metadata.seq} · ${ev.metadata.transition_name} · ${ev.value.error_type}`),
      failureBlock(ev),
      h('button', { type: 'button', onclick: () => choose(before(ev.metadata.seq)) }, 'State before it')))
      : h('p.muted', 'None.'));
  }

  function before(seq) {
    const i = timeline.indexAt(seq - 1);
    return i >= 0 ? timeline.rows[i].seq : seq;
  }

  // ------------------------------------------------------------------ inspector: a place's markers
  function inspectPlace(name, { keep = false } = {}) {
    S.place = name;
    graph.select(name);
    const st = shown();
    const markers = (st.marking && st.marking[name]) || [];
    const extra = markers.length > MARKERS_SHOWN ? `… and ${markers.length - MARKERS_SHOWN} more` : '';
    const body = h('div.place-markers', { dataset: { place: name } },
      h('p', h('strong', name), ` · ${markers.length} marker${markers.length === 1 ? '' : 's'} · ` +
        (S.at === null ? 'live' : `as of seq ${st.last_seq}`)),
      h('pre.json', json(markers.slice(0, MARKERS_SHOWN))), extra ? h('p.muted', extra) : null);
    if (!keep || inspector.querySelector('.place-markers')) fill(inspector, body);
  }

  // ------------------------------------------------------------------ chat
  async function sendChat(e) {
    e.preventDefault();
    const text = chatInput.value.trim();
    if (!text) return;
    try {
      await post(`${base}/messages`, { text });
      chatInput.value = '';
    } catch (err) {
      failed(err);
    }
  }

  function renderChat() {
    const turns = S.live.chat.slice(-CHAT_TURNS);
    const done = new Set(S.live.chat.map((t) => t.event_id));
    for (const k of [...S.deltas.keys()]) if (done.has(k)) S.deltas.delete(k);
    const nearBottom = chatLog.scrollTop + chatLog.clientHeight >= chatLog.scrollHeight - 30;
    fill(chatLog, 
      S.live.chat.length > CHAT_TURNS ? h('p.muted', `${S.live.chat.length - CHAT_TURNS} earlier turns`) : null,
      turns.map((t) => h(`div.msg.${t.role}`, { dataset: { seq: t.seq, role: t.role } }, t.text)),
      [...S.deltas.entries()].map(([k, text]) => h('div.msg.agent.streaming', { dataset: { event: k } }, text)));
    if (nearBottom) chatLog.scrollTop = chatLog.scrollHeight;
  }

  // ------------------------------------------------------------------ markers
  const exposed = (botInfo && botInfo.locations) || [];
  for (const loc of exposed) locSelect.append(h('option', { value: loc.name }, loc.name));
  const template = () => {
    const loc = exposed.find((l) => l.name === locSelect.value);
    markerData.value = loc ? json(example(loc.json_schema)) : '{}';
  };
  locSelect.addEventListener('change', template);
  template();

  async function addMarker(e) {
    e.preventDefault();
    let data;
    try {
      data = JSON.parse(markerData.value);
    } catch (err) {
      notice(`the marker's data is not JSON: ${err.message}`);
      return;
    }
    try {
      await post(`${base}/markers`, { location: locSelect.value, data });
      notice(null);
    } catch (err) {
      failed(err);
    }
  }

  // ------------------------------------------------------------------ waiting for the user
  async function answer(path, accepted) {
    try {
      await post(path, { accepted });
    } catch (err) {
      failed(err);
    }
  }

  function yesNo(path, yes, no) {
    return h('div.row',
      h('button.primary.accept', { type: 'button', onclick: () => answer(path, true) }, yes),
      h('button.reject', { type: 'button', onclick: () => answer(path, false) }, no));
  }

  function renderPending() {
    const st = S.live;
    const items = [];
    for (const f of st.in_flight.filter((x) => x.status === 'awaiting_confirmation')) {
      items.push(h('div.pending.confirmation', { dataset: { task: f.firing_id, transition: f.transition } },
        h('p', h('strong', f.transition), ' wants to run on'),
        h('pre.json', json(f.consumed)),
        yesNo(`${base}/confirmations/${enc(f.firing_id)}`, 'Accept', 'Reject')));
    }
    for (const q of st.pending_requests) {
      if (q.type === 'confirm_request') {
        items.push(h('div.pending.question', { dataset: { request: q.request_id, transition: q.transition || '' } },
          h('p', h('strong', q.transition || 'a transition'), ' asks: ', q.description),
          yesNo(`${base}/confirm_requests/${enc(q.request_id)}`, 'Yes', 'No')));
      } else {
        const file = h('input.upload-file', { type: 'file' });
        items.push(h('div.pending.file-request', { dataset: { request: q.request_id } },
          h('p', h('strong', q.transition || 'a transition'), ' asks for a file: ', q.description),
          h('div.row', file, h('button.primary.upload', { type: 'button', onclick: async () => {
            const f = file.files[0];
            if (!f) { notice('choose a file first'); return; }
            try {
              await api('PUT', `${q.upload_url}?name=${enc(f.name)}`, f);
            } catch (err) { failed(err); }
          } }, 'Upload'))));
      }
    }
    const key = JSON.stringify(items.map((el) => el.dataset));
    if (pendingEl.dataset.key === key) return;  // unchanged: keep what the user is doing there
    pendingEl.dataset.key = key;
    fill(pendingEl, items.length ? items : h('p.muted', 'Nothing.'));
  }

  // ------------------------------------------------------------------ files
  function renderFiles() {
    const files = S.live.files;
    const key = files.map((f) => f.file_id).join();
    if (filesEl.dataset.key === key && files.length) return;
    filesEl.dataset.key = key;
    fill(filesEl, files.length ? h('ul.files', files.map((f) => h('li', { dataset: { file: f.file_id } },
      h('span', `${f.direction === 'input' ? '↑' : '↓'} ${f.name} (${f.size} bytes) `),
      h('button.download', { type: 'button', onclick: () => download(f.url, f.name).catch(failed) }, 'Download'))))
      : h('p.muted', 'None.'));
  }

  renderState();
  renderErrors();
  loadTimeline();
  return () => {
    S.closed = true;
    stream.close();
    clearTimeout(refreshTimer);
  };
}

/** A starting value for a marker's JSON from its location's schema (required fields, typed blanks). */
function example(schema) {
  const out = {};
  const props = (schema && schema.properties) || {};
  for (const [name, p] of Object.entries(props)) {
    if ('default' in p) continue;
    const type = p.type || (p.anyOf && p.anyOf[0] && p.anyOf[0].type);
    out[name] = type === 'integer' || type === 'number' ? 0 : type === 'boolean' ? false
      : type === 'array' ? [] : type === 'object' ? {} : '';
  }
  return out;
}
