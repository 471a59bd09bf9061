"""The Flower and Opacus internals fedcxr relies on, pinned: an upgrade of either that moves
one of them fails here, by name, rather than somewhere in a federation run.

Where each is used: ``server/strategy.py`` (TrainNodesGrid forwards every Grid method;
strategy state = FedOpt's ``current_arrays`` / ``m_t`` / ``v_t``), ``server/updates.py``
(quiets the ``flwr`` logger during per-slice aggregation), ``common/dp_grad_sample.py``
(PrivacyEngine ``_prepare_model`` / ``_prepare_optimizer`` overrides; ``p._norm_sample``
read by ``get_clipping_coef``; the optimizer's ``summed_grad``; GroupNorm's autograd node
``_saved_result1`` / ``_saved_result2``), ``common/privacy.py`` (the accountant's
``history``), tests (Message metadata ``_src_node_id``)."""

from __future__ import annotations

import inspect

import flwr
import opacus


def test_pinned_versions():
    """The versions these pins were read from; a new version must pass the rest again."""
    assert flwr.__version__ == "1.41.0"
    assert opacus.__version__ == "1.6.0"


def test_train_nodes_grid_forwards_every_grid_method():
    from flwr.serverapp import Grid

    from server.strategy import TrainNodesGrid

    abstract = set(Grid.__abstractmethods__)
    assert abstract == {"set_run", "run", "create_message", "get_node_ids", "push_messages",
                        "pull_messages", "send_and_receive"}
    assert abstract <= set(vars(TrainNodesGrid))
    for name in abstract - {"run"}:
        ours = inspect.signature(getattr(TrainNodesGrid, name)).parameters
        theirs = inspect.signature(getattr(Grid, name)).parameters
        assert list(ours) == list(theirs), name


def test_strategy_state_is_the_attributes_we_checkpoint():
    """FedOpt's state (current arrays, m_t, v_t) and adaptive clipping's current norm."""
    from flwr.serverapp.strategy import (
        DifferentialPrivacyServerSideAdaptiveClipping,
        FedAdam,
        FedAvg,
    )

    from server.strategy import STATE_KEYS

    strategy = FedAdam()
    for key in ("current_arrays", "m_t", "v_t"):
        assert key in STATE_KEYS and hasattr(strategy, key), key
    assert "self.m_t" in inspect.getsource(type(strategy).__mro__[1])
    adaptive = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 1.0, 2,
                                                             clipped_count_stddev=1.0)
    assert "clipping_norm" in STATE_KEYS and hasattr(adaptive, "clipping_norm")
    assert "self.clipping_norm" in inspect.getsource(type(adaptive)._geometric_update)


def test_flower_logs_through_the_flwr_logger():
    from flwr.common.logger import FLOWER_LOGGER

    assert FLOWER_LOGGER.name == "flwr"


def test_message_metadata_keeps_the_source_node_in_src_node_id():
    from flwr.app import Metadata

    assert "_src_node_id" in inspect.getsource(Metadata.__init__)


def test_opacus_privacy_engine_hooks_we_override():
    from opacus import PrivacyEngine

    model = inspect.signature(PrivacyEngine._prepare_model).parameters
    assert list(model) == ["self", "module", "batch_first", "max_grad_norm", "loss_reduction",
                           "grad_sample_mode", "wrap_model"]
    optimizer = inspect.signature(PrivacyEngine._prepare_optimizer).parameters
    assert {"optimizer", "noise_multiplier", "max_grad_norm", "expected_batch_size",
            "grad_sample_mode", "kwargs"} <= set(optimizer)


def test_opacus_reads_norm_sample_and_sums_into_summed_grad():
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping

    assert "param._norm_sample" in inspect.getsource(
        GradSampleModuleFastGradientClipping.get_norm_sample)
    assert "summed_grad" in inspect.getsource(DPOptimizerFastGradientClipping.accumulate)


def test_opacus_noise_is_what_our_whole_model_noise_step_reproduces():
    """``BookkeepingDPOptimizer.add_noise`` / ``scale_grad`` redo these two methods as
    whole-model operations: the std, the noised sum in ``p.grad`` and the processed flags."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    add_noise = inspect.getsource(DPOptimizerFastGradientClipping.add_noise)
    assert "effective_noise_multiplier * self.max_grad_norm" in add_noise
    assert "p.grad = (p.summed_grad + noise).view_as(p)" in add_noise
    assert "_mark_as_processed(p.summed_grad)" in add_noise
    assert "p.grad /= self.expected_batch_size * self.accumulated_iterations" in \
        inspect.getsource(DPOptimizerFastGradientClipping.scale_grad)


def test_opacus_accountants_keep_a_history_list():
    from opacus.accountants import PRVAccountant, RDPAccountant

    for accountant in (PRVAccountant(), RDPAccountant()):
        assert accountant.history == []


def test_group_norm_node_saves_mean_and_rstd_and_its_kernel_takes_images_as_groups():
    """``common.dp_grad_sample`` reads GroupNorm's per-(image, group) mean and 1/std from the
    autograd node (``_saved_result1`` / ``_saved_result2``) and runs the native backward
    kernel with every (image, group) pair as a group of one "image": both must keep meaning
    what they mean here, checked against per-image gradients taken one image at a time; at
    2x2 positions (``_FEW_POSITIONS``) the per-image gradients come from sums instead, the
    input's mean (1) large beside its spread (3) as after a ReLU."""
    for size in (5, 2):
        _check_group_norm_per_image_norms(size)


def _check_group_norm_per_image_norms(size: int) -> None:
    import torch

    from common.dp_grad_sample import _FEW_POSITIONS, group_norm_norm_sample

    assert (size * size <= _FEW_POSITIONS) == (size == 2)
    torch.manual_seed(0)
    layer = torch.nn.GroupNorm(3, 6)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1.0, 1.0)
    x = torch.randn(4, 6, size, size) * 3 + 1
    out = layer(x)
    node = out.grad_fn
    assert node.name() == "NativeGroupNormBackward0"
    groups = x.view(4, 3, -1)
    torch.testing.assert_close(node._saved_result1, groups.mean(dim=2))
    torch.testing.assert_close(node._saved_result2,
                               (groups.var(dim=2, unbiased=False) + layer.eps).rsqrt())
    g = torch.randn_like(x)
    want = [torch.autograd.grad((layer(x[i:i + 1]) * g[i:i + 1]).sum(),
                                [layer.weight, layer.bias]) for i in range(4)]
    for stats in ([], [node._saved_result1, node._saved_result2]):  # recomputed, or saved
        norms = group_norm_norm_sample(layer, [x, *stats], g)
        torch.testing.assert_close(norms[layer.weight],
                                   torch.stack([w.norm() for w, _ in want]))
        torch.testing.assert_close(norms[layer.bias], torch.stack([b.norm() for _, b in want]))
