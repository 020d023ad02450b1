"""bench/profile.py: the train step's device time by region and op family (CPU smoke run + GPU-shaped trace)."""

import gzip
import json

import jax
import pytest

from configs import demo
from eflow_jax import config_file, train
from eflow_jax.bench import profile
from eflow_jax.bench import train as bench_train


@pytest.fixture(scope="module")
def traced():
    """The tiny flow-matching step with token drop (encoder, middle, decoder, optimizer), profiled."""
    c = demo.get_config("steps=10,objective=flow_matching,test=1,batch=16")
    c.objective.token_drop = True
    c.train.compile_cache_dir = ""
    prog = train.setup(c)
    state = prog.init_state(0)
    batch = bench_train.random_batch(prog, c.model.num_classes)
    state, m = prog.step(state, batch)
    jax.block_until_ready(m)
    state, report = profile.profile_program(prog, state, batch, steps=2)
    return prog, report


def _shares(report, table):
    return {r["key"]: r["frac"] for r in report[table]}


def test_cpu_profile_covers_the_step(traced):
    _, report = traced
    s = report["summary"]
    assert s["source"] == "host" and s["module"] == "jit_train_step"
    assert s["matched_frac"] > 0.99  # Every thunk maps to an instruction of the optimised HLO.
    # The step's ops fill most of the profiled wall time (8 fake devices share 2 cores).
    assert s["trace_span_ms_per_step"] > 0.5 * s["wall_ms_per_step"]
    regions = _shares(report, "region")
    assert {"encoder", "middle", "decoder", "optimizer", "loss", "embed_head"} <= set(regions)
    assert sum(regions.values()) == pytest.approx(1.0)
    assert regions.get("other", 0.0) < 0.1  # The rules place (nearly) everything.
    families = _shares(report, "family")
    for family in ("local_attention", "global_attention", "pooling", "mlp", "qkv_out_proj",
                   "adaln_norm_modulate", "gather_scatter", "optimizer"):
        assert family in families, family
    assert families.get("other", 0.0) < 0.1
    assert {r["key"] for r in report["pass_"]} >= {"fwd", "bwd", "step"}
    assert len(report["top"]) == 20 and report["top"][0]["ms_per_step"] >= report["top"][-1]["ms_per_step"]
    md = profile.markdown(report, "tiny")
    assert "| encoder |" in md and "| middle |" in md and "top kernels" in md
    rows = profile.json_rows(report, setting="tiny")
    assert rows[0]["bench"] == "profile_summary" and all(json.dumps(r) for r in rows)


def test_hlo_index_labels_the_model_scopes(traced):
    prog, _ = traced
    index = profile.parse_hlo(prog.step.as_text())
    labels = [profile.classify(index, name) for name in index.instrs]
    by = {(lab["region"], lab["family"]) for lab in labels}
    assert ("middle", "local_attention") in by and ("decoder", "mlp") in by and ("encoder", "pooling") in by
    assert ("drop_restore", "gather_scatter") in by and ("optimizer", "optimizer") in by
    # Call stacks come from the HLO's frame tables (innermost first): pooling is found by function.
    pooling = next(lab for lab in labels if lab["family"] == "pooling")
    assert pooling["frames"][:2] == ("pool_cells", "GLGA._global")
    assert profile.classify(index, "no-such-op")["pass_"] == "unmatched"


