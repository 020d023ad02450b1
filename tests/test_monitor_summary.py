"""The one gauge line a demo run ends with names each sampler's accuracy and both references."""

from eflow_jax import monitor


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
