"""loss/preference.py against TRL (1.16): the same pairs through mft's packed rows and TRL's padded batches.

dpo, ipo, rpo: TRL's ``DPOTrainer.compute_loss`` (loss_type sigmoid, ipo, [sigmoid, sft]) with a separately
loaded reference model. orpo, simpo: TRL's ``ORPOTrainer.odds_ratio_loss`` and ``CPOTrainer.cpo_loss`` on log-probs
from TRL's ``get_batch_logps`` of transformers' logits. Answers of equal length within a batch where TRL takes a
batch token mean (rpo's and orpo's NLL; module docstring of loss/preference.py).
"""

from __future__ import annotations

import types

import pytest
import torch
import transformers

from mft_components.data.preference import collate_pairs, pair_from_ids
from mft_components.loss.preference import PreferenceLoss, pair_logps
from mft_components.models import build_model, prepare_batch
from tests.tiny_models import make_tiny_model_dir

trl = pytest.importorskip("trl")

VOCAB = 512


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref_loss")
    return {"policy": make_tiny_model_dir(root / "policy", vocab_size=VOCAB, seed=1),
            "reference": make_tiny_model_dir(root / "reference", vocab_size=VOCAB, seed=2)}


def _examples(equal_chosen: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()
    lengths = [(5, 4, 6), (3, 4, 2), (7, 4, 5), (4, 4, 3)]
    return [{"prompt_ids": ids(p), "chosen_ids": ids(c if equal_chosen else c + i), "rejected_ids": ids(r)}
            for i, (p, c, r) in enumerate(lengths)]


def _mft_loss(models, examples, **loss_kwargs) -> torch.Tensor:
    """mft's loss of all pairs in one packed row (sample mode: the mean over pairs, as TRL's batch mean)."""
    pairs = [pair_from_ids(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], index=i)
             for i, e in enumerate(examples)]
    batch = collate_pairs([pairs], pad_to=128)
    loss_fn = PreferenceLoss(mode="sample", **loss_kwargs)
    loss_fn.setup(["t"])
    counts = loss_fn.step_counts([batch])
    policy = build_model(models["policy"], method="full", dtype="fp32")
    prepared = prepare_batch(batch, torch.device("cpu"), policy.config)
    ref = None
    if loss_fn.needs_reference:
        with torch.no_grad():
            reference = build_model(models["reference"], method="full", dtype="fp32")
            ref = pair_logps(reference(prepared, projection_dtype="float32")[0], prepared)[0]
    token_losses, _ = policy(prepared, projection_dtype="float32")
    return loss_fn(token_losses, prepared, counts, ref_logps=ref).detach()


def _trl_dpo_loss(models, examples, tmp_path, **config) -> torch.Tensor:
    from datasets import Dataset

    policy = transformers.AutoModelForCausalLM.from_pretrained(models["policy"], dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(models["reference"], dtype=torch.float32)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=__import__("tokenizers").Tokenizer(__import__("tokenizers").models.WordLevel(
            {f"t{i}": i for i in range(VOCAB)}, unk_token="t0")), pad_token="t0", eos_token="t2")
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", per_device_train_batch_size=len(examples),
                         use_cpu=True, bf16=False, max_length=None, **config)
    data = Dataset.from_list([{"prompt": "t3", "chosen": "t4", "rejected": "t5"}])
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data,
                             processing_class=tokenizer)
    inputs = trainer.data_collator(examples)
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, inputs).detach()


@pytest.mark.parametrize("mft, trl_config, equal", [
    ({"preference": "dpo", "beta": 0.1}, {"beta": 0.1, "loss_type": ["sigmoid"]}, False),
    ({"preference": "ipo", "beta": 0.5}, {"beta": 0.5, "loss_type": ["ipo"]}, False),
    ({"preference": "rpo", "beta": 0.2, "rpo_alpha": 0.7},
     {"beta": 0.2, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7]}, True),
])
def test_dpo_family_equals_trl(models, tmp_path, mft, trl_config, equal):
    examples = _examples(equal_chosen=equal)
    ours = _mft_loss(models, examples, **mft)
    theirs = _trl_dpo_loss(models, examples, tmp_path, **trl_config)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)


