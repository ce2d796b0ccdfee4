"""The leave-one-bed-out protocol end to end on Gaussian mixtures standing in for the learned beds (seconds)."""

import json
import shlex

import pytest
from safetensors import safe_open

from consistency_solver.solver import load_coefficients
from consistency_solver.solver.defaults import BUNDLED_DIR
from consistency_solver.training.trainer import leave_one_out

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "--mode direct --schedule learned --steps 5,8 --updates 2 --batch 2 --train-count 8 --held-out-count 8"


def test_every_learned_bed_is_left_out_once_then_the_default_trains_on_all(tmp_path, monkeypatch, capsys):
    learned, mixtures = ["gmm-vector-eps", "gmm-image-eps"], ["gmm-vector-eps-cfg"]
    monkeypatch.setattr(leave_one_out, "family_beds", lambda family: (learned, mixtures))
    trained = {}
    original = leave_one_out.train

    def recorded(beds, recipe, output, work):
        trained[output.stem] = beds
        original(beds, recipe, output, work)

    monkeypatch.setattr(leave_one_out, "train", recorded)
    monkeypatch.chdir(tmp_path)  # as the repository root: the files record paths relative to it
    output = tmp_path / "default-eps.safetensors"
    argv = ["--family", "eps", "--recipe", TINY, "--out", str(tmp_path / "out"), "--output", str(output)]
    leave_one_out.main([*argv, "--samples", "8"])
    assert trained == {
        "without-gmm-vector-eps": ["gmm-image-eps", "gmm-vector-eps-cfg"],
        "without-gmm-image-eps": ["gmm-vector-eps", "gmm-vector-eps-cfg"],
        "default-eps": [*learned, *mixtures],
    }
    assert load_coefficients(output).trained_steps == (5, 8)
    with safe_open(output, "pt") as opened:
        command = shlex.split(json.loads(opened.metadata()["training"])["command"])
    assert command[command.index("--output") + 1] == "default-eps.safetensors"
    assert command[command.index("--checkpoint") + 1] == "out/eps/default-eps.ckpt"
    printed = capsys.readouterr().out
    assert "| gmm-image-eps (left out) | without-gmm-image-eps | 5 | karras |" in printed
    assert "| gmm-image-eps (left out) | without-gmm-image-eps | 8 | consistency_solver |" in printed
    assert "| gmm-vector-eps-cfg | default-eps | 8 | karras |" in printed
    results = json.loads((tmp_path / "out" / "leave_one_out_eps.json").read_text())
    assert [(v["bed"], v["left_out"]) for v in results["verdicts"]] == [
        ("gmm-vector-eps", True),
        ("gmm-image-eps", True),
        ("gmm-vector-eps-cfg", False),
    ]
    assert set(results["judgements"]["gmm-vector-eps (left out)"]["without-gmm-vector-eps"]) == {
        "karras",
        "consistency_solver",
    }


def test_a_bed_left_out_passes_on_one_schedule_when_both_ratios_hold_at_5_and_8_steps():
    from consistency_solver.training.evaluation.benchmark import BedResult

    result = BedResult("bed", ("a", "b"))
    result.judged["file"] = {"karras": ("file on karras", ["ComfyUI dpmpp_2m", "ComfyUI uni_pc"])}
    result.rows = {
        "file on karras": {5: (0.10,), 8: (0.05,)},
        "ComfyUI dpmpp_2m": {5: (0.20,), 8: (0.07,)},
        "ComfyUI uni_pc": {5: (0.11,), 8: (0.06,)},
    }
    assert leave_one_out.verdict("bed", result, "file", left_out=True).schedules == ("karras",)
    result.rows["ComfyUI dpmpp_2m"][8] = (0.06,)  # 0.83x dpmpp_2m at 8 steps: above 0.8x
    assert leave_one_out.verdict("bed", result, "file", left_out=True).schedules == ()
    assert leave_one_out.verdict("bed", result, "file", left_out=False).schedules == ("karras",)
    result.rows["file on karras"][5] = (0.12,)  # 1.09x uni_pc at 5 steps: a mixture needs 1.0x
    assert leave_one_out.verdict("bed", result, "file", left_out=False).schedules == ()


@pytest.mark.parametrize("family", leave_one_out.FAMILIES)
def test_the_bundled_defaults_are_what_their_familys_recipe_makes(family):
    loaded = load_coefficients(BUNDLED_DIR / f"default-{family}.safetensors")
    command = shlex.split(json.loads(loaded.metadata["training"])["command"])
    recipe = leave_one_out.RECIPES[family].split()
    assert command[:3] == ["python", "-m", "consistency_solver.training"] and command[3 : 3 + len(recipe)] == recipe
    learned, mixtures = leave_one_out.family_beds(family)
    assert [command[i + 1] for i, flag in enumerate(command) if flag == "--bed"] == [*learned, *mixtures]
    assert command[command.index("--output") + 1] == f"solver/bundled/default-{family}.safetensors"
    # The recipe's last step is the file's (a file without the key is "learned").
    assert loaded.last_step == (recipe[recipe.index("--last-step") + 1] if "--last-step" in recipe else "learned")
