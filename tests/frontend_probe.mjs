// Loads workflows into ComfyUI's real frontend in headless Chromium and prints what it measures as
// one JSON object on stdout; tests/test_frontend_layout.py judges the numbers.
//
//   node tests/frontend_probe.mjs --url http://127.0.0.1:8188 --phase layout|missing \
//        [--viewport 1366x768] [--shots DIR] [--chromium /usr/bin/chromium] WORKFLOW.json...
//
// playwright-core is looked up next to this file, then in $PLAYWRIGHT_DIR (a folder whose
// node_modules holds it, e.g. after `npm i playwright-core` there).
//
// layout:  per workflow, the saved view (extra.ds), the canvas and the frontend's overlays on it
//          (minimap, toolbars, tab strip), every node's box, title, badge strip, minimum size and
//          widget rows, and every link's spline control points; then every Sana node added by
//          hand at its default size. Screenshots go to --shots.
// missing: per workflow, the entries of the "Missing Models" dialog that loading it opens.

import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';

function args(argv) {
  const options = { viewport: '1366x768', chromium: '/usr/bin/chromium', phase: 'layout', workflows: [] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i].startsWith('--')) options[argv[i].slice(2)] = argv[++i];
    else options.workflows.push(argv[i]);
  }
  return options;
}

function loadPlaywright() {
  const places = [import.meta.url];
  if (process.env.PLAYWRIGHT_DIR) places.push(path.join(process.env.PLAYWRIGHT_DIR, 'package.json'));
  for (const place of places) {
    try {
      return createRequire(place)('playwright-core');
    } catch { /* try the next place */ }
  }
  throw new Error('playwright-core not found: npm i playwright-core in a folder and set PLAYWRIGHT_DIR to it');
}

const options = args(process.argv.slice(2));
const [width, height] = options.viewport.split('x').map(Number);
const { chromium } = loadPlaywright();

// A first visit opens the template browser over the canvas; mark it as seen for this user folder.
await fetch(`${options.url}/settings/Comfy.TutorialCompleted`, { method: 'POST', body: 'true' });

