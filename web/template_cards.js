// The template browser's cards for this pack's example workflows: a line on what each does and which model it loads.
//
// ComfyUI's frontend (1.27) knows a custom node's template by its file name only, and its card repeats that name
// under the title. Each example workflow carries its own line in extra.description; when a card of this pack shows
// the name there, the line replaces it (and its tooltip). Cards of other packs and ComfyUI's own are left alone.
import { api } from "../../scripts/api.js";

// ComfyUI serves this file at /extensions/<pack folder>/ and the pack's templates under the same folder name.
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/")[2]);
const CARD_ID = "template-workflow-";
const CARDS = `[data-testid^="${CARD_ID}"]`;

let ourTemplates = null; // Promise<Set<string>>: this pack's template names
const descriptions = new Map(); // template name -> Promise<string | null>

function templateNames() {
  ourTemplates ??= api
    .getWorkflowTemplates()
    .then((templates) => new Set(templates[PACK] ?? []))
    .catch(() => new Set());
  return ourTemplates;
}

function description(name) {
  if (!descriptions.has(name)) {
    const url = api.apiURL(`/workflow_templates/${encodeURIComponent(PACK)}/${encodeURIComponent(name)}.json`);
    const line = fetch(url)
      .then((response) => (response.ok ? response.json() : null))
      .then((workflow) => workflow?.extra?.description ?? null)
      .catch(() => null);
    descriptions.set(name, line);
  }
  return descriptions.get(name);
}

async function describe(card) {
  if (!card.dataset.testid?.startsWith(CARD_ID)) return;
  const name = card.dataset.testid.slice(CARD_ID.length);
  const text = card.querySelector("p");
  // The frontend's own text for a custom template: its name with - and _ as spaces.
  if (!text || text.textContent.trim() !== name.replace(/[-_]/g, " ").trim()) return;
  if (!(await templateNames()).has(name)) return;
  const line = await description(name);
  if (line) {
    text.textContent = line;
    text.title = line;
  }
}

// A card appears when the browser opens or shows another category; the frontend may also reuse a card's element
// for another template, changing its data-testid.
new MutationObserver((mutations) => {
  for (const mutation of mutations) {
    if (mutation.type === "attributes") {
      describe(mutation.target);
      continue;
    }
    for (const added of mutation.addedNodes) {
      if (!(added instanceof Element)) continue;
      const cards = added.matches(CARDS) ? [added] : added.querySelectorAll(CARDS);
      cards.forEach(describe);
    }
  }
}).observe(document.body, { childList: true, subtree: true, attributes: true, attributeFilter: ["data-testid"] });
