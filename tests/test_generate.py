"""`mft generate`: the prompt is the training prompt, decoding is the trained model's, and it stops at the EOS.

The reference is a plain greedy loop (full forward, argmax) over the TRAINED model on `ChatFormat.prompt_ids`.
A random tiny model never chooses the real EOS, so the checkpoint declares the k-th token of its greedy answer
the training EOS: generation must then stop right before it, whichever way the model was loaded.
"""

from __future__ import annotations

import argparse
import io
import json

import pytest
import torch
from transformers import AutoTokenizer

from mft_components import generate as gen
from mft_components.export import export_checkpoint
from mft_components.generate import GenerateError, generate, load_generation_model
from mft_components.data.templates import ChatFormat
from tests.test_export import train_and_save
from tests.tiny_models import make_tiny_model_dir

SYSTEM = "You write SQL."
PROMPT = "Count the rows of table t."
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
N_REF = 12


@torch.no_grad()
def greedy_reference(model, prompt_ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    for _ in range(n):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("generate")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    base = make_tiny_model_dir(root / "base", family="llama", vocab_size=len(tok), tokenizer_dir=smollm2_dir, seed=3)
    ck, model = train_and_save(base, root / "run", "lora", seed=1)
    prompt_ids = ChatFormat().prompt_ids(MESSAGES, tok)
    ref = greedy_reference(model.hf_model, prompt_ids, N_REF)
    # A token from the middle of the answer, not seen earlier in it, becomes the training EOS.
    k = next((i for i in [*range(N_REF // 2, N_REF), *range(1, N_REF // 2)] if ref[i] not in ref[:i]), 0)
    meta = json.loads((ck / "mft_checkpoint.json").read_text())
    meta["eos_token"] = tok.convert_ids_to_tokens(ref[k])
    (ck / "mft_checkpoint.json").write_text(json.dumps(meta))
    out = export_checkpoint(ck, root / "out", dtype="fp32")
    return dict(base=base, ck=ck, out=out, tok=tok, prompt_ids=prompt_ids, ref=ref, k=k)


def test_exported_dir_uses_training_prompt_and_stops_at_eos(trained):
    tok, k, ref = trained["tok"], trained["k"], trained["ref"]
    gm = load_generation_model(trained["out"])
    assert gm.eos_token_id == ref[k]
    g = generate(gm, PROMPT, system=SYSTEM, greedy=True, max_new_tokens=N_REF)
    assert g.prompt_ids == trained["prompt_ids"]
    # The exported chat template gives the same prompt (what other serving stacks will send).
    assert g.prompt_ids == list(gm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                                 return_dict=False))
    assert g.new_ids == ref[:k] and g.finished
    assert g.text == tok.decode(ref[:k])


@pytest.mark.parametrize("adapter", ["ck", "out/adapter"])
def test_base_plus_adapter_matches(trained, adapter):
    adapter_dir = trained["ck"] if adapter == "ck" else trained["out"] / "adapter"
    gm = load_generation_model(trained["base"], adapter=adapter_dir)
    g = generate(gm, MESSAGES, greedy=True, max_new_tokens=N_REF)
    assert g.prompt_ids == trained["prompt_ids"]
    assert g.new_ids == trained["ref"][: trained["k"]] and g.finished


def test_budget_exhausted_without_eos(trained):
    gm = load_generation_model(trained["out"])
    g = generate(gm, MESSAGES, greedy=True, max_new_tokens=trained["k"])
    assert g.new_ids == trained["ref"][: trained["k"]] and not g.finished
    # Sampling: seeded runs repeat and respect the budget.
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(generate(gm, MESSAGES, temperature=0.8, top_p=0.9, max_new_tokens=5).new_ids)
    assert runs[0] == runs[1] and len(runs[0]) <= 5


def test_decodes_with_torchs_threads(trained):
    """`mft generate` decodes on the threads torch has (all cores by default), not on the one thread that code
    evaluation inside training uses by default (``eval.code.cpu_threads``, measured on shared cores)."""
    gm = load_generation_model(trained["out"])
    seen = []
    hook = gm.model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generate(gm, MESSAGES, greedy=True, max_new_tokens=2)
    finally:
        torch.set_num_threads(before)
        hook.remove()
    assert seen and set(seen) == {2}


def _parser():
    parser = argparse.ArgumentParser()
    gen.add_arguments(parser)
    return parser


def test_cli_prompt_and_jsonl(trained, tmp_path, capsys):
    expected = trained["tok"].decode(trained["ref"][: trained["k"]])
    args = _parser().parse_args(["--model", str(trained["out"]), "--prompt", PROMPT, "--system", SYSTEM, "--greedy",
                                 "--max-new-tokens", str(N_REF)])
    assert gen.run(args) == 0
    assert capsys.readouterr().out == expected + "\n"

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": 1, "prompt": PROMPT, "system": SYSTEM}) + "\n\n"
                       + json.dumps({"id": 2, "messages": MESSAGES}) + "\n")
    out = tmp_path / "answers.jsonl"
    args = _parser().parse_args(["--model", str(trained["base"]), "--adapter", str(trained["ck"]), "--file",
                                 str(prompts), "--output", str(out), "--greedy", "--max-new-tokens", str(N_REF)])
    assert gen.run(args) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["id"] for a in answers] == [1, 2]
    assert all(a["response"] == expected for a in answers)


def test_errors(trained, tmp_path, capsys):
    with pytest.raises(GenerateError, match="no training chat format"):
        load_generation_model(trained["base"])  # a plain base model: which template? refuse to guess
    with pytest.raises(GenerateError, match="--adapter .*no adapter_config.json"):
        load_generation_model(trained["base"], adapter=trained["base"])
    with pytest.raises(GenerateError, match="already merged"):
        load_generation_model(trained["out"], adapter=trained["ck"])
    with pytest.raises(GenerateError, match="--model .*does not exist"):
        load_generation_model(tmp_path / "nowhere")
    # A fallback format (mft eval --template) is for a model without a training one, not for a damaged one.
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(trained["out"], damaged)
    (damaged / "mft_chat_format.json").write_text('{"chat_format": ')
    with pytest.raises(GenerateError, match="mft_chat_format.json: not valid JSON"):
        load_generation_model(damaged, default_chat_format={"template": "hf"})
    gm = load_generation_model(trained["out"])
    with pytest.raises(GenerateError, match="must end with a user turn"):
        generate(gm, MESSAGES + [{"role": "assistant", "content": "x"}])
    with pytest.raises(GenerateError, match="message 0"):
        generate(gm, [{"role": "human", "content": "hi"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + "{not json\n")
    with pytest.raises(GenerateError, match=r"bad.jsonl:2: invalid JSON"):
        gen.read_prompt_file(bad)
    bad.write_text(json.dumps({"text": "no prompt"}) + "\n")
    args = _parser().parse_args(["--model", str(trained["out"]), "--file", str(bad)])
    assert gen.run(args) == 2
    assert "bad.jsonl:1: expected an object with 'prompt'" in capsys.readouterr().err


_EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("the model's own code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


class EvilConfig(LlamaConfig):
    model_type = "mft_evil"


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
'''


def test_remote_code_runs_only_when_trusted(trained, tmp_path, monkeypatch, capsys):
    """A model and a tokenizer that ship Python code (auto_map): `mft generate` and `mft export` refuse them with a
    message naming --trust-remote-code, never ask (a "y" on stdin changes nothing) and run none of it."""
    import shutil

    import cli

    marker = tmp_path / "RAN"
    model = tmp_path / "evil_model"
    shutil.copytree(trained["out"], model)
    (model / "evil.py").write_text(_EVIL.format(marker=str(marker)))
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="mft_evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"})
    (model / "config.json").write_text(json.dumps(config))
    tokenizer = tmp_path / "evil_tokenizer"
    shutil.copytree(trained["base"], tokenizer, ignore=shutil.ignore_patterns("*.safetensors"))
    (tokenizer / "evil.py").write_text(_EVIL.format(marker=str(marker)))
    tok_config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    tok_config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(tok_config))
    ck = tmp_path / "run" / "step_7"
    shutil.copytree(trained["ck"], ck)
    meta = json.loads((ck / "mft_checkpoint.json").read_text())
    (ck / "mft_checkpoint.json").write_text(json.dumps({**meta, "config": {"tokenizer": {"path": str(tokenizer)}}}))

    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))  # what a user typing "y" at a prompt would send
    assert cli.main(["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{model}: the model ships its own Python code" in err and "--trust-remote-code" in err
    assert cli.main(["export", str(ck), "--output", str(tmp_path / "out")]) == 2
    out = capsys.readouterr()
    assert f"{tokenizer}: the tokenizer ships its own Python code" in out.err and "--trust-remote-code" in out.err
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert "Do you wish to run the custom code" not in out.out + out.err
    # `mft eval` refuses the model the same way, and the option its message names exists there: trusted, it runs.
    evalset = tmp_path / "e.jsonl"
    evalset.write_text(json.dumps({"prompt": "p", "test": "assert True"}) + "\n")
    argv = ["eval", "--model", str(model), "--suite", str(evalset), "--isolation", "process", "--max-new-tokens", "1",
            "--output", str(tmp_path / "answers.jsonl")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{model}: the model ships its own Python code" in err and "--trust-remote-code" in err
    assert not marker.exists()
    assert cli.main(argv + ["--trust-remote-code"]) == 0
    assert marker.exists()
