"""The built-in parts and presets of the catalogue (:mod:`trainer.methods.catalog`).

Each :func:`register` call is the whole of what Lamina knows about a part: its knobs (fields of
the flat ``hyperparameters``), its torch implementation, its capacity check and ledger notes
(:mod:`trainer.methods.capacity`). Torch-free: implementations are ``"module:attr"`` references.
"""

from __future__ import annotations

from typing import Literal

from trainer.methods.catalog import Knob, Part, Preset, register, register_preset

_IMPL = "trainer.methods.parametrizations"
_REG = "trainer.methods.regularizers"
_CAP = "trainer.methods.capacity"


# ---------------------------------------------------------------------------------------------
# Knobs (a knob shared by two parts is one object).

SPARSITY = Knob(
    "sparsity",
    float,
    0.9,
    "LoRI-S: fraction of B masked out; the global top-(1 − s) |B| are kept.",
    ge=0.0,
    lt=1.0,
)
MASK_FRACTION = Knob(
    "mask_fraction",
    float,
    0.1,
    "LoRAF: share of each module's B one task claims, k = max(1, ⌊f · d_out · r⌋).",
    gt=0.0,
    le=1.0,
)
CALIBRATION_STEPS = Knob(
    "calibration_steps",
    int,
    20,
    "Unmasked steps whose |B| (LoRI-S) or |ΔB| (LoRAF) choose the task's mask.",
    ge=1,
    le=100_000,
)
SUBSPACE_ENERGY = Knob(
    "subspace_energy",
    float,
    0.99,
    "inflora, own-lora: fraction ε of each earlier task's input energy, per module, that the "
    "protected subspace holds; inflora draws the new task's frozen A orthogonal to it, own-lora's "
    "merge receives the new task with it taken out. Higher: less "
    "forgetting, fewer free directions for later tasks (on the embedded model 0.999 filled a "
    "module after 5 of 15 tasks; 0.99 left 9 % of the fullest one free after all 15).",
    gt=0.0,
    lt=1.0,
)
SUBSPACE_BASE_ENERGY = Knob(
    "subspace_base_energy",
    float,
    0.9,
    "inflora, own-lora: before a store's first task, the fraction of the base model's own input "
    "energy (on text it samples itself) that the protected subspace holds, so what the model knew "
    "before any task survives them. Higher keeps more of it and leaves fewer directions to the "
    "tasks (embedded model, 15 tasks: 0.99 kept 70 % of the probe but forgot 29 points of the "
    "tasks, 0.9 kept 50 % and forgot 12). 0 protects only the tasks. The first task of a store "
    "sets it; later tasks keep what it chose.",
    ge=0.0,
    lt=1.0,
)
SUBSPACE_INIT = Knob(
    "subspace_init",
    Literal["inputs", "random"],
    "inputs",
    'inflora: how the frozen A is drawn inside the free directions. "inputs" '
    "(InfLoRA's choice): the r free directions where this task's own inputs, on the served model, "
    'have the most energy; "random": LoRI\'s seeded random A, projected.',
)
L1_LAMBDA = Knob(
    "l1_lambda",
    float | None,
    None,
    "λ of the N-LoRA loss λ‖ΔW‖₁. None: the preset's value; set on a method without it to "
    "add it (e.g. O-LoRA + N-LoRA); 0 removes it.",
    ge=0,
)
STABILITY_LAMBDA = Knob(
    "stability_lambda",
    float | None,
    None,
    "λ of the PS-LoRA stability loss (eq. 4); None/0 as for l1_lambda.",
    ge=0,
)
STABILITY_ALPHA = Knob(
    "stability_alpha",
    float | None,
    None,
    "Temperature α of PS-LoRA's sign term tanh(α·ΔW_t)·tanh(α·S). The paper gives no value. "
    "None: per module α = STABILITY_ALPHA_RMS / rms(S), so an entry of S one rms in size gives "
    "tanh(α·S) = tanh(2) = 0.96 — a fixed α is inert for ΔW entries of ~5e-4 (tanh ≈ α·ΔW ≈ 0).",
    gt=0,
)
ORTHOGONAL_LAMBDA = Knob(
    "orthogonal_lambda",
    float | None,
    None,
    "λ of the O-LoRA orthogonality loss; None/0 as for l1_lambda.",
    ge=0,
)

# ---------------------------------------------------------------------------------------------
# Parametrizations. The auto learning rates (trainer.auto) are for a fully trained B; masked
# methods divide them by the share they train.

