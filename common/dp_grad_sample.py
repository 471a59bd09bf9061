"""Faster per-sample clipping for DenseNet-121 inside Opacus' own gradient-sample module.

Three things, each registered into Opacus (``register``) rather than replacing it:

1. A per-sample gradient function for ``nn.Conv2d`` (``hooks`` mode). Opacus' generic one
   unfolds every input through its own padding helper and extracts group diagonals with an
   einsum plus ``.contiguous()``: on DenseNet-121, whose 120 convolutions all have
   ``groups=1`` and half of which are 1x1, those copies were 35% of a DP step. For
   ``groups=1`` the per-sample gradient is one batched matmul of the output gradient with
   the (unfolded) input; a 1x1 stride-1 convolution needs no unfolding at all.
2. Per-sample gradient *norm* functions for ``nn.Conv2d``, ``nn.GroupNorm`` and ``nn.Linear``
   (Opacus' ghost clipping calls these instead of materialising per-sample gradients). Each
   convolution takes the cheaper of the "ghost norm" (Gram matrices) and the direct
   per-sample gradient ("mixed" ghost clipping, Bu et al. 2022).
3. Book-keeping (``bk`` mode, Bu et al. 2023): Opacus' ghost clipping backpropagates twice,
   once for the norms and once more for the clipped loss. The second pass only repeats
   what the first one already saw, so here the norm functions also keep, per layer, what the
   clipped gradient needs (the per-sample gradients when they were formed anyway, else the
   layer's input and output gradient); ``clipped_backward`` then runs a single backward that
   forms no weight gradients at all, takes Opacus' clipping coefficients, and writes
   ``p.grad = sum_i c_i g_i`` layer by layer. Opacus' DP optimizer adds the noise and its
   accountant counts the step, exactly as after its own second pass.

Anything these functions do not cover falls back to Opacus' own functions.

This is the one module that reaches into Opacus' internals: the PrivacyEngine's
``_prepare_model`` / ``_prepare_optimizer``, ``p._norm_sample`` (read by
``get_clipping_coef``), the optimizer's ``summed_grad`` and the accountants' ``history``
(``accountant_with_history``); ``tests/test_framework_internals.py`` pins each of them.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus import GradSampleModule, PrivacyEngine
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping,
)
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

# Layer attribute: set on every layer of a model wrapped for bk mode (the norm functions then
# keep what the clipped gradient needs); the kept parts live in `_BK_PARTS` until used.
_BK_ON = "_fedcxr_bk"
_BK_PARTS = "_fedcxr_bk_parts"
BK_LAYERS = (nn.Conv2d, nn.GroupNorm, nn.Linear)


def _simple(layer: nn.Conv2d, n: int) -> bool:
    return (layer.groups == 1 and layer.dilation == (1, 1) and n > 0
            and isinstance(layer.padding, tuple))


def _pointwise(layer: nn.Conv2d) -> bool:
    """A 1x1, stride-1, unpadded convolution: a matrix product at every position."""
    return layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0)


def _columns(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    if _pointwise(layer):
        return x.reshape(n, layer.in_channels, -1)  # (n, D, T): no unfolding needed
    return F.unfold(x, layer.kernel_size, padding=layer.padding, stride=layer.stride)


# Up to this many output positions, a larger kernel's per-sample gradients are a batched
# matmul with the unfolded input (small there) rather than a grouped weight-gradient kernel.
_UNFOLD_POSITIONS = 16


def _per_sample(layer: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """(n, O, D) per-sample weight gradients of a ``groups=1`` convolution. 1x1: one
    batched matmul. Larger kernels: one weight-gradient kernel of the same convolution
    with the batch folded into groups, which avoids materialising the unfolded input
    (``F.unfold`` was the largest single cost of a DP step in the torch profiler), except
    at a few output positions (``_UNFOLD_POSITIONS``: DenseNet-121's 3x3 convolutions at
    4x4, 64-px input), where the unfolded input is small and the grouped kernel slow: 670 vs
    780-870 us a layer (scratch profile of a DP step)."""
    n = x.shape[0]
    g = backprops.reshape(n, layer.out_channels, -1)
    if _pointwise(layer) or g.shape[2] <= _UNFOLD_POSITIONS:
        return torch.bmm(g, _columns(layer, x).transpose(1, 2))
    w = torch.nn.grad.conv2d_weight(
        x.reshape(1, n * layer.in_channels, *x.shape[2:]),
        (n * layer.out_channels, layer.in_channels, *layer.kernel_size),
        backprops.reshape(1, n * layer.out_channels, *backprops.shape[2:]),
        layer.stride, layer.padding, layer.dilation, groups=n)
    return w.view(n, layer.out_channels, -1)


def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    x = activations[0]
    n = x.shape[0]
    if not _simple(layer, n):
        return compute_conv_grad_sample(layer, activations, backprops)
    x = x.to(backprops.dtype)
    g = backprops.reshape(n, layer.out_channels, -1)  # (n, O, L)
    ret = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = _per_sample(layer, x, backprops).view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = g.sum(dim=2)
    return ret


def _keep(layer: nn.Module, parts: dict) -> None:
    if getattr(layer, _BK_ON, False):
        setattr(layer, _BK_PARTS, parts)


def _norms(per_sample: dict[nn.Parameter, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
    # torch.linalg's norm, not Tensor.norm: the same kernel without the Python dispatch of
    # torch.functional.norm, which is most of the call at these sizes (364 parameters a step)
    return {p: torch.linalg.vector_norm(gs.reshape(gs.shape[0], -1), dim=1)
            for p, gs in per_sample.items()}


def conv2d_norm_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of a convolution.

    With A (D x T, unfolded input) and G (O x T, output gradient) per sample, the weight
    gradient is G A^T and its squared norm is <G^T G, A^T A> (the "ghost norm", T x T
    Gram matrices) -- cheaper than forming G A^T when T^2 (D + O) < T D O, i.e. in the
    deep, low-resolution blocks."""
    x = activations[0]
    n = x.shape[0]
    if not _simple(layer, n):
        per_sample = compute_conv_grad_sample(layer, activations, backprops)
        _keep(layer, {"per_sample": per_sample})
        return _norms(per_sample)
    x = x.to(backprops.dtype)
    g = backprops.reshape(n, layer.out_channels, -1)  # (n, O, T)
    ret, parts = {}, {}
    if layer.weight.requires_grad:
        d, t = layer.weight[0].numel(), g.shape[2]
        if t * t * (d + layer.out_channels) < t * d * layer.out_channels:
            cols = _columns(layer, x)  # (n, D, T)
            gram_a = torch.bmm(cols.transpose(1, 2), cols)  # (n, T, T)
            gram_g = torch.bmm(g.transpose(1, 2), g)
            sq = (gram_a * gram_g).sum(dim=(1, 2))
            parts["io"] = (x, backprops)  # clipped gradient: one weight-gradient kernel
        else:
            per_sample = _per_sample(layer, x, backprops)  # (n, O, D)
            sq = per_sample.pow(2).sum(dim=(1, 2))
            parts["per_sample"] = {layer.weight: per_sample.view(n, *layer.weight.shape)}
        ret[layer.weight] = sq.clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        bias = g.sum(dim=2)
        ret[layer.bias] = bias.norm(2, dim=1)
        parts.setdefault("per_sample", {})[layer.bias] = bias
    _keep(layer, parts)
    return ret


