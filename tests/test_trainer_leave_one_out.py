"""The defaults' protocol end to end on Gaussian mixtures standing in for the learned beds (seconds), the choice rule,
and the bundled defaults' recorded verdicts."""

import json
import shlex

import pytest
from safetensors import safe_open

from consistency_solver.solver import load_coefficients
from consistency_solver.solver.defaults import BUNDLED_DIR
from consistency_solver.training.evaluation.benchmark import Judgement
from consistency_solver.training.trainer import cli, leave_one_out

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "--mode direct --schedule learned --steps 5,8 --updates 2 --batch 2 --train-count 8 --held-out-count 8"


def tiny_file(path, beds):
    cli.main([*TINY.split(), *(a for bed in beds for a in ("--bed", bed)), "--threads", "1", "--no-progress",
              "--output", str(path), "--report-dir", str(path.with_suffix(""))])  # fmt: skip
    return path


def test_every_candidate_is_judged_on_beds_it_did_not_see_and_the_rule_writes_its_choice(
    tmp_path, monkeypatch, capsys, comfy_samplers
):
    learned, mixtures = ["gmm-vector-eps", "gmm-image-eps"], ["gmm-vector-eps-cfg"]
    monkeypatch.setattr(leave_one_out, "family_beds", lambda family: (learned, mixtures))
    monkeypatch.chdir(tmp_path)  # as the repository root: the files record paths relative to it
    previous = tiny_file(tmp_path / "old.safetensors", ["gmm-vector-eps", "gmm-vector-eps-cfg"])
    other = tiny_file(tmp_path / "mixture-only.safetensors", ["gmm-vector-eps-cfg"])
    trained = {}
    original = leave_one_out.cli.main

    def recorded(argv):
        trained[argv[argv.index("--output") + 1]] = [argv[i + 1] for i, a in enumerate(argv) if a == "--bed"]
        original(argv)

    monkeypatch.setattr(leave_one_out.cli, "main", recorded)
    output = tmp_path / "default-eps.safetensors"
    argv = ["--family", "eps", "--recipe", TINY, "--out", "out", "--output", str(output), "--samples", "8"]
    argv += ["--previous", str(previous), "--candidate", str(other)]
    leave_one_out.main(argv)
    assert trained == {
        "default-eps.safetensors": [*learned, *mixtures],
        "out/eps/folds/previous-without-gmm-vector-eps.safetensors": ["gmm-vector-eps-cfg"],
        "out/eps/folds/recipe-without-gmm-vector-eps.safetensors": ["gmm-image-eps", "gmm-vector-eps-cfg"],
        "out/eps/folds/recipe-without-gmm-image-eps.safetensors": ["gmm-vector-eps", "gmm-vector-eps-cfg"],
    }  # the file trained on mixtures only, and the previous one on a bed it never saw, are judged as they are
    results = json.loads((tmp_path / "out" / "defaults_eps.json").read_text())
    assert set(results["candidates"]) == {"previous", "mixture-only", "recipe"}
    assert set(results["left_out"]["recipe"]) == set(learned)
    assert set(results["own"]["recipe"]) == {*learned, *mixtures}
    assert set(results["left_out"]["previous"]["gmm-image-eps"]) == {"stock", "learned"}
    assert set(results["left_out"]["previous"]["gmm-image-eps"]["stock"]) == {"4", "5", "6", "8", "10", "12"}
    assert results["candidates"]["previous"]["passes_a"]  # no file is worse than itself
    order = [(not v["passes_a"], not v["passes_b"], v["mean_to_best"]) for v in results["candidates"].values()]
    assert results["chosen"] == list(results["candidates"])[order.index(min(order))]

    with safe_open(output, "pt") as opened:
        training = json.loads(opened.metadata()["training"])
    assert training["choice"]["chosen"] == results["chosen"] and training["choice"]["rule"] == leave_one_out.RULE
    chosen_file = tmp_path / "out" / "eps" / "candidates" / f"{results['chosen']}.safetensors"
    assert load_coefficients(output).trained_steps == load_coefficients(chosen_file).trained_steps
    printed = capsys.readouterr().out
    assert "| gmm-image-eps | 5 | karras |" in printed and "| gmm-vector-eps-cfg | 8 | learned |" in printed
    assert "### The rule's verdict" in printed and "**chosen**" in printed

    # Run again: the folds and the recipe's file record the same commands, so nothing is trained, nothing rerun.
    trained.clear()
    leave_one_out.main(argv)
    assert trained == {}
    assert json.loads((tmp_path / "out" / "defaults_eps.json").read_text())["chosen"] == results["chosen"]


def cells(values: dict[int, float], best: float = 0.1) -> dict:
    return {"stock": {n: Judgement(v, "euler", best, None) for n, v in values.items()}}


