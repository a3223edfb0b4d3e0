// The net drawn as a graph: places (circles with their marker counts), transitions (boxes), arcs (input
// arcs with their counts). Laid out here, left to right in layers: cycles are broken by the back arcs a
// depth-first walk finds, each node goes to its longest-path layer (places land in even columns and
// transitions in odd ones: arcs alternate), and a few barycentre sweeps order each column. Every walk is
// iterative, so a net of any size cannot exhaust the stack.

import { s, short } from './dom.js';

const COL_W = 170;
const ROW_H = 66;
const MARGIN = 40;
const R = 22;
const BOX_H = 30;
const SWEEPS = 8;
const BAND_GAP = 50;

/**
 * Positions for `net` ({places, transitions}): {nodes: Map(id -> node), arcs, width, height}; `opts.columns`:
 * the most columns side by side before the layout wraps into another band below.
 */
export function layout(net, opts = {}) {
  const nodes = new Map();
  for (const p of net.places) nodes.set(`p:${p.name}`, { id: `p:${p.name}`, kind: 'place', name: p.name, info: p });
  for (const t of net.transitions) {
    nodes.set(`t:${t.name}`, { id: `t:${t.name}`, kind: 'transition', name: t.name, info: t });
  }
  const arcs = [];
  for (const t of net.transitions) {
    for (const [place, count] of Object.entries(t.inputs)) {
      if (nodes.has(`p:${place}`)) arcs.push({ from: `p:${place}`, to: `t:${t.name}`, count, input: true });
    }
    for (const place of t.outputs) {
      if (nodes.has(`p:${place}`)) arcs.push({ from: `t:${t.name}`, to: `p:${place}`, count: null, input: false });
    }
  }
  const out = new Map([...nodes.keys()].map((k) => [k, []]));
  const inn = new Map([...nodes.keys()].map((k) => [k, []]));
  for (const a of arcs) { out.get(a.from).push(a); inn.get(a.to).push(a); }

  // Back arcs: those a depth-first walk (from the nodes nothing points at, then the rest) finds closing a cycle.
  const colour = new Map();
  const roots = [...nodes.keys()].sort((a, b) => inn.get(a).length - inn.get(b).length);
  for (const root of roots) {
    if (colour.has(root)) continue;
    const stack = [[root, 0]];
    colour.set(root, 1);
    while (stack.length) {
      const top = stack[stack.length - 1];
      const edges = out.get(top[0]);
      if (top[1] >= edges.length) { colour.set(top[0], 2); stack.pop(); continue; }
      const a = edges[top[1]++];
      const c = colour.get(a.to);
      if (c === 1) a.back = true;
      else if (c === undefined) { colour.set(a.to, 1); stack.push([a.to, 0]); }
    }
  }
  // Longest-path layers over the forward arcs (Kahn's order).
  const layer = new Map([...nodes.keys()].map((k) => [k, 0]));
  const indeg = new Map([...nodes.keys()].map((k) => [k, inn.get(k).filter((a) => !a.back).length]));
  const queue = [...nodes.keys()].filter((k) => indeg.get(k) === 0);
  for (let i = 0; i < queue.length; i++) {
    const k = queue[i];
    for (const a of out.get(k)) {
      if (a.back) continue;
      layer.set(a.to, Math.max(layer.get(a.to), layer.get(k) + 1));
      indeg.set(a.to, indeg.get(a.to) - 1);
      if (indeg.get(a.to) === 0) queue.push(a.to);
    }
  }
  for (const [k, n] of nodes) {  // places in even columns, transitions in odd ones
    let l = layer.get(k);
    if ((n.kind === 'place') !== (l % 2 === 0)) l += 1;
    layer.set(k, l);
  }
  const columns = [];
  for (const k of nodes.keys()) {
    const l = layer.get(k);
    (columns[l] ||= []).push(k);
  }
  for (let i = 0; i < columns.length; i++) columns[i] ||= [];
  // Barycentre sweeps: order each column by the mean position of its neighbours in the one before (after).
  const pos = new Map();
  const index = () => columns.forEach((col) => col.forEach((k, i) => pos.set(k, i / Math.max(1, col.length - 1))));
  index();
  const bary = (k, dir) => {
    const near = (dir > 0 ? inn.get(k).map((a) => a.from) : out.get(k).map((a) => a.to))
      .filter((o) => layer.get(o) === layer.get(k) - dir);
    return near.length ? near.reduce((sum, o) => sum + pos.get(o), 0) / near.length : pos.get(k);
  };
  for (let sweep = 0; sweep < SWEEPS; sweep++) {
    const dir = sweep % 2 === 0 ? 1 : -1;
    const order = dir > 0 ? columns.keys() : [...columns.keys()].reverse();
    for (const c of order) {
      const col = columns[c];
      const b = new Map(col.map((k) => [k, bary(k, dir)]));
      col.sort((x, y) => b.get(x) - b.get(y));
      col.forEach((k, i) => pos.set(k, i / Math.max(1, col.length - 1)));
    }
  }
  // Long nets wrap: at most `perBand` columns side by side, the next ones in a band below.
  const perBand = Math.max(2, opts.columns || columns.length || 1);
  let top = MARGIN;
  let width = 0;
  for (let b = 0; b * perBand < columns.length; b++) {
    const band = columns.slice(b * perBand, (b + 1) * perBand);
    const tall = Math.max(1, ...band.map((c) => c.length));
    band.forEach((col, i) => {
      const y0 = top + ((tall - col.length) * ROW_H) / 2 + ROW_H / 2;
      col.forEach((k, j) => {
        const n = nodes.get(k);
        n.band = b;
        n.x = MARGIN + R + i * COL_W;
        n.y = y0 + j * ROW_H;
        n.w = n.kind === 'place' ? 2 * R : Math.min(COL_W - 30, Math.max(70, short(n.name, 20).length * 7.5 + 16));
      });
    });
    width = Math.max(width, MARGIN * 2 + 2 * R + (band.length - 1) * COL_W + 60);
    top += tall * ROW_H + BAND_GAP;
  }
  return { nodes, arcs, width, height: top - BAND_GAP + MARGIN };
}

