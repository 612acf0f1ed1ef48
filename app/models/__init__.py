"""Torch-side model adapters shared by export and the PyTorch reference backend: loading, wrappers, samples."""
