// The gateway's public API, as any client uses it: REST with `Authorization: Bearer`, and the session's
// WebSocket, which (a browser cannot set its headers) sends {"type": "auth", "token"} first.

const KEY = 'petribus.key';

export function token() {
  return localStorage.getItem(KEY) || '';
}

export function setToken(value) {
  if (value) localStorage.setItem(KEY, value);
  else localStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
  }
}

export const enc = encodeURIComponent;

export function sessionPath(bot, id) {
  return `/bots/${enc(bot)}/sessions/${enc(id)}`;
}

/** A JSON request (or `raw`: the Response). Throws ApiError with the gateway's message. */
export async function api(method, path, body, { raw = false, headers = {} } = {}) {
  const sent = { ...headers };
  const t = token();
  if (t) sent.Authorization = `Bearer ${t}`;
  let payload;
  if (body instanceof Blob) payload = body;
  else if (body !== undefined) {
    sent['Content-Type'] = 'application/json';
    payload = JSON.stringify(body);
  }
  const r = await fetch(path, { method, headers: sent, body: payload, cache: 'no-store' });
  if (!r.ok) {
    let b = null;
    try { b = await r.json(); } catch { /* not JSON */ }
    throw new ApiError(r.status, b);
  }
  if (raw) return r;
  return r.status === 204 ? null : r.json();
}

export const get = (path) => api('GET', path);
export const post = (path, body) => api('POST', path, body ?? {});

/**
 * Follow a session from after `since`: every event of its log, then live, plus reply deltas.
 * Reconnects with the last seq seen (nothing lost or repeated) until `close()`.
 */
export function follow(bot, id, since, onEvent, onState) {
  let ws = null;
  let last = since;
  let stopped = false;
  let retry = 500;
  const open = () => {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    ws = new WebSocket(`${scheme}//${location.host}/bots/${enc(bot)}/ws?session_id=${enc(id)}&since=${last}`);
    ws.onopen = () => {
      const t = token();
      if (t) ws.send(JSON.stringify({ type: 'auth', token: t }));
      retry = 500;
      onState('connected');
    };
    ws.onmessage = (m) => {
      const ev = JSON.parse(m.data);
      if (ev.metadata && ev.metadata.seq) last = Math.max(last, ev.metadata.seq);
      onEvent(ev);
    };
    ws.onclose = (e) => {
      if (stopped) return;
      if (e.code === 4404 || e.code === 4401 || e.code === 1008) {
        onState(`closed (${e.code}${e.reason ? ': ' + e.reason : ''})`);
        return;
      }
      onState('reconnecting');
      setTimeout(() => { if (!stopped) open(); }, retry);
      retry = Math.min(retry * 2, 8000);
    };
  };
  open();
  return {
    send: (msg) => ws && ws.readyState === WebSocket.OPEN && ws.send(JSON.stringify(msg)),
    close: () => { stopped = true; if (ws) ws.close(); },
  };
}

/** Download a session's file with the key (a plain link could not send it). */
export async function download(url, name) {
  const r = await api('GET', url, undefined, { raw: true });
  const blob = await r.blob();
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  a.download = name || 'file';
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
}
