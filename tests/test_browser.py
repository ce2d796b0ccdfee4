"""The artist's view: ComfyUI's own frontend in headless Chromium, against a real ComfyUI server with this pack.

It opens every example workflow from the template browser, finds the pack's nodes in the node search, runs the
preview -> approve -> refine loop with a Diffusion Preview added from the search (whose seed control the frontend
sets to 'randomize'), picks two of four previews by clicking them on the Diffusion Preview (the Refine renders exactly
those), and shows KSampler's error at an untrained step count. Screenshots of every step go to outputs/browser/
(pick-previews.png is docs/images/pick-previews.png). Locally the module skips when Chromium or playwright is
missing; in CI (CI=true) it fails.
"""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from fixtures.browser import EXTENSION_PATH, browser_missing, comfy_page
from fixtures.comfyui import require_comfyui
from fixtures.example_workflows import EXAMPLES, EXAMPLES_DIR, THUMBNAIL_SUFFIX, stand_in_models
from safetensors.torch import load_file

from consistency_solver.nodes import NODE_DISPLAY_NAME_MAPPINGS
from consistency_solver.nodes.preview_state import parse_selection

MISSING = browser_missing()
if MISSING and os.environ.get("CI") == "true":
    pytest.fail(f"the browser test must run in CI, but {MISSING}", pytrace=False)
if MISSING:
    pytest.skip(f"no browser: {MISSING}", allow_module_level=True)
require_comfyui()

from fixtures.comfy_server import ComfyServer  # noqa: E402
from fixtures.workflows import UIGraph  # noqa: E402
from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPOSITORY / "outputs" / "browser"
PACK_FOLDER = "consistency_solver"  # the folder name under custom_nodes: the template browser's module name
REFINE = {"steps": 6, "cfg": 4.0, "scheduler": "karras"}
SEARCH_INPUT_ID = "comfy-vue-node-search-box-input-"  # the frontend's node search input, a random suffix follows
DOUBLE_CLICK_TIME = "Comfy.Pointer.DoubleClickTime"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui")
    stand_in_models(base)
    packs = {PACK_FOLDER: REPOSITORY, "test_pack": REPOSITORY / "tests" / "fixtures" / "comfy_test_pack"}
    running = ComfyServer(base, packs, frontend=True)
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def page(server):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {SCREENSHOTS}")
    with comfy_page(server.port) as opened:
        yield opened


def shoot(page, name):
    page.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def overlaps(boxes):
    """Pairs of nodes whose drawn boxes (title bars included) intersect."""
    found = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                found.append((a["title"], b["title"]))
    return found


def open_pack_templates(page):
    """The template browser at this pack's workflows; returns the dialog."""
    page.command("Comfy.BrowseTemplates")
    dialog = page.page.locator(".p-dialog").filter(has_text="Custom Nodes")
    dialog.wait_for()
    dialog.get_by_role("option", name=PACK_FOLDER, exact=True).click()
    return dialog


def open_example(page, name, attempts=3):
    """Click the example's card in the template browser until its workflow is the active one. In loaded runs a click
    sometimes opened nothing: the frontend's ``loadWorkflowTemplate`` silently ignores a card clicked before its
    template list has loaded. So a click that opened nothing in 15 s is repeated in the same dialog (closing it with
    Escape and reopening it at once raced the closing: the open command shows the closing dialog again, which then
    goes), and
    each miss leaves a screenshot for the next look."""
    is_active = "name => app.extensionManager.workflow.activeWorkflow?.filename === name"
    dialog = open_pack_templates(page)
    for attempt in range(attempts):
        if not dialog.is_visible():
            dialog = open_pack_templates(page)
        try:
            dialog.locator(".template-card").filter(has=page.page.locator("h3", has_text=name)).first.click()
            page.page.wait_for_function(is_active, arg=name, timeout=15_000)
            dialog.wait_for(state="detached")
            return
        except PlaywrightTimeout:
            shoot(page, f"open-missed {name} {attempt + 1}")
            if page.evaluate(is_active, name):  # a late load closed the dialog under the second click
                return
    active = page.evaluate("() => app.extensionManager.workflow.activeWorkflow?.filename ?? null")
    pytest.fail(f"{name}: {attempts} clicks on its template card did not open it; the active workflow is {active!r}")


