// The timeline: every event of the session with its seq, in a virtualised list. However long the session,
// the DOM holds only the rows in view (plus a few either side); the rest is a spacer of the right height.

import { fill, h, short } from './dom.js';

export const ROW_H = 24;
const OVERSCAN = 12;

/** A one-line description of an event as clients see it ({type, value, metadata}). */
export function summary(ev) {
  const v = ev.value;
  const t = ev.metadata && ev.metadata.transition_name;
  switch (ev.type) {
    case 'user_message': return `user: ${short(v, 100)}`;
    case 'agent_message': return `agent: ${short(v, 100)}`;
    case 'marker_added': return `+ ${v.location} ${short(JSON.stringify(v.data), 80)}`;
    case 'transition_fired': return `${t} claimed its inputs`;
    case 'transition_started': return `${t} started`;
    case 'transition_completed': return `${t} completed`;
    case 'transition_failed': return `${t} failed: ${v.error_type}: ${short(v.error, 80)}`;
    case 'confirm_transition': return `${t} waits for a confirmation`;
    case 'accept_transition': return `accepted ${t || ''}`;
    case 'reject_transition': return `rejected ${t || ''}${v && v.reason ? ': ' + short(v.reason, 60) : ''}`;
    case 'prompt_request': return `${t || 'a transition'} asks the model: ${short(v && v.text, 70)}`;
    case 'prompt_response': return `model: ${short(typeof v === 'string' ? v : v && v.text, 80)}`;
    case 'session_forked': return `forked from ${v.source_session} at seq ${v.source_seq}`;
    case 'confirm_request': return `${t || 'a transition'} asks: ${short(v, 80)}`;
    case 'confirm_response': return `answered ${v ? 'yes' : 'no'}`;
    case 'input_file_request': return `${t || 'a transition'} asks for a file: ${short(v && v.description, 60)}`;
    case 'input_file_response': return `file uploaded: ${short(v && v.name, 60)}`;
    case 'output_file': return `file sent: ${short(v && v.name, 60)}`;
    default: return short(typeof v === 'string' ? v : JSON.stringify(v ?? ''), 100);
  }
}

export class Timeline {
  constructor(scroller, onSelect) {
    this.scroller = scroller;
    this.onSelect = onSelect;
    this.rows = [];  // {seq, type, text, failed}
    this.selected = null;
    this.spacer = h('div.tl-spacer');
    fill(scroller, this.spacer);
    this.drawn = null;
    scroller.addEventListener('scroll', () => this.schedule());
    new ResizeObserver(() => this.schedule()).observe(scroller);
  }

  get last() {
    return this.rows.length ? this.rows[this.rows.length - 1].seq : 0;
  }

  /** Add events (ascending seq, after the last one held). */
  push(events) {
    const atEnd = this.scroller.scrollTop + this.scroller.clientHeight >= this.scroller.scrollHeight - ROW_H * 2;
    for (const ev of events) {
      const seq = ev.metadata.seq;
      if (!seq || seq <= this.last) continue;
      this.rows.push({ seq, type: ev.type, text: summary(ev) });
    }
    this.spacer.style.height = `${this.rows.length * ROW_H}px`;
    if (atEnd && this.selected === null) this.scroller.scrollTop = this.scroller.scrollHeight;
    this.schedule();
  }

  /** The index of the newest row at or before `seq` (-1: none). */
  indexAt(seq) {
    let lo = 0, hi = this.rows.length - 1, found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (this.rows[mid].seq <= seq) { found = mid; lo = mid + 1; } else hi = mid - 1;
    }
    return found;
  }

  select(seq, { scroll = true } = {}) {
    this.selected = seq;
    if (seq !== null && scroll) {
      const i = this.indexAt(seq);
      const top = i * ROW_H;
      if (top < this.scroller.scrollTop || top > this.scroller.scrollTop + this.scroller.clientHeight - ROW_H) {
        this.scroller.scrollTop = Math.max(0, top - this.scroller.clientHeight / 2);
      }
    }
    this.drawn = null;
    this.render();
  }

  schedule() {
    if (this.pending) return;
    this.pending = requestAnimationFrame(() => { this.pending = 0; this.render(); });
  }

  render() {
    const first = Math.max(0, Math.floor(this.scroller.scrollTop / ROW_H) - OVERSCAN);
    const last = Math.min(this.rows.length, first + Math.ceil(this.scroller.clientHeight / ROW_H) + 2 * OVERSCAN);
    const key = `${first}:${last}:${this.rows.length}:${this.selected}`;
    if (key === this.drawn) return;
    this.drawn = key;
    for (const el of [...this.spacer.children]) el.remove();
    for (let i = first; i < last; i++) {
      const r = this.rows[i];
      const row = h(`div.tl-row.ev-${r.type}`, {
        dataset: { seq: r.seq, type: r.type }, title: `seq ${r.seq}: ${r.type}`,
        onclick: () => this.onSelect(r.seq),
      }, h('span.tl-seq', String(r.seq)), h('span.tl-type', r.type), h('span.tl-text', r.text));
      row.style.top = `${i * ROW_H}px`;
      if (r.seq === this.selected) row.classList.add('selected');
      this.spacer.append(row);
    }
  }
}
