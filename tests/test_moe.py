"""LoRA on MoE experts and routers (models/expert_lora.py) against transformers, peft and a per-expert reference
loop, for each MoE family with fused experts; the router's load-balancing loss against transformers'."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

from mft_components.inference.generate import merge_adapter_into
from mft_components.models import build_model
from mft_components.models.expert_lora import ParamLoRA, lora_target_parameters
from mft_components.models.lora import (
    adapter_to_peft_state_dict,
    get_adapter_state_dict,
    lora_target_names,
    merge_lora_weights,
    peft_adapter_config,
    peft_to_adapter_state_dict,
)
from tests.tiny_models import MOE_CONFIGS, make_tiny_model_dir

VOCAB = 128
T = 10
FAMILIES = list(MOE_CONFIGS)
TARGETS = ["q_proj", "experts", "router"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = make_tiny_model_dir(tmp_path_factory.mktemp(family), family, vocab_size=VOCAB)
        return cache[family]

    return get


def _batch(seed=1, rows=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, T), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], 1)
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(T).expand(rows, T).contiguous(),
            "sample_ids": torch.zeros_like(ids)}


def _build(model_dir, targets=TARGETS, **kwargs):
    return build_model(model_dir, method="lora", dtype="fp32", attn_implementation="eager",
                       lora={"rank": 4, "alpha": 8, "target_modules": targets}, **kwargs)


def _randomise_lora_b(model, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b." in name:
                p.normal_(0, 0.2)


def _logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_lora_changes_output_and_peft_loads_it(tiny_dir, tmp_path, family):
    peft = pytest.importorskip("peft")
    model_dir = tiny_dir(family)
    model = _build(model_dir)
    adapted = {n for n, m in model.named_modules() if isinstance(m, ParamLoRA)}
    moe_layers = sum(1 for n, _ in model.named_modules() if n.endswith("mlp.experts"))
    assert moe_layers and len(adapted) == 3 * moe_layers  # gate_up, down and the router in every MoE layer
    ids = _batch()["input_ids"]
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.testing.assert_close(_logits(model.hf_model, ids), _logits(base, ids))  # B == 0: exactly the base
    _randomise_lora_b(model)
    trained = _logits(model.hf_model, ids)
    assert (trained - _logits(base, ids)).abs().max() > 1e-3

    save_file(adapter_to_peft_state_dict(get_adapter_state_dict(model)), str(tmp_path / "adapter_model.safetensors"))
    cfg = peft_adapter_config(model_dir, 4, 8, 0.0, lora_target_names(model),
                              target_parameters=lora_target_parameters(model))
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), trained, rtol=1e-4, atol=1e-4)

    merge_lora_weights(model)
    assert not any(isinstance(m, ParamLoRA) for m in model.modules())
    torch.testing.assert_close(_logits(model.hf_model, ids), trained, rtol=1e-4, atol=1e-4)


def test_peft_round_trip_of_the_expert_layout(tiny_dir):
    model = _build(tiny_dir("mixtral"))
    _randomise_lora_b(model)
    ours = {k.removeprefix("hf_model."): v for k, v in get_adapter_state_dict(model).items()}
    cfg = {"target_parameters": lora_target_parameters(model), "r": 4}
    back = peft_to_adapter_state_dict(adapter_to_peft_state_dict(ours), cfg["target_parameters"], cfg["r"])
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def _reference_expert_grads(experts, hidden, top_k_index, top_k_weights):
    """Per expert, in a Python loop over experts: the tokens routed to it through W + s * B @ A."""
    out = torch.zeros_like(hidden)
    gu, dn = experts.lora["gate_up_proj"], experts.lora["down_proj"]
    w_gu, w_dn = experts._parameters["gate_up_proj"], experts._parameters["down_proj"]
    for e in range(w_gu.shape[0]):
        token, slot = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        x = hidden[token]
        h = F.linear(x, w_gu[e]) + gu.scaling * (x @ gu.lora_a.weight[e].T @ gu.lora_b.weight[e].T)
        gate, up = h.chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        y = F.linear(h, w_dn[e]) + dn.scaling * (h @ dn.lora_a.weight[e].T @ dn.lora_b.weight[e].T)
        out.index_add_(0, token, y * top_k_weights[token, slot, None])
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_expert_gradients_match_a_per_expert_loop(tiny_dir, family):
    model = _build(tiny_dir(family), targets=["experts"])
    _randomise_lora_b(model)
    experts = model.hf_model.model.layers[-1].mlp.experts  # DeepSeek-V3's first layer is dense
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, model.config.hidden_size, generator=g)
    top_k_index = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [1, 0], [1, 0], [0, 1], [1, 0]])
    top_k_weights = torch.rand(9, 2, generator=g)
    params = [p for n, p in experts.named_parameters() if ".lora_" in n]

    ours = experts(hidden, top_k_index, top_k_weights)
    ours_grads = torch.autograd.grad(ours.square().sum(), params)
    ref = _reference_expert_grads(experts, hidden, top_k_index, top_k_weights)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for n, a, b in zip([n for n, _ in experts.named_parameters() if ".lora_" in n], ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
        # experts 2 and 3 got no token: their factors get exactly no gradient
        assert a[2:].abs().max() == 0 and a[:2].abs().max() > 0, n


# ----------------------------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def tokenized_dir(tmp_path_factory, smollm2_dir):
    """MoE bases with the SmolLM2 tokenizer (what `mft export` writes next to the weights)."""
    cache = {}
    vocab = len(transformers.AutoTokenizer.from_pretrained(smollm2_dir))

    def get(family):
        if family not in cache:
            cache[family] = make_tiny_model_dir(tmp_path_factory.mktemp(family), family, vocab_size=vocab,
                                                tokenizer_dir=smollm2_dir)
        return cache[family]

    return get


def _save_adapter(model, model_dir, out):
    out.mkdir(parents=True)
    save_file(adapter_to_peft_state_dict(get_adapter_state_dict(model)), str(out / "adapter_model.safetensors"))
    cfg = peft_adapter_config(model_dir, 4, 8, 0.0, lora_target_names(model),
                              target_parameters=lora_target_parameters(model))
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("family,files", [("mixtral", "per_expert"), ("mixtral", "fused"), ("gpt_oss", "fused")] + [
    pytest.param(f, "as saved", marks=pytest.mark.slow) for f in ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")])
def test_merged_export_equals_trained(tokenized_dir, tmp_path, family, files):
    """Our adapter merged onto the base's files: one tensor per expert (Mixtral as transformers saves it) or fused
    (GPT-OSS, stored [E, in, out])."""
    from mft_components.inference.export import export_adapter

    model_dir = tokenized_dir(family)
    if files == "fused" and family == "mixtral":
        model_dir = _fused_copy(model_dir, tmp_path / "fused_base")
    model = _build(model_dir)
    _randomise_lora_b(model)
    ids = _batch()["input_ids"]
    trained = _logits(model.hf_model, ids)
    adapter = _save_adapter(model, model_dir, tmp_path / "adapter")
    out = export_adapter(adapter, model_dir, tmp_path / "out", dtype="fp32")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(exported, ids), trained, rtol=1e-4, atol=1e-4)
    # mft generate --model BASE --adapter DIR merges it into the loaded model the same way
    loaded = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merge_adapter_into(loaded, adapter)
    torch.testing.assert_close(_logits(loaded, ids), trained, rtol=1e-4, atol=1e-4)


def _fused_copy(model_dir, dest):
    """The same model with its experts fused in the files too (mlp.experts.gate_up_proj, as loaded in memory)."""
    import shutil

    shutil.copytree(model_dir, dest)
    (dest / "model.safetensors").unlink()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dest / "model.safetensors"))
    return dest


@pytest.mark.parametrize("files", ["per_expert", "fused"])
def test_mftcoder_mixtral_adapter_merges_onto_fused_experts(tokenized_dir, tmp_path, files):
    """An MFTCoder (transformers 4) Mixtral adapter on the router and every expert's w1 / w2 / w3 lands in its
    slice of the fused tensors (w1 = gate rows, w3 = up rows of gate_up_proj, w2 = down_proj), whether the base's
    files hold one tensor per expert (as transformers saves Mixtral) or the fused tensors."""
    from mft_components.inference.export import export_adapter

    model_dir = tokenized_dir("mixtral")
    if files == "fused":
        model_dir = _fused_copy(model_dir, tmp_path / "fused_base")
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = base.config
    hidden, inter, r = cfg.hidden_size, cfg.intermediate_size, 4
    g = torch.Generator().manual_seed(5)
    tensors, reference = {}, transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for layer in range(cfg.num_hidden_layers):
            prefix = f"base_model.model.model.layers.{layer}.block_sparse_moe"
            mlp = reference.model.layers[layer].mlp
            shapes = {"w1": (inter, hidden), "w3": (inter, hidden), "w2": (hidden, inter)}
            for e in range(cfg.num_local_experts):
                for w, (out_dim, in_dim) in shapes.items():
                    a, b = torch.randn(r, in_dim, generator=g) * 0.1, torch.randn(out_dim, r, generator=g) * 0.1
                    tensors[f"{prefix}.experts.{e}.{w}.lora_A.weight"] = a
                    tensors[f"{prefix}.experts.{e}.{w}.lora_B.weight"] = b
                    target = {"w1": mlp.experts.gate_up_proj[e, :inter], "w3": mlp.experts.gate_up_proj[e, inter:],
                              "w2": mlp.experts.down_proj[e]}[w]
                    target += 2.0 * (b @ a)
            a, b = torch.randn(r, hidden, generator=g) * 0.1, torch.randn(cfg.num_local_experts, r, generator=g) * 0.1
            tensors[f"{prefix}.gate.lora_A.weight"], tensors[f"{prefix}.gate.lora_B.weight"] = a, b
            mlp.gate.weight += 2.0 * (b @ a)
    adapter = tmp_path / "mftcoder_adapter"
    adapter.mkdir()
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 8, "lora_dropout": 0.05, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate", "w1", "w2", "w3"]}))
    out = export_adapter(adapter, model_dir, tmp_path / "out", dtype="fp32")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = _batch()["input_ids"]
    assert (_logits(reference, ids) - _logits(base, ids)).abs().max() > 1e-3
    torch.testing.assert_close(_logits(exported, ids), _logits(reference, ids), rtol=1e-5, atol=1e-5)
    merge_adapter_into(base, adapter)  # mft generate --model BASE --adapter MFTCODER_DIR: the loaded model is fused
    torch.testing.assert_close(_logits(base, ids), _logits(reference, ids), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ checkpoint / resume

@pytest.mark.slow
def test_recipe_saves_resumes_and_exports_expert_adapters(tmp_path, smollm2_dir):
    """The LoRA recipe on a tiny Mixtral with adapters on the experts and the router: a run resumed from step 2
    reaches step 4's adapter exactly; the checkpoint loads in peft and exports to the same logits."""
    import shutil

    peft = pytest.importorskip("peft")
    from mft_components.inference.export import export_checkpoint
    from mft_components.training import checkpoint as ck
    from tests.test_recipes import LORA_RECIPE, _config, _records, _run, _write_tasks

    vocab = len(transformers.AutoTokenizer.from_pretrained(smollm2_dir))
    model_dir = make_tiny_model_dir(tmp_path / "model", "mixtral", vocab_size=vocab, tokenizer_dir=smollm2_dir)
    assets = {"model_dir": str(model_dir), "data_paths": _write_tasks(tmp_path / "data", n=12)}
    cfg = _config(assets, tmp_path, save_every_n_steps=2, eval_every_n_steps=2,
                  **{"model.lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": TARGETS}})
    _run(LORA_RECIPE, cfg)
    straight, resumed = tmp_path / "out", tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "step_2", resumed / "step_2")
    _run(LORA_RECIPE, cfg, f"output_dir={resumed}", "resume=auto")
    a, b = ck.load_checkpoint_weights(straight / "step_4"), ck.load_checkpoint_weights(resumed / "step_4")
    assert a.keys() == b.keys() and any(".experts.base_layer.lora_A" in k for k in a)
    assert all(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # every adapter trained, experts' and router's
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert [r["step"] for r in _records(resumed, "train")] == [3, 4]

    ids = _batch()["input_ids"]
    config = json.loads((straight / "step_4" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight"]
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with_peft = _logits(peft.PeftModel.from_pretrained(base, straight / "step_4"), ids)
    out = export_checkpoint(straight / "step_4", tmp_path / "export", dtype="fp32")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(exported, ids), with_peft, rtol=1e-4, atol=1e-4)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert (_logits(base, ids) - with_peft).abs().max() > 1e-4  # training moved the experts' adapters


# ---------------------------------------------------------------------------------------------- router loss

@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "gpt_oss"])
def test_router_aux_loss_is_transformers_over_real_tokens(tiny_dir, family):
    """MFTModel's load-balancing loss over the real tokens of a padded batch = transformers' own aux_loss
    (load_balancing_loss_func with the attention mask) of the same model."""
    model_dir = tiny_dir(family)
    model = _build(model_dir)
    _randomise_lora_b(model)
    batch = _batch()
    real = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    real[1, 6:] = False  # row 1 ends in padding
    batch["sample_ids"] = torch.where(real, 0, -1)
    batch["labels"] = batch["labels"].masked_fill(~real, -100)
    with torch.no_grad():
        _, aux = model(batch)
        ref = model.hf_model(input_ids=batch["input_ids"], attention_mask=real.long(), output_router_logits=True)
    assert ref.aux_loss is not None
    torch.testing.assert_close(aux, ref.aux_loss.float(), rtol=1e-5, atol=1e-6)


