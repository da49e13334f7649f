"""Generation for code evaluation: the in-training model (LoRA not merged, packed-training attention, train mode)
gives the same greedy tokens as its `mft export` and as a plain greedy loop; under FSDP2 on 2 ranks, the same
answers as one process, with every verdict gathered, also when one rank's programs run for longer than the
process group's timeout."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from mft_components.training import checkpoint as ck
from mft_components.models.attention import kv_cache_attention
from mft_components.code_eval.generation import generate_batched
from mft_components.export import export_checkpoint
from mft_components.generate import load_generation_model
from mft_components.models import build_model
from mft_components.data.templates import ChatFormat
from tests.conftest import REPO_ROOT, run_torchrun
from tests.test_export import train_and_save
from tests.test_generate import greedy_reference
from tests.tiny_models import make_tiny_model_dir

QUESTIONS = ["Sum a list.", "Reverse the string s, keeping its case and every character.", "Sort."]


@pytest.fixture(scope="module")
def base(tmp_path_factory, smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    root = tmp_path_factory.mktemp("gen")
    return make_tiny_model_dir(root / "base", family="llama", vocab_size=len(tok), tokenizer_dir=smollm2_dir, seed=3)


def test_in_training_model_generates_what_its_export_generates(base, tmp_path):
    tok = AutoTokenizer.from_pretrained(base)
    ckpt, _ = train_and_save(base, tmp_path / "run", "lora", seed=1)
    # The training model as the recipe has it: sdpa_varlen (no KV cache support), train mode, adapter unmerged.
    model = build_model(str(base), method="lora", dtype="fp32", attn_implementation="sdpa_varlen",
                        lora=ck.read_checkpoint_meta(ckpt)["lora"])
    ck.load_adapter(model, ckpt)
    model.train()
    prompts = [ChatFormat().prompt_ids([{"role": "user", "content": q}], tok) for q in QUESTIONS]
    kwargs = dict(eos_token_id=tok.eos_token_id, max_new_tokens=10, batch_size=2)
    threads = torch.get_num_threads()
    in_training = [g.new_ids for g in generate_batched(model, prompts, **kwargs)]
    # train mode, the training attention and torch's threads (generation decodes on one) are back
    assert model.training and model.config._attn_implementation == "sdpa_varlen"
    assert torch.get_num_threads() == threads

    exported = load_generation_model(export_checkpoint(ckpt, tmp_path / "out", dtype="fp32"))
    assert [g.new_ids for g in generate_batched(exported.model, prompts, **kwargs)] == in_training
    # ... and what a plain greedy loop of full forwards (no cache, no padding) over the trained weights picks.
    model.eval()
    with kv_cache_attention(model.config):  # the plain HF forward needs a mask-based attention
        assert [greedy_reference(model.hf_model, p, 10) for p in prompts] == in_training
    assert len({tuple(a) for a in in_training}) == 3 and all(len(a) == 10 for a in in_training)


@pytest.mark.slow
def test_fsdp_ranks_stay_in_step_and_gather(base, tmp_path):
    eval_file = tmp_path / "t.jsonl"
    eval_file.write_text("".join(json.dumps({"prompt": q, "test": "assert True"}) + "\n" for q in QUESTIONS))
    proc = run_torchrun(REPO_ROOT / "tests" / "dist" / "code_eval_check.py", base, eval_file)
    assert "OK" in proc.stdout


def test_generation_replaces_training_attentions_that_cannot_decode_fast():
    """mft's packed attentions and flex_attention (unfused in generation's eager layers) decode with sdpa, or with
    eager where the model softcaps attention logits (sdpa would drop the softcap); others run as trained."""
    import transformers

    cases = [(transformers.LlamaConfig(), "sdpa_varlen", "sdpa"), (transformers.LlamaConfig(), "varlen_attn", "sdpa"),
             (transformers.LlamaConfig(), "flex_attention", "sdpa"), (transformers.LlamaConfig(), "eager", "eager"),
             (transformers.Gemma2Config(), "flex_attention", "eager"), (transformers.Gemma2Config(), "sdpa_varlen", "eager")]
    for config, trained, generating in cases:
        config._attn_implementation = trained
        with kv_cache_attention(config):
            assert config._attn_implementation == generating, (type(config).__name__, trained)
        assert config._attn_implementation == trained
