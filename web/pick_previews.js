// Diffusion Preview's pick grid: pick the previews to refine by clicking them.
//
// With a VAE connected, Diffusion Preview shows its decoded previews on the node, each captioned with its seed and
// batch position ("seed 42 · #1", counted from 0 as Diffusion Refine's select counts). Clicking a preview marks it
// as chosen or unmarks it; the chosen set is written to the select of every Diffusion Refine the preview feeds
// ("1,3"; "all" when none is picked, the Refine's default). The marks are always drawn from that select, so typing
// there moves them too, and a saved or shared workflow brings them back. A click changes only the Refine's widget:
// the approving run reuses the cached previews (no model call).
//
// Whatever this relies on in the frontend is checked, and where it is missing (Vue nodes, no canvas widgets, an
// error while drawing) the frontend shows the previews its own way, select is typed, and the console says why.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { PREVIEW, refinesFedBy } from "./diffusion_preview.js";

const PICKS_KEY = "diffusion_preview"; // nodes/runtime.py PICKS_UI_KEY: the seed and batch size of the previews
const GRID = "$$diffusion_preview_picks";
const SELECT = "select";
const SELECT_ALL = "all";
const LOG = "[consistency_solver]";

const MARK = "#2ecc71"; // a chosen preview's frame, badge and caption
const DIMMED = 0.4; // the opacity of the previews not chosen, once some are
const GAP = 8;
const CAPTION = 18; // the caption line under each preview
const STATUS = 22; // the line under the grid that says what the Refine renders
const MIN_HEIGHT = 220;

// --- select: the saved form of the choice (parsed as nodes/preview_state.py parse_selection does) ---------------

/** `select` read against a batch: the chosen positions, whether it says "all", or what is wrong with it. */
export function parseSelect(text, batchSize) {
  const all = Array.from({ length: batchSize }, (_, position) => position);
  const typed = String(text ?? "").trim().toLowerCase();
  if (typed === SELECT_ALL) return { all: true, positions: all, problem: null };
  const parts = typed
    .split(",")
    .map((part) => part.trim())
    .filter(Boolean);
  if (!parts.length) return { all: false, positions: [], problem: "select is empty" };
  if (!parts.every((part) => /^[+-]?\d+$/.test(part))) {
    return { all: false, positions: [], problem: `select "${text}" is not 'all' or positions such as 0,2` };
  }
  const numbers = parts.map(Number);
  const outside = numbers.filter((position) => position < -batchSize || position >= batchSize);
  if (outside.length) {
    return { all: false, positions: [], problem: `select names ${outside.join(", ")}: pick 0 to ${batchSize - 1}` };
  }
  const positions = [...new Set(numbers.map((position) => (position + batchSize) % batchSize))];
  return { all: false, positions: positions.sort((a, b) => a - b), problem: null };
}

/** `select` after a click on `position`: the explicit picks with that one toggled, "all" when none is left. */
export function toggledSelect(text, position, batchSize) {
  const parsed = parseSelect(text, batchSize);
  const chosen = new Set(parsed.all || parsed.problem ? [] : parsed.positions);
  if (chosen.has(position)) chosen.delete(position);
  else chosen.add(position);
  return chosen.size ? [...chosen].sort((a, b) => a - b).join(",") : SELECT_ALL;
}

// --- what the grid shows ---------------------------------------------------------------------------------------

function vaeConnected(node) {
  return node.inputs?.find((input) => input.name === "vae")?.link != null;
}

/** The select widgets the grid writes (every Refine fed by the preview) and why picking is off, if it is. */
function selectWidgets(node) {
  const refines = refinesFedBy(node);
  if (!refines.length) return { selects: [], why: "Connect a Diffusion Refine to pick previews" };
  const selects = refines.map((refine) => refine.widgets?.find((widget) => widget.name === SELECT)).filter(Boolean);
  if (!selects.length) return { selects, why: "The Diffusion Refine has no select widget" };
  const linked = refines.some((refine) => refine.inputs?.find((input) => input.name === SELECT)?.link != null);
  if (linked) return { selects: [], why: "The Refine's select comes from a link: set it there" };
  return { selects, why: null };
}

