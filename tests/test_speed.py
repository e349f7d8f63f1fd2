"""The speed command's bookkeeping (no timing is asserted: times are measured in the command, not in tests)."""

import json
import os

from benchmarks.commands.speed import run_speed


def test_speed_writes_network_purification_and_gradient_rows(tmp_path):
    result = run_speed(str(tmp_path), defenses=["adp"], row_batches=(1, 2), rows=2, gradient_rows=2,
                       gradients=("exact", "surrogate"), repeats=1, settings={"adp": {"steps": 2, "tau": 0.0}},
                       verbose=False)
    rows = result["rows"]
    assert [r["n"] for r in rows if r["defense"] == "prior network"] == [1, 2]
    assert all(r["seconds"] > 0 and r["forward_backward_seconds"] > 0 for r in rows if r["defense"] == "prior network")
    purification = {r["switch"]: r for r in rows if r["defense"] == "adp" and r.get("switch")}
    assert set(purification) == {"eager", "default", "channels_last"}
    assert purification["default"]["nfe_per_image"] == {"prior_forward": 4.0, "prior_backward": 0.0}  # 2 steps x 2
    assert purification["eager"]["speedup_over_eager"] == 1.0
    assert purification["default"]["max_abs_difference_to_eager"] == 0.0  # inference_mode is exact
    assert all(r["overhead_ratio"] > 0 and r["settings"] == {"steps": 2, "tau": 0.0} for r in purification.values())
    [exact] = [r for r in rows if r["defense"] == "adp" and r["gradient"] == "exact"]  # ADP has no surrogate mode
    assert exact["nfe_per_image"]["prior_backward"] > 0 and exact["n"] == 2
    with open(os.path.join(tmp_path, "speed.json")) as f:
        assert json.load(f)["rows"] == json.loads(json.dumps(rows))


def test_process_split_rows_cover_both_splits_and_refuse_a_bad_split():
    import pytest

    from benchmarks.commands.speed import process_throughput

    rows = process_throughput(["diffpure"], processes=2, threads=2, rows=2, repeats=1,
                              settings={"diffpure": {"t_star": 0.01}})
    assert [(r["processes"], r["threads_per_process"], r["n"]) for r in rows] == [(1, 2, 4), (2, 1, 4)]
    assert rows[0]["speedup_over_one_process"] == 1.0
    assert all(r["seconds"] > 0 for r in rows)
    with pytest.raises(ValueError, match="2 <= K <= --threads"):
        process_throughput(["diffpure"], processes=4, threads=2)