def _group_norm_stats(layer: nn.GroupNorm, output: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-(image, group) mean and 1/std the forward pass of ``layer`` already computed
    (autograd saves them for its own backward), or None when ``output`` did not come from
    the native kernel."""
    node = output.grad_fn
    if node is None or node.name() != "NativeGroupNormBackward0":
        return None
    return node._saved_result1, node._saved_result2


# At this many positions per channel or fewer, GroupNorm's per-sample gradients are formed
# with tensor ops: the native kernel, run with a group per (image, group) pair, is slowest
# there (DenseNet-121's last block at 64 px: 392 against 127 us at 1024 channels, 2x2, in a
# scratch microbenchmark).
_FEW_POSITIONS = 4


def _group_norm_per_sample(layer: nn.GroupNorm, x: torch.Tensor, out_grad: torch.Tensor,
                           mean: torch.Tensor, rstd: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, C) weight and bias gradients, one row per image: ``x`` and ``out_grad`` are (n, C,
    positions), ``mean`` and ``rstd`` one per (image, group). The weight's is
    ``rstd * (sum dy x - mean * sum dy)`` per channel (the normalised input is never formed),
    and both sums over the few positions are matrix-vector products: torch's sum over a
    last dimension of 4 took 40-100 us at DenseNet-121's 512-1024 channels, its matrix-vector
    product 16-29 (scratch microbenchmark, session 23)."""
    n, c, hw = x.shape
    g = layer.num_groups
    ones = x.new_ones(hw)
    dy = out_grad.reshape(n * c, hw)
    bias = torch.mv(dy, ones)
    dy_x = torch.mv(dy * x.reshape(n * c, hw), ones)
    weight = (dy_x.view(n, g, -1) - mean.reshape(n, g, 1) * bias.view(n, g, -1)) \
        * rstd.reshape(n, g, 1)
    return weight.view(n, c), bias.view(n, c)


def group_norm_norm_sample(layer: nn.GroupNorm, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """GroupNorm's per-sample gradients are (n, C): formed by the native GroupNorm backward
    kernel itself, run as one "image" whose groups are every (image, group) pair, so its
    weight and bias gradients come out per image and channel, in one fused pass over the
    input and the output gradient (no normalised copy of the input, no product tensor:
    half the time of forming them with tensor ops), except at ``_FEW_POSITIONS`` or fewer,
    where tensor ops are faster (``_group_norm_per_sample``). ``activations`` is ``[x]`` or, from
    ``BookkeepingGradSampleModule``, ``[x, mean, rstd]`` as the forward pass saved them;
    bk mode keeps the gradients for the clipped sum."""
    x = activations[0]
    n, c = x.shape[:2]
    hw, groups = x[0, 0].numel(), n * layer.num_groups
    flat = x.reshape(1, n * c, hw)
    if len(activations) == 3:
        mean, rstd = (s.reshape(1, groups) for s in activations[1:])
    else:
        _, mean, rstd = torch.ops.aten.native_group_norm(flat, None, None, 1, n * c, hw,
                                                         groups, layer.eps)
    out_grad = backprops.reshape(n, c, hw).to(x.dtype)
    if hw <= _FEW_POSITIONS:
        weight, bias = _group_norm_per_sample(layer, x.reshape(n, c, hw), out_grad, mean, rstd)
    else:
        _, weight, bias = torch.ops.aten.native_group_norm_backward(
            out_grad.reshape(1, n * c, hw), flat, mean, rstd, None, 1, n * c, hw, groups,
            [False, True, True])
    per_sample = {}
    if layer.weight is not None and layer.weight.requires_grad:
        per_sample[layer.weight] = weight.view(n, c)
    if layer.bias is not None and layer.bias.requires_grad:
        per_sample[layer.bias] = bias.view(n, c)
    _keep(layer, {"per_sample": per_sample})
    return _norms(per_sample)


def linear_norm_sample(layer: nn.Linear, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """A classifier head on pooled features (2-D input): per-sample gradients are small
    (n, out, in); anything else uses Opacus' own ghost norm."""
    from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample

    if backprops.dim() != 2:
        if getattr(layer, _BK_ON, False):
            per_sample = compute_linear_grad_sample(layer, activations, backprops)
            _keep(layer, {"per_sample": per_sample})
            return _norms(per_sample)
        return compute_linear_norm_sample(layer, activations, backprops)
    a = activations[0].to(backprops.dtype)
    per_sample = {}
    if layer.weight.requires_grad:
        per_sample[layer.weight] = torch.einsum("ni,nj->nij", backprops, a)
    if layer.bias is not None and layer.bias.requires_grad:
        per_sample[layer.bias] = backprops
    _keep(layer, {"per_sample": per_sample})
    return _norms(per_sample)


class BookkeepingGradSampleModule(GradSampleModuleFastGradientClipping):
    """Opacus' fast-gradient-clipping module with lighter hooks, for ``bk`` mode.

    Opacus hooks every layer twice: a forward hook plus a *full* backward hook, which wraps
    each layer's inputs and outputs in extra autograd nodes, a large share of the forward
    pass on DenseNet-121's 242 parameterised layers (torch profiler). Here one forward hook
    keeps the layer's input and puts a tensor hook on its output; when the output's gradient
    arrives, the layer's registered norm function (``NORM_SAMPLERS``, above) records each
    parameter's per-image gradient norm in ``p._norm_sample`` -- what Opacus'
    ``get_clipping_coef`` reads -- and keeps the parts ``clipped_backward`` needs."""

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        if not batch_first or force_functorch:
            raise ValueError("book-keeping clipping needs batch-first inputs, no functorch")
        if (layer := covers(self._module)) is not None:
            raise TypeError(f"book-keeping clipping does not cover layer {layer}")
        self._module.autograd_grad_sample_hooks = []
        self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
        self.bk_layers = _trainable_layers(self._module)  # what clipped_backward visits
        self._names = {layer: name for name, layer in self._module.named_modules()}
        self._seen: set[nn.Module] = set()  # layers captured in the current forward pass
        for layer in self.bk_layers:
            setattr(layer, _BK_ON, True)
            self.autograd_grad_sample_hooks.append(
                layer.register_forward_hook(self._capture))
        self.autograd_grad_sample_hooks.append(
            self._module.register_forward_pre_hook(lambda *_: self._seen.clear()))
        self._scale_mean = loss_reduction == "mean"
        self._norm_scale = 1  # the batch size of the pass captured last, for a mean loss
        self.enable_hooks()

    def _capture(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (self.hooks_enabled and layer.training and torch.is_grad_enabled()
                and output.requires_grad):
            return
        # A layer applied twice in one pass has two inputs and two output gradients; the
        # parts kept here hold one of each, so its clipped gradient would be wrong.
        if layer in self._seen:
            raise RuntimeError(
                f"book-keeping clipping: layer {self._names.get(layer, type(layer).__name__)} "
                "is used twice in one forward pass, which it cannot clip correctly; use "
                "grad-sample-mode=hooks for this model")
        self._seen.add(layer)
        x = inputs[0].detach()
        norm_fn = self.NORM_SAMPLERS[type(layer)]
        activations = [x]
        if isinstance(layer, nn.GroupNorm) and (stats := _group_norm_stats(layer, output)):
            activations += [s.detach() for s in stats]
        # The norm functions see the gradient of the batch-*mean* loss, each image's 1/n
        # share; the norms are scaled back in get_norm_sample (all at once) and the
        # coefficients in clipped_backward, instead of copying every output gradient times n.
        self._norm_scale = x.shape[0] if self._scale_mean else 1

        def on_output_grad(grad: torch.Tensor) -> None:
            for p, norms in norm_fn(layer, activations, grad.detach()).items():
                p._norm_sample = norms

        output.register_hook(on_output_grad)

    def get_norm_sample(self) -> torch.Tensor:
        """Opacus' per-image gradient norms, scaled back from the batch-mean loss's once
        here rather than each parameter's in its hook."""
        return super().get_norm_sample() * self._norm_scale

    def remove_hooks(self) -> None:
        super().remove_hooks()
        for layer in self.bk_layers:
            for attr in (_BK_ON, _BK_PARTS):
                if hasattr(layer, attr):
                    delattr(layer, attr)


class NoiseAhead:
    """Standard normal noise for every parameter, in one flat buffer, drawn for the next step
    in a background thread while this step's forward and backward passes run.

    Drawing 7 M Gaussians is about 30 ms of a DP step on a CPU and runs on one core; much of
    a small-image step is Python overhead that leaves the other core idle, so the draw costs
    little there. Only the optimizer's own generator is used, by one thread at a time (the
    next draw starts after this one is taken), parameter by parameter: the noise is the
    sequence Opacus' own ``add_noise`` draws from that generator. Each draw is used once
    (``take`` draws itself when no fresh draw is waiting), and a failed draw raises in the
    step that needs it."""

    def __init__(self, params: list[nn.Parameter], generator: torch.Generator) -> None:
        self.generator = generator
        total = sum(p.numel() for p in params)
        self.flat = torch.empty(total, dtype=params[0].dtype, device=params[0].device)
        self.views, offset = [], 0
        for p in params:
            self.views.append(self.flat[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        self.ahead = self.flat.device.type == "cpu"  # an accelerator draws fast, in its stream
        self._thread: threading.Thread | None = None
        self._fresh = False
        self._error: BaseException | None = None

    def _draw(self) -> None:
        try:
            # Parameter by parameter, as Opacus draws: the same generator gives the same
            # noise as Opacus' own add_noise, value for value.
            for view in self.views:
                view.normal_(0.0, 1.0, generator=self.generator)
            self._fresh = True
        except BaseException as exc:  # re-raised by take(), in the training thread
            self._error = exc

    def take(self) -> list[torch.Tensor]:
        """This step's noise, one view per parameter (valid until ``draw_next``)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elif not self._fresh:
            self._draw()
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("drawing the DP noise failed") from error
        self._fresh = False  # used once: the next take() draws again unless draw_next() did
        return self.views

    def draw_next(self) -> None:
        """Start the next step's draw (after this step's noise has been added); nothing when
        one is drawn or being drawn (a skipped step took none)."""
        if self.ahead and self._thread is None and not self._fresh:
            # Not a daemon: the interpreter's exit joins it (a daemon thread still inside
            # torch when the interpreter finalises aborts the process).
            self._thread = threading.Thread(target=self._draw, name="fedcxr-dp-noise")
            self._thread.start()


class BookkeepingDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' fast-gradient-clipping DP optimizer (its noise scale, scaling and accountant
    hook) with the per-parameter loops made whole-model operations.

    - The clipped sum is taken without a copy. Opacus deep-copies every ``p.grad`` into
      ``p.summed_grad`` because autograd may still add into ``p.grad`` (gradient
      accumulation); ``clipped_backward`` assigns a fresh ``p.grad`` every step and Poisson
      sampling forbids accumulation, and ``add_noise`` replaces ``p.grad`` rather than
      writing into it, so the sum can be handed over as it is.
    - The noise is Opacus' mechanism, N(0, (noise multiplier x max grad norm)^2) on every
      coordinate from the optimizer's generator, but drawn ahead (``NoiseAhead``) and added
      in one fused operation, in place into the clipped sum; Opacus allocates a zero tensor,
      draws and adds per parameter, 364 times on DenseNet-121 (the optimizer part of
      ``benchmarks/train_throughput.py --breakdown``, before and after). Secure mode, a missing
      generator (the global one is not ours to use from a thread) or mixed dtypes keep
      Opacus' own ``add_noise``."""

    _noise: NoiseAhead | None = None

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad.data)
            else:
                p.summed_grad = p.grad.data

    def add_noise(self) -> None:
        params = self.params
        if (self.secure_mode or self.generator is None
                or len({(p.dtype, p.device) for p in params}) != 1):
            return super().add_noise()
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) \
            * self.max_grad_norm
        sums = [p.summed_grad for p in params]
        for s in sums:
            _check_processed_flag(s)
        if std != 0:
            if self._noise is None:
                self._noise = NoiseAhead(params, self.generator)
            # In place: the clipped sum is this step's own tensor (``accumulate``), read by
            # nothing after the noise; a new 7 M-value result cost an allocation and its page
            # faults every step.
            torch._foreach_add_(sums, self._noise.take(), alpha=std)
        for p, s in zip(params, sums, strict=True):
            p.grad = s.view_as(p)
            _mark_as_processed(s)

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            torch._foreach_div_([p.grad for p in self.params],
                                self.expected_batch_size * self.accumulated_iterations)

    def step(self, closure=None) -> float | None:
        # The next draw starts after the wrapped optimizer's update, which uses both cores:
        # it then runs beside the next batch's loading and forward pass.
        result = super().step(closure)
        if self._noise is not None:
            self._noise.draw_next()
        return result


class BookkeepingPrivacyEngine(PrivacyEngine):
    """Opacus' PrivacyEngine (its data loader, DP optimizer with its noise, and its
    accountant) around ``BookkeepingGradSampleModule``; call ``make_private`` with
    ``grad_sample_mode="ghost"`` so the optimizer is Opacus' fast-gradient-clipping one,
    which takes ``p.grad`` as the already-clipped sum (``BookkeepingDPOptimizer``)."""

    def _prepare_model(self, module: nn.Module, *, batch_first: bool = True,
                       max_grad_norm: float = 1.0, loss_reduction: str = "mean",
                       grad_sample_mode: str = "ghost", wrap_model: bool = True):
        if grad_sample_mode != "ghost" or not wrap_model or isinstance(module, GradSampleModule):
            raise ValueError("BookkeepingPrivacyEngine wraps a plain module in ghost mode")
        self.validate(module=module, optimizer=None, data_loader=None)
        return BookkeepingGradSampleModule(module, batch_first=batch_first,
                                           loss_reduction=loss_reduction,
                                           max_grad_norm=max_grad_norm)

    def _prepare_optimizer(self, **kwargs) -> BookkeepingDPOptimizer:
        optimizer = super()._prepare_optimizer(**kwargs)
        if type(optimizer) is not DPOptimizerFastGradientClipping:
            raise ValueError(f"book-keeping clipping needs Opacus' fast-gradient-clipping "
                             f"optimizer, got {type(optimizer).__name__}")
        optimizer.__class__ = BookkeepingDPOptimizer  # same state, one method differs
        return optimizer


def _trainable_layers(model: nn.Module) -> list[nn.Module]:
    return [layer for layer in model.modules()
            if any(p.requires_grad for p in layer.parameters(recurse=False))]


def covers(model: nn.Module) -> str | None:
    """None when bk mode can train ``model`` (every layer with trainable parameters has a
    norm function here), else the first layer it cannot."""
    names = {layer: name for name, layer in model.named_modules()}
    for layer in _trainable_layers(model):
        if not isinstance(layer, BK_LAYERS):
            return f"{names[layer]} ({type(layer).__name__})"
    return None


def clipped_backward(gsm: BookkeepingGradSampleModule, loss_per_sample: torch.Tensor,
                     inputs: torch.Tensor) -> torch.Tensor:
    """One backward pass; leaves ``p.grad = sum_i c_i * grad_i`` (c_i Opacus' clipping
    coefficient for image i) on every trainable parameter. ``inputs`` is the batch, with
    ``requires_grad`` set: the pass runs towards it only, so autograd forms no weight
    gradient (they would be unclipped). Returns the per-image clipping coefficients."""
    norms_backward(loss_per_sample, inputs)
    return clipped_sum(gsm)


def norms_backward(loss_per_sample: torch.Tensor, inputs: torch.Tensor) -> None:
    """The single backward pass of ``clipped_backward``: input gradients only; on the way the
    norm functions set every parameter's per-image gradient norms and keep the parts of its
    clipped gradient (``benchmarks/train_throughput.py --breakdown`` times the two apart)."""
    torch.autograd.backward(loss_per_sample.mean(), inputs=[inputs])


def clipped_sum(gsm: BookkeepingGradSampleModule) -> torch.Tensor:
    """After ``norms_backward``: Opacus' clipping coefficients from the norms, and
    ``p.grad = sum_i c_i * grad_i`` from the kept parts, layer by layer. Returns the
    coefficients."""
    coef = gsm.get_clipping_coef()
    # The kept parts are the batch-mean loss's (1/n of each image's gradient; see _capture).
    scale = len(coef) if gsm._scale_mean else 1
    missing = []
    scaled = coef * scale
    with torch.no_grad():
        for layer in gsm.bk_layers:
            parts = getattr(layer, _BK_PARTS, None)
            if parts is None:  # its output gradient never arrived
                missing.append(type(layer).__name__)
                continue
            delattr(layer, _BK_PARTS)
            c = scaled.to(layer.weight.dtype)  # itself when the dtype is the same
            for p, per_sample in parts.get("per_sample", {}).items():
                p.grad = torch.matmul(c, per_sample.reshape(len(c), -1)).view_as(p)
            if "io" in parts:
                layer.weight.grad = _clipped_weight_gradient(layer, *parts["io"], c)
    if missing:
        raise RuntimeError(f"book-keeping clipping left no gradient for {len(missing)} "
                           f"layer(s), e.g. {missing[0]}")
    return coef


def _clipped_weight_gradient(layer: nn.Conv2d, x: torch.Tensor, out_grad: torch.Tensor,
                             c: torch.Tensor) -> torch.Tensor:
    """``sum_i c_i G_i A_i^T``: the convolution's weight gradient with each image's output
    gradient scaled by its coefficient. A 1x1 stride-1 convolution's is one matrix product
    over every image's positions (measured faster than ``conv2d_weight``, which takes the
    general convolution path, at the 4x4 and 2x2 resolutions where the ghost norm is taken)."""
    n = x.shape[0]
    scaled = out_grad * c.view(-1, 1, 1, 1)
    if _pointwise(layer):  # kept only for groups=1 layers (conv2d_norm_sample)
        g = scaled.reshape(n, layer.out_channels, -1).transpose(0, 1).reshape(
            layer.out_channels, -1)  # (O, n T)
        a = _columns(layer, x).transpose(0, 1).reshape(layer.in_channels, -1)  # (D, n T)
        return torch.mm(g, a.t()).view(layer.weight.shape)
    return torch.nn.grad.conv2d_weight(x, layer.weight.shape, scaled, layer.stride,
                                       layer.padding, layer.dilation, layer.groups)


def register() -> None:
    register_grad_sampler(nn.Conv2d)(conv2d_grad_sample)
    register_norm_sampler(nn.Conv2d)(conv2d_norm_sample)
    register_norm_sampler(nn.GroupNorm)(group_norm_norm_sample)
    register_norm_sampler(nn.Linear)(linear_norm_sample)


def accountant_with_history(accountant, history: list[tuple[float, float, int]]):
    """An Opacus accountant holding ``history`` (noise multiplier, sample rate, steps): the
    accountants have no public way to be given a composed history, so it is set here, with
    the other Opacus internals (pinned in tests/test_framework_internals.py)."""
    accountant.history = list(history)
    return accountant
