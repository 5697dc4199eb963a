"""The language model: GPT with GQA attention, SwiGLU, RoPE, RMSNorm and tensor-parallel layers."""

from ghostvis.model.gpt import GPT, count_params, flops_per_token
from ghostvis.model.kv_cache import KVCache
from ghostvis.model.parallel import gather_state_dict, shard_state_dict

__all__ = ["GPT", "KVCache", "count_params", "flops_per_token", "gather_state_dict", "shard_state_dict"]