function positionsText(positions) {
  return positions.map((position) => `#${position}`).join(", ");
}

/** The state of the grid as drawn: the marks, captions and the status line, from the Refine's select. */
function picksOf(node, shown) {
  const { selects, why } = selectWidgets(node);
  const parsed = selects.length ? parseSelect(selects[0].value, shown.batchSize) : { all: true, positions: [] };
  const chosen = parsed.all || parsed.problem ? [] : parsed.positions;
  let status;
  if (why) status = why;
  else if (parsed.problem) status = `${parsed.problem[0].toUpperCase()}${parsed.problem.slice(1)}`;
  else if (parsed.all) status = `No pick: the Refine renders all ${shown.batchSize} · click to pick`;
  else status = `The Refine renders ${positionsText(chosen)} · click to change`;
  return {
    chosen,
    all: Boolean(parsed.all) && !why,
    problem: Boolean(parsed.problem || why),
    status,
    captions: shown.images.map((_, position) => `seed ${shown.seed} · #${position}`),
  };
}

/** The output this node shows: its last executed output, or the one the frontend keeps for it. */
function shownOutput(node, state) {
  const output = state.executed ?? app.nodeOutputs?.[String(node.id)];
  const meta = output?.[PICKS_KEY]?.[0];
  const images = output?.images;
  if (!meta || !Array.isArray(images) || images.length !== meta.batch_size) return null;
  return { output, images, seed: meta.seed, batchSize: meta.batch_size };
}

function imageUrl(image) {
  const query = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder ?? "", type: image.type });
  return api.apiURL(`/view?${query}${app.getPreviewFormatParam?.() ?? ""}${app.getRandParam?.() ?? ""}`);
}

/** Loads the preview images once per output (keyed by their file names); redraws the node as each one arrives. */
function loadImages(node, state, shown) {
  const key = JSON.stringify(shown.images);
  if (state.key === key) return;
  state.key = key;
  state.images = shown.images.map((image) => {
    const element = new Image();
    element.onload = () => node.setDirtyCanvas?.(true, false);
    element.src = imageUrl(image);
    return element;
  });
  node.imgs = state.images; // the frontend's Open / Save / Copy Image menu entries read these
  node.imageIndex = null;
}

/** Cells of `count` previews of aspect `ratio` (width / height) in a box: the column count giving the largest. */
function layout(count, ratio, left, top, width, height) {
  let best = null;
  for (let columns = 1; columns <= count; columns++) {
    const rows = Math.ceil(count / columns);
    const cellWidth = (width - GAP * (columns - 1)) / columns;
    const imageHeight = Math.min((height - GAP * (rows - 1)) / rows - CAPTION, cellWidth / ratio);
    if (imageHeight <= 0) continue;
    if (!best || imageHeight > best.imageHeight) best = { columns, cellWidth, imageHeight };
  }
  if (!best) return [];
  const imageWidth = best.imageHeight * ratio;
  const rowHeight = best.imageHeight + CAPTION;
  return Array.from({ length: count }, (_, position) => {
    const column = position % best.columns;
    const row = Math.floor(position / best.columns);
    const x = left + column * (best.cellWidth + GAP) + (best.cellWidth - imageWidth) / 2;
    return [x, top + row * (rowHeight + GAP), imageWidth, best.imageHeight];
  });
}

function drawCheckBadge(ctx, x, y, radius) {
  ctx.fillStyle = MARK;
  ctx.beginPath();
  ctx.arc(x, y, radius, 0, 2 * Math.PI);
  ctx.fill();
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = radius * 0.28;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(x - radius * 0.45, y + radius * 0.02);
  ctx.lineTo(x - radius * 0.1, y + radius * 0.38);
  ctx.lineTo(x + radius * 0.5, y - radius * 0.35);
  ctx.stroke();
}

