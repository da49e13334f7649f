"""build_model against transformers' own from_pretrained, peft, and the LoRA invariants, for every tiny family."""

import importlib.util
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

from mft_components.models.lora import (
    LoRALinear,
    adapter_to_peft_state_dict,
    get_adapter_state_dict,
    lora_target_names,
    merge_lora_weights,
    peft_adapter_config,
)
from mft_components.models import DEFAULT_LORA_TARGETS, build_model, load_tokenizer
from tests.tiny_models import MOE_FAMILIES, TINY_CONFIGS, make_tiny_model_dir
from tests.tolerances import assert_close_rounding

VOCAB = 1024
T = 12


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    cache = {}

    def get(family, **kwargs):
        key = (family, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = make_tiny_model_dir(tmp_path_factory.mktemp(family), family, vocab_size=VOCAB, **kwargs)
        return cache[key]

    return get


def _batch(seed=1, rows=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, T), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], 1)
    labels[0, :3] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(T).expand(rows, T).contiguous(),
            "sample_ids": torch.zeros_like(ids)}


def _reference_losses(hf_model, batch):
    logits = hf_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    flat = batch["labels"].reshape(-1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, reduction="none")[flat != -100]


def _randomise_lora_b(model, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b." in name:
                p.normal_(0, 0.2)


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_family_matches_transformers_and_lora_init_is_exact(tiny_dir, family):
    model_dir = tiny_dir(family)
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = _batch()
    with torch.no_grad():
        expected = _reference_losses(ref, batch)
        full, _ = build_model(model_dir, method="full", dtype="fp32")(batch)
        lora_model = build_model(model_dir, method="lora", dtype="fp32")
        lora, aux = lora_model(batch)
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(lora, full)  # lora_b == 0: exactly the base
    assert (aux is not None) == (family in MOE_FAMILIES)
    targets = lora_target_names(lora_model)
    assert targets and set(targets) <= set(DEFAULT_LORA_TARGETS[lora_model.config.model_type])


def test_one_step_changes_only_lora(tiny_dir):
    model = build_model(tiny_dir("qwen2"), method="lora", dtype="fp32", lora={"rank": 4, "alpha": 8})
    _randomise_lora_b(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses, _ = model(_batch())
    losses.mean().backward()
    opt.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (".lora_a." in name or ".lora_b." in name), name


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt_neox"])
def test_qlora_close_to_bf16_and_grads_reach_adapters(tiny_dir, family):
    model_dir = tiny_dir(family)
    batch = _batch()
    with torch.no_grad():
        bf16, _ = build_model(model_dir, method="lora", dtype="bf16")(batch)
    qlora = build_model(model_dir, method="qlora", dtype="bf16")
    layer_linears = [m for n, m in qlora.decoder_layers().named_modules() if "lora_" not in n
                     and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]
    assert layer_linears and all(isinstance(m.weight, NF4Tensor) for m in layer_linears)
    assert not isinstance(qlora.hf_model.get_output_embeddings().weight, NF4Tensor)
    _randomise_lora_b(qlora)
    losses, _ = qlora(batch)
    # NF4 error: a few percent of the per-token loss of a random model (measured ~1-2%)
    assert (losses.float().mean() - bf16.float().mean()).abs() < 0.05 * bf16.float().mean()
    losses.mean().backward()
    grads = {n: p.grad for n, p in qlora.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merge_equals_unmerged(tiny_dir, method):
    model = build_model(tiny_dir("qwen3"), method=method, dtype="fp32", lora={"target_modules": "all-linear"})
    _randomise_lora_b(model)
    batch = _batch()
    with torch.no_grad():
        unmerged, _ = model(batch)
        merge_lora_weights(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        merged, _ = model(batch)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_peft_loads_our_adapter(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model_dir = tiny_dir("mistral")
    lora = {"rank": 4, "alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    model = build_model(model_dir, method="lora", dtype="fp32", lora=lora)
    _randomise_lora_b(model)
    batch = _batch()
    with torch.no_grad():
        ours, _ = model(batch)
    save_file(adapter_to_peft_state_dict(get_adapter_state_dict(model)), str(tmp_path / "adapter_model.safetensors"))
    cfg = peft_adapter_config(model_dir, 4, 8, 0.0, lora_target_names(model), use_rslora=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        theirs = _reference_losses(peft_model, batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint_and_packed_mask(tiny_dir):
    sharded = tiny_dir("llama", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    single = tiny_dir("llama")
    batch = _batch()
    with torch.no_grad():
        a, _ = build_model(sharded, method="full", dtype="fp32")(batch)
        model = build_model(single, method="full", dtype="fp32", attn_implementation="sdpa")  # takes a 4-D mask
        b, _ = model(batch)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        # A packed row (two samples, positions restart, block-diagonal causal mask) == the samples one by one.
        ids = batch["input_ids"][0]
        split = 5
        pos = torch.cat([torch.arange(split), torch.arange(T - split)])
        labels = torch.cat([ids[1:split], torch.tensor([-100]), ids[split + 1:], torch.tensor([-100])])
        seg = torch.cat([torch.zeros(split), torch.ones(T - split)])
        mask = (seg[:, None] == seg[None, :]) & torch.ones(T, T).tril().bool()
        packed, _ = model({"input_ids": ids[None], "labels": labels[None], "position_ids": pos[None],
                           "attention_mask": mask[None, None]})
        alone = [model({"input_ids": ids[None, s], "labels": labels[None, s], "position_ids": pos[None, s]})[0]
                 for s in (slice(0, split), slice(split, T))]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_bf16_defaults_and_errors(tiny_dir, tmp_path, capsys):
    model = build_model(tiny_dir("gemma"))  # lora, bf16, default targets
    assert "trainable params" in capsys.readouterr().out
    assert model.hf_model.get_input_embeddings().weight.dtype == torch.bfloat16
    # tied embeddings stay tied
    assert model.hf_model.get_input_embeddings().weight is model.hf_model.get_output_embeddings().weight
    with pytest.raises(ValueError, match="model.method"):
        build_model(tiny_dir("gemma"), method="dora")
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        build_model(tiny_dir("gemma"), lora={"target_modules": ["nope"]})
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_model(tmp_path)


def test_load_tokenizer(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    assert tok("def f(): pass")["input_ids"]


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compile_matches_eager_across_packings(tmp_path):
    """compile=True compiles norms and MLPs only: same losses and LoRA gradients as eager for differently packed
    micro-batches (sdpa_varlen's per-sample lengths change every time), without recompiling per packing."""
    import numpy as np
    import torch._dynamo

    from mft_components.data.dataset import Sample
    from mft_components.models.parallelize import compile_layers
    from mft_components.data.packing import collate, pack_samples

    model_dir = make_tiny_model_dir(tmp_path / "m", family="llama", vocab_size=VOCAB)
    rng = np.random.default_rng(0)
    batches = []
    for lengths in ([9, 5, 13, 3], [7, 2, 11, 4, 16], [6, 6, 6]):
        samples = [Sample(rng.integers(0, VOCAB, n).astype(np.int32), rng.random(n) < 0.7, i % 2)
                   for i, n in enumerate(lengths)]
        batches.append(collate([[samples[i] for i in r] for r in pack_samples(samples, 16)], pad_to=16))
    lora = {"rank": 4, "alpha": 8, "target_modules": "all-linear"}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counters of earlier tests' compilations
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(model_dir, method="lora", lora=lora, dtype="fp32", attn_implementation="sdpa_varlen")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_b" in name:
                    p.normal_(0, 0.02)
        if compiled:
            assert compile_layers(model) == ["input_layernorm", "mlp", "post_attention_layernorm"]
        losses, grads = [], []
        for batch in batches:
            token_losses, _ = model(batch)
            token_losses.sum().backward()
            losses.append(token_losses.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            model.zero_grad(set_to_none=True)
        runs[compiled] = (losses, grads)
    _assert_same(list(zip(*runs[True])), list(zip(*runs[False])))
    assert all(grad for grad in runs[True][1])
    # Frames compiled: 3 children x (layer 0 whose input needs no grad, later layers); packings add none.
    assert 3 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 6


def test_evaluation_computes_losses_as_training_does(tiny_dir):
    """evaluate() passes the loss's CE options to the model: a bf16 model's validation loss follows
    loss.projection_dtype (transformers' bf16 logits for "model", float32 logits for "float32")."""
    from mft_components.loss import TaskWeightedLoss
    from mft_components.training.evaluate import evaluate

    model = build_model(tiny_dir("llama"), method="lora", dtype="bf16", attn_implementation="sdpa")
    with torch.no_grad():  # logits of order 10, so that their rounding to bf16 shows in the loss
        model.hf_model.base_model.norm.weight.mul_(300)
    batch = _batch()
    batch["task_ids"] = torch.zeros_like(batch["input_ids"])
    ids, pos = batch["input_ids"], batch["position_ids"]
    with torch.no_grad():
        hidden = model.hf_model.base_model(input_ids=ids, position_ids=pos).last_hidden_state
        weight = model.hf_model.get_output_embeddings().weight
    keep = batch["labels"].reshape(-1) != -100
    for projection, logits in (("model", (hidden @ weight.t()).float()), ("float32", hidden.float() @ weight.float().t())):
        loss_fn = TaskWeightedLoss(chunk_size=5, projection_dtype=projection)
        result = evaluate(model, [batch], ["t"], torch.device("cpu"), loss_fn.ce_kwargs)
        ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="none")
        assert result.task_loss["t"] == pytest.approx(ref[keep].mean().item(), rel=1e-5)


def _packings(vocab, seed=0):
    """Micro-batches of two 16-token rows, packed differently each time (one ends in an all-padding row)."""
    import numpy as np

    from mft_components.data.dataset import Sample
    from mft_components.data.packing import collate, pack_samples

    rng = np.random.default_rng(seed)
    batches = []
    for lengths in ([9, 5, 13, 3], [7, 2, 11, 4, 16], [6, 6, 6], [16]):
        samples = [Sample(rng.integers(0, vocab, n).astype(np.int32), rng.random(n) < 0.7, i % 2)
                   for i, n in enumerate(lengths)]
        rows = [[samples[i] for i in r] for r in pack_samples(samples, 16)][:2]
        batches.append(collate(rows + [None] * (2 - len(rows)), pad_to=16))
    return batches


def _losses_and_grads(model, batches, **forward_kwargs):
    """Per-token losses and LoRA gradients of each prepared micro-batch, one backward per micro-batch."""
    from mft_components.models import prepare_batch

    out = []
    for batch in batches:
        token_losses, _ = model(prepare_batch(batch, torch.device("cpu"), model.config), **forward_kwargs)
        if torch.is_grad_enabled():
            token_losses.sum().backward()
        out.append((token_losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    return out


def _assert_same(runs, reference, dtype=torch.float32, n=VOCAB):
    """Same losses and gradients up to the rounding of reductions as long as the vocabulary (the loss's), which
    a compiled graph or another kernel may order differently (tests/tolerances.py)."""
    for (loss, grad), (ref_loss, ref_grad) in zip(runs, reference):
        assert_close_rounding(loss, ref_loss, dtype, n)
        assert grad.keys() == ref_grad.keys()
        for name in grad:
            assert_close_rounding(grad[name], ref_grad[name], dtype, n, msg=name)


@pytest.mark.parametrize("mode", [True, "selective", "every_other"])
def test_activation_checkpointing_modes_match_none(tiny_dir, mode):
    """Every activation checkpointing mode recomputes exactly what it dropped: the same losses and LoRA gradients
    as no checkpointing, and the layers it covers are the ones the mode names."""
    batches = _packings(VOCAB)[:2]
    lora = {"rank": 4, "alpha": 8, "target_modules": "all-linear"}
    model_dir = tiny_dir("llama")  # before seeding: building the directory draws random weights
    runs = []
    for checkpointing in (False, mode):
        torch.manual_seed(0)
        model = build_model(model_dir, lora=lora, dtype="fp32", activation_checkpointing=checkpointing)
        _randomise_lora_b(model)
        model.train()
        runs.append(_losses_and_grads(model, batches))
    _assert_same(runs[1], runs[0])
    flags = [layer.gradient_checkpointing for layer in model.decoder_layers()]
    assert flags == ([True, False] if mode == "every_other" else [True, True])


def test_sharded_whole_layer_compile_keeps_activation_checkpointing(tiny_dir, tmp_path):
    """FSDP2 (a one-rank group here) with whole decoder layers compiled still recomputes every layer in backward:
    the compiled forward is the outermost checkpointing wrapper, not the inner one FSDP2's subclass hides. Run
    under the force_eager stance: the compiled callable runs as Python, so no compilation is needed to see it."""
    import torch.distributed as dist

    model_dir = tiny_dir("llama")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_model(model_dir, lora={"rank": 4, "alpha": 8}, dtype="fp32", attn_implementation="sdpa",
                            activation_checkpointing="full", compile=True, distributed=True)
        assert model.compile_scope == "layers"
        checkpointed = []
        for i, layer in enumerate(model.decoder_layers()):
            inner = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = lambda *a, _i=i, _f=inner, **k: checkpointed.append(_i) or _f(*a, **k)
        with torch.compiler.set_stance("force_eager"):
            _losses_and_grads(model, _packings(VOCAB)[:1])
        assert checkpointed == list(range(len(model.decoder_layers())))
    finally:
        dist.destroy_process_group()


def test_compile_and_checkpointing_choices():
    from mft_components.models.parallelize import activation_checkpointing_mode, resolve_compile

    assert resolve_compile("auto", "cpu", static_attention=True, moe=False)[0] == "off"
    assert resolve_compile("auto", "cuda", static_attention=True, moe=False)[0] == "layers"
    assert resolve_compile("auto", "cuda", static_attention=False, moe=False)[0] == "norms_mlp"
    assert resolve_compile("auto", "cuda", static_attention=True, moe=True)[0] == "norms_mlp"
    assert resolve_compile(True, "cpu", static_attention=False, moe=False)[0] == "norms_mlp"
    assert resolve_compile(False, "cuda", static_attention=True, moe=False)[0] == "off"
    with pytest.raises(ValueError, match="model.compile: expected auto, true or false"):
        resolve_compile("yes", "cpu", True, False)
    assert activation_checkpointing_mode(True) == "full" and activation_checkpointing_mode(None) is False
    with pytest.raises(ValueError, match="model.activation_checkpointing: expected one of .*selective"):
        activation_checkpointing_mode("some")
    from mft_components.models import resolve_liger

    assert resolve_liger(False, "cpu") == ()
    with pytest.raises(ValueError, match="model.liger: liger-kernel's Triton kernels run on CUDA only"):
        resolve_liger(True, "cpu")


def test_liger_options_apply_exactly_the_kernels_asked_for():
    """liger's per-family functions default some kernels on (Gemma's geglu, the fused linear cross entropy); mft
    passes every one explicitly. Signatures as in liger-kernel 0.8.5 (the package needs CUDA's Triton to import)."""
    from mft_components.models import liger_options

    def apply_liger_kernel_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True,
                                    swiglu=True, model=None):
        pass

    def apply_liger_kernel_to_gemma(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True,
                                    geglu=True, model=None):
        pass

    assert liger_options(apply_liger_kernel_to_llama, ("rms_norm",), "llama") == {
        "rope": False, "cross_entropy": False, "fused_linear_cross_entropy": False, "rms_norm": True, "swiglu": False}
    gemma = liger_options(apply_liger_kernel_to_gemma, ("rope",), "gemma")
    assert gemma["geglu"] is False and gemma["rope"] is True  # was left at liger's default: on, unasked
    assert liger_options(apply_liger_kernel_to_gemma, ("swiglu",), "gemma")["geglu"] is True  # Gemma's MLP kernel

    def apply_liger_kernel_to_phi(rope=True, rms_norm=True, model=None):
        pass

    with pytest.raises(ValueError, match="model.liger: liger-kernel has no swiglu kernel for model_type 'phi'"):
        liger_options(apply_liger_kernel_to_phi, ("rms_norm", "swiglu"), "phi")


def test_prepare_batch_matches_and_checks_labels(tiny_dir):
    """A prepared micro-batch (loss positions and attention boundaries from the host copy) computes what the
    plain batch computes; a label outside the vocabulary is reported before anything reaches the device."""
    from mft_components.loss import LOSS_INDEX
    from mft_components.models import ATTENTION_INPUTS, prepare_batch

    model = build_model(tiny_dir("llama"), dtype="fp32")
    batch = _packings(VOCAB)[0]
    prepared = prepare_batch(batch, torch.device("cpu"), model.config)
    assert prepared[LOSS_INDEX].numel() == int((batch["labels"] != -100).sum())
    assert "segment_lengths" in prepared[ATTENTION_INPUTS]  # sdpa_varlen on the CPU
    with torch.no_grad():
        torch.testing.assert_close(model(prepared)[0], model(batch)[0], rtol=0, atol=0)
    bad = {**batch, "labels": batch["labels"].clone()}
    bad["labels"][0, 2] = VOCAB
    with pytest.raises(ValueError, match=f"labels must be -100 or in \\[0, {VOCAB}\\)"):
        prepare_batch(bad, torch.device("cpu"), model.config)


KERNELS = importlib.util.find_spec("kernels") is not None  # transformers >= 5.25 pulls it in; constraints.txt pins it


def _compiled_checkpointed(model_dir, mode, **compile_kwargs):
    """build_model with activation checkpointing ``mode``, then what it does for compile: true, with the
    ``aot_eager`` backend (dynamo and AOTAutograd as on a GPU, no C++ compile); returns the model and its watch."""
    from mft_components.models.parallelize import COMPILE_SCOPES, CompileWatch, compile_layers

    torch.manual_seed(0)
    model = build_model(model_dir, lora={"rank": 4, "alpha": 8, "target_modules": "all-linear"}, dtype="fp32",
                        attn_implementation="sdpa", activation_checkpointing=mode)
    _randomise_lora_b(model)
    compile_layers(model, whole=True, backend="aot_eager", **compile_kwargs)
    return model, CompileWatch(model, COMPILE_SCOPES["layers"], auto=False)


@pytest.mark.parametrize("mode", [True, "every_other", "selective"])
def test_checkpointed_layers_really_compile(tiny_dir, mode):
    """Whole decoder layers compiled with activation checkpointing inside: dynamo traces the checkpoint (graphs,
    no graph break, every layer compiled as the run's check reports), with the `kernels` package's attention
    wrapper that transformers 5.25 puts on every attention class; losses and LoRA gradients as eager."""
    model_dir = tiny_dir("llama")
    batches = _packings(VOCAB)[:3]
    torch.manual_seed(0)
    eager = build_model(model_dir, lora={"rank": 4, "alpha": 8, "target_modules": "all-linear"}, dtype="fp32",
                        attn_implementation="sdpa", activation_checkpointing=mode)
    assert any("_kernel_funcs" in m.__dict__ for m in eager.modules()) == KERNELS  # the wrapper is there
    _randomise_lora_b(eager)
    reference = _losses_and_grads(eager, batches)
    graphs = _count_graphs()
    model, watch = _compiled_checkpointed(model_dir, mode)
    runs = _losses_and_grads(model, batches)
    ok, report = watch.report()
    assert ok and "every decoder layer runs compiled" in report, report
    assert graphs() >= 1 and sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert all(grad for _, grad in runs)
    _assert_same(runs, reference)


@pytest.mark.skipif(not KERNELS, reason="the kernels package is not installed: no attention wrapper to break dynamo")
def test_compile_check_names_the_layers_that_fall_back(tiny_dir, monkeypatch, capsys):
    """The run's compile check tells a layer that does not compile: with the kernels attention wrapper left on
    (what mft compiled before it removed it), dynamo refuses its global mutation inside the checkpoint, compiles no
    graph, and the report names each layer and the reason instead of announcing whole compiled layers."""
    from mft_components.models import parallelize
    from mft_components.models.parallelize import report_compile

    monkeypatch.setattr(parallelize, "remove_hub_kernel_routing", lambda module: 0)
    graphs = _count_graphs()
    model, watch = _compiled_checkpointed(tiny_dir("llama"), True)
    _losses_and_grads(model, _packings(VOCAB)[:1])
    model.compile_watch = watch
    assert report_compile(model) is False and graphs() == 0
    err = capsys.readouterr().err
    assert "warning: compile did not hold" in err
    assert "layer 0: graph break x1: HOP: Unsafe side effect" in err and "layer 1: runs layer 0's compiled code" in err


def _count_graphs():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counters of earlier tests' compilations
    return lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_whole_layer_compile_one_graph_for_all_packings(tmp_path):
    """compile: true with an attention whose inputs have static shapes compiles whole decoder layers: the same
    losses and LoRA gradients as eager over four different packings, and no graph per packing (sdpa: the mask
    transformers builds; flex_attention: mft's BlockMask, forward only on the CPU). The CPU stands in for CUDA,
    where compile: auto does this."""
    from mft_components.models.parallelize import compile_layers

    model_dir = make_tiny_model_dir(tmp_path / "m", family="llama", vocab_size=VOCAB)
    batches = _packings(VOCAB)
    lora = {"rank": 4, "alpha": 8, "target_modules": "all-linear"}
    graphs = _count_graphs()
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(model_dir, lora=lora, dtype="fp32", attn_implementation="sdpa", compile=compiled)
        _randomise_lora_b(model)
        assert model.compile_scope == ("layers" if compiled else "off")
        runs[compiled] = _losses_and_grads(model, batches)
    _assert_same(runs[True], runs[False])
    assert graphs() == 2  # layer 0 (its input needs no gradient) and the other layers; none per packing

    torch.manual_seed(0)
    model = build_model(model_dir, lora=lora, dtype="fp32", attn_implementation="sdpa")
    model.hf_model.set_attn_implementation("flex_attention")  # the CUDA default; no CPU backward: forward only
    with torch.no_grad():
        eager = [loss for loss, _ in _losses_and_grads(model, batches)]
        compile_layers(model, whole=True)
        graphs = _count_graphs()
        compiled = [loss for loss, _ in _losses_and_grads(model, batches)]
    for a, b in zip(compiled, eager):
        assert_close_rounding(a, b, torch.float32, n=VOCAB)
    assert graphs() == 1  # one graph for every layer and packing: the BlockMask is an input, not a constant