def test_every_example_opens_from_the_template_browser(page):
    dialog = open_pack_templates(page)
    cards = dialog.locator(".template-card")
    cards.first.wait_for()
    page.page.wait_for_timeout(1000)
    titles = [card.locator("h3").inner_text() for card in cards.all()]
    assert sorted(titles) == sorted(EXAMPLES)
    # Under each title, what the workflow does and which model it loads (the frontend alone repeats the title).
    for card, title in zip(cards.all(), titles, strict=True):
        line = card.locator("p").filter(has_text=EXAMPLES[title].description)
        line.wait_for()
        assert line.inner_text() == line.get_attribute("title") == EXAMPLES[title].description
        assert line.evaluate("p => p.scrollHeight <= p.clientHeight"), f"{title}: its line is cut off"
    shoot(page, "0-template-browser")
    page.page.keyboard.press("Escape")
    dialog.wait_for(state="detached")
    for name in sorted(EXAMPLES):
        assert (EXAMPLES_DIR / f"{name}{THUMBNAIL_SUFFIX}").is_file(), f"no thumbnail for {name}"
        open_example(page, name)
        page.page.wait_for_timeout(500)  # time for a missing-node dialog to show
        visible_dialogs = page.page.locator(".p-dialog:visible")
        assert visible_dialogs.count() == 0, f"{name}: {visible_dialogs.all_inner_texts()}"
        boxes = page.node_boxes()
        assert len(boxes) == len(json.loads((EXAMPLES_DIR / f"{name}.json").read_text())["nodes"])
        assert overlaps(boxes) == [], name
        too_small = [b["title"] for b in boxes if b["size"][0] < b["min_size"][0] or b["size"][1] < b["min_size"][1]]
        assert too_small == [], f"{name}: nodes smaller than their contents"
        assert any(b["type"] == "Note" for b in boxes), f"{name}: no Note"
        # A node whose coefficients come in through a link shows its own coefficient widgets locked.
        overridden = page.evaluate(
            """() => app.graph.nodes
                .filter(node => node.inputs?.some(input => input.name === "loaded_coefficients" && input.link != null))
                .map(node => node.widgets.find(widget => widget.name === "coefficients").disabled)"""
        )
        assert all(overridden), f"{name}: coefficient widgets shown as if they counted"
        shoot(page, f"1-example {name}")


UNDER_THE_POINTER = """([x, y]) => {
    const element = document.elementFromPoint(x, y)
    const rect = app.canvas.canvas.getBoundingClientRect()
    const [graphX, graphY] = app.canvas.ds.convertCanvasToOffset([x - rect.left, y - rect.top])
    return {element: element && `${element.tagName}.${element.className}`,
            node: app.graph.getNodeOnPos(graphX, graphY)?.title ?? null,
            offset: [...app.canvas.ds.offset], scale: app.canvas.ds.scale,
            dialogs: [...document.querySelectorAll('.p-dialog')].map(dialog => dialog.innerText.slice(0, 80))}
}"""


def search(page, text, expected, attempts=3):
    """Double-click the empty canvas and type into the node search once its input is shown; returns the result lines
    once ``expected`` (a display name) is among them, or after ``attempts`` tries of 10 s. Once in CI no search box
    opened in three tries, as when LiteGraph does not count the two clicks as a double-click: their events must be
    stamped less than the setting Comfy.Pointer.DoubleClickTime (300 ms) apart, which a busy machine can miss (a
    setting of 0.001 ms gives the same failure here). So the search allows the slowest double-click an artist can set
    (1 s), and a failed search prints what lies under the pointer. Keys typed while no search input has the focus go
    to the canvas, whose shortcuts they are ('w' opens the workflows panel), so the text is filled into the input
    itself."""
    box = page.page.locator(f'input[id^="{SEARCH_INPUT_ID}"]')
    options = page.page.locator("li[role=option]")
    set_setting = "([id, value]) => app.extensionManager.setting.set(id, value)"
    double_click_time = page.evaluate("id => app.extensionManager.setting.get(id)", DOUBLE_CLICK_TIME)
    page.evaluate(set_setting, [DOUBLE_CLICK_TIME, 1000])
    try:
        for _ in range(attempts):
            page.page.keyboard.press("Escape")
            box.wait_for(state="hidden")
            page.page.mouse.dblclick(800, 520)
            try:
                box.wait_for(state="visible", timeout=10_000)
                box.fill(text)
                options.filter(has_text=expected).first.wait_for(timeout=10_000)
                break
            except PlaywrightTimeout:
                continue
        else:  # what the page showed instead, for the failure that follows
            shoot(page, f"search-failed {text}")
            print(f"search for {text!r} failed; under the double-click:", page.evaluate(UNDER_THE_POINTER, [800, 520]))
    finally:
        page.evaluate(set_setting, [DOUBLE_CLICK_TIME, double_click_time])
    page.page.wait_for_timeout(300)
    return [line.strip() for line in options.all_inner_texts()]


