// The ott-bootstrap dashboard: polls /api/tree every 500 ms and draws it as SVG.
// Every string from the network reaches the page through textContent or setAttribute
// on a data-/geometry attribute, never as markup.
'use strict';

const NS = 'http://www.w3.org/2000/svg';
const W = 1000, H = 640, MX = 70, MY = 50;
const POLL_MS = 500;
const ROLE_FILL = { server: '#66bb6a', relay: '#42a5f5', pop: '#ffa726' };
const SERVER_COLOURS = ['#1565c0', '#ad1457', '#2e7d32', '#ef6c00', '#6a1b9a', '#00838f', '#4e342e', '#c62828'];

function svg(name, attrs, text) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function html(name, text, cls) {
  const e = document.createElement(name);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function clear(id) {
  const e = document.getElementById(id);
  while (e.firstChild) e.removeChild(e.firstChild);
  return e;
}

function fmtMs(v) {
  if (v === null || v === undefined) return '–';
  return (v < 10 ? v.toFixed(2) : v.toFixed(1)) + ' ms';
}

function serverColour(servers, id) {
  const i = servers.indexOf(id);
  return SERVER_COLOURS[(i < 0 ? 0 : i) % SERVER_COLOURS.length];
}

// One arrowhead marker per server colour.
function markers(servers) {
  const defs = clear('defs');
  servers.forEach((s, i) => {
    const m = svg('marker', {
      id: 'arrow' + i, viewBox: '0 0 10 10', refX: 9, refY: 5,
      markerWidth: 6, markerHeight: 6, orient: 'auto-start-reverse',
    });
    m.appendChild(svg('path', { d: 'M0,0 L10,5 L0,10 z', fill: serverColour(servers, s) }));
    defs.appendChild(m);
  });
}

function draw(tree) {
  document.getElementById('topology').textContent = tree.topology;
  const nodes = tree.nodes;
  const byId = new Map(nodes.map(n => [n.id, n]));
  const servers = nodes.filter(n => n.role === 'server').map(n => n.id).sort();
  const perRow = new Map();
  for (const n of nodes) perRow.set(n.y, (perRow.get(n.y) || 0) + 1);
  const widest = Math.max(1, ...perRow.values());
  const R = Math.max(6, Math.min(18, (W - 2 * MX) / widest / 3));
  const pos = n => [MX + n.x * (W - 2 * MX), MY + n.y * (H - 2 * MY)];
  markers(servers);

  const links = clear('links');
  for (const l of tree.links) {
    const a = byId.get(l.a), b = byId.get(l.b);
    if (!a || !b) continue;
    const [x1, y1] = pos(a), [x2, y2] = pos(b);
    let cls = 'link';
    if (!l.alive) cls += ' down';
    if (l.streams.length > 0) cls += ' carrying';
    links.appendChild(svg('line', { class: cls, x1, y1, x2, y2, 'data-a': l.a, 'data-b': l.b }));
    // Labels go on the side opposite the parent arrows drawn along this link.
    let px = -(y2 - y1), py = x2 - x1;
    const plen = Math.hypot(px, py) || 1;
    px /= plen; py /= plen;
    const t = l.trees[0];
    if (t && t.child === l.b) { px = -px; py = -py; }
    const mx = (x1 + x2) / 2 - px * 12, my = (y1 + y2) / 2 - py * 12;
    const anchor = Math.abs(px) < 0.3 ? 'middle' : (px > 0 ? 'end' : 'start');
    if (l.latency_ms !== null) {
      links.appendChild(svg('text', { x: mx, y: my, 'text-anchor': anchor, class: 'lat' }, fmtMs(l.latency_ms)));
    }
    if (l.streams.length > 0) {
      const names = [...new Set(l.streams.map(s => s.name))].sort().join(', ');
      links.appendChild(svg('text', { x: mx, y: my + 12, 'text-anchor': anchor, class: 'streams' }, names));
    }
  }

  // Parent arrows: each live relay or PoP to its parent, per server, offset so they do
  // not hide the link or each other.
  const arrows = clear('arrows');
  for (const n of nodes) {
    // A server's route to another server distributes nothing.
    if (!n.alive || n.role === 'server') continue;
    n.routes.forEach(r => {
      const p = r.parent === null ? undefined : byId.get(r.parent);
      if (!p) return;
      const si = Math.max(0, servers.indexOf(r.server));
      const [x1, y1] = pos(n), [x2, y2] = pos(p);
      const len = Math.hypot(x2 - x1, y2 - y1) || 1;
      const ux = (x2 - x1) / len, uy = (y2 - y1) / len;
      const off = 5 + 5 * si;
      const ox = -uy * off, oy = ux * off;
      const best = r.server === n.server;
      arrows.appendChild(svg('line', {
        class: 'arrow',
        x1: x1 + ux * R + ox, y1: y1 + uy * R + oy,
        x2: x2 - ux * (R + 2) + ox, y2: y2 - uy * (R + 2) + oy,
        stroke: serverColour(servers, r.server),
        'stroke-opacity': best ? 1 : 0.45,
        'marker-end': 'url(#arrow' + si + ')',
        'data-child': n.id, 'data-parent': p.id, 'data-server': r.server,
      }));
    });
  }

  const group = clear('nodes');
  for (const n of nodes) {
    const [x, y] = pos(n);
    const g = svg('g', {
      class: 'node ' + (n.alive ? 'alive' : 'dead'),
      'data-id': n.id, 'data-role': n.role, 'data-alive': n.alive,
      'data-parent': n.parent === null ? '' : n.parent,
    });
    g.appendChild(svg('circle', { cx: x, cy: y, r: R, fill: ROLE_FILL[n.role] || '#ccc' }));
    g.appendChild(svg('text', { x: x, y: y + 4, 'text-anchor': 'middle', class: 'id' }, n.id));
    let state;
    if (!n.alive) state = n.last_report_ms === null ? 'never heard' : 'dead';
    else if (n.role === 'server') state = 'server';
    else if (n.hops === null) state = 'no route';
    else state = fmtMs(n.latency_ms) + ' · ' + n.hops + ' hop' + (n.hops === 1 ? '' : 's');
    g.appendChild(svg('text', { x: x + R + 4, y: y - 2, class: 'state' }, state));
    if (n.role === 'pop' && n.alive) {
      g.appendChild(svg('text', { x: x + R + 4, y: y + 11, class: 'viewers' },
        n.viewers + ' viewer' + (n.viewers === 1 ? '' : 's')));
    }
    const title = svg('title', {}, n.id + ' (' + n.role + ')' +
      (n.viewer_addrs.length ? '\nviewers: ' + n.viewer_addrs.join(', ') : ''));
    g.appendChild(title);
    group.appendChild(g);
  }

  const alive = nodes.filter(n => n.alive).length;
  const viewers = nodes.reduce((s, n) => s + (n.alive ? n.viewers : 0), 0);
  document.getElementById('summary').textContent =
    alive + ' of ' + nodes.length + ' nodes alive · ' + viewers + ' viewers';
  const sv = clear('servers');
  servers.forEach(s => {
    const sw = html('i', undefined, 'swatch');
    sw.style.background = serverColour(servers, s);
    sv.appendChild(sw);
    sv.appendChild(document.createTextNode('tree of ' + s + '  '));
  });
  const st = tree.stats;
  document.getElementById('stats').textContent = 'reports: ' + st.accepted + ' accepted, ' +
    (st.malformed + st.unknown_address + st.wrong_id + st.auth_failed) + ' refused, ' +
    st.stale + ' stale';

  const rows = clear('rows');
  for (const n of nodes) {
    const tr = html('tr', undefined, n.alive ? 'alive' : 'dead');
    tr.dataset.id = n.id;
    const streams = n.streams
      .filter(s => s.upstream !== null || s.children.length > 0 || s.viewers > 0)
      .map(s => s.name + ' (' + (s.upstream === null ? '·' : s.upstream) + ' → ' +
        [...s.children, ...(s.viewers ? [s.viewers + ' viewers'] : [])].join(', ') + ')')
      .join('; ');
    const nbs = n.neighbours
      .map(b => b.id + (b.alive ? ' ' + fmtMs(b.rtt_ms) : ' dead')).join(', ');
    const state = n.alive ? 'alive' : (n.last_report_ms === null ? 'never heard' : 'dead, ' + (n.last_report_ms / 1000).toFixed(1) + ' s silent');
    for (const text of [n.id, n.role, state, n.parent === null ? '–' : n.parent,
      n.server === null ? '–' : n.server, fmtMs(n.latency_ms), n.hops === null ? '–' : String(n.hops),
      streams || '–', String(n.viewers), nbs || '–']) {
      tr.appendChild(html('td', text));
    }
    rows.appendChild(tr);
  }
}

async function poll() {
  const conn = document.getElementById('conn');
  try {
    const r = await fetch('/api/tree', { cache: 'no-store' });
    if (!r.ok) throw new Error('HTTP ' + r.status);
    draw(await r.json());
    conn.textContent = 'live · ' + new Date().toLocaleTimeString();
    conn.className = '';
  } catch (e) {
    conn.textContent = 'bootstrapper unreachable (' + e.message + ')';
    conn.className = 'bad';
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
