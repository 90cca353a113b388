"""Kernels, each beside a pure-jnp reference (imported as eva_jax.kernels)."""
from .logprob_chunked import chunked_target_logprobs
from .logprob_dense import dense_target_logprobs
from .logprob_pallas import pallas_target_logprobs
from .target_logprobs import reference_target_logprobs
from .target_logprobs import target_logprobs
from .vocab_parallel import vocab_parallel_target_logprobs
from .vocab_parallel_embed import vocab_parallel_embed

__all__ = [
    "chunked_target_logprobs",
    "dense_target_logprobs",
    "pallas_target_logprobs",
    "reference_target_logprobs",
    "target_logprobs",
    "vocab_parallel_embed",
    "vocab_parallel_target_logprobs",
]
