"""The UI-workflow checker and the example workflows, against this pack's node definitions (no ComfyUI).

The stock nodes in the examples are checked against a live ComfyUI in test_comfy_server.py.
"""

import copy
import json
from pathlib import Path

import pytest
from fixtures.example_workflows import EXAMPLES, EXAMPLES_DIR
from fixtures.workflows import UIGraph, check_workflow, node_info, widget_names

from consistency_solver.nodes import NODE_CLASS_MAPPINGS, widgets

# Stands in for the stock loaders in the synthetic workflow.
SOURCES = {"input": {"required": {}}, "output": ["MODEL", "CONDITIONING", "LATENT"], "output_name": ["m", "c", "l"]}
UI_KEYS = {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"}


@pytest.fixture
def our_definitions(monkeypatch):
    # The scheduler list as ComfyUI has it once the pack registered consistency_solver.
    monkeypatch.setattr(widgets, "scheduler_names", lambda: ["simple", "karras", "consistency_solver"])
    monkeypatch.setattr(widgets, "coefficient_file_names", lambda: [])
    monkeypatch.setattr(widgets, "sampler_names", lambda: ["euler", "dpmpp_2m", "consistency_solver"])
    return {name: node_info(cls) for name, cls in NODE_CLASS_MAPPINGS.items()} | {"Sources": SOURCES}


@pytest.fixture
def preview_refine(our_definitions):
    graph = UIGraph(our_definitions)
    preview = graph.add("DiffusionPreview", (0, 0), seed=3, scheduler="karras")
    refine = graph.add("DiffusionRefine", (400, 0), approve=True, select="0,1")
    solver = graph.add("SamplerConsistencySolver", (0, 400), coefficients="ab3 (untrained)")
    sources = graph.add("Sources", (0, 600))
    for node in (preview, refine):
        graph.connect(sources, 0, node, "model")
        graph.connect(sources, 1, node, "positive")
        graph.connect(sources, 1, node, "negative")
    graph.connect(sources, 2, preview, "latent_image")
    graph.connect(preview, 1, refine, "preview_state")
    graph.connect(solver, 0, refine, "sampler")
    return graph.to_json()


def test_widget_layout_follows_the_frontend(our_definitions):
    assert widget_names(our_definitions["DiffusionPreview"]) == [
        "seed", "seed:control", "steps", "cfg", "scheduler", "denoise", "coefficients"
    ]  # fmt: skip
    assert widget_names(our_definitions["DiffusionRefine"]) == ["approve", "select", "steps", "cfg", "scheduler"]


def test_a_consistent_workflow_passes(preview_refine, our_definitions):
    assert check_workflow(preview_refine, our_definitions) == []
    assert preview_refine["nodes"][0]["widgets_values"] == [3, "fixed", 8, 8.0, "karras", 1.0, "auto"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda w: w["nodes"][0]["widgets_values"].pop(), "widget values"),
        (lambda w: w["nodes"][0].update(type="NoSuchNode"), "unknown node type"),
        (lambda w: w["links"][-2].__setitem__(5, "LATENT"), "PREVIEW_STATE -> PREVIEW_STATE via LATENT"),
        (lambda w: w["links"][-2].__setitem__(3, 99), "unknown node ids"),
        (lambda w: w["nodes"][1]["inputs"][3].update(link=None), "not recorded on both"),
        (lambda w: w["nodes"][1]["inputs"][3].update(link=None), "required input 'preview_state' missing"),
        (lambda w: w["nodes"][0]["widgets_values"].__setitem__(4, "no_such_scheduler"), "not one of its choices"),
        (lambda w: w["nodes"][0]["outputs"].pop(), "outputs"),
    ],
)
def test_the_checker_finds_broken_workflows(preview_refine, our_definitions, damage, message):
    broken = copy.deepcopy(preview_refine)
    damage(broken)
    assert any(message in problem for problem in check_workflow(broken, our_definitions)), message


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_workflows_are_ui_format_and_fit_our_nodes(name, our_definitions):
    workflow = json.loads((EXAMPLES_DIR / f"{name}.json").read_text())
    assert UI_KEYS <= workflow.keys()
    assert any(node["type"] in NODE_CLASS_MAPPINGS or "consistency_solver" in node["widgets_values"]
               for node in workflow["nodes"])  # fmt: skip
    assert check_workflow(workflow, our_definitions, skip_unknown=True) == []
    assert workflow["extra"]["description"] == EXAMPLES[name].description  # its template card's line


def test_every_example_file_has_a_builder():
    assert {path.stem for path in Path(EXAMPLES_DIR).glob("*.json")} == set(EXAMPLES)