def test_router_aux_loss_coef_defaults_to_the_model_config():
    from mft_components.loss.task_weighted import TaskWeightedLoss

    config = MOE_CONFIGS["olmoe"](VOCAB)  # router_aux_loss_coef 0.01
    unset = TaskWeightedLoss()
    assert "model config's" in unset.resolve_router_aux_loss_coef(config, moe=True)
    assert unset.router_aux_loss_coef == config.router_aux_loss_coef == 0.01
    off = TaskWeightedLoss(router_aux_loss_coef=0)
    off.resolve_router_aux_loss_coef(config, moe=True)
    assert off.router_aux_loss_coef == 0.0
    dense = TaskWeightedLoss()
    dense.resolve_router_aux_loss_coef(config, moe=False)
    assert dense.router_aux_loss_coef == 0.0
    with pytest.raises(ValueError, match="loss.router_aux_loss_coef: expected a non-negative number"):
        TaskWeightedLoss(router_aux_loss_coef=-1)


@pytest.mark.parametrize("targets", [None, "[q_proj,k_proj,v_proj,o_proj,gate,w1,w2,w3]"])
def test_mftcoder_import_of_a_mixtral_config_says_what_the_adapter_covers(tmp_path, targets):
    from mft_components.interop import mftcoder

    src = tmp_path / "lora_mixtral.json"
    src.write_text(json.dumps({"data_paths": "[a,b]", "output_dir": "o", "pretrained_model_path": "m",
                               "model_type": "mixtral", "peft_type": "lora", "target_modules": targets}))
    result, _ = mftcoder.import_mftcoder(src)
    text = mftcoder.report(result, "out.yaml")
    assert "router_aux_loss_coef" not in result.config.get("loss", {})  # null: the model config's, as MFTCoder
    if targets is None:
        assert result.config["model"]["lora"]["target_modules"] == "all-linear"
        assert "all-linear covers attention, the routed experts" in text
    else:
        assert "w1 and w3 adapt the fused experts' gate_up_proj" in text


