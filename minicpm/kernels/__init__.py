"""Small native CPU kernels where PyTorch has no fast one, each with a PyTorch fallback.

The C sources sit next to this file and are compiled at first use (see `build.py`); nothing
here is required: where a kernel cannot be built or loaded, callers get None and use PyTorch.
Set MINICPM_NATIVE=0 to switch them all off.
"""
