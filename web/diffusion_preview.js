// Diffusion Preview's seed: approving renders the preview you saw, whatever "control after generate" says.
//
// The frontend changes a seed right after queueing a run, so once a preview is on screen the seed widget already
// holds the next seed: switching the Refine's approve on and running again would preview and render that unseen
// seed (with the "before" setting the seed changes at the start of every run but the first, the approving run
// included). On a Diffusion Preview, whatever that setting, the change is made at the start of the next run, and
// not at all while a Diffusion Refine fed by it has approve on. The seed shown is always the seed of the preview
// on screen, and the approving run reuses the cached preview.
import { app } from "../../scripts/app.js";

export const PREVIEW = "DiffusionPreview";
export const REFINE = "DiffusionRefine";
const REROUTE = "Reroute";
// The frontend's own bounds for a number that "randomize" may reach.
const LARGEST_SEED = 1125899906842624;

function linkTargets(graph, node) {
  const targets = [];
  for (const output of node.outputs ?? []) {
    for (const linkId of output.links ?? []) {
      const link = graph.links instanceof Map ? graph.links.get(linkId) : graph.links[linkId];
      const target = link && graph.getNodeById(link.target_id);
      if (target) targets.push(target);
    }
  }
  return targets;
}

// The Diffusion Refine nodes a Diffusion Preview feeds, directly or through reroutes, nearest link first.
export function refinesFedBy(preview) {
  const refines = [];
  const pending = linkTargets(preview.graph, preview).reverse();
  const seen = new Set();
  while (pending.length) {
    const node = pending.pop();
    if (seen.has(node.id)) continue;
    seen.add(node.id);
    if (node.type === REFINE) refines.push(node);
    if (node.type === REROUTE) pending.push(...linkTargets(node.graph, node).reverse());
  }
  return refines;
}

function approvedDownstream(preview) {
  return refinesFedBy(preview).some((refine) => refine.widgets?.find((widget) => widget.name === "approve")?.value);
}

function nextSeed(mode, seed) {
  const step = seed.options.step2 ?? 1;
  const min = Math.max(-LARGEST_SEED, seed.options.min ?? 0);
  const max = Math.min(LARGEST_SEED, seed.options.max ?? LARGEST_SEED);
  let value = seed.value;
  if (mode === "increment") value += step;
  else if (mode === "decrement") value -= step;
  else if (mode === "randomize") value = Math.floor(Math.random() * ((max - min) / step)) * step + min;
  return Math.min(max, Math.max(min, value));
}

function holdSeedUntilNextPreview(node) {
  const seed = node.widgets?.find((widget) => widget.name === "seed");
  const control = seed?.linkedWidgets?.[0];
  if (!control) return;
  let changeDue = false;
  control.label = "seed on next run";
  control.tooltip =
    "Changes the seed at the start of the next run, so the seed shown is the one of the preview on screen. " +
    "It stays as it is while the Diffusion Refine's approve is on: approving renders the preview you saw.";
  control.afterQueued = () => {
    changeDue = true;
  };
  control.beforeQueued = () => {
    if (!changeDue || approvedDownstream(node)) return;
    changeDue = false;
    const value = nextSeed(control.value, seed);
    if (value !== seed.value) {
      seed.value = value;
      seed.callback?.(value);
    }
  };
}

// A connected coefficients input (from Consistency Solver Coefficients or Calibrate) wins over a node's own
// coefficient widgets: they are greyed out and locked while it is connected, rather than shown as if they counted.
const SELECTION_NODES = new Set([PREVIEW, "SamplerConsistencySolver", "ConsistencySolverScheduler"]);
const SELECTION_WIDGETS = new Set(["coefficients", "inference_mode", "allow_untrained_steps"]);

function lockWidgetsWhileCoefficientsConnected(node) {
  const connected = () => node.inputs?.find((input) => input.name === "loaded_coefficients")?.link != null;
  for (const widget of node.widgets ?? []) {
    if (SELECTION_WIDGETS.has(widget.name)) Object.defineProperty(widget, "disabled", { get: connected });
  }
}

app.registerExtension({
  name: "consistency_solver.DiffusionPreviewSeed",
  nodeCreated(node) {
    const type = node.comfyClass ?? node.type;
    if (type === PREVIEW) holdSeedUntilNextPreview(node);
    if (SELECTION_NODES.has(type)) lockWidgetsWhileCoefficientsConnected(node);
  },
});