# ---------------------------------------------------------------------------------------------------- QLoRA

@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_nf4_experts_close_to_bf16_and_adapters_train(tiny_dir, family):
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    model_dir = tiny_dir(family)
    batch = _batch()
    lora = {"rank": 4, "alpha": 8, "target_modules": TARGETS}
    bf16 = build_model(model_dir, method="lora", dtype="bf16", attn_implementation="eager", lora=lora)
    qlora = build_model(model_dir, method="qlora", dtype="bf16", attn_implementation="eager", lora=lora)
    experts = qlora.hf_model.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, NF4Tensor) and experts.gate_up_proj.shape == (4 * 128, 64)
    with torch.no_grad():
        ref, _ = bf16(batch)
        ours, _ = qlora(batch)
    # NF4 error: a few percent of the per-token loss of a random model, as for dense QLoRA (tests/test_models.py)
    assert (ours.float().mean() - ref.float().mean()).abs() < 0.05 * ref.float().mean()
    _randomise_lora_b(qlora)
    losses, aux = qlora(batch)
    (losses.mean() + aux).backward()
    grads = {n: p.grad for n, p in qlora.named_parameters() if p.requires_grad}
    assert any(".experts.lora." in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    # the merged (dequantised) model computes what the QLoRA model computes
    with torch.no_grad():
        before, _ = qlora(batch)
        merge_lora_weights(qlora.hf_model)
        after, _ = qlora(batch)
    torch.testing.assert_close(after.float(), before.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_fsdp2_expert_adapters_match_single_process(tmp_path):
    """Expert and router adapters (plain and over NF4 experts) sharded by FSDP2 over 2 ranks: the loss, every
    adapter gradient and the gathered adapter equal one process's."""
    from pathlib import Path

    from tests.conftest import run_torchrun

    model_dir = make_tiny_model_dir(tmp_path / "mixtral", "mixtral", vocab_size=1024)
    script = Path(__file__).parent / "dist" / "fsdp_model_check.py"
    proc = run_torchrun(script, f"{model_dir}=lora:experts,qlora:experts")
    for spec in ("lora:experts", "qlora:experts"):
        assert f"OK {model_dir} {spec}" in proc.stdout


def test_router_aux_loss_of_a_padding_only_micro_batch_is_zero():
    """A rank's micro-batch can be all padding: its load-balancing loss is 0 with a finite gradient, not NaN."""
    from mft_components.models.moe import router_aux_loss

    logits = torch.randn(2, 6, 4, requires_grad=True)
    aux = router_aux_loss((logits,), 4, 2, torch.zeros(2, 6, dtype=torch.bool))
    aux.backward()
    assert aux.item() == 0 and torch.isfinite(logits.grad).all()


def test_expert_targets_on_a_dense_model_are_a_config_error(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "llama", "llama", vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"\['experts'\] name MoE experts / routers, but LlamaForCausalLM is not"):
        build_model(model_dir, method="lora", dtype="fp32", lora={"target_modules": ["q_proj", "experts"]})


def test_shipped_mixtral_config_adapts_experts_and_router(tiny_dir):
    import yaml

    from mft_components.config.registry import configs_dir
    from mft_components.models.build import build_meta_model

    cfg = yaml.safe_load((configs_dir() / "mixtral_qlora.yaml").read_text())
    model, lora = build_meta_model(tiny_dir("mixtral"), cfg["model"]["method"], cfg["model"]["lora"], "bf16")
    adapted = {n.split(".lora.")[-1] for n, m in model.named_modules() if isinstance(m, ParamLoRA)}
    assert adapted == {"gate_up_proj", "down_proj", "weight"}


def test_persistent_buffers_load_from_the_checkpoint(tmp_path):
    """DeepSeek-V3's router keeps e_score_correction_bias as a buffer: it is read from the checkpoint (a wrong
    one changes which experts are chosen), not left at its constructor's zeros."""
    from safetensors.torch import load_file

    model_dir = make_tiny_model_dir(tmp_path / "ds", "deepseek_v3", vocab_size=VOCAB)
    weights = load_file(model_dir / "model.safetensors")
    key = next(k for k in weights if k.endswith("e_score_correction_bias"))
    weights[key] = torch.tensor([3.0, -3.0, 3.0, -3.0])
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    model = build_model(model_dir, method="full", dtype="fp32", attn_implementation="eager")
    torch.testing.assert_close(model.hf_model.get_buffer(key), weights[key])
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = _batch()["input_ids"]
    torch.testing.assert_close(_logits(model.hf_model, ids), _logits(ref, ids))
