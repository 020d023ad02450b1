"""The loop's quality signals: the probe compiles without baking its clips in; the demo's last gauge line."""

import re

import jax

from configs import demo
from eflow_jax import monitor, optim, sharding
from eflow_jax import state as state_lib
from eflow_jax.models import dit


def _scores(accuracy: float) -> dict:
    return dict(class_accuracy=accuracy, motion_consistency=0.1, frechet=3.0, class_accuracy_real=1.0,
                class_accuracy_noise=0.25, motion_consistency_real=0.95, motion_consistency_noise=0.01,
                frechet_real=0.3, frechet_noise=100.0)


def test_summary_line_leads_with_the_most_steps():
    line = monitor.summary_line({1: _scores(0.5), 2: _scores(0.875)})
    assert line.startswith("gauge: 2-step samples: class accuracy 0.88, motion 0.10 | 1-step samples: "
                           "class accuracy 0.50")
    assert "real clips: class accuracy 1.00, motion 0.95" in line and "noise clips: class accuracy 0.25" in line
    assert "\n" not in line


def test_probe_takes_its_clips_as_inputs_not_compile_time_constants():
    # Closed-over clips became HLO constants that XLA constant-folded through the encoder: 34 s more
    # compile for EFlow-B at 16x128x128 on an H200.
    c = demo.get_config("steps=1,objective=eflow,test=1,batch=16")
    c.log.probe_clips = 32
    mesh = sharding.make_mesh(c.mesh)
    model, net = dit.make_network(c.model)
    abstract, _ = state_lib.state_shardings(model, optim.make_optimizer(c.optim, c.total_steps), mesh, c.seed)
    quality = monitor.QualityMonitor(c, net, mesh)
    text = quality._probe_fn.lower(abstract.params, quality._fixed).as_text()
    assert "probe_vel_err" in str(jax.eval_shape(quality._probe_fn, abstract.params, quality._fixed))
    big_constants = re.findall(r'dense<"0x[0-9A-Fa-f]{2048,}"', text)  # Over 1 KB each.
    assert not big_constants, f"{len(big_constants)} large constants in the probe program"