def _trl_logps(models, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's average answer log-probs (chosen, rejected) from transformers' logits of TRL's padded batch."""
    from trl.experimental.orpo import ORPOTrainer

    inputs = trl.trainer.dpo_trainer.DataCollatorForPreference(pad_token_id=0)(examples)
    model = transformers.AutoModelForCausalLM.from_pretrained(models["policy"], dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    return logps.chunk(2)


def test_orpo_equals_trl(models):
    from trl.experimental.orpo import ORPOTrainer

    examples = _examples(equal_chosen=True)
    chosen, rejected = _trl_logps(models, examples)
    trainer = types.SimpleNamespace(beta=0.25, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    ratio_losses = ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)[0]
    # TRL's NLL covers prompt + answer; mft's (as SFT's) the answer only: the answer's token-mean NLL here
    theirs = -chosen.mean() - ratio_losses.mean()
    torch.testing.assert_close(_mft_loss(models, examples, preference="orpo", beta=0.25), theirs, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_equals_trl_cpo(models, label_smoothing):
    from trl.experimental.cpo import CPOTrainer

    examples = _examples(equal_chosen=False)
    chosen, rejected = _trl_logps(models, examples)
    trainer = types.SimpleNamespace(beta=2.0, simpo_gamma=0.8, label_smoothing=label_smoothing, alpha=0.0,
                                    loss_type="simpo", accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    theirs = CPOTrainer.cpo_loss(trainer, chosen, rejected)[0].mean()  # cpo_alpha 0: SimPO without the NLL
    ours = _mft_loss(models, examples, preference="simpo", beta=2.0, gamma=0.8, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_dpo_label_smoothing_is_cdpo():
    """cDPO (MFTCoder's TRL): (1 - ls) * -logsig(beta h) + ls * -logsig(-beta h), by hand."""
    from mft_components.loss.preference import pair_losses

    logps = torch.tensor([[-3.0, -5.0], [-4.0, -2.0]])
    ref = torch.tensor([[-3.5, -4.0], [-4.2, -2.5]])
    losses, _ = pair_losses("dpo", logps, torch.ones(2, 2), ref, beta=0.3, label_smoothing=0.2)
    h = (logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1])
    expected = -0.8 * torch.nn.functional.logsigmoid(0.3 * h) - 0.2 * torch.nn.functional.logsigmoid(-0.3 * h)
    torch.testing.assert_close(losses, expected)


@pytest.mark.parametrize("kwargs, key", [({"preference": "kto"}, "loss.preference"), ({"mode": "token"}, "loss.mode"),
                                          ({"beta": 0}, "loss.beta"), ({"label_smoothing": 0.6}, "label_smoothing"),
                                          ({"preference": "ipo", "label_smoothing": 0.1}, "label_smoothing")])
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        PreferenceLoss(**kwargs)


def test_task_reduction_weights():
    """task mode: sum_t w_t * mean_{p in t} l_p / W over the tasks present; sample mode: mean over pairs."""
    loss = PreferenceLoss(mode="task", task_weights={"a": 1.0, "b": 3.0, "c": 5.0})
    loss.setup(["a", "b", "c"])
    tasks = torch.tensor([0, 0, 1, 0])
    coef = loss.pair_coefficients(tasks, torch.tensor([3, 1, 0]))  # c is absent: its weight does not count
    torch.testing.assert_close(coef, torch.tensor([1 / 12, 1 / 12, 0.75, 1 / 12], dtype=torch.float64))
    loss.mode = "sample"
    torch.testing.assert_close(loss.pair_coefficients(tasks, torch.tensor([3, 1, 0])),
                               torch.full((4,), 0.25, dtype=torch.float64))
