"""A learned bed through ComfyUI's KSampler with ``consistency_solver`` picked by name equals the solver API."""

import pytest

from consistency_solver.solver.defaults import BUNDLED_DIR
from consistency_solver.training.evaluation import ksampler_path

pytestmark = pytest.mark.usefixtures("one_thread", "comfy_samplers")


@pytest.mark.parametrize(("bed", "stock"), [("fashion-v-cfg", "karras"), ("fashion-flow-cfg", "simple")])
def test_ksampler_by_name_gives_the_solver_apis_previews_on_both_schedules(bed, stock):
    files = {kind: BUNDLED_DIR / f"default-{kind}.safetensors" for kind in ("eps", "flow")}
    rows = ksampler_path.measure([bed], files, (5,), samples=4, log=lambda message: None)
    assert [row["scheduler"] for row in rows] == [stock, "consistency_solver"]
    for row in rows:
        assert row["max_sigma_difference"] < 1e-5  # 5 steps divide 1000: simple is the beds' flow schedule
        assert row["max_sample_difference"] < 1e-4
        assert row["ksampler_rmse"] == pytest.approx(row["solver_rmse"], abs=1e-5)
    assert "| consistency_solver |" in ksampler_path.table(rows, "command")