def test_consistency_finds_every_node_of_the_pack(page):
    page.command("Comfy.NewBlankWorkflow")
    results = search(page, "consistency", NODE_DISPLAY_NAME_MAPPINGS["DiffusionRefine"])
    shoot(page, "2-search-consistency")
    page.page.keyboard.press("Escape")
    found = {line.split("\n")[0].strip() for line in results}
    assert set(NODE_DISPLAY_NAME_MAPPINGS.values()) <= found, results


def tiny_graph(definitions, with_refine):
    """Tiny test model, two conditionings and a 64x64 latent (left); a Refine and two SaveLatents (right).

    Returns (workflow, ids); the middle of the canvas stays empty for the Diffusion Preview."""
    graph = UIGraph(definitions)
    ids = {
        "model": graph.add("TinyTestModel", (0, 0), kind="eps", seed=0),
        "positive": graph.add("TinyTestConditioning", (0, 160), seed=1),
        "negative": graph.add("TinyTestConditioning", (0, 280), seed=2),
        "latent": graph.add("EmptyLatentImage", (0, 400), width=64, height=64, batch_size=1),
        "save_preview": graph.add("SaveLatent", (1100, 0), filename_prefix="latents/preview"),
    }
    if with_refine:
        ids["refine"] = graph.add("DiffusionRefine", (1100, 180), approve=False, select="all", **REFINE)
        ids["save_refined"] = graph.add("SaveLatent", (1100, 520), filename_prefix="latents/refined")
        for name in ("model", "positive", "negative"):
            graph.connect(ids[name], 0, ids["refine"], name)
        graph.connect(ids["refine"], 0, ids["save_refined"], "samples")
    return graph, ids


def show_at_scale_one(page):
    page.evaluate("() => { app.canvas.ds.offset = [80, 80]; app.canvas.ds.scale = 1; app.canvas.setDirty(true, true) }")


def add_from_search(page, query, title):
    """Adds the node whose search result starts with ``title`` at the middle of the canvas; returns its id."""
    results = search(page, query, title)
    positions = [i for i, line in enumerate(results) if line.startswith(title)]
    assert positions, f"no search result for {query!r} starts with {title!r}: {results}"
    position = positions[0]
    for _ in range(position):
        page.page.keyboard.press("ArrowDown")
    page.page.keyboard.press("Enter")
    page.page.wait_for_timeout(300)
    return page.evaluate("() => app.graph.nodes.at(-1).id")


def connect(page, origin, slot, target, input_name):
    page.evaluate(
        """([origin, slot, target, name]) => {
            const node = app.graph.getNodeById(target)
            app.graph.getNodeById(origin).connect(slot, node, node.findInputSlot(name))
        }""",
        [origin, slot, target, input_name],
    )


def widget(page, node_id, name):
    return page.evaluate(
        "([id, name]) => app.graph.getNodeById(id).widgets.find(w => w.name === name).value", [node_id, name]
    )


def click_widget(page, node_id, name):
    """A real mouse click on a node's widget, where the canvas draws it."""
    x, y = page.evaluate(
        """([id, name]) => {
            const node = app.graph.getNodeById(id)
            const widget = node.widgets.find(w => w.name === name)
            const rect = app.canvas.canvas.getBoundingClientRect()
            const [x, y] = app.canvas.ds.convertOffsetToCanvas(
                [node.pos[0] + node.size[0] / 2, node.pos[1] + widget.y + LiteGraph.NODE_WIDGET_HEIGHT / 2])
            return [rect.left + x, rect.top + y]
        }""",
        [node_id, name],
    )
    page.page.mouse.click(x, y)
    page.page.wait_for_timeout(300)


def run(page, server, timeout=120.0):
    """Clicks Run and waits for the prompt to finish (ComfyUI writes its history entry then); returns that entry."""
    before = set(server.get("/history"))
    page.page.get_by_test_id("queue-button").click()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [prompt_id for prompt_id in server.get("/history") if prompt_id not in before]
        if new:
            assert len(new) == 1, f"one Run queued {len(new)} prompts"
            return server.get(f"/history/{new[0]}")[new[0]]
        time.sleep(0.25)
    raise TimeoutError(f"no prompt finished within {timeout} s of clicking Run")


def saved_latent(server, history, node_id):
    saved = history["outputs"][str(node_id)]["latents"][0]
    return load_file(server.base / "output" / saved["subfolder"] / saved["filename"])["latent_tensor"]


