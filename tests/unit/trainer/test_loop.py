"""The training loop on a tiny random Llama with a char-level tokenizer, for every preset."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from adapters_store.lora import LoraAdapter, LoraModule
from tests.support.models import make_model
from trainer.config import PRESETS, Example, Hyperparameters, resolve_method
from trainer.loop import TrainingCancelled, TrainResult, completion_loss, load_base, tokenize, train_task
from trainer.methods.parametrizations import CapacityError

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 =>"
# A trivially learnable mapping: the completion repeats the prompt's first letter.
TASKS = [
    [Example(f"{c}=", c * 4) for c in "abcdefgh"],
    [Example(f"{c}>", c * 3) for c in "stuvwxyz"],
]
HP = Hyperparameters(
    r=4,
    lora_alpha=8,
    steps=30,
    learning_rate=1e-2,
    batch_size=8,
    calibration_steps=5,
    sparsity=0.5,
    mask_fraction=0.3,
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return make_model(len(tokenizer))


def snapshot(model: torch.nn.Module) -> tuple:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {n: p.requires_grad for n, p in model.named_parameters()},
        model.training,
    )


def assert_unchanged(model: torch.nn.Module, before: tuple) -> None:
    state, modules, flags, training = snapshot(model)
    assert modules == before[1], "module tree changed (adapter left behind?)"
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
    assert flags == before[2] and training == before[3]


PROBE = make_tokenizer()("a=bc", return_tensors="pt")["input_ids"]  # (1, 5): <s> a = b c


@dataclass
class Run:
    results: list[TrainResult]
    probe_logits: list[torch.Tensor]  # the trained model's logits on PROBE at the end of each task
    progress: list[list[tuple[int, int, float]]] = field(default_factory=list)


@pytest.fixture(scope="module", params=sorted(PRESETS))
def run(request, model, tokenizer) -> Run:
    """Two tasks in a row with one preset, on one base model (as a worker does)."""
    method = resolve_method(request.param)
    before = snapshot(model)
    out = Run(results=[], probe_logits=[])
    for examples in TASKS:
        calls: list[tuple[int, int, float]] = []

        def progress(step, total, loss, calls=calls):
            calls.append((step, total, loss))
            if step == total:  # `model` is wrapped in place while training: these are the trained logits
                with torch.no_grad():
                    out.probe_logits.append(model(PROBE).logits.clone())

        history = [result.adapter for result in out.results]
        out.results.append(train_task(model, tokenizer, examples, method, HP, history, progress=progress))
        out.progress.append(calls)
        assert_unchanged(model, before)
    return out


def test_loss_drops(run: Run) -> None:
    """A batch is the whole task (8 examples), so the loss has no sampling noise and any steady drop
    is learning. LoRA on this random 2-layer model plateaus near 2.5 nats from ~3.7, a 20–32 % drop
    in 30 steps; 0.8 was too close to that (seq-lora's warm-started second task: 0.82 on an Intel
    Xeon, with the same code that passed on an AMD EPYC)."""
    for result in run.results:
        assert result.metrics["final_loss"] < 0.9 * result.metrics["initial_loss"], result.metrics
        assert result.metrics["steps"] == HP.steps


def test_progress_is_reported_to_the_end(run: Run) -> None:
    for calls, result in zip(run.progress, run.results, strict=True):
        total = HP.steps + result.metrics["calibration_steps"]
        assert [c[0] for c in calls] == sorted(c[0] for c in calls) and calls[-1][:2] == (total, total)
        assert calls[-1][2] == pytest.approx(result.losses[-1])


def test_adapter_shape_names_and_masks(run: Run, model: LlamaForCausalLM) -> None:
    adapter = run.results[0].adapter
    expected = {f"model.layers.{i}.{part}" for i in range(2) for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    )}  # fmt: skip
    assert set(adapter.modules) == expected
    for name, module in adapter.modules.items():
        linear = model.get_submodule(name)
        assert module.A.shape == (HP.r, linear.in_features) and module.B.shape == (linear.out_features, HP.r)
        assert module.A.dtype == module.B.dtype == torch.float32 and module.scale == HP.lora_alpha / HP.r
        if adapter.masks:
            assert (module.B[~adapter.masks[name]] == 0).all()


def reload_logits(model: torch.nn.Module, adapter: LoraAdapter, directory: Path) -> torch.Tensor:
    adapter.save_peft(directory, base_model="tiny-llama")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), directory)
    with torch.no_grad():
        return peft_model(PROBE).logits


def test_saved_adapter_reloads_into_peft_with_the_trained_logits(run: Run, model, tmp_path: Path) -> None:
    logits = reload_logits(model, run.results[0].adapter, tmp_path)  # task 1 trained on the base alone
    torch.testing.assert_close(logits, run.probe_logits[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(model(PROBE).logits, logits, atol=1e-3), "the adapter changed nothing"
    reloaded = LoraAdapter.load_peft(tmp_path)
    assert reloaded.masks.keys() == run.results[0].adapter.masks.keys()


# ---------------------------------------------------------------------------------------------
# Behaviour of particular methods through the loop.


def test_loraf_tasks_share_B_without_overlap(model, tokenizer, tmp_path: Path) -> None:
    method = resolve_method("loraf")
    first = train_task(model, tokenizer, TASKS[0], method, HP, [])
    captured = []

    def progress(step, total, loss):
        if step == total:
            with torch.no_grad():
                captured.append(model(PROBE).logits.clone())

    second = train_task(model, tokenizer, TASKS[1], method, HP, [first.adapter], progress=progress)
    summed = {}
    for name, m1 in first.adapter.modules.items():
        m2, mask1, mask2 = second.adapter.modules[name], first.adapter.masks[name], second.adapter.masks[name]
        assert torch.equal(m1.A, m2.A) and not (mask1 & mask2).any()
        summed[name] = LoraModule(A=m1.A, B=m1.B + m2.B, scale=m1.scale)
    # While training task 2 the model ran on the shared B, which holds task 1's entries too.
    logits = reload_logits(model, LoraAdapter(modules=summed), tmp_path)
    torch.testing.assert_close(logits, captured[0], atol=1e-5, rtol=1e-5)


def test_loraf_capacity_error_before_training(model, tokenizer) -> None:
    hp = HP.model_copy(update={"mask_fraction": 0.6})
    first = train_task(model, tokenizer, TASKS[0], resolve_method("loraf"), hp, [])
    before = snapshot(model)
    with pytest.raises(CapacityError, match="free B positions"):
        train_task(model, tokenizer, TASKS[1], resolve_method("loraf"), hp, [first.adapter])
    assert_unchanged(model, before)


def test_cancel_restores_the_model(model, tokenizer) -> None:
    before = snapshot(model)
    calls = iter(range(100))
    with pytest.raises(TrainingCancelled, match="step 2"):
        train_task(
            model, tokenizer, TASKS[0], resolve_method("lori-s"), HP, [], should_stop=lambda: next(calls) >= 2
        )
    assert_unchanged(model, before)


def test_stack_history_puts_earlier_tasks_in_the_forward_pass(model, tokenizer, tmp_path: Path) -> None:
    first = train_task(model, tokenizer, TASKS[0], resolve_method("inc-lora"), HP, [])
    stacked = resolve_method("inc-lora").model_copy(update={"stack_history": True})
    second = train_task(model, tokenizer, TASKS[0], stacked, HP, [first.adapter])
    # Step 0 of task 2 has B = 0, so its loss is task 1's adapter's loss on the full batch.
    first.adapter.save_peft(tmp_path, base_model="tiny-llama")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    ids, labels = zip(*tokenize(tokenizer, TASKS[0], HP.max_seq_len), strict=True)
    with torch.no_grad():  # all examples of TASKS[0] have the same length: no padding needed
        expected = completion_loss(peft_model(torch.tensor(ids)).logits, torch.tensor(labels))
    assert second.losses[0] == pytest.approx(expected.item(), rel=1e-4)
    assert second.losses[0] < 0.8 * first.losses[0]


def test_tokenize_labels_only_the_completion(tokenizer) -> None:
    [(ids, labels)] = tokenize(tokenizer, [Example("ab=", "cd")], max_seq_len=64)
    assert tokenizer.decode(ids) == "<s>ab=cd</s>"
    assert labels == [-100] * 4 + ids[4:]
    [(ids, labels)] = tokenize(
        tokenizer, [Example("abcdefgh=", "cd")], max_seq_len=5
    )  # prompt cut from the left
    assert tokenizer.decode(ids) == "h=cd</s>" and labels[-3:] == ids[-3:]


def test_load_base_reads_a_saved_model_in_fp32(model, tokenizer, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_base(tmp_path)
    assert not loaded.training and all(p.dtype == torch.float32 for p in loaded.parameters())
    assert loaded_tokenizer("a=bc")["input_ids"] == PROBE[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROBE).logits, model(PROBE).logits)


def test_loraf_grows_the_rank_when_the_store_is_full(model, tokenizer) -> None:
    from adapters_store.merges import build_merge

    hp = HP.model_copy(update={"mask_fraction": 0.6})
    first = train_task(model, tokenizer, TASKS[0], resolve_method("loraf"), hp, [])
    wider = hp.model_copy(update={"r": 2 * hp.r, "lora_alpha": 2 * hp.lora_alpha})  # same scale
    second = train_task(model, tokenizer, TASKS[1], resolve_method("loraf"), wider, [first.adapter])
    expected = {}
    for name, m1 in first.adapter.modules.items():
        m2 = second.adapter.modules[name]
        assert m2.rank == 2 * m1.rank and m2.scale == m1.scale
        assert torch.equal(m2.A[: m1.rank], m1.A), "the old rows of A must stay as they were"
        mask1, mask2 = first.adapter.masks[name], second.adapter.masks[name]
        assert not (mask2[:, : m1.rank] & mask1).any(), "masks stay disjoint after growth"
        assert mask2[:, m1.rank :].any(), "the new columns are where the new task fits"
        expected[name] = m1.delta() + m2.delta()
    merged = build_merge("sum", [first.adapter, second.adapter], None)
    for name, module in merged.modules.items():
        torch.testing.assert_close(module.delta(), expected[name], atol=1e-6, rtol=1e-5)
