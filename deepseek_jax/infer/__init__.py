"""Generation with the MLA latent KV cache (absorbed or naive attention) and MTP self-speculative decoding.

    tokens = infer.generate(cfg, variables, prompt_BT, max_new_tokens=64)              # greedy
    out = infer.decode(cfg, variables, prompt_BT, max_new_tokens=64, speculative=True)  # + acceptance rate

Modules: cache (the latent cache), cached (the model over a cache), sampling, decode (plain steps),
speculative (MTP draft + verify), generation (the API), checkpoints (loading trained weights), text (the
streaming command line), uncached (the slow reference).
"""

from deepseek_jax.infer.cache import KVCache, LayerCache, bytes_per_token, cache_shapes, init_cache
from deepseek_jax.infer.generation import Generation, TokenStream, decode, generate, stream

__all__ = ["Generation", "KVCache", "LayerCache", "TokenStream", "bytes_per_token", "cache_shapes", "decode",
           "generate", "init_cache", "stream"]
