"""The largest option values ``vae-ext`` accepts, and why (shared by the parser and TrainConfig).

Beyond them a value does not fail with a clear message by itself: a traceback from deep inside
PyTorch, or a crash. Sizes within them may still not fit in memory; ``vae_ext.model_memory`` refuses
those before anything is allocated. No torch import here: the parser uses this before torch loads.
"""
from __future__ import annotations

__all__ = ["MAX_INT", "MAX_SEED", "MAX_THREADS", "FLOAT32_MAX", "MAX_LR", "LR_WHY"]

# Every integer option: PyTorch passes sizes, seeds and counts as int64.
MAX_INT = 2**63 - 1
# A seed plus the epoch (DistributedSampler's shuffle) must fit the generator's uint64.
MAX_SEED = 2**63 - 1
# OpenMP crashes (SIGSEGV) when asked for 100,000 threads; 1,024 work, and more are never faster.
MAX_THREADS = 1024
FLOAT32_MAX = 3.4028234663852886e38
# Adam's first step multiplies the weights' update by lr / (1 - beta1) = 10 lr, a float32 scalar
# for float32 weights: above this PyTorch raises "value cannot be converted to type float".
MAX_LR = 3.4e37
LR_WHY = "Adam's first step, lr / (1 - 0.9), must fit in float32"
