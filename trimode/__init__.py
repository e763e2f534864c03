"""trimode: one set of weights, three decoding modes (ar, diffusion, selfspec)."""

from trimode.llm import LLM
from trimode.sampling_params import Mode, SamplingParams

__all__ = ["LLM", "Mode", "SamplingParams"]
__version__ = "0.1.0"