function edgePoint(n, other) {
  if (n.kind === 'place') {
    const dx = other.x - n.x, dy = other.y - n.y;
    const d = Math.hypot(dx, dy) || 1;
    return { x: n.x + (R * dx) / d, y: n.y + (R * dy) / d };
  }
  return { x: n.x + (other.x >= n.x ? n.w / 2 : -n.w / 2), y: n.y };
}

function bottom(n) {
  return { x: n.x, y: n.y + (n.kind === 'place' ? R : BOX_H / 2) };
}

/**
 * Draw `lay` into `svg`; returns {update(state), select(placeName)}. `state` is a session detail (marking,
 * in_flight); `onPlace(name)` is called when a place is clicked.
 */
export function draw(svg, lay, { onPlace, onTransition }) {
  while (svg.firstChild) svg.firstChild.remove();
  svg.setAttribute('viewBox', `0 0 ${lay.width} ${lay.height}`);
  svg.setAttribute('width', lay.width);
  svg.setAttribute('height', lay.height);
  svg.append(s('defs', {}, s('marker', {
    id: 'arrow', viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse',
  }, s('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrowhead' }))));
  const arcLayer = s('g', { class: 'arcs' });
  const nodeLayer = s('g', { class: 'nodes' });
  svg.append(arcLayer, nodeLayer);
  for (const a of lay.arcs) {
    const from = lay.nodes.get(a.from), to = lay.nodes.get(a.to);
    const sameBand = from.band === to.band;
    const forward = sameBand && to.x > from.x + 10;
    const p = forward || !sameBand ? edgePoint(from, { x: from.x + 1, y: from.y }) : bottom(from);
    const q = forward || !sameBand ? edgePoint(to, { x: to.x - 1, y: to.y }) : bottom(to);
    const dip = Math.max(p.y, q.y) + ROW_H * 0.5;
    const mx = (p.x + q.x) / 2;
    let d;
    if (forward) d = `M${p.x},${p.y} C${mx},${p.y} ${mx},${q.y} ${q.x},${q.y}`;
    else if (sameBand) d = `M${p.x},${p.y} C${p.x},${dip} ${q.x},${dip} ${q.x},${q.y}`;
    else d = `M${p.x},${p.y} C${p.x + 90},${p.y} ${q.x - 90},${q.y} ${q.x},${q.y}`;  // into another band
    const g = s('g', { class: `arc ${a.input ? 'input' : 'output'}${a.back ? ' back' : ''}`,
      'data-from': from.name, 'data-to': to.name, 'data-count': a.count ?? '' });
    g.append(s('path', { d, 'marker-end': 'url(#arrow)' }));
    g.append(s('title', {}, `${from.name} → ${to.name}${a.count ? ` (${a.count} per firing)` : ''}`));
    if (a.count && a.count > 1) {
      const lx = mx;
      const ly = sameBand && !forward ? dip - 4 : (p.y + q.y) / 2 - 6;
      g.append(s('text', { x: lx, y: ly, class: 'arc-count' }, String(a.count)));
    }
    arcLayer.append(g);
  }
  const places = new Map();
  const transitions = new Map();
  for (const n of lay.nodes.values()) {
    if (n.kind === 'place') {
      const count = s('text', { x: n.x, y: n.y + 5, class: 'count' }, '0');
      const g = s('g', {
        class: `place${n.info.exposed ? ' exposed' : ''}`, 'data-place': n.name, 'data-count': 0, tabindex: 0,
        role: 'button', onclick: () => onPlace(n.name),
        onkeydown: (e) => { if (e.key === 'Enter') onPlace(n.name); },
      },
      s('title', {}, `${n.name}${n.info.description ? ': ' + n.info.description : ''} (click: its markers)`),
      s('circle', { cx: n.x, cy: n.y, r: R }), count,
      s('text', { x: n.x, y: n.y + R + 14, class: 'label' }, short(n.name, 22)));
      places.set(n.name, { g, count });
      nodeLayer.append(g);
    } else {
      const badge = s('text', { x: n.x + n.w / 2 - 2, y: n.y - BOX_H / 2 - 4, class: 'badge' }, '');
      const g = s('g', {
        class: `transition${n.info.confirm ? ' confirm' : ''}`, 'data-transition': n.name, 'data-state': 'idle',
        'data-in-flight': 0, onclick: () => onTransition && onTransition(n.name),
      },
      s('title', {}, `${n.name}${n.info.description ? ': ' + n.info.description : ''}` +
        `${n.info.confirm ? ' (asks before it runs)' : ''}`),
      s('rect', { x: n.x - n.w / 2, y: n.y - BOX_H / 2, width: n.w, height: BOX_H, rx: 4 }),
      s('text', { x: n.x, y: n.y + 4, class: 'label' }, short(n.name, 20)), badge);
      transitions.set(n.name, { g, badge });
      nodeLayer.append(g);
    }
  }
  let selected = null;
  return {
    zoom(z) {
      svg.setAttribute('width', Math.round(lay.width * z));
      svg.setAttribute('height', Math.round(lay.height * z));
    },
    update(state) {
      const marking = (state && state.marking) || {};
      for (const [name, p] of places) {
        const n = (marking[name] || []).length;
        p.count.textContent = String(n);
        p.g.setAttribute('data-count', n);
        p.g.classList.toggle('marked', n > 0);
      }
      const flight = new Map();
      for (const f of (state && state.in_flight) || []) {
        const e = flight.get(f.transition) || { running: 0, waiting: 0 };
        if (f.status === 'awaiting_confirmation') e.waiting++;
        else e.running++;
        flight.set(f.transition, e);
      }
      for (const [name, t] of transitions) {
        const e = flight.get(name) || { running: 0, waiting: 0 };
        const st = e.running ? 'firing' : e.waiting ? 'awaiting' : 'idle';
        t.g.setAttribute('data-state', st);
        t.g.setAttribute('data-in-flight', e.running + e.waiting);
        t.badge.textContent = e.running + e.waiting > 1 ? `×${e.running + e.waiting}` : '';
      }
    },
    select(name) {
      if (selected) selected.classList.remove('selected');
      selected = name ? (places.get(name) || {}).g : null;
      if (selected) selected.classList.add('selected');
    },
  };
}
