"""A faster Opacus per-sample-gradient function for DenseNet's convolutions.

Opacus' generic Conv2d grad sampler unfolds every input through its own padding helper and
then extracts group diagonals with an einsum plus ``.contiguous()``: on DenseNet-121, whose
120 convolutions all have ``groups=1`` and half of which are 1x1, those copies were 35% of a
DP step (torch profiler, benchmarks/train_throughput.py). For ``groups=1`` and no dilation the
per-sample gradient is one batched matmul of the output gradient with the (unfolded) input;
for a 1x1 stride-1 convolution the input needs no unfolding at all. Anything else falls back
to Opacus' own function. Registering replaces the sampler for ``nn.Conv2d`` in this process.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler


def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    x = activations[0]
    n = x.shape[0]
    simple = (layer.groups == 1 and layer.dilation == (1, 1) and n > 0
              and isinstance(layer.padding, tuple))
    if not simple:
        return compute_conv_grad_sample(layer, activations, backprops)
    x = x.to(backprops.dtype)
    g = backprops.reshape(n, layer.out_channels, -1)  # (n, O, L)
    if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0):
        cols = x.reshape(n, layer.in_channels, -1)  # (n, I, L): no unfolding needed
    else:
        cols = F.unfold(x, layer.kernel_size, padding=layer.padding, stride=layer.stride)
    ret = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.bmm(g, cols.transpose(1, 2)).view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = g.sum(dim=2)
    return ret


def _columns(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0):
        return x.reshape(n, layer.in_channels, -1)  # (n, D, T): no unfolding needed
    return F.unfold(x, layer.kernel_size, padding=layer.padding, stride=layer.stride)


def conv2d_norm_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of a convolution, without keeping per-sample gradients
    (Opacus' ghost clipping calls this instead of a grad sampler).

    With A (D x T, unfolded input) and G (O x T, output gradient) per sample, the weight
    gradient is G A^T and its squared norm is <G^T G, A^T A> (the "ghost norm", T x T
    Gram matrices) -- cheaper than forming G A^T when T^2 (D + O) < T D O, i.e. in the
    deep, low-resolution blocks. Each layer takes whichever is cheaper ("mixed" ghost
    clipping, Bu et al. 2022)."""
    x = activations[0]
    n = x.shape[0]
    simple = (layer.groups == 1 and layer.dilation == (1, 1) and n > 0
              and isinstance(layer.padding, tuple))
    ret = {}
    if not simple:
        for p, gs in compute_conv_grad_sample(layer, activations, backprops).items():
            ret[p] = gs.reshape(n, -1).norm(2, dim=1)
        return ret
    x = x.to(backprops.dtype)
    g = backprops.reshape(n, layer.out_channels, -1)  # (n, O, T)
    if layer.weight.requires_grad:
        cols = _columns(layer, x)  # (n, D, T)
        d, t = cols.shape[1], cols.shape[2]
        if t * t * (d + layer.out_channels) < t * d * layer.out_channels:
            gram_a = torch.bmm(cols.transpose(1, 2), cols)  # (n, T, T)
            gram_g = torch.bmm(g.transpose(1, 2), g)
            sq = (gram_a * gram_g).sum(dim=(1, 2))
        else:
            sq = torch.bmm(g, cols.transpose(1, 2)).pow(2).sum(dim=(1, 2))
        ret[layer.weight] = sq.clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = g.sum(dim=2).norm(2, dim=1)
    return ret


def register() -> None:
    register_grad_sampler(nn.Conv2d)(conv2d_grad_sample)
    register_norm_sampler(nn.Conv2d)(conv2d_norm_sample)
