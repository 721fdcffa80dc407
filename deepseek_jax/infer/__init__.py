"""Generation with the MLA latent KV cache (absorbed or naive attention) and MTP self-speculative decoding.

    tokens = infer.generate(cfg, variables, prompt_BT, max_new_tokens=64)              # greedy
    out = infer.decode(cfg, variables, prompt_BT, max_new_tokens=64, speculative=True)  # + acceptance rate

Modules: cached (the model's pieces over a cache), sampling, steps (prefill and plain decode steps),
speculative (MTP draft + verify), generation (the API), text (the streaming command line). The cache
itself is the model's (model/cache.py); the slow uncached reference is train/sample.py's.
"""

from deepseek_jax.infer.generation import Generation, TokenStream, decode, generate, stream
from deepseek_jax.model.cache import KVCache, LayerCache, bytes_per_token, cache_shapes, init_cache

__all__ = ["Generation", "KVCache", "LayerCache", "TokenStream", "bytes_per_token", "cache_shapes", "decode",
           "generate", "init_cache", "stream"]