def ksampler_latent(server, seed):
    """The stock KSampler's render of ``seed`` with the Refine's settings and sampler (dpmpp_2m)."""
    prompt = {
        "1": {"class_type": "TinyTestModel", "inputs": {"kind": "eps", "seed": 0}},
        "2": {"class_type": "TinyTestConditioning", "inputs": {"seed": 1}},
        "3": {"class_type": "TinyTestConditioning", "inputs": {"seed": 2}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                         "seed": seed, "sampler_name": "dpmpp_2m", "denoise": 1.0, **REFINE}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/ksampler"}},
    }  # fmt: skip
    reply = server.post_prompt(prompt)
    assert reply.get("node_errors") == {}, reply
    return saved_latent(server, server.wait_for_history(reply["prompt_id"]), 6)


@pytest.fixture(params=["after", "before"])
def widget_control_mode(request, page):
    """The frontend's setting for when seeds change: after each run (the default) or before each run but the first."""
    set_mode = "mode => app.extensionManager.setting.set('Comfy.WidgetControlMode', mode)"
    page.evaluate(set_mode, request.param)
    yield request.param
    page.evaluate(set_mode, "after")


def test_approving_renders_the_preview_on_screen_whatever_the_seed_control(page, server, widget_control_mode):
    """The seed trap: a Preview from the node search has 'randomize'; approving must still render the seed seen."""
    graph, ids = tiny_graph(server.get("/object_info"), with_refine=True)
    page.load_workflow(graph.to_json())
    show_at_scale_one(page)
    preview = add_from_search(page, "Diffusion Preview", "Diffusion Preview")
    assert widget(page, preview, "control_after_generate") == "randomize"  # what the frontend gives a new node
    for name in ("model", "positive", "negative"):
        connect(page, ids[name], 0, preview, name)
    connect(page, ids["latent"], 0, preview, "latent_image")
    connect(page, preview, 0, ids["save_preview"], "samples")
    connect(page, preview, 1, ids["refine"], "preview_state")
    step = "" if widget_control_mode == "after" else " (control before generate)"
    shoot(page, f"3-preview-added-from-search{step}")

    previewing = run(page, server)
    assert previewing["status"]["status_str"] == "success", previewing["status"]
    seen_seed = previewing["prompt"][2][str(preview)]["inputs"]["seed"]
    seen = saved_latent(server, previewing, ids["save_preview"])
    shoot(page, f"4-after-the-preview-run{step}")
    assert str(ids["save_refined"]) not in previewing["outputs"]  # approve off: the refine waited

    click_widget(page, ids["refine"], "approve")
    assert widget(page, ids["refine"], "approve") is True
    shoot(page, f"5-approve-switched-on{step}")
    approving = run(page, server)
    assert approving["status"]["status_str"] == "success", approving["status"]
    shoot(page, f"6-after-the-approving-run{step}")
    refined_seed = approving["prompt"][2][str(preview)]["inputs"]["seed"]
    refined = saved_latent(server, approving, ids["save_refined"])

    assert refined_seed == seen_seed, f"the preview on screen had seed {seen_seed}, the approving run {refined_seed}"
    assert torch.equal(refined, ksampler_latent(server, seen_seed)), "the refine is not KSampler's render of it"
    cached = next(data for event, data in approving["status"]["messages"] if event == "execution_cached")
    assert str(preview) in cached["nodes"], "the approving run computed the preview again"
    assert torch.equal(saved_latent(server, approving, ids["save_preview"]), seen)

    # Approve off again: the next run previews a new seed, and the seed shown is that preview's.
    click_widget(page, ids["refine"], "approve")
    next_run = run(page, server)
    next_seed = next_run["prompt"][2][str(preview)]["inputs"]["seed"]
    assert next_seed != seen_seed
    assert widget(page, preview, "seed") == next_seed


GRID = "$$diffusion_preview_picks"  # web/pick_previews.js: the pick grid's widget on Diffusion Preview
DESCRIBE_GRID = f"id => app.graph.getNodeById(id).widgets?.find(w => w.name === '{GRID}')?.describe() ?? null"
FASHION_SEED = 42
FASHION_REFINE = {"steps": 12, "cfg": 3.0, "scheduler": "karras"}


