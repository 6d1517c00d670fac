"""Where the model runs: how many text layers and whether the vision encoder are on a GPU."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    gpu_offload: bool  # this llama.cpp build has a GPU backend (CUDA, Metal, Vulkan, ...)
    text_layers_on_gpu: int  # of `offloadable_layers` (the blocks plus the output layer, as llama.cpp counts)
    offloadable_layers: int
    vision_on_gpu: bool

    def describe(self) -> str:
        text = f"{self.text_layers_on_gpu}/{self.offloadable_layers} text layers on the GPU"
        return f"{text}, vision encoder on the {'GPU' if self.vision_on_gpu else 'CPU'}"


def plan_placement(gpu_layers: int, vision_gpu: bool | None, block_count: int, gpu_offload: bool) -> Placement:
    """What llama.cpp will do with the requested offload (-1: every layer; vision None: follow the text)."""
    offloadable = block_count + 1
    wanted = offloadable if gpu_layers < 0 else min(gpu_layers, offloadable)
    vision = wanted > 0 if vision_gpu is None else vision_gpu
    if not gpu_offload and (wanted or vision):
        log.warning("this llama.cpp build has no GPU backend; running on the CPU "
                    "(see `pixtral-cpp backend install cuda` or `metal`)")
        return Placement(False, 0, offloadable, False)
    return Placement(gpu_offload, wanted, offloadable, vision)