function drawGrid(ctx, node, state, width, y) {
  const shown = state.shown;
  const picks = picksOf(node, shown);
  const top = y + GAP / 2;
  const bottom = node.size[1] - STATUS;
  const first = state.images.find((image) => image.naturalWidth);
  const ratio = first ? first.naturalWidth / first.naturalHeight : 1;
  state.cells = layout(state.images.length, ratio, GAP, top, width - 2 * GAP, bottom - top);
  const mouse = app.canvas?.graph_mouse;
  const hovered = mouse
    ? state.cells.findIndex(([x, y0, w, h]) => {
        const [mx, my] = [mouse[0] - node.pos[0], mouse[1] - node.pos[1]];
        return mx >= x && mx <= x + w && my >= y0 && my <= y0 + h + CAPTION;
      })
    : -1;
  node.overIndex = hovered >= 0 ? hovered : null;
  const anyChosen = picks.chosen.length > 0;
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  state.cells.forEach(([x, y0, w, h], position) => {
    const image = state.images[position];
    const chosen = picks.chosen.includes(position);
    ctx.globalAlpha = anyChosen && !chosen ? DIMMED : 1;
    if (image?.complete && image.naturalWidth) ctx.drawImage(image, x, y0, w, h);
    else {
      ctx.fillStyle = "#333";
      ctx.fillRect(x, y0, w, h);
    }
    ctx.globalAlpha = 1;
    if (chosen) {
      ctx.strokeStyle = MARK;
      ctx.lineWidth = 4;
      ctx.strokeRect(x - 2, y0 - 2, w + 4, h + 4);
      drawCheckBadge(ctx, x + w - 13, y0 + 13, Math.min(11, w / 6));
    } else if (position === hovered && !picks.problem) {
      ctx.strokeStyle = "#ddd";
      ctx.lineWidth = 2;
      ctx.strokeRect(x - 1, y0 - 1, w + 2, h + 2);
    }
    ctx.font = chosen ? "bold 12px Arial" : "12px Arial";
    ctx.fillStyle = chosen ? MARK : LiteGraph.WIDGET_TEXT_COLOR ?? "#ddd";
    ctx.fillText(picks.captions[position], x + w / 2, y0 + h + CAPTION / 2 + 1, w + GAP);
  });
  ctx.font = "12px Arial";
  ctx.fillStyle = picks.problem ? "#f0a040" : (LiteGraph.WIDGET_SECONDARY_TEXT_COLOR ?? "#999");
  ctx.fillText(picks.status, width / 2, node.size[1] - STATUS / 2, width - 2 * GAP);
  if (hovered >= 0 && !picks.problem && app.canvas?.canvas) app.canvas.canvas.style.cursor = "pointer";
}

/** Toggles the preview under a point (node-local) in every select the preview feeds. */
function pickAt(node, state, x, y) {
  const position = state.cells.findIndex(([cx, cy, w, h]) => x >= cx && x <= cx + w && y >= cy && y <= cy + h + CAPTION);
  if (position < 0 || !state.shown) return;
  const { selects, why } = selectWidgets(node);
  if (why) return;
  const next = toggledSelect(selects[0].value, position, state.shown.batchSize);
  for (const select of selects) {
    select.value = next;
    select.callback?.(next);
  }
  node.graph?.setDirtyCanvas(true, true);
}

// --- wiring into the node ----------------------------------------------------------------------------------------

const warned = new Set();
function warnOnce(reason) {
  if (warned.has(reason)) return;
  warned.add(reason);
  console.warn(
    `${LOG} Diffusion Preview: picking previews by clicking is off (${reason}); the previews show as usual, ` +
      "type the positions to refine into Diffusion Refine's select (such as 0,2)."
  );
}

function whyUnavailable(node) {
  if (typeof LiteGraph === "undefined") return "no LiteGraph in this frontend";
  if (LiteGraph.vueNodesMode) return "the Vue node renderer is on";
  if (typeof node.addCustomWidget !== "function") return "this frontend has no addCustomWidget";
  return null;
}

