"""drpo inspect's report names the swept thresholds that bind no token (DRPO and Mask-DRPO at
delta >= 1) and none that do; the boundary counts it prints agree."""

import json
import re

from drpo.cli import main
from test_inspect import write_synthetic


def test_report_flags_exactly_the_thresholds_no_token_reaches(tmp_path):
    write_synthetic(tmp_path / "d")
    out = tmp_path / "r"
    assert main(["inspect", str(tmp_path / "d"), "--out", str(out), "--method", "drpo", "--method", "mask_drpo", "--method", "grpo",
                 "--param", "drpo.delta=0.15,1,12.5", "--param", "mask_drpo.delta=0.15,2"]) == 0
    md = (out / "report.md").read_text()
    flagged = set(re.findall(r"^- `([^`]+)`: (?:drpo|mask_drpo) with delta=", md, re.M))
    assert flagged == {"drpo(delta=1)", "drpo(delta=12.5)", "mask_drpo(delta=2)"}
    # the flagged variants have no token beyond their boundary in the synthetic batch; the tight ones do
    report = json.loads((out / "report.json").read_text())
    beyond = {label: m["all"]["beyond_boundary_pos_frac"] + m["all"]["beyond_boundary_neg_frac"]
              for label, m in report["total"]["methods"].items()}
    assert all(beyond[v] == 0 for v in flagged)
    assert beyond["drpo(delta=0.15)"] > 0 and beyond["mask_drpo(delta=0.15)"] > 0
