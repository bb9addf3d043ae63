"""Weight-only quantization (int8 per channel, int4 group-wise) as a module swap.

    from minicpm.quantization import quantize_model
    quantize_model(model, bits=4, group_size=128, head="int8")   # in place
    save_pretrained(model, tokenizer, "out")                     # config.json records it

Checkpoint layout of a quantized Linear `X` (portable; packed for the CPU kernels at load):
    X.qweight  int8 [N, K]                      (8 bits)   w = qweight * scales[:, None]
               uint8 [N, K/2], even k low nibble (4 bits)   w = (q - zeros) * scales, per group
    X.scales   [N] (8 bits) or [N, K/G] (4 bits), model dtype
    X.zeros    [N, K/G] zero points in code units, floats (4 bits only; integer for GPTQ/AWQ)
    X.bias     if the layer has one
"""

from minicpm.quantization.linear import QuantizedLinear
from minicpm.quantization.quantize import load_quantized, make_spec, quantize_model

__all__ = ["QuantizedLinear", "load_quantized", "make_spec", "quantize_checkpoint", "quantize_model"]


def quantize_checkpoint(src, out, bits: int = 4, group_size: int = 128, head: str = "int8",
                        overwrite: bool = False, progress: bool = True):
    """Load `src` (memory-mapped), quantize it layer by layer, write a checkpoint to `out`."""
    from pathlib import Path

    import minicpm
    from minicpm.errors import MiniCPMError
    from minicpm.formats.hf import save_pretrained

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:  # fail before the slow part
        raise MiniCPMError(f"{out} already exists and is not empty (pass overwrite=True / --force)")
    make_spec(bits, group_size, head)
    model, tokenizer = minicpm.load(src, device="cpu")
    quantize_model(model, bits=bits, group_size=group_size, head=head, progress=progress)
    return save_pretrained(model, tokenizer, out, overwrite=overwrite)