def pick_graph(definitions):
    """The batch loop on the Fashion-MNIST latent bed (a trained model: the previews show garments): four previews of
    one seed, shown on the Diffusion Preview through its VAE input; a Refine; SaveLatents for both."""
    graph = UIGraph(definitions)
    ids = {
        "model": graph.add("FashionTestModel", (0, 0), size=(280, 0)),
        "positive": graph.add("FashionTestClass", (0, 110), size=(280, 0), garment="Sneaker"),
        "negative": graph.add("FashionTestClass", (0, 230), size=(280, 0), garment="none"),
        "latent": graph.add("EmptyLatentImage", (0, 350), size=(280, 0), width=112, height=112, batch_size=4),
        "vae": graph.add("FashionTestVAE", (0, 530), size=(280, 0)),
        "preview": graph.add("DiffusionPreview", (330, 0), size=(360, 700), seed=FASHION_SEED, steps=8, cfg=3.0,
                             scheduler="consistency_solver"),
        "refine": graph.add("DiffusionRefine", (740, 0), size=(300, 0), approve=False, select="all",
                            **FASHION_REFINE),
        "save_preview": graph.add("SaveLatent", (1090, 0), size=(300, 0), filename_prefix="latents/fashion-preview"),
        "save_refined": graph.add("SaveLatent", (1090, 120), size=(300, 0), filename_prefix="latents/fashion-refined"),
    }  # fmt: skip
    for name in ("model", "positive", "negative"):
        graph.connect(ids[name], 0, ids["preview"], name)
        graph.connect(ids[name], 0, ids["refine"], name)
    graph.connect(ids["latent"], 0, ids["preview"], "latent_image")
    graph.connect(ids["vae"], 0, ids["preview"], "vae")
    graph.connect(ids["preview"], 0, ids["save_preview"], "samples")
    graph.connect(ids["preview"], 1, ids["refine"], "preview_state")
    graph.connect(ids["refine"], 0, ids["save_refined"], "samples")
    return graph.to_json(), ids


def grid(page, preview):
    return page.evaluate(DESCRIBE_GRID, preview)


def wait_for_grid(page, preview, timeout=30_000):
    """Until the Preview shows its pick grid with every preview image loaded; returns what it shows."""
    page.page.wait_for_function(
        f"id => {{ const shown = ({DESCRIBE_GRID})(id)\n"
        "return shown?.loaded && shown.cells.length === shown.batchSize }",
        arg=preview,
        timeout=timeout,
    )
    return grid(page, preview)


def click_preview(page, preview, refine, position):
    """A real mouse click on one preview of the grid, where the canvas draws it; waits for the Refine's select to
    change (the click toggles that preview in it)."""
    before = widget(page, refine, "select")
    x, y = page.evaluate(
        f"""([id, position]) => {{
            const node = app.graph.getNodeById(id)
            const [left, top, width, height] = ({DESCRIBE_GRID})(id).cells[position]
            const rect = app.canvas.canvas.getBoundingClientRect()
            const [x, y] = app.canvas.ds.convertOffsetToCanvas(
                [node.pos[0] + left + width / 2, node.pos[1] + top + height / 2])
            return [rect.left + x, rect.top + y]
        }}""",
        [preview, position],
    )
    page.page.mouse.click(x, y)
    page.page.wait_for_function(
        "([id, before]) => app.graph.getNodeById(id).widgets.find(w => w.name === 'select').value !== before",
        arg=[refine, before],
        timeout=10_000,
    )
    page.page.mouse.move(5, 5)  # off the node: no hover outline in the screenshots
    return widget(page, refine, "select")


def type_into_widget(page, node_id, name, text):
    """Types into a text widget as an artist does: a click opens the frontend's value prompt, Enter sets it."""
    click_widget(page, node_id, name)
    prompt = page.page.locator(".graphdialog input").last
    prompt.wait_for(state="visible", timeout=10_000)
    prompt.fill(text)
    prompt.press("Enter")
    page.page.wait_for_function(
        "([id, name, text]) => app.graph.getNodeById(id).widgets.find(w => w.name === name).value === text",
        arg=[node_id, name, text],
        timeout=10_000,
    )


def executed_nodes(history):
    """The node ids a prompt ran (not taken from ComfyUI's cache)."""
    cached = next(data["nodes"] for event, data in history["status"]["messages"] if event == "execution_cached")
    return set(history["prompt"][2]) - set(cached)


