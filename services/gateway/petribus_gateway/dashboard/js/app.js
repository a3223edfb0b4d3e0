// The dashboard's shell: the key form, the notice line, and a hash router over two pages: the bots with
// their sessions (#/), and one session (#/bots/BOT/sessions/ID).

import { enc, get, post, setToken, token } from './api.js';
import { ago, fill, h } from './dom.js';
import { openSession } from './session.js';
import { failed, go, notice, statusBadge } from './shell.js';

const main = document.getElementById('main');
const crumbs = document.getElementById('crumbs');
let leave = null;  // what the current page does when it is left (close its stream, stop its timer)

function setCrumbs(...parts) {
  fill(crumbs, ...parts.flatMap((p, i) => (i ? [h('span.sep', '/'), p] : [p])));
}

async function home() {
  setCrumbs(h('span', 'bots'));
  const page = h('div.home');
  fill(main, page);
  let bots;
  try {
    bots = await get('/bots');
  } catch (err) {
    failed(err);
    return;
  }
  notice(null);
  const lists = new Map();
  for (const bot of bots) {
    const list = h('div.sessions', h('p.muted', 'Loading sessions…'));
    lists.set(bot.name, list);
    page.append(h('section.card.bot', { dataset: { bot: bot.name } },
      h('div.bot-head',
        h('h2', bot.name),
        h('button.primary', {
          dataset: { action: 'new-session' },
          onclick: async () => {
            try {
              const made = await post(`/bots/${enc(bot.name)}/sessions`);
              go(`#/bots/${enc(bot.name)}/sessions/${enc(made.session_id)}`);
            } catch (err) { failed(err); }
          },
        }, 'New session')),
      h('p.muted', bot.description || ''),
      list));
  }
  if (!bots.length) {
    page.append(h('p#no-bots.muted', token() ? 'This gateway serves no bot to this key.'
      : 'No bot here is open without a key: enter an API key above (an operator makes one with ' +
        '`petribus keys create --owner NAME`).'));
  }
  const refresh = async () => {
    for (const bot of bots) {
      try {
        const recent = await get(`/bots/${enc(bot.name)}/recent?limit=50`);
        showSessions(bot.name, lists.get(bot.name), recent);
      } catch (err) {
        failed(err);
      }
    }
  };
  await refresh();
  const timer = setInterval(refresh, 5000);
  return () => clearInterval(timer);
}

function showSessions(bot, list, recent) {
  fill(list);
  if (!recent.sessions.length) {
    list.append(h('p.muted', 'No sessions yet.'));
    return;
  }
  list.append(h('table.session-table',
    h('thead', h('tr', h('th', 'session'), h('th', 'status'), h('th', 'events'), h('th', 'last activity'),
      h('th', 'forked from'))),
    h('tbody', recent.sessions.map((s) => h('tr.session-row', { dataset: { session: s.session_id, status: s.status } },
      h('td', h('a', { href: `#/bots/${enc(bot)}/sessions/${enc(s.session_id)}` }, s.session_id)),
      h('td', statusBadge(s.status)),
      h('td.num', String(s.events)),
      h('td', { title: new Date(s.updated * 1000).toLocaleString() }, ago(s.updated)),
      h('td', s.forked_from ? h('a', { href: `#/bots/${enc(bot)}/sessions/${enc(s.forked_from)}` },
        s.forked_from.slice(0, 8)) : ''))))));
  if (recent.more) list.append(h('p.muted', `and ${recent.more} older sessions`));
}

let generation = 0;

async function route() {
  if (leave) { leave(); leave = null; }
  const mine = ++generation;
  notice(null);
  const m = location.hash.match(/^#\/bots\/([^/]+)\/sessions\/([^/?]+)/);
  if (m) {
    const bot = decodeURIComponent(m[1]);
    const id = decodeURIComponent(m[2]);
    setCrumbs(h('a', { href: '#/' }, 'bots'), h('span', bot), h('span.mono', id));
    done(mine, await openSession(main, bot, id));
  } else {
    done(mine, await home());
  }
}

function done(mine, onLeave) {
  if (mine === generation) leave = onLeave || null;
  else if (onLeave) onLeave();  // left while it was opening
}

const form = document.getElementById('key-form');
const input = document.getElementById('key-input');
input.value = token() ? '••••••••' : '';
form.addEventListener('submit', (e) => {
  e.preventDefault();
  if (input.value && !input.value.startsWith('•')) setToken(input.value.trim());
  input.value = token() ? '••••••••' : '';
  route();
});
document.getElementById('key-clear').addEventListener('click', () => {
  setToken('');
  input.value = '';
  route();
});
window.addEventListener('hashchange', route);
route();