function gridWidget(node, state) {
  const guarded = (work) => {
    try {
      return work();
    } catch (error) {
      stopPicking(node, state, error);
    }
  };
  return {
    name: GRID,
    type: "diffusion_preview_picks",
    value: "",
    serialize: false,
    options: { serialize: false },
    computeLayoutSize: () => ({ minHeight: MIN_HEIGHT, minWidth: 1 }),
    draw(ctx, drawnNode, width, y) {
      ctx.save(); // restored even when drawing fails half-way, or every later frame would be drawn shifted
      try {
        guarded(() => drawGrid(ctx, drawnNode, state, width, y));
      } finally {
        ctx.restore();
      }
    },
    // The current frontend hands a canvas pointer: a click (not a drag) toggles the preview pressed.
    onPointerDown(pointer, pressedNode, canvas) {
      const [gx, gy] = canvas?.graph_mouse ?? app.canvas.graph_mouse;
      const [x, y] = [gx - pressedNode.pos[0], gy - pressedNode.pos[1]];
      pointer.onClick = () => guarded(() => pickAt(pressedNode, state, x, y));
      return true;
    },
    // Older frontends call mouse() on press and release: the press toggles.
    mouse(event, [x, y], pressedNode) {
      if (event.type === "pointerdown" || event.type === "mousedown") guarded(() => pickAt(pressedNode, state, x, y));
      return true;
    },
    /** What the grid shows, for tests: captions, marks, status, and each preview's box (node-local). */
    describe() {
      if (!state.shown) return null;
      const loaded = state.images.every((image) => image.complete && image.naturalWidth > 0);
      return { ...picksOf(node, state.shown), cells: state.cells, batchSize: state.shown.batchSize, loaded };
    },
  };
}

function removeWidget(node, name) {
  const index = node.widgets?.findIndex((widget) => widget.name === name) ?? -1;
  if (index < 0) return;
  node.widgets[index].onRemove?.();
  node.widgets.splice(index, 1);
}

function stopPicking(node, state, error) {
  state.failed = true;
  removeWidget(node, GRID);
  // The node goes back to the frontend as it is without this extension: it loads the previews itself.
  node.imgs = undefined;
  node.overIndex = null;
  console.error(`${LOG} Diffusion Preview: the pick grid failed`, error);
  warnOnce(`the pick grid failed: ${error?.message ?? error}`);
  // Redrawn after this frame (which may have failed half-way), now the frontend's way.
  requestAnimationFrame(() => node.setDirtyCanvas?.(true, true));
}

/** Draws the pick grid when a VAE is connected and its previews came with their captions; else (false) the
 * frontend draws the node as it would without this extension: as now without a VAE, and the live sampling previews
 * of a first run (its widget makes way for the grid once the decoded previews arrive). */
function showPicks(node, state) {
  if (!vaeConnected(node)) {
    removeWidget(node, GRID);
    return false;
  }
  const shown = shownOutput(node, state);
  state.shown = shown;
  if (!shown) {
    // Nothing shown yet (the frontend's live sampling previews may be), or images without captions.
    removeWidget(node, GRID);
    return false;
  }
  loadImages(node, state, shown);
  // The frontend's own preview widgets ("$$..."), left from a run before the VAE was connected, make way.
  for (const widget of [...(node.widgets ?? [])]) {
    if (widget.name?.startsWith("$$") && widget.name !== GRID) removeWidget(node, widget.name);
  }
  if (!node.widgets?.some((widget) => widget.name === GRID)) {
    node.addCustomWidget(gridWidget(node, state));
    node.setDirtyCanvas?.(true, true);
  }
  return true;
}

function installPickGrid(node) {
  const state = { executed: null, shown: null, key: null, images: [], cells: [], failed: false };
  const frontendDraw = node.onDrawBackground;
  node.onDrawBackground = function (...args) {
    if (!state.failed && !LiteGraph.vueNodesMode) {
      try {
        if (showPicks(this, state)) return;
      } catch (error) {
        stopPicking(this, state, error);
      }
    }
    return frontendDraw?.apply(this, args);
  };
  const frontendExecuted = node.onExecuted;
  node.onExecuted = function (output, ...rest) {
    state.executed = output;
    return frontendExecuted?.apply(this, [output, ...rest]);
  };
}

app.registerExtension({
  name: "consistency_solver.DiffusionPreviewPicks",
  nodeCreated(node) {
    if ((node.comfyClass ?? node.type) !== PREVIEW) return;
    const why = whyUnavailable(node);
    if (why) warnOnce(why);
    else installPickGrid(node);
  },
});
