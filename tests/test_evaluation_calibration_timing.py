"""The calibration's time besides model calls, as its benchmark prints it."""

from consistency_solver.training.evaluation import calibration_timing


def test_the_table_splits_a_calibrations_seconds_into_model_calls_and_the_rest(comfy_samplers, capsys):
    calibration_timing.main(["--beds", "fashion-latent-eps-cfg", "--budget", "1100"])
    row = capsys.readouterr().out.splitlines()[-1].strip("| ").split(" | ")
    name, calls, total, inside, besides = row
    assert name == "fashion-latent-eps-cfg" and 0 < int(calls) <= 1100
    assert 0 < float(inside) <= float(total) and abs(float(total) - float(inside) - float(besides)) <= 0.11
