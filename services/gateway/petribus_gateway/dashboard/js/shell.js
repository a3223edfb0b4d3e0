// What every page shares: the notice line, error reporting, navigation, status badges.

import { ApiError } from './api.js';
import { h } from './dom.js';

const noticeEl = () => document.getElementById('notice');

export function notice(message, kind = 'error') {
  const el = noticeEl();
  if (!message) { el.hidden = true; return; }
  el.textContent = message;
  el.className = `notice ${kind}`;
  el.hidden = false;
}

/** Report a failed call: a missing key says so; anything else shows the gateway's own message. */
export function failed(err) {
  if (err instanceof ApiError && err.status === 401) {
    notice(`${err.message} — enter an API key above.`, 'error');
    document.getElementById('key-input').focus();
  } else {
    notice(err instanceof ApiError ? `${err.code || err.status}: ${err.message}` : String(err), 'error');
  }
}

export function go(hash) {
  if (location.hash === hash) window.dispatchEvent(new HashChangeEvent('hashchange'));
  else location.hash = hash;
}

const STATUS_TEXT = { idle: 'idle', running: 'running', waiting: 'waiting for a person', failed: 'failed' };

export function statusBadge(status) {
  return h(`span.status.status-${status}`, { dataset: { status } }, STATUS_TEXT[status] || status);
}