def stock_fashion_render(server, positions):
    """The stock KSampler's render of some batch positions of FASHION_SEED's batch of four, with the Refine's settings
    and sampler (dpmpp_2m): Latent From Batch gives each position its noise (batch_index) and Latent Batch joins them,
    so the batch has the Refine's shape."""
    prompt = {
        "1": {"class_type": "FashionTestModel", "inputs": {}},
        "2": {"class_type": "FashionTestClass", "inputs": {"garment": "Sneaker"}},
        "3": {"class_type": "FashionTestClass", "inputs": {"garment": "none"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 112, "height": 112, "batch_size": 4}},
    }
    joined = None
    for position in positions:
        node = str(len(prompt) + 1)
        prompt[node] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["4", 0], "batch_index": position,
                                                                    "length": 1}}  # fmt: skip
        if joined is not None:
            batch = str(len(prompt) + 1)
            prompt[batch] = {"class_type": "LatentBatch", "inputs": {"samples1": [joined, 0], "samples2": [node, 0]}}
            node = batch
        joined = node
    prompt["sampler"] = {"class_type": "KSampler",
                         "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                    "latent_image": [joined, 0], "seed": FASHION_SEED, "sampler_name": "dpmpp_2m",
                                    "denoise": 1.0, **FASHION_REFINE}}  # fmt: skip
    prompt["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0],
                                                            "filename_prefix": "latents/fashion-ksampler"}}  # fmt: skip
    reply = server.post_prompt(prompt)
    assert reply.get("node_errors") == {}, reply
    return saved_latent(server, server.wait_for_history(reply["prompt_id"]), "save")


def test_picking_previews_by_clicking_them_refines_those_seeds(page, server):
    """Issue 23: four previews on the node, a click per pick; the Refine renders exactly the picked ones (the stock
    KSampler's renders of them), select shows them, a saved workflow keeps them and brings the marks back, and no
    pick or change of pick runs the Preview again."""
    workflow, ids = pick_graph(server.get("/object_info"))
    preview, refine = ids["preview"], ids["refine"]
    page.load_workflow(workflow)
    show_at_scale_one(page)
    console_before = list(page.pack_console)

    previewing = run(page, server)
    assert previewing["status"]["status_str"] == "success", previewing["status"]
    assert len(previewing["outputs"][str(preview)]["images"]) == 4  # the decoded previews, shown on the node
    shown = wait_for_grid(page, preview)
    assert shown["captions"] == [f"seed {FASHION_SEED} · #{position}" for position in range(4)]
    assert shown["chosen"] == [] and shown["all"], shown  # select 'all': no pick yet, the Refine renders every one
    shoot(page, "8-four-previews-on-the-node")

    type_into_widget(page, refine, "select", "0")  # typing still works: the mark follows select
    assert grid(page, preview)["chosen"] == [0]
    assert click_preview(page, preview, refine, 0) == "all"  # unmarking the only pick goes back to every preview
    assert click_preview(page, preview, refine, 1) == "1"
    assert click_preview(page, preview, refine, 3) == "1,3"
    shown = grid(page, preview)
    assert shown["chosen"] == [1, 3] and shown["status"].startswith("The Refine renders #1, #3"), shown
    shoot(page, "9-previews-1-and-3-picked")
    page.screenshot_nodes(SCREENSHOTS / "pick-previews.png", [preview, refine], margin=28)  # docs/images/

    click_widget(page, refine, "approve")
    approving = run(page, server)
    assert approving["status"]["status_str"] == "success", approving["status"]
    assert executed_nodes(approving) == {str(refine), str(ids["save_refined"])}  # the previews came from the cache
    refined = {(1, 3): saved_latent(server, approving, ids["save_refined"])}
    assert refined[1, 3].shape[0] == 2
    # What Save writes: the serialized graph as JSON (undefined fields left out).
    saved = page.evaluate("async () => JSON.parse(JSON.stringify((await app.graphToPrompt()).workflow))")
    embedded = approving["prompt"][3]["extra_pnginfo"]["workflow"]  # what the outputs' metadata carries
    for workflow_json in (saved, embedded):
        node = next(node for node in workflow_json["nodes"] if node["id"] == refine)
        assert node["widgets_values"][:2] == [True, "1,3"], node["widgets_values"]
    shoot(page, "10-after-refining-1-and-3")

    # Another pick re-runs the Refine alone.
    assert click_preview(page, preview, refine, 3) == "1"
    repicking = run(page, server)
    assert executed_nodes(repicking) == {str(refine), str(ids["save_refined"])}
    refined[(1,)] = saved_latent(server, repicking, ids["save_refined"])

    # The saved workflow brings select back, and the marks with it once the (cached) previews show again.
    page.load_workflow(saved)
    show_at_scale_one(page)
    assert widget(page, refine, "select") == "1,3"
    reopened = run(page, server)
    assert reopened["status"]["status_str"] == "success", reopened["status"]
    assert str(preview) not in executed_nodes(reopened)
    assert wait_for_grid(page, preview)["chosen"] == [1, 3]
    shoot(page, "11-saved-workflow-reopened")
    assert page.pack_console == console_before, "the pick grid fell back in this frontend"

    # Last, as another prompt on the server drops the graph's cached outputs.
    for positions, latent in refined.items():
        assert torch.equal(latent, stock_fashion_render(server, positions)), f"not KSampler's render of {positions}"


