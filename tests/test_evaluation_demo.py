"""The demo writes its labelled grid, and refuses clearly when the default coefficient file is missing."""

import pytest
import torch
from PIL import Image

from consistency_solver.solver import Preset, TableCoefficients, save_coefficients
from consistency_solver.training.evaluation import demo
from consistency_solver.training.testbeds import get_testbed

torch.set_num_threads(1)  # the cores are shared; one thread is faster than two contended ones


def fashion_weights_present() -> bool:
    from consistency_solver.training.testbeds.fashion import UNET_WEIGHTS

    return UNET_WEIGHTS.is_file()


def test_missing_default_file_names_the_command_that_makes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEFAULT_COEFFICIENTS", tmp_path / "default-eps.safetensors")
    with pytest.raises(SystemExit, match="python -m consistency_solver.training"):
        demo.main(["--out", str(tmp_path / "demo.png")])


@pytest.mark.skipif(
    not fashion_weights_present(), reason="the shipped Fashion-MNIST weights are not in training/testbeds/weights/"
)
def test_demo_writes_a_labelled_grid(tmp_path, capsys):
    coefficients = tmp_path / "ab2-6.safetensors"
    weights = Preset("ab2").weights(get_testbed("gmm-vector-eps").sigmas(demo.PREVIEW_STEPS))
    save_coefficients(
        coefficients, TableCoefficients(tables={demo.PREVIEW_STEPS: weights}, order=2), model_family="any"
    )
    out = tmp_path / "grid.png"
    demo.main(["--coefficients", str(coefficients), "--classes", "1", "8", "--seeds", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "ConsistencySolver" in printed and "dpmpp_2m" in printed and "RMSE" in printed
    image = Image.open(out)
    # Three rows (two previews, the final) of two 84-px images, plus the label column and captions.
    assert image.size[0] > 2 * 84 and image.size[1] > 3 * 84


def test_preview_loop_counts_calls_false_accepts_and_rejects():
    from consistency_solver.training.evaluation.preview_loop import FINAL_STEPS, simulate

    previews = torch.tensor([True, False, True, False])
    finals = torch.tensor([False, True, True, False])
    # seed 0: accepted, final fails (false accept); seed 1: rejected, final would pass (false reject);
    # seed 2: accepted and good; seed 3 comes after the last good final and is not counted.
    solver = simulate("ConsistencySolver", previews, finals, preview_steps=6)
    assert (solver.calls, solver.good_finals, solver.false_accepts, solver.false_rejects) == (
        3 * 6 + 2 * FINAL_STEPS,
        1,
        1,
        1,
    )
    live = simulate("live preview", previews, finals, preview_steps=6)
    assert live.calls == 2 * FINAL_STEPS + 6
    full = simulate("no preview", previews, finals, preview_steps=6)
    assert (full.calls, full.good_finals) == (3 * FINAL_STEPS, 2)
    assert full.calls_per_good_final == 1.5 * FINAL_STEPS


def test_preview_fidelity_measures_the_ink_shift_the_artist_sees():
    from consistency_solver.training.evaluation.preview_loop import fidelity

    finals = torch.linspace(-0.9, 0.9, 2 * 28 * 28).reshape(2, 1, 28, 28)
    brighter = fidelity(finals + 0.02, finals)  # ink mass is brightness in [0, 1]: +0.02 in [-1, 1] is +0.01
    assert brighter.rmse == pytest.approx(0.02) and brighter.ink_shift == pytest.approx(0.01)
    # Below black is displayed as black: an error the clamp cuts off shifts no ink, however large its RMSE.
    black = -torch.ones(2, 1, 28, 28)
    darker = fidelity(black - 0.1, black)
    assert darker.rmse == pytest.approx(0.1) and darker.ink_shift == 0.0


def test_preview_loop_table_reports_each_previews_fidelity():
    from consistency_solver.training.evaluation.preview_loop import METHODS, Fidelity, Outcome, table

    totals = {method: Outcome(calls=120, good_finals=2, false_accepts=1, false_rejects=3) for method in METHODS}
    fidelities = {method: Fidelity(rmse=0.078, ink_shift=0.0021) for method in METHODS if method != "no preview"}
    rows = table(totals, fidelities, 16, 10, 0.9, 6, (0.35, 0.65), {"model_calls": 2970, "seconds": 27.0})
    lines = {line.split(" | ")[0].lstrip("| "): line for line in rows.splitlines() if line.startswith("| ")}
    assert lines["dpmpp_2m"].endswith("| 1 | 3 | 0.078 | +0.0021 |")
    assert lines["no preview"].endswith("| — | — | — | — |")


def test_the_preview_loop_amortises_the_calibration_over_prompts_and_names_the_break_even():
    from consistency_solver.training.evaluation.preview_loop import CALIBRATED_FILE, METHODS, Outcome, break_even

    totals = {method: Outcome(calls=100, good_finals=1) for method in METHODS}
    totals[CALIBRATED_FILE] = Outcome(calls=60, good_finals=1)
    totals["live preview"] = Outcome(calls=90, good_finals=1)
    text = break_even(totals, 2000)
    assert "it pays for itself after 67 prompts (break-even N), against live preview" in text  # 2000 / 30
    assert "62.0 at N = 1000" in text
    totals[CALIBRATED_FILE] = Outcome(calls=95, good_finals=1)
    assert "never pays for itself here: live preview" in break_even(totals, 2000)
