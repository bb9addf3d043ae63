"""The SigLIP vision tower of MiniCPM-V 2.0 (`vpm.*`), with timm's parameter names.

A pre-norm ViT as timm builds `vit_so400m_patch14_siglip_384` with `dynamic_img_size=True`:
a 14x14 patch convolution with bias, a learned position table for a 27x27 grid resized to each
image's grid, blocks `x + attn(norm1(x))`, `x + fc2(gelu(fc1(norm2(x))))` with exact (erf)
GELU and LayerNorm eps 1e-6, and the final norm. MiniCPM-V replaces the attention pooling head
by nothing and drops the last block, so the output is every patch's feature, row-major.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minicpm.kernels.attention import full_attention
from minicpm.kernels.linear import linear_gemm, widens
from minicpm.vision.config import SiglipConfig


def dense(layer: nn.Module, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """layer(x) (then exact GELU): a float Linear by the faster GEMM for this CPU
    (minicpm.kernels.linear.linear_gemm, same arithmetic); an int8 one (`--vision int8`) as it runs."""
    if type(layer) is nn.Linear:
        return linear_gemm(x, layer.weight, layer.bias, gelu=gelu)
    y = layer(x)
    return F.gelu(y) if gelu else y


class PatchEmbed(nn.Module):
    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.proj = nn.Conv2d(3, config.hidden_size, config.patch_size, config.patch_size, bias=True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> [B, gh, gw, C]; H and W padded up to the patch size at the
        right and bottom with zeros (timm's dynamic_img_pad; slices are multiples already)."""
        p = self.patch_size
        pad_h, pad_w = -pixels.shape[-2] % p, -pixels.shape[-1] % p
        if pad_h or pad_w:
            pixels = F.pad(pixels, (0, pad_w, 0, pad_h))
        if widens(pixels, self.proj.weight, self.proj.bias):  # bf16 emulated here: 1.2 s a slice, 13 ms in fp32
            weight, bias = self.proj.weight.float(), self.proj.bias.float()
            return F.conv2d(pixels.float(), weight, bias, stride=p).to(pixels.dtype).permute(0, 2, 3, 1)
        return self.proj(pixels).permute(0, 2, 3, 1)


class Attention(nn.Module):
    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # [B, N, 3C] -> 3 x [B, heads, N, head_dim]
        q, k, v = dense(self.qkv, x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = full_attention(q, k, v)  # scale head_dim^-0.5, no mask
        return dense(self.proj, out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(self.fc2, dense(self.fc1, x, gelu=True))  # exact GELU, not the tanh form


class Block(nn.Module):
    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Mlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, config: SiglipConfig, num_blocks: int):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid ** 2, config.hidden_size))
        self.blocks = nn.ModuleList(Block(config) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def position_table(self, gh: int, gw: int) -> torch.Tensor:
        """The learned table for a gh x gw grid [1, gh*gw, C], as timm's resample_abs_pos_embed:
        unchanged for its own square grid, else an antialiased bicubic resize in fp32 (the
        antialias matters for upsampling too: it selects Pillow's a=-0.5 cubic kernel)."""
        table = self.pos_embed
        g = self.config.grid
        if (gh, gw) == (g, g):
            return table
        grid = table.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(table.dtype)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] (normalised) -> patch features [B, gh*gw, C]."""
        x = self.patch_embed(pixels.to(self.pos_embed.dtype))
        b, gh, gw, c = x.shape
        x = x.reshape(b, gh * gw, c) + self.position_table(gh, gw)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