def test_the_pick_grid_falls_back_to_the_frontends_previews_and_says_so(page, server):
    """When drawing the grid fails (as a changed frontend detail would make it), the node shows the previews the
    frontend's own way, select still works, and the console says why."""
    workflow, ids = pick_graph(server.get("/object_info"))
    preview, refine = ids["preview"], ids["refine"]
    page.load_workflow(workflow)
    show_at_scale_one(page)
    assert run(page, server)["status"]["status_str"] == "success"
    wait_for_grid(page, preview)
    # As if the frontend held something else in node.imgs, which the grid draws.
    page.evaluate(
        """id => { app.graph.getNodeById(id).imgs[0] = { complete: true, naturalWidth: 1, naturalHeight: 1 }
                   app.canvas.setDirty(true, true) }""",
        preview,
    )
    page.page.wait_for_function(
        f"""id => {{ const node = app.graph.getNodeById(id)
                    return !node.widgets.some(w => w.name === '{GRID}') && node.imgs?.length === 4 &&
                           node.imgs.every(image => image instanceof HTMLImageElement && image.naturalWidth > 0) }}""",
        arg=preview,
        timeout=10_000,
    )
    page.page.wait_for_timeout(300)
    shoot(page, "12-pick-grid-fallback")
    said = "picking previews by clicking is off (the pick grid failed"
    fallbacks = [line for line in page.pack_console if said in line]
    assert len(fallbacks) == 1, page.pack_console
    assert "type the positions to refine into Diffusion Refine's select" in fallbacks[0]
    type_into_widget(page, refine, "select", "2")  # the way left: select, typed
    page.pack_console.clear()


def test_the_grid_reads_select_as_the_refine_does(page):
    """The extension's reading of select (marks) against the Refine's own (what it renders), on the same strings."""
    cases = ["all", " ALL ", "0,2", "2,0", "1", "-1", "0,0", " 3 , 1 ", "+2", "4", "-5", "a,b", "", " , ", "1;2"]
    # The path the frontend imported it from (GET /extensions lists them), so this is the module it runs.
    url = page.evaluate(
        "async () => (await (await fetch('/extensions')).json()).find(path => path.endsWith('/pick_previews.js'))"
    )
    assert url and url.startswith(EXTENSION_PATH), url
    read = page.evaluate(
        "async ([url, cases]) => { const grid = await import(url); return cases.map(c => grid.parseSelect(c, 4)) }",
        [url, cases],
    )
    for text, parsed in zip(cases, read, strict=True):
        try:
            expected = sorted(set(parse_selection(text, 4)))
        except ValueError:
            assert parsed["problem"], (text, parsed)
            continue
        assert parsed["problem"] is None and parsed["positions"] == expected, (text, parsed)
        assert parsed["all"] == (text.strip().lower() == "all"), (text, parsed)


CALIBRATE = {
    "cfg": 3.0,
    "preview_steps": "5,8",
    "refine_sampler": "dpmpp_2m",
    "refine_scheduler": "karras",
    "refine_steps": 12,
    "budget": 1000,
    "file_name": "auto",
    "recalibrate_for_each_prompt": False,
}
REPORT_BOX = "$$calibration_report"  # web/calibration_report.js
LISTEN_PROGRESS = """() => {
    window.__calibrationProgress = []
    window.comfyAPI.api.api.addEventListener("progress", event => window.__calibrationProgress.push(event.detail))
}"""


def calibrate_graph(definitions):
    """The example's calibrate-then-preview loop on the Fashion-MNIST latent model (a trained model)."""
    graph = UIGraph(definitions)
    ids = {
        "model": graph.add("FashionTestModel", (0, 0), size=(280, 0)),
        "positive": graph.add("FashionTestClass", (0, 110), size=(280, 0), garment="Sneaker"),
        "negative": graph.add("FashionTestClass", (0, 230), size=(280, 0), garment="none"),
        "latent": graph.add("EmptyLatentImage", (0, 350), size=(280, 0), width=112, height=112, batch_size=1),
        "preview": graph.add("DiffusionPreview", (760, 0), size=(320, 0), seed=7, steps=5, cfg=3.0,
                             scheduler="consistency_solver"),
        "save": graph.add("SaveLatent", (1120, 0), size=(280, 0), filename_prefix="latents/calibrated-preview"),
    }  # fmt: skip
    for name in ("model", "positive", "negative"):
        graph.connect(ids[name], 0, ids["preview"], name)
    graph.connect(ids["latent"], 0, ids["preview"], "latent_image")
    graph.connect(ids["preview"], 0, ids["save"], "samples")
    return graph, ids


