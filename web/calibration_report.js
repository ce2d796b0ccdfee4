// Text the pack's nodes report after a run, shown on the node in a read-only box, as ComfyUI's Preview Any shows a
// value: Consistency Solver Calibrate's report (what the calibration measured on held-out noises: per step count,
// what the file uses and its RMSE against the best stock sampler and the pack's default; also its `report` output),
// and, with a model connected, which file 'auto' uses for it on Consistency Solver Coefficients.
//
// It relies on ComfyUI's STRING widget factory; where that is missing the report stays on the output (connect it to
// Preview Any) and the console says so.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const BOXES = {
  ConsistencySolverCalibrate: "After a run: what the calibration measured on noises it did not fit on.",
  ConsistencySolverCoefficients: "With a model connected, after a run: which file 'auto' uses for it.",
};
const REPORT = "$$calibration_report";
const LOG = "[consistency_solver]";

function addReportBox(node, placeholder) {
  if (typeof ComfyWidgets?.STRING !== "function") {
    console.warn(`${LOG} no STRING widget in this frontend: connect Calibrate's report output to Preview Any`);
    return;
  }
  const box = ComfyWidgets.STRING(node, REPORT, ["STRING", { multiline: true }], app).widget;
  box.serialize = false; // what a run measured, not a setting: never saved in the workflow
  if (box.element) {
    box.element.readOnly = true;
    box.element.placeholder = placeholder;
  }
}

app.registerExtension({
  name: "consistency_solver.CalibrationReport",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const placeholder = BOXES[nodeData.name];
    if (!placeholder) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      addReportBox(this, placeholder);
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const box = this.widgets?.find((widget) => widget.name === REPORT);
      if (box && message?.text?.length) box.value = message.text[0];
    };
  },
});