def _gpu_trace(names, module):
    """A trace shaped like XLA:GPU's: kernels on a device stream line, launches on the host carrying
    the same annotation, and a derived line that repeats the kernels (must not be counted twice)."""
    ev = [dict(ph="M", pid=1, name="process_name", args=dict(name="/device:GPU:0")),
          dict(ph="M", pid=1, tid=7, name="thread_name", args=dict(name="Stream #7(Kernel,MemcpyH2D)")),
          dict(ph="M", pid=1, tid=8, name="thread_name", args=dict(name="XLA Ops")),
          dict(ph="M", pid=2, name="process_name", args=dict(name="/host:CPU")),
          dict(ph="M", pid=2, tid=3, name="thread_name", args=dict(name="python"))]
    ts = 0.0
    for i, name in enumerate(names * 2):  # Two steps.
        args = dict(hlo_op=name, hlo_module=module, name="...", correlation_id=i)
        ev.append(dict(ph="X", pid=1, tid=7, ts=ts, dur=10.0, name=f"kernel_{name}", args=args))
        ev.append(dict(ph="X", pid=1, tid=8, ts=ts, dur=10.0, name=name, args=args))
        ev.append(dict(ph="X", pid=2, tid=3, ts=ts, dur=3.0, name="cuLaunchKernel", args=args))
        ts += 12.0
    ev.append(dict(ph="X", pid=1, tid=7, ts=ts, dur=5.0, name="MemcpyH2D", args={}))
    ev.append(dict(ph="X", pid=1, tid=7, ts=ts + 6, dur=4.0, name="other_module_kernel",
                   args=dict(hlo_op="add.1", hlo_module="jit__add_to_sums")))
    return dict(traceEvents=ev)


def test_gpu_shaped_trace_counts_device_kernels_once(traced):
    prog, _ = traced
    index = profile.parse_hlo(prog.step.as_text())
    entry = next(c for c in index.computations if c.startswith("main"))
    names = [n for n in index.computations[entry] if index.instrs[n].opcode == "fusion"][:50]
    report = profile.analyze(_gpu_trace(names, "jit_train_step"), index, steps=2)
    s = report["summary"]
    assert s["source"] == "device" and s["lines"] == ["Stream #7(Kernel,MemcpyH2D)"]
    # 50 kernels x 10 us per step: not the host launches, not the derived line, not another module.
    assert s["device_ms_per_step"] == pytest.approx(50 * 10 / 1e3)
    assert s["kernels_per_step"] == 50 and s["matched_frac"] == 1.0
    assert s["unannotated_ms_per_step"] == pytest.approx(5 / 2 / 1e3)  # The memcpy, per step.
    assert report["top"][0]["calls_per_step"] == 1


def test_cpu_thunks_nested_in_a_while_count_once():
    ev = [dict(ph="M", pid=1, name="process_name", args=dict(name="/host:CPU")),
          dict(ph="X", pid=1, tid=1, ts=0, dur=100, name="while.1", args=dict(hlo_op="while.1")),
          dict(ph="X", pid=1, tid=1, ts=10, dur=30, name="f.1", args=dict(hlo_op="f.1")),
          dict(ph="X", pid=1, tid=1, ts=50, dur=40, name="f.2", args=dict(hlo_op="f.2")),
          dict(ph="X", pid=1, tid=1, ts=120, dur=5, name="f.3", args=dict(hlo_op="f.3"))]
    kernels, facts = profile.device_kernels(dict(traceEvents=ev))
    assert facts["source"] == "host"
    assert {k.hlo_op: k.dur for k in kernels} == {"while.1": 30, "f.1": 30, "f.2": 40, "f.3": 5}


def test_cli_writes_json_markdown_and_ops(tmp_path, capsys, monkeypatch):
    ops, md = tmp_path / "ops.json.gz", tmp_path / "p.md"
    profile.main([f"--config={config_file.in_repo('demo.py')}:steps=10,objective=flow_matching,test=1,batch=16",
                  "--set=objective.token_drop=True", "--set=train.compile_cache_dir=", "--steps=1",
                  "--warmup=1", f"--md={md}", f"--ops_out={ops}"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["bench"] == "profile_summary" and rows[0]["objective"] == "flow_matching"
    assert any(r["bench"] == "profile" and r["table"] == "region" and r["key"] == "middle" for r in rows)
    assert "| op family |" in md.read_text()
    saved = json.load(gzip.open(ops, "rt"))
    (setting,) = saved
    assert saved[setting]["ops"][0]["us_per_step"] >= saved[setting]["ops"][-1]["us_per_step"]