def test_the_rule_puts_no_regression_first_then_monotone_steps_then_the_mean_ratio():
    previous = {"bed": cells({5: 0.10, 8: 0.05})}
    better = {"bed": cells({5: 0.08, 8: 0.04})}
    slightly_worse = {"bed": cells({5: 0.103, 8: 0.04})}  # 3 % worse at 5 steps: allowed
    worse = {"bed": cells({5: 0.104, 8: 0.02})}  # 4 % worse at 5 steps, much better at 8
    non_monotone = {"bed": cells({5: 0.045, 8: 0.046})}
    verdicts = {
        name: leave_one_out.verdict(name, left_out, {}, previous)
        for name, left_out in [("previous", previous), ("better", better), ("slightly", slightly_worse),
                               ("worse", worse), ("non-monotone", non_monotone)]
    }  # fmt: skip
    assert verdicts["previous"].passes == (True, True)
    assert verdicts["slightly"].passes == (True, True)
    assert verdicts["worse"].passes == (False, True)
    assert verdicts["worse"].worse[0]["steps"] == 5 and verdicts["worse"].worse[0]["ratio"] == pytest.approx(1.04)
    assert verdicts["non-monotone"].passes == (True, False)
    assert verdicts["non-monotone"].breaks[0] | {"rmse_from": 0, "rmse_to": 0} == {
        "bed": "bed", "view": "left out", "schedule": "stock", "from": 5, "to": 8, "rmse_from": 0, "rmse_to": 0
    }  # fmt: skip
    ranked = sorted(verdicts.values(), key=leave_one_out.Verdict.order)
    # The lowest mean ratio (worse: 0.62x) loses to every file that passes (a) and (b); a break in (b) loses to all.
    assert [found.name for found in ranked] == ["better", "slightly", "previous", "non-monotone", "worse"]
    # (b) also reads the candidate's own file on every bed, mixtures included.
    own = {"mixture": cells({5: 0.2, 6: 0.25, 8: 0.1})}
    assert leave_one_out.verdict("x", better, own, previous).breaks[0]["view"] == "own file"


def test_acceptance_reads_each_schedule_at_5_and_8_steps():
    learned = {5: Judgement(0.086, "deis", 0.1, None), 8: Judgement(0.05, "deis", 0.05, None)}
    stock = {5: Judgement(0.1, "deis", 0.1, None), 8: Judgement(0.055, "deis", 0.05, None)}
    left_out = {"bed": {"learned": learned, "stock": stock}}
    met = {(row["schedule"], row["steps"]): row["met"] for row in leave_one_out.acceptance(left_out)}
    assert met == {("learned", 5): False, ("learned", 8): True, ("stock", 5): True, ("stock", 8): True}


def test_a_recorded_command_gives_the_recipe_and_beds_without_where_it_wrote(tmp_path):
    path = tiny_file(tmp_path / "file.safetensors", ["gmm-vector-eps", "gmm-vector-eps-cfg"])
    recipe, beds = leave_one_out.recorded_recipe(path)
    assert recipe == TINY and beds == ["gmm-vector-eps", "gmm-vector-eps-cfg"]


@pytest.mark.parametrize("family", leave_one_out.FAMILIES)
def test_each_bundled_default_is_the_rules_choice_and_records_how_it_was_made(family):
    loaded = load_coefficients(BUNDLED_DIR / f"default-{family}.safetensors")
    training = json.loads(loaded.metadata["training"])
    choice = training["choice"]
    assert choice["rule"] == leave_one_out.RULE
    assert shlex.split(choice["command"])[:5] == [
        "python", "-m", "consistency_solver.training.trainer.leave_one_out", "--family", family
    ]  # fmt: skip
    candidates = choice["candidates"]
    assert leave_one_out.PREVIOUS in candidates and len(candidates) >= 2
    order = {name: (not c["passes_a"], not c["passes_b"], c["mean_to_best"]) for name, c in candidates.items()}
    assert choice["chosen"] == min(order, key=order.get)
    command = shlex.split(training["command"])
    assert command[:3] == ["python", "-m", "consistency_solver.training"]
    assert [command[i + 1] for i, flag in enumerate(command) if flag == "--bed"] == candidates[choice["chosen"]]["beds"]
    if candidates[choice["chosen"]]["trained_by_protocol"]:
        # A recipe the protocol trained on every bed of the family, from the repository root: the family's recipe.
        recipe = leave_one_out.RECIPES[family].split()
        assert command[3 : 3 + len(recipe)] == recipe == candidates[choice["chosen"]]["recipe"].split()
        learned, mixtures = leave_one_out.family_beds(family)
        assert candidates[choice["chosen"]]["beds"] == [*learned, *mixtures]
        assert command[command.index("--output") + 1] == f"solver/bundled/default-{family}.safetensors"
        assert loaded.last_step == (recipe[recipe.index("--last-step") + 1] if "--last-step" in recipe else "learned")
