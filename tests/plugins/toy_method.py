"""A toy method in one registration: a ridge penalty λ Σ‖B‖²_F on the new task's B, with its own
hyper-parameter ``toy_ridge_lambda``, and a preset ``toy-ridge`` that uses it.

Loaded with ``LAMINA_PLUGINS=tests.plugins.toy_method`` by the server and the worker alike. It
imports no torch: the regularizer only calls tensor methods on the weights it is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainer.methods.catalog import Knob, Part, Preset, register, register_preset

if TYPE_CHECKING:
    import torch

    from trainer.methods.registry import Layers


class Ridge:
    """Σ_modules ‖B_t‖²_F: pulls the new task's B towards zero (its λ is applied by the loop)."""

    def __init__(self, hp: Any, history: list[Any]) -> None:
        """No state: the penalty needs neither the hyper-parameters nor the earlier tasks."""

    def __call__(self, layers: Layers) -> torch.Tensor:
        terms = [(p.B**2).sum() for p in layers.values()]
        return sum(terms[1:], terms[0])


register(
    Part(
        "regularizer",
        "toy-ridge",
        "λ Σ‖B‖²_F on the new task's B (a test's toy).",
        knobs=(
            Knob(
                "toy_ridge_lambda",
                float | None,
                None,
                "λ of the toy ridge penalty; None: the preset's.",
                ge=0,
            ),
        ),
        implementation=Ridge,
        lambda_knob="toy_ridge_lambda",
    )
)
register_preset(
    Preset(
        "toy-ridge",
        parametrization="lora",
        regularizers={"toy-ridge": 1e-3},
        merge="concat",
        stack_history=True,
    )
)
