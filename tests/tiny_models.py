"""Tiny random-initialised models built from the real `transformers` config classes.

Every family has 2 decoder layers, hidden size 64, 4 attention heads of size 16 and 2 key/value heads
(GPT-NeoX has no GQA: 4/4). The sizes are chosen so that every linear of a decoder layer can be quantised to
torchao NF4 and sharded by FSDP2 over 2 ranks: every weight has a multiple of 64 * 8 elements, and
`mft_components.lora.nf4_block_sizes` picks a smaller *scaler* block size per tensor (the quantisation block
stays 64) where the tensor has fewer than 256 * 8 blocks. Real models keep torchao's 64 / 256.

    TINY_CONFIGS["llama"](vocab_size) -> transformers.LlamaConfig
    make_tiny_model_dir(tmp_path / "m", family="qwen2", tokenizer_dir=smollm2_dir) -> Path

The MoE family is `qwen3_moe` (4 experts, 2 per token, `output_router_logits` off as in the released configs).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch
import transformers

HIDDEN = 64
INTERMEDIATE = 128
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
LAYERS = 2

# Files a tokenizer directory may hold; copied next to the tiny model so AutoTokenizer finds them.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja",
)


def _common(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def _llama(vocab_size: int) -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(**_common(vocab_size), head_dim=HEAD_DIM, tie_word_embeddings=False)


def _qwen2(vocab_size: int) -> transformers.PretrainedConfig:
    # Qwen2 has biases on q/k/v: exercises LoRALinear's bias path.
    return transformers.Qwen2Config(**_common(vocab_size), tie_word_embeddings=True)


def _qwen3(vocab_size: int) -> transformers.PretrainedConfig:
    # Qwen3 has q_norm / k_norm per head.
    return transformers.Qwen3Config(**_common(vocab_size), head_dim=HEAD_DIM, tie_word_embeddings=True)


def _mistral(vocab_size: int) -> transformers.PretrainedConfig:
    return transformers.MistralConfig(**_common(vocab_size), head_dim=HEAD_DIM, sliding_window=None)


def _gemma(vocab_size: int) -> transformers.PretrainedConfig:
    # Gemma scales embeddings by sqrt(hidden) and ties them; head_dim must be set (default 256).
    return transformers.GemmaConfig(**_common(vocab_size), head_dim=HEAD_DIM, tie_word_embeddings=True)


def _phi3(vocab_size: int) -> transformers.PretrainedConfig:
    # Phi3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj.
    kwargs = _common(vocab_size)
    kwargs.update(pad_token_id=0, original_max_position_embeddings=512)
    return transformers.Phi3Config(**kwargs, tie_word_embeddings=False)


def _starcoder2(vocab_size: int) -> transformers.PretrainedConfig:
    # StarCoder2: LayerNorm, biases everywhere (use_bias), c_fc / c_proj MLP, tied embeddings.
    return transformers.Starcoder2Config(**_common(vocab_size), use_bias=True, tie_word_embeddings=True)


def _gpt_neox(vocab_size: int) -> transformers.PretrainedConfig:
    # GPT-NeoX: fused query_key_value, partial rotary (25%), parallel residual, no GQA.
    kwargs = _common(vocab_size)
    kwargs.pop("num_key_value_heads")
    return transformers.GPTNeoXConfig(**kwargs, tie_word_embeddings=False)


def _qwen3_moe(vocab_size: int) -> transformers.PretrainedConfig:
    return transformers.Qwen3MoeConfig(
        **_common(vocab_size),
        head_dim=HEAD_DIM,
        moe_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    )


TINY_CONFIGS: dict[str, Callable[[int], transformers.PretrainedConfig]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma": _gemma,
    "phi3": _phi3,
    "starcoder2": _starcoder2,
    "gpt_neox": _gpt_neox,
    "qwen3_moe": _qwen3_moe,
}

MOE_FAMILIES = ("qwen3_moe",)


# More MoE families with fused experts (transformers 5), used by tests/test_moe.py: 4 experts, 2 per token,
# expert width 64. Kept out of TINY_CONFIGS so that the dense-model tests parametrised over it stay as fast.
def _mixtral(vocab_size: int) -> transformers.PretrainedConfig:
    kwargs = _common(vocab_size) | {"intermediate_size": 64}
    return transformers.MixtralConfig(**kwargs, head_dim=HEAD_DIM, num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=None, tie_word_embeddings=False)


def _qwen2_moe(vocab_size: int) -> transformers.PretrainedConfig:
    # Qwen2-MoE: a shared expert (dense MLP) gated by shared_expert_gate, an nn.Linear [1, H].
    return transformers.Qwen2MoeConfig(**_common(vocab_size), moe_intermediate_size=64,
                                       shared_expert_intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                                       decoder_sparse_step=1, tie_word_embeddings=False)


def _olmoe(vocab_size: int) -> transformers.PretrainedConfig:
    kwargs = _common(vocab_size) | {"intermediate_size": 64}
    return transformers.OlmoeConfig(**kwargs, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)


def _gpt_oss(vocab_size: int) -> transformers.PretrainedConfig:
    # GPT-OSS: experts stored transposed [E, in, out] with biases, interleaved gate/up, a router with a bias.
    kwargs = _common(vocab_size) | {"intermediate_size": 64}
    return transformers.GptOssConfig(**kwargs, head_dim=HEAD_DIM, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=128, layer_types=["sliding_attention", "full_attention"],
                                     tie_word_embeddings=False)


def _deepseek_v3(vocab_size: int) -> transformers.PretrainedConfig:
    # DeepSeek-V3: MLA attention (no GQA), a dense first layer, grouped sigmoid routing with a float32 router.
    kwargs = _common(vocab_size) | {"num_key_value_heads": HEADS}
    return transformers.DeepseekV3Config(
        **kwargs, moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16, tie_word_embeddings=False, rope_interleave=True)


MOE_CONFIGS: dict[str, Callable[[int], transformers.PretrainedConfig]] = {
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "olmoe": _olmoe,
    "gpt_oss": _gpt_oss,
    "deepseek_v3": _deepseek_v3,
}


def make_tiny_model_dir(
    path: str | Path,
    family: str = "llama",
    vocab_size: int = 49152,
    tokenizer_dir: str | Path | None = None,
    seed: int = 0,
    max_shard_size: str | int | None = None,
) -> Path:
    """Write a random-initialised tiny `family` model (fp32 safetensors) to `path` and return `path`.

    Args:
        path: directory to create (parents too); existing files are overwritten.
        family: a key of `TINY_CONFIGS`.
        vocab_size: vocabulary size; use the tokenizer's size when `tokenizer_dir` is given.
        tokenizer_dir: a directory whose tokenizer files are copied next to the model, and whose
            bos / eos / pad ids are written into the config.
        seed: torch seed for the weights (same seed, same model).
        max_shard_size: passed to `save_pretrained` to force several shards plus an index (e.g. "200KB").

    Returns:
        Path: the model directory.

    Raises:
        KeyError: unknown family.
    """
    configs = TINY_CONFIGS | MOE_CONFIGS
    if family not in configs:
        raise KeyError(f"unknown tiny model family {family!r}; expected one of {sorted(configs)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = configs[family](vocab_size)
    if tokenizer_dir is not None:
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        config.bos_token_id = tok.bos_token_id
        config.eos_token_id = tok.eos_token_id
        config.pad_token_id = tok.pad_token_id
        for name in _TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy(Path(tokenizer_dir) / name, path / name)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # HF initialises some weights to exact constants (norms to 1, biases to 0, router to 0): randomise them so
    # that a wrongly loaded or wrongly mapped tensor shows up in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 or "router" in name or name.endswith("gate.weight"):
                param.add_(torch.randn_like(param) * 0.1)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def make_sentencepiece_tokenizer(path: str | Path, legacy: bool = True) -> Path:
    """A tiny SentencePiece Llama tokenizer (``tokenizer.model`` trained here, ``legacy`` as Llama-2 / Mistral /
    Mixtral ship it), in a directory AutoTokenizer loads; its vocabulary size is ``len(tokenizer)``."""
    import json

    import sentencepiece

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    corpus = ["human bot system hello world def function return value print the list of numbers",
              "Write a function that reverses a list.", "human: what is python? bot: a language", "x = [1, 2, 3]"]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 40), model_prefix=str(path / "tokenizer"), vocab_size=320, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", minloglevel=2)
    (path / "tokenizer.vocab").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": legacy, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))
    return path
