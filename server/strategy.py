"""The federated arm's strategy: Flower's own strategies, restricted to training nodes, with
update screening in front of aggregation.

``make_strategy`` picks FedAvg / FedProx / FedAdam / FedMedian / FedTrimmedAvg from
``flwr.serverapp.strategy``. ``TrainNodesGrid`` lets a strategy's ``configure_train`` sample
only the nodes whose *own* config says ``role=train``. Screening and aggregation of the
updates themselves live in ``server.updates``.

This is also the one module that reaches into Flower's internals: the Grid methods
``TrainNodesGrid`` forwards, FedOpt's state attributes (``STATE_KEYS``) and the ``flwr``
logger (``quiet_flower``); ``tests/test_framework_internals.py`` pins each of them, so a
Flower upgrade that moves one fails there by name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import contextmanager

from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Strategy,
)

from common.config import RunConfig

log = logging.getLogger("flwr")

# Strategy attributes that carry state between rounds (checkpointed with the run).
STATE_KEYS = ("current_arrays", "m_t", "v_t", "clipping_norm")


CLIENT_DP_WRAPPERS = (DifferentialPrivacyServerSideFixedClipping,
                      DifferentialPrivacyServerSideAdaptiveClipping,
                      DifferentialPrivacyClientSideFixedClipping,
                      DifferentialPrivacyClientSideAdaptiveClipping)


def is_client_dp(strategy: Strategy) -> bool:
    return isinstance(strategy, CLIENT_DP_WRAPPERS)


def make_strategy(run: RunConfig, n_train: int) -> Strategy:
    """The federated arm's Flower strategy; with ``client-dp``, wrapped in Flower's own
    client-level DP wrapper (clipping each site's update, Gaussian noise on the mean)."""
    inner = _base_strategy(run, n_train)
    σ, clip = run.client_noise_multiplier, run.client_clipping_norm
    if run.client_dp == "fixed-server":
        return DifferentialPrivacyServerSideFixedClipping(inner, σ, clip, n_train)
    # Adaptive clipping also releases a noised count of clipped updates; its noise (Flower's
    # default n/20 is too little for a few hospitals) is at least the model's multiplier, so
    # the update's own noise is raised by at most 1/sqrt(1 - 1/4) (Andrew et al. 2021).
    count_sd = max(n_train / 20, σ)
    if run.client_dp == "adaptive-server":
        return DifferentialPrivacyServerSideAdaptiveClipping(
            inner, σ, n_train, initial_clipping_norm=clip, clipped_count_stddev=count_sd)
    if run.client_dp == "fixed-client":
        return DifferentialPrivacyClientSideFixedClipping(inner, σ, clip, n_train)
    if run.client_dp == "adaptive-client":
        return DifferentialPrivacyClientSideAdaptiveClipping(
            inner, σ, n_train, initial_clipping_norm=clip, clipped_count_stddev=count_sd)
    return inner


def _base_strategy(run: RunConfig, n_train: int) -> Strategy:
    common = dict(min_train_nodes=max(1, min(run.min_train_sites, n_train)),
                  min_available_nodes=1, min_evaluate_nodes=1)
    if run.strategy == "fedavg":
        return FedAvg(**common)
    if run.strategy == "fedprox":
        return FedProx(proximal_mu=run.proximal_mu, **common)
    if run.strategy == "fedadam":
        return FedAdam(eta=run.fedadam_eta, eta_l=run.lr, **common)
    if run.strategy == "fedmedian":
        return FedMedian(**common)
    return FedTrimmedAvg(beta=run.trim_fraction, **common)


def strategy_state(strategy: Strategy) -> dict:
    return {k: getattr(strategy, k) for k in STATE_KEYS if getattr(strategy, k, None) is not None}


def restore_strategy_state(strategy: Strategy, state: dict) -> None:
    for k, v in state.items():
        setattr(strategy, k, v)


class TrainNodesGrid(Grid):
    """A view of the Grid in which only the training nodes exist."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid = grid
        self._ids = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._ids)

    def set_run(self, run):
        return self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages):
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        return self._grid.send_and_receive(messages, timeout=timeout)


@contextmanager
def quiet_flower():
    """Flower's strategies log one line per aggregate call (on the ``flwr`` logger); per key
    group of a sliced aggregation that is noise."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
