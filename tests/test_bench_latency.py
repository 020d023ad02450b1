"""The latency benchmark's CPU smoke path: one JSON line per row on stdout, consistent fields."""

import json

import pytest

from eflow_jax.bench import latency
from eflow_jax.models import dit

FIELDS = {"variant", "shape", "batch", "method", "nfe", "median_ms", "p10_ms", "p90_ms",
          "speedup_vs_cfg50", "end_to_end_ms", "end_to_end", "gflop_per_sample", "token_drop"}


def test_tiny_run_prints_only_json_rows(capsys):
    returned = latency.main(["--tiny"])
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines]  # Fails on any non-JSON stdout line.
    assert rows == json.loads(json.dumps(returned))
    by_method = {r["method"]: r for r in rows}
    assert list(by_method) == ["eflow_1step", "euler2_cfg", "euler2_pdg"]
    for row in rows:
        assert FIELDS <= set(row)
        assert row["variant"] == "tiny" and row["shape"] == [4, 16, 16, 3] and row["batch"] == 1
        assert 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["runs"] == 3 and row["token_drop"] is False
        # Pixel space: nothing to decode, so end-to-end is the denoise time.
        assert row["end_to_end_ms"] == row["median_ms"]

    cfg_row, pdg, eflow = by_method["euler2_cfg"], by_method["euler2_pdg"], by_method["eflow_1step"]
    assert (eflow["nfe"], cfg_row["nfe"], pdg["nfe"], pdg["weak_nfe"]) == (1, 4, 4, 2)
    assert cfg_row["speedup_vs_cfg50"] == 1.0
    for row in (eflow, pdg):
        ratio = cfg_row["median_ms"] / row["median_ms"]
        assert row["speedup_vs_cfg50"] == pytest.approx(ratio, rel=0.01)

    # FLOPs per sample from the analytic cost model: N full passes; PDG swaps half for weak ones.
    args = latency.parse_args(["--tiny"])
    flops = dit.count_flops(latency.model_config(args, "glga"))
    assert eflow["gflop_per_sample"] == pytest.approx(flops.full / 1e9, abs=1e-3)
    assert cfg_row["gflop_per_sample"] == pytest.approx(4 * flops.full / 1e9, abs=1e-3)
    assert pdg["gflop_per_sample"] == pytest.approx(2 * (flops.full + flops.weak) / 1e9, abs=1e-3)
    assert pdg["gflop_per_sample"] < cfg_row["gflop_per_sample"]


def test_bad_geometry_names_the_field_before_building():
    args = latency.parse_args(["--variant=tiny", "--video_shape=4,16,16,3", "--patch=1,4,4",
                               "--tile=3,4,4"])
    with pytest.raises(ValueError, match="model.tile"):
        latency.model_config(args, "glga")


def test_profiled_rows_break_the_sampler_down_and_command_buffer_flags(capsys, monkeypatch):
    latency.main(["--tiny", "--profile=1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    summary = next(r for r in rows if r["bench"] == "profile_summary")
    assert summary["method"] == "eflow_1step" and summary["matched_frac"] > 0.99 and summary["busy_frac"] > 0
    regions = {r["key"] for r in rows if r.get("bench") == "profile" and r["table"] == "region"}
    assert {"encoder", "middle", "decoder"} <= regions and "optimizer" not in regions  # A sampler: no update.
    timed = [r for r in rows if "median_ms" in r]
    assert [r["method"] for r in timed] == ["eflow_1step", "euler2_cfg", "euler2_pdg"]
    assert all(0 < r["dispatch_ms"] <= r["median_ms"] for r in timed)

    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
    assert latency.set_command_buffers("default") == "--xla_foo=1"
    flags = latency.set_command_buffers("loops")
    assert flags.startswith("--xla_foo=1 --xla_gpu_enable_command_buffer=") and "WHILE,CONDITIONAL" in flags
