"""A plugin whose knob is named like a shared hyper-parameter (``r``): trainer.config refuses it."""

from trainer.methods.catalog import Knob, Part, register

register(
    Part(
        "regularizer",
        "clash",
        "a knob that would replace the adapter's rank",
        knobs=(Knob("r", float, 0.0, "not the rank"),),
        implementation="tests.plugins.clashing_knob:nothing",
        lambda_knob="r",
    )
)
