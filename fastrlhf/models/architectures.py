"""Tiny configs of each causal-LM architecture fastrlhf is tested on, sized like ``tiny`` and sharing its
tokenizer, so that every command can run on each of them on a CPU (``build_tiny_model(architecture=...)``).

The same handful of sizes (hidden, layers, heads, KV heads, MLP width) is spelled in each architecture's
own config vocabulary here, and only here.
"""

from __future__ import annotations

from fastrlhf.errors import InputError

# name -> what it adds to a plain pre-norm decoder, for the docs and error messages
ARCHITECTURES = {
    "llama": "RMSNorm, RoPE, SwiGLU, grouped-query attention",
    "qwen2": "Llama's layout with biases on q/k/v",
    "mistral": "Llama's layout with a sliding attention window",
    "gemma": "RMSNorm on (1 + weight), embeddings scaled by sqrt(H), GeGLU, explicit head_dim",
    "gemma2": "Gemma with soft-capped attention and final logits",
    "gpt2": "LayerNorm with biases, learned absolute positions, fused qkv",
    "gpt_neox": "LayerNorm with biases, partial RoPE, parallel residual",
}


def architecture_config(
    architecture: str,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 352,
    tie_word_embeddings: bool = False,
):
    """A transformers config of ``architecture`` with these sizes and the tiny tokenizer's vocabulary and
    special ids. ``llama`` is ``tiny``'s own config (``tiny.tiny_config``)."""
    import transformers

    from fastrlhf.models.tiny import MAX_LENGTH, load_tiny_tokenizer, tiny_config

    sizes = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
    )
    if architecture == "llama":
        return tiny_config(**sizes, num_key_value_heads=num_key_value_heads)
    tokenizer = load_tiny_tokenizer()
    special = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    llama_like = dict(sizes, num_key_value_heads=num_key_value_heads, max_position_embeddings=MAX_LENGTH)
    if architecture == "qwen2":
        return transformers.Qwen2Config(**llama_like, use_sliding_window=False, **special)
    if architecture == "mistral":
        return transformers.MistralConfig(**llama_like, sliding_window=MAX_LENGTH // 4, **special)
    if architecture in ("gemma", "gemma2"):
        head_dim = hidden_size // num_attention_heads
        config_class = transformers.GemmaConfig if architecture == "gemma" else transformers.Gemma2Config
        return config_class(**llama_like, head_dim=head_dim, hidden_activation="gelu_pytorch_tanh", **special)
    if architecture == "gpt2":
        return transformers.GPT2Config(
            n_embd=hidden_size,
            n_layer=num_hidden_layers,
            n_head=num_attention_heads,
            n_inner=intermediate_size,
            n_positions=MAX_LENGTH,
            tie_word_embeddings=tie_word_embeddings,
            **special,
        )
    if architecture == "gpt_neox":
        return transformers.GPTNeoXConfig(
            **sizes, max_position_embeddings=MAX_LENGTH, use_parallel_residual=True, **special
        )
    raise InputError(f"architecture: expected one of {sorted(ARCHITECTURES)}, got {architecture!r}")
