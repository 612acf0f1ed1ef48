"""edgegen: offline, TensorRT-optimised image generation (FLUX.2 Klein, SD3.5)."""

__version__ = "0.1.0"
