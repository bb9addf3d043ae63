"""Weight-only quantization (int8 per channel, int4 group-wise) as a module swap.

    from minicpm.quantization import quantize_model
    quantize_model(model, bits=4, group_size=128, head="int8")   # in place
    save_pretrained(model, tokenizer, "out")                     # config.json records it

Checkpoint layout of a quantized Linear `X` (portable; packed for the CPU kernels at load):
    X.qweight  int8 [N, K]                      (8 bits)   w = qweight * scales[:, None]
               uint8 [N, K/2], even k low nibble (4 bits)   w = (q - zeros) * scales, per group
    X.scales   [N] (8 bits) or [N, K/G] (4 bits), model dtype
    X.zeros    [N, K/G] zero points in code units, floats (4 bits only; integer for GPTQ/AWQ)
    X.input_perm  int32 [K], GPTQ act-order only: the columns are stored in this order of x's
    X.bias     if the layer has one

The tied embedding of a model with an int8 head is not stored (`"embedding": "head"` in the
record): lookups read the head's table. Records without the key store it ("float").

This package works on modules and tensors; writing a quantized checkpoint from a file, streaming,
is `minicpm.formats.quantized.quantize_checkpoint` (`minicpm quantize`). Calibrated codes in the
same layout: gptq.py and awq.py (one Linear / one layer), layerwise.py (a checkpoint stream, one
decoder layer at a time), calibration.py (the calibration windows); docs/quantization.md.
"""

from minicpm.quantization.embedding import QuantizedEmbedding
from minicpm.quantization.linear import QuantizedLinear
from minicpm.quantization.quantize import (
    dequantize_model,
    load_quantized,
    make_spec,
    quantize_model,
    quantize_tensors,
)

__all__ = ["QuantizedEmbedding", "QuantizedLinear", "dequantize_model", "load_quantized", "make_spec", "quantize_model", "quantize_tensors"]