def test_calibrate_once_a_prompt_edit_makes_no_calibration_progress(page, server):
    """Issue 20: a Calibrate added from the node search has no seed to re-roll; its first run shows its progress and
    its report; after a prompt edit the next run shows no calibration progress (the file follows the model) and the
    preview is made again with the new prompt."""
    graph, ids = calibrate_graph(server.get("/object_info"))
    page.load_workflow(graph.to_json())
    show_at_scale_one(page)
    calibrate = add_from_search(page, "Consistency Solver Calibrate", "Consistency Solver Calibrate")
    names = page.evaluate("id => app.graph.getNodeById(id).widgets.map(w => w.name)", calibrate)
    assert "control_after_generate" not in names and "seed" not in names  # nothing re-rolls between runs
    for name in ("model", "positive", "negative"):
        connect(page, ids[name], 0, calibrate, name)
    connect(page, ids["latent"], 0, calibrate, "latent_image")
    connect(page, calibrate, 0, ids["preview"], "loaded_coefficients")
    page.evaluate(
        """([id, values]) => {
            const node = app.graph.getNodeById(id)
            for (const [name, value] of Object.entries(values)) node.widgets.find(w => w.name === name).value = value
            node.pos = [360, 0]
            app.canvas.setDirty(true, true)
        }""",
        [calibrate, CALIBRATE],
    )
    page.evaluate(LISTEN_PROGRESS)

    first = run(page, server, timeout=600.0)
    assert first["status"]["status_str"] == "success", first["status"]
    progress = page.evaluate("() => window.__calibrationProgress.map(p => String(p.node))")
    assert str(calibrate) in progress, "the first run showed no calibration progress"
    report = widget(page, calibrate, REPORT_BOX)
    assert report.startswith("Judged on") and "x best stock" in report
    shoot(page, "calibrate-1-first-run")

    page.evaluate(
        "id => { app.graph.getNodeById(id).widgets.find(w => w.name === 'garment').value = 'Bag' }", ids["positive"]
    )
    page.evaluate("() => { window.__calibrationProgress = [] }")
    second = run(page, server, timeout=600.0)
    assert second["status"]["status_str"] == "success", second["status"]
    progress = page.evaluate("() => window.__calibrationProgress.map(p => String(p.node))")
    assert str(calibrate) not in progress, "a prompt edit calibrated again"
    assert str(ids["preview"]) in executed_nodes(second)  # the preview is made again, with the new prompt
    assert widget(page, calibrate, REPORT_BOX) == report
    shoot(page, "calibrate-2-after-a-prompt-edit")


def test_ksampler_at_an_untrained_step_count_says_what_to_change(page, server):
    graph, ids = tiny_graph(server.get("/object_info"), with_refine=False)
    sampler = graph.add("KSampler", (500, 0), seed=1, steps=20, cfg=4.0, sampler_name="consistency_solver",
                        scheduler="karras")  # fmt: skip
    for name in ("model", "positive", "negative"):
        graph.connect(ids[name], 0, sampler, name)
    graph.connect(ids["latent"], 0, sampler, "latent_image")
    graph.connect(sampler, 0, ids["save_preview"], "samples")
    page.load_workflow(graph.to_json())
    show_at_scale_one(page)
    history = run(page, server)
    assert history["status"]["status_str"] == "error"
    dialog = page.page.locator(".p-dialog:visible")
    dialog.first.wait_for()
    shoot(page, "7-ksampler-20-steps-error")
    message = dialog.first.inner_text()
    print(f"KSampler at 20 steps, the dialog says:\n{message}")
    # What to change first, naming the sampler and the file, in the words of a KSampler (no option it lacks).
    assert message.startswith("KSampler\n\nSet steps to 4-12 for the consistency_solver sampler"), message
    assert "default-eps.safetensors" in message and "this run has 20" in message, message
    assert not any(jargon in message for jargon in ("allow_untrained_steps", "=True", "python -m")), message
    page.page.keyboard.press("Escape")


def test_no_page_error_came_from_the_pack(page):
    assert page.pack_errors == [], f"errors in {EXTENSION_PATH}: {page.pack_errors}"
    assert page.pack_console == [], f"the pack's extensions fell back: {page.pack_console}"
