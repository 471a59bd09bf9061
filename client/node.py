"""Everything a node knows about its own site, rebuilt cheaply for every message.

Site facts come from the node config (``role``, ``site-name``, ``data-path``, ...). In
simulation Flower gives each virtual node a ``partition-id`` instead, which indexes the sites
of the cohort file named in the run config. Opening a site is a memmap and a small CSV read.
"""

from __future__ import annotations

import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.cache import SiteCache
from common.config import NodeConfig, RunConfig, parse
from common.data import CachedImages, split_datasets
from common.errors import ConfigError
from common.privacy import PrivacyLedger, default_ledger_path
from common.site import SiteSource, default_cache_dir, ensure_cache


@dataclass
class Site:
    config: NodeConfig
    source: SiteSource

    @property
    def device(self) -> str:
        """Where this node trains and scores (node config ``device``, default auto: CUDA
        when the node's machine has it)."""
        from common.model import resolve_device

        return resolve_device(self.config.device)

    @property
    def name(self) -> str:
        return self.config.site_name

    @property
    def role(self) -> str:
        return self.config.role

    def cache(self, size: int) -> SiteCache:
        path = Path(self.config.cache_path) / f"cache-{size}" if self.config.cache_path \
            else default_cache_dir(self.source.data_dir, size)
        return ensure_cache(self.source, size, path)

    def splits(self, run: RunConfig) -> dict[str, CachedImages]:
        cache = self.cache(run.image_size)
        splits = split_datasets(cache, seed=run.seed)
        if run.max_images_per_site:
            cap = run.max_images_per_site
            splits = {k: CachedImages(cache, v.rows[: max(cap * len(v) // max(len(cache.index),
                                                                               1), 2)])
                      for k, v in splits.items()}
        return splits

    @property
    def state_dir(self) -> Path:
        """The site's own writable folder: the ledger's folder (``ledger-path``), else
        ``cache-path``, else ``<data>/.fedcxr``. Held-out sites keep per-run model scores
        here (under ``external/``); nothing in it is ever sent."""
        if self.config.ledger_path:
            return Path(self.config.ledger_path).parent
        if self.config.cache_path:
            return Path(self.config.cache_path)
        return self.source.data_dir / ".fedcxr"

    def ledger(self, accountant: str) -> PrivacyLedger:
        path = Path(self.config.ledger_path) if self.config.ledger_path else \
            default_ledger_path(self.source.data_dir)
        return PrivacyLedger(path, site=self.name, accountant=accountant)


def site_from_cohort(cohort_file: Path, partition_id: int) -> NodeConfig:
    cohort = tomllib.loads(Path(cohort_file).read_text())
    sites = cohort["site"]
    if not 0 <= partition_id < len(sites):
        raise ConfigError(f"{cohort_file}: partition {partition_id} but only {len(sites)} sites")
    s = sites[partition_id]
    base = Path(cohort_file).parent
    return NodeConfig(role=s["role"], site_name=s["name"], data_path=str(base / s["path"]),
                      manifest=str(base / s["path"] / s["manifest"]), format=s["format"],
                      max_epsilon=s.get("max-epsilon"), min_cell=int(s.get("min-cell", 10)),
                      partition_id=partition_id,
                      num_partitions=len(sites))


def open_site(node_config: dict, run: RunConfig) -> Site:
    config = parse(NodeConfig, dict(node_config), what="node config")
    if config.partition_id >= 0 and not config.data_path:
        if not run.cohort:
            raise ConfigError("simulation needs run config key 'cohort' (path to cohort.toml)")
        from_cohort = site_from_cohort(Path(run.cohort), config.partition_id)
        # What the node's own config sets (its ledger, cache, budget) wins over the cohort's.
        own = {f.replace("-", "_") for f in node_config} - {"partition_id", "num_partitions"}
        config = NodeConfig(**{**from_cohort.__dict__,
                               **{k: v for k, v in config.__dict__.items() if k in own}})
    if not config.data_path:
        raise ConfigError("node config needs 'data-path' (the site's data folder)")
    name = config.site_name or Path(config.data_path).name
    config = NodeConfig(**{**config.__dict__, "site_name": name})
    source = SiteSource(Path(config.data_path), Path(config.manifest) if config.manifest else None,
                        config.format or None, site=name, allow_outside=config.allow_outside,
                        max_image_mb=config.max_image_mb,
                        annotations=annotation_files(config))
    return Site(config, source)


def annotation_files(config: NodeConfig) -> tuple[Path, ...]:
    """The node config's reader and box files (``readers``, ``boxes``: comma-separated)."""
    named = [p.strip() for v in (config.readers, config.boxes) for p in v.split(",")]
    return tuple(Path(p) for p in named if p)


def prevalence(labels: np.ndarray) -> list[float]:
    """Fraction positive per label; -1 where the site never annotates it (all blank)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-blank column is expected
        p = np.nanmean(labels, axis=0) if len(labels) else np.full(labels.shape[1], np.nan)
    return [float(x) if np.isfinite(x) else -1.0 for x in p]
