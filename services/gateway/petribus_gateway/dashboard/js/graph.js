// The net drawn as a graph: places (circles with their marker counts), transitions (boxes), arcs (input
// arcs with their counts). The layout is petribus's own (`petribus.graph`, the same drawing as
// `petribus graph APP --format svg`), served laid out by GET /bots/{bot}/net; here it is drawn as SVG
// once, and only counts and states change after that.

import { s, short } from './dom.js';

/**
 * Draw the laid-out net `lay` (GET /bots/{bot}/net) into `svg`; returns {update(state), select(place),
 * zoom(z)}. `state` is a session detail (marking, in_flight); `onPlace(name)` runs when a place is clicked.
 */
export function draw(svg, lay, { onPlace }) {
  while (svg.firstChild) svg.firstChild.remove();
  svg.setAttribute('viewBox', `0 0 ${lay.width} ${lay.height}`);
  svg.append(s('defs', {}, s('marker', {
    id: 'arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse',
  }, s('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrowhead' }))));
  const byId = new Map(lay.nodes.map((n) => [n.id, n]));
  const arcLayer = s('g', { class: 'arcs' });
  const nodeLayer = s('g', { class: 'nodes' });
  svg.append(arcLayer, nodeLayer);
  for (const e of lay.edges) {
    const from = byId.get(e.source), to = byId.get(e.target);
    const input = from.kind === 'place';
    const d = e.points.map(([x, y], i) => `${i ? 'L' : 'M'}${x},${y}`).join(' ');
    const g = s('g', { class: `arc ${input ? 'input' : 'output'}${e.back ? ' back' : ''}`,
      'data-from': from.name, 'data-to': to.name, 'data-count': input ? e.count : '' },
    s('path', { d, 'marker-end': 'url(#arrow)' }),
    s('title', {}, `${from.name} → ${to.name}${input ? ` (${e.count} per firing)` : ''}`));
    if (input && e.count > 1) {  // by the transition's end: a place may feed many, a transition has few inputs
      const n = e.points.length;
      const [[x0, y0], [x1, y1]] = e.back ? [e.points[1], e.points[0]] : [e.points[n - 2], e.points[n - 1]];
      g.append(s('text', { x: (x0 + x1) / 2, y: (y0 + y1) / 2 - 4, class: 'arc-count' }, String(e.count)));
    }
    arcLayer.append(g);
  }
  const places = new Map();
  const transitions = new Map();
  for (const n of lay.nodes) {
    const tip = `${n.name}${n.description ? ': ' + n.description : ''}`;
    if (n.kind === 'place') {
      const count = s('text', { x: n.x, y: n.y + 13, class: 'count' }, '0');
      const g = s('g', {
        class: `place${n.expose ? ' exposed' : ''}`, 'data-place': n.name, 'data-count': 0, tabindex: 0,
        role: 'button', onclick: () => onPlace(n.name),
        onkeydown: (ev) => { if (ev.key === 'Enter') onPlace(n.name); },
      },
      s('title', {}, `${tip} (click: its markers)`),
      s('circle', { cx: n.x, cy: n.y, r: n.width / 2 }),
      s('text', { x: n.x, y: n.y - 3, class: 'label' }, n.name), count);
      places.set(n.name, { g, count });
      nodeLayer.append(g);
    } else {
      const badge = s('text', { x: n.x + n.width / 2 - 2, y: n.y - n.height / 2 - 4, class: 'badge' }, '');
      const g = s('g', {
        class: `transition${n.confirm ? ' confirm' : ''}${n.expose ? '' : ' hidden'}`, 'data-transition': n.name,
        'data-state': 'idle', 'data-in-flight': 0,
      },
      s('title', {}, `${tip}${n.confirm ? ' (asks before it runs)' : ''}`),
      s('rect', { x: n.x - n.width / 2, y: n.y - n.height / 2, width: n.width, height: n.height, rx: 4 }),
      s('text', { x: n.x, y: n.y + 4, class: 'label' }, short(n.name, 40)), badge);
      transitions.set(n.name, { g, badge });
      nodeLayer.append(g);
    }
  }
  let selected = null;
  const graph = {
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
        t.g.setAttribute('data-state', e.running ? 'firing' : e.waiting ? 'awaiting' : 'idle');
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
  graph.zoom(1);
  return graph;
}
