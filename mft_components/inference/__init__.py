"""Inference: a trained checkpoint as files other tools load, and answers from it in the training prompt format.

    adapters.py  PEFT LoRA adapters: read (what does not merge as W + scale * B @ A is refused), merged
    shards.py    safetensors specs from the headers, shard plans, a streaming writer (one tensor in memory)
    export.py    `mft export`: a Hugging Face model directory + PEFT adapter + model card, swapped in atomically
    tokenizer_files.py  the exported tokenizer: training chat template, dropped options written back, ids checked
    gguf.py      `mft export --gguf / --ollama`: llama.cpp's converter on that directory, an Ollama Modelfile
    decoding.py  batched decoding with a KV cache (code evaluation in training, `mft generate`)
    generate.py  `mft generate`: an exported model, or a base model with an adapter merged in
"""