register(
    Part(
        "parametrization",
        "lora",
        "A and B trained; earlier tasks frozen (IncLoRA).",
        implementation=f"{_IMPL}:Lora",
        continues_previous=True,
        auto_learning_rate=2e-3,
    )
)
register(
    Part(
        "parametrization",
        "lori",
        "A frozen seeded random, B trained; LoRI-S masks B to its top-(1 − sparsity) entries.",
        knobs=(SPARSITY, CALIBRATION_STEPS),
        implementation=f"{_IMPL}:Lori",
        auto_learning_rate=5e-3,
    )
)
register(
    Part(
        "parametrization",
        "loraf",
        "One shared frozen A and B; each task owns disjoint positions of B (LoRAF).",
        knobs=(MASK_FRACTION, CALIBRATION_STEPS),
        implementation=f"{_IMPL}:LoraF",
        capacity=f"{_CAP}:loraf_plan",
        notes=f"{_CAP}:loraf_growth_notes",
        includes_history=True,
        auto_learning_rate=5e-3,
    )
)
register(
    Part(
        "parametrization",
        "inflora",
        "As lori, with A projected off the live tasks' input subspace (ours, after GPM / InfLoRA).",
        knobs=(SPARSITY, SUBSPACE_ENERGY, SUBSPACE_BASE_ENERGY, SUBSPACE_INIT),
        implementation=f"{_IMPL}:InfLora",
        capacity=f"{_CAP}:inflora_free_directions",
        auto_learning_rate=5e-3,
    )
)
register(
    Part(
        "parametrization",
        "own-lora",
        "A and B trained on the base alone, served as they are; the merge gets A off the protected "
        "input subspace (ours, after GPM).",
        knobs=(SUBSPACE_ENERGY, SUBSPACE_BASE_ENERGY),
        implementation=f"{_IMPL}:OwnLora",
        auto_learning_rate=2e-3,
    )
)

# ---------------------------------------------------------------------------------------------
# Regularizers (each with the knob that sets its λ).

register(
    Part(
        "regularizer",
        "l1",
        "N-LoRA: λ‖ΔW_t‖₁ of the full product.",
        knobs=(L1_LAMBDA,),
        implementation=f"{_REG}:L1",
        lambda_knob="l1_lambda",
    )
)
register(
    Part(
        "regularizer",
        "stability",
        "PS-LoRA eq. 4: magnitude times sign alignment with the earlier tasks' sum.",
        knobs=(STABILITY_LAMBDA, STABILITY_ALPHA),
        implementation=f"{_REG}:Stability",
        lambda_knob="stability_lambda",
    )
)
register(
    Part(
        "regularizer",
        "orthogonal",
        "O-LoRA: λ Σ_{i<t} ‖A_i A_tᵀ‖_F².",
        knobs=(ORTHOGONAL_LAMBDA,),
        implementation=f"{_REG}:Orthogonal",
        lambda_knob="orthogonal_lambda",
    )
)

# ---------------------------------------------------------------------------------------------
# Merges (implemented in adapters_store.merges, where the store publishes).

register(
    Part(
        "merge",
        "concat",
        "LoRI: stack the tasks' A and B; exactly Σ ΔW_t at rank Σ r_t.",
        capacity=f"{_CAP}:concat_rank",
    )
)
register(Part("merge", "magnitude", "PS-LoRA eq. 5: elementwise, the entry of larger magnitude (dense)."))
register(Part("merge", "sum", "LoRAF: the disjoint masked B's add up on the shared A."))
register(Part("merge", "linear", "(Σ w A)(Σ w B): a baseline with cross terms."))
register(Part("merge", "latest", "The last task's adapter (SeqLoRA, which trains one adapter throughout)."))

# ---------------------------------------------------------------------------------------------
# Presets, in the order the benchmark reports them: baselines first.

# Baselines. IncLoRA, like O-LoRA, N-LoRA and PS-LoRA, trains each new LoRA with the earlier ones
# frozen in the forward pass (PS-LoRA eq. 3); LoRI and LoRAF train on the base alone.
register_preset(Preset("seq-lora", parametrization="lora", warm_start=True, merge="latest"))
register_preset(Preset("inc-lora", parametrization="lora", merge="concat", stack_history=True))
# O-LoRA: orthogonality of A_t to the earlier A_i (λ = 0.5 as in PS-LoRA's O-LoRA runs).
register_preset(
    Preset(
        "o-lora", parametrization="lora", regularizers={"orthogonal": 0.5}, merge="concat", stack_history=True
    )
)
# N-LoRA: L1 on the full product ΔW. λ is far below the paper's 0.4 because the norm here is
# summed over d_out × d_in entries of every module, not over an r × r product.
register_preset(
    Preset("n-lora", parametrization="lora", regularizers={"l1": 1e-4}, merge="concat", stack_history=True)
)
# LoRI (Zhang et al. 2025): frozen random A, B dense (D) or masked at 90 % sparsity (S); concat merge.
register_preset(Preset("lori-d", parametrization="lori", sparsity=0.0, merge="concat"))
register_preset(Preset("lori-s", parametrization="lori", merge="concat"))
# LoRAF: one shared A and B, disjoint per-task masks; the masked B's simply add up.
register_preset(Preset("loraf", parametrization="loraf", merge="sum"))
# PS-LoRA: stability loss (eq. 4, λ = 0.01 as for llama2-7b long sequences) + magnitude merge (eq. 5).
register_preset(
    Preset(
        "ps-lora",
        parametrization="lora",
        regularizers={"stability": 0.01},
        merge="magnitude",
        stack_history=True,
    )
)
# Ours, after GPM / InfLoRA: LoRI-D whose frozen A avoids the input directions of the live
# tasks (measured on the served model), trained on top of them; concat merge.
register_preset(
    Preset("inflora", parametrization="inflora", sparsity=0.0, merge="concat", stack_history=True)
)
# Ours, for routed serving (the default): each task's own LoRA on the base, which `continual`
# serves for its prompts; the concat merge gets each task off the protected input subspace.
register_preset(Preset("own-lora", parametrization="own-lora", merge="concat"))