const browser = await chromium.launch({
  executablePath: options.chromium,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const result = { viewport: [width, height], phase: options.phase, workflows: {}, console: [] };
try {
  const page = await browser.newPage({ viewport: { width, height } });
  page.on('console', (message) => {
    if (['error', 'warning'].includes(message.type())) result.console.push(message.text().slice(0, 300));
  });
  await page.goto(options.url, { waitUntil: 'networkidle' });
  await page.waitForFunction(() => window.app?.graph && window.app?.canvas, null, { timeout: 60000 });
  for (const file of options.workflows) {
    const name = path.basename(file, '.json');
    const workflow = JSON.parse(fs.readFileSync(file, 'utf8'));
    if (options.phase === 'missing') {
      result.workflows[name] = await missingModels(page, workflow, name);
    } else {
      result.workflows[name] = await layout(page, workflow, name);
      if (options.shots) await page.screenshot({ path: path.join(options.shots, `${name}.png`) });
    }
  }
  if (options.phase === 'layout') {
    result.handAdded = await handAddedNodes(page);
    if (options.shots) await page.screenshot({ path: path.join(options.shots, 'hand_added_nodes.png') });
  }
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(result) + '\n');

async function layout(page, workflow, name) {
  return page.evaluate(async ({ workflow, name }) => {
    const app = window.app;
    await app.loadGraphData(workflow, true, true, name, { showMissingModelsDialog: false });
    app.canvas.setDirty(true, true);
    // Widgets get their rows when the canvas draws: wait for two frames.
    await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
    await new Promise((resolve) => setTimeout(resolve, 300));
    return measureGraph(app);

    function measureGraph(app) {
      const LiteGraph = window.LiteGraph;
      const canvasElement = app.canvas.canvas;
      const canvasRect = canvasElement.getBoundingClientRect();
      const context = document.createElement('canvas').getContext('2d');
      const textWidth = (text, font) => { context.font = font; return context.measureText(String(text)).width; };
      const nodes = app.graph._nodes.map((node) => {
        const badges = (node.badges || []).map((badge) => (typeof badge === 'function' ? badge() : badge)).filter((b) => b.visible !== false);
        return {
          id: node.id,
          type: node.type,
          title: node.getTitle(),
          pos: [node.pos[0], node.pos[1]],
          size: [node.size[0], node.size[1]],
          minSize: Array.from(node.computeSize()),
          titleHeight: LiteGraph.NODE_TITLE_HEIGHT,
          titleWidth: textWidth(node.getTitle(), node.titleFontStyle),
          badgeHeight: badges.length ? Math.max(...badges.map((b) => b.height)) + 2 : 0,
          widgets: (node.widgets || []).filter((w) => !w.hidden && (node.isWidgetVisible?.(w) ?? true)).map((w) => ({
            name: w.name,
            type: w.type,
            y: w.y,
            height: w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT,
            labelWidth: textWidth(w.label || w.name, app.canvas.inner_text_font),
            valueWidth: ['number', 'combo'].includes(w.type) ? textWidth(w._displayValue ?? w.value, app.canvas.inner_text_font) : 0,
          })),
        };
      });
      const renderer = app.canvas.linkRenderer.pathRenderer;
      const links = [];
      for (const link of app.graph.links.values()) {
        const source = app.graph.getNodeById(link.origin_id);
        const target = app.graph.getNodeById(link.target_id);
        const start = source.getOutputPos(link.origin_slot);
        const end = target.getInputPos(link.target_slot);
        const controls = renderer.calculateControlPoints({ x: start[0], y: start[1] }, { x: end[0], y: end[1] }, 'right', 'left');
        links.push({ id: link.id, origin: link.origin_id, target: link.target_id,
          points: [[start[0], start[1]], [controls[0].x, controls[0].y], [controls[1].x, controls[1].y], [end[0], end[1]]] });
      }
      return {
        ds: { offset: [app.canvas.ds.offset[0], app.canvas.ds.offset[1]], scale: app.canvas.ds.scale },
        canvas: { left: canvasRect.left, top: canvasRect.top, width: canvasRect.width, height: canvasRect.height },
        overlays: overlaysOn(canvasElement, canvasRect),
        lowQualityScale: app.canvas._lowQualityZoomThreshold,
        splineLinks: app.canvas.links_render_mode === LiteGraph.SPLINE_LINK,
        nodes,
        links,
      };
    }

    // The frontend's panels that float over the canvas (tab strip, minimap, toolbars), found by
    // hit-testing a grid of points, in canvas pixels. Nodes' own DOM widgets (text areas) are not overlays.
    function overlaysOn(canvasElement, canvasRect) {
      const found = new Map();
      for (let x = canvasRect.left + 2; x < canvasRect.right; x += 12) {
        for (let y = canvasRect.top + 2; y < canvasRect.bottom; y += 12) {
          let element = document.elementFromPoint(x, y);
          if (!element || element === canvasElement || element.closest('.dom-widget')) continue;
          while (element.parentElement && element.parentElement !== document.body) {
            const r = element.parentElement.getBoundingClientRect();
            if (r.width * r.height === 0 || r.width * r.height > 0.3 * canvasRect.width * canvasRect.height) break;
            element = element.parentElement;
          }
          const r = element.getBoundingClientRect();
          const key = `${element.tagName}.${element.className}`;
          if (!found.has(key)) {
            found.set(key, { name: String(element.className).split(' ')[0] || element.tagName,
              x: r.left - canvasRect.left, y: r.top - canvasRect.top, width: r.width, height: r.height });
          }
        }
      }
      // The canvas info (T:, I:, N:, V:, FPS) that LiteGraph draws at the bottom left.
      if (window.app.canvas.renderInfo && window.app.canvas.show_info !== false) {
        found.set('canvas-info', { name: 'canvas-info', x: 10, y: canvasRect.height - 80, width: 80, height: 70 });
      }
      return [...found.values()];
    }
  }, { workflow, name });
}

async function handAddedNodes(page) {
  return page.evaluate(async () => {
    const app = window.app;
    const LiteGraph = window.LiteGraph;
    app.graph.clear();
    const context = document.createElement('canvas').getContext('2d');
    const nodes = [];
    let x = 20;
    let y = 80;
    for (const type of Object.keys(LiteGraph.registered_node_types).filter((t) => t.startsWith('Sana')).sort()) {
      const node = LiteGraph.createNode(type);
      node.pos = [x, y];
      app.graph.add(node);
      context.font = node.titleFontStyle;
      nodes.push({ type, title: node.getTitle(), size: [node.size[0], node.size[1]], titleHeight: LiteGraph.NODE_TITLE_HEIGHT,
        titleWidth: context.measureText(node.getTitle()).width, category: node.constructor.category });
      y += node.size[1] + 90;
      if (y > 600) { y = 80; x += 440; }
    }
    app.canvas.ds.offset = [0, 0];
    app.canvas.ds.scale = 0.8;
    app.canvas.setDirty(true, true);
    await new Promise((resolve) => setTimeout(resolve, 300));
    return nodes;
  });
}

async function missingModels(page, workflow, name) {
  await page.evaluate(async ({ workflow, name }) => {
    await window.app.loadGraphData(workflow, true, true, name);
  }, { workflow, name });
  const list = page.locator('.comfy-missing-models');
  try {
    await list.waitFor({ state: 'visible', timeout: 5000 });
  } catch {
    return { dialog: false, entries: [] };
  }
  const entries = await list.locator('li').evaluateAll((items) => items.map((item) => ({
    label: item.querySelector('span[title]')?.textContent.trim() ?? item.textContent.trim(),
    url: item.querySelector('span[title]')?.getAttribute('title') ?? '',
    error: item.querySelector('.p-message')?.textContent.trim() ?? '',
    downloadEnabled: [...item.querySelectorAll('button')].some((b) => /download/i.test(b.textContent) && !b.disabled),
  })));
  await page.keyboard.press('Escape');
  await list.waitFor({ state: 'hidden', timeout: 5000 }).catch(() => {});
  return { dialog: true, entries };
}
