"""DenseNet-121 for 1-channel chest radiographs, 14 logits.

The network is torchvision's DenseNet-121 (``common.densenet``: the same modules, keys and
seeded initial weights, without importing torchvision). Three changes, each for a reason:
- the stem takes ``in_channels`` (1 for radiographs); 3-channel ImageNet weights are summed
  over their input channels, which gives the same response to a grey image;
- no in-place ReLU anywhere (torchvision's ``forward`` uses ``F.relu(inplace=True)`` and its
  layers ``nn.ReLU(inplace=True)``): in-place ops overwrite tensors that Opacus' per-sample
  gradient hooks and Grad-CAM's activation hooks hold on to;
- ``norm="group"`` swaps every BatchNorm for GroupNorm, which DP-SGD needs (BatchNorm mixes
  samples in a batch, so per-sample gradients are undefined).

Weights are never downloaded: ``init_weights`` is a local file (torchvision format, the
legacy ``norm.1``-style keys of the original DenseNet checkpoints, or our own checkpoints).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import cpu_runtime
from common.atomic import atomic_path
from common.densenet import densenet121_features
from common.errors import FedcxrError
from common.labels import LABELS

log = logging.getLogger(__name__)

cpu_runtime.apply()  # oneDNN kernel caches sized for varying batch sizes, before any kernel

CHECKPOINT_FORMAT = "fedcxr-model/1"
GROUPS = 32  # every DenseNet-121 norm layer has a multiple of 32 channels
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


class ModelLoadError(FedcxrError):
    """A weights file that does not fit the model."""


class CxrDenseNet(nn.Module):
    """DenseNet-121 features + linear head, with an out-of-place forward."""

    def __init__(self, num_labels: int = len(LABELS), in_channels: int = 1,
                 norm: str = "batch") -> None:
        super().__init__()
        features, imagenet_head = densenet121_features()
        features.conv0 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3,
                                   bias=False)
        self.features = features
        self.classifier = nn.Linear(imagenet_head.in_features, num_labels)
        self.num_labels, self.in_channels, self.norm = num_labels, in_channels, "batch"
        if norm == "group":
            to_group_norm(self)
        elif norm != "batch":
            raise ValueError(f"norm must be 'batch' or 'group', not {norm!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        out = F.relu(features)  # not in place: hooks may hold `features`
        out = F.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))

    def config(self) -> dict:
        return {"num_labels": self.num_labels, "in_channels": self.in_channels,
                "norm": self.norm}


def to_group_norm(model: CxrDenseNet) -> CxrDenseNet:
    """Replace every BatchNorm2d with a fresh GroupNorm (affine parameters do not carry over)."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, nn.GroupNorm(GROUPS, child.num_features))
                replaced += 1
    model.norm = "group"
    log.info("norm: %d BatchNorm layers replaced by GroupNorm(%d); pretrained BatchNorm "
             "statistics and affine parameters do not carry over", replaced, GROUPS)
    return model


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        m = _LEGACY_KEY.match(key)
        if m:
            key = m.group(1) + m.group(2)
        out[key] = value
    return out


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: weights file not found; give a local path "
                             "(weights are never downloaded)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path}: not a PyTorch weights file ({exc})") from exc
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj["state_dict"], obj.get("config", {})
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"], {}
    if isinstance(obj, dict):
        return obj, {}
    raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a state dict")


def load_weights(model: CxrDenseNet, path: Path, *, strict_head: bool = False) -> list[str]:
    """Load a weights file into ``model``; returns notes on what was adapted.

    Adapts a 3-channel stem by summing over input channels and skips an ImageNet head whose
    shape does not fit (the head is then trained from scratch). Anything else that does not
    fit raises ModelLoadError listing the missing and unexpected keys.
    """
    state, _ = _read(path)
    state = _normalise_keys(state)
    own = model.state_dict()
    notes = []
    stem = state.get("features.conv0.weight")
    if stem is not None and stem.shape[1] != model.in_channels:
        if model.in_channels == 1:
            state["features.conv0.weight"] = stem.sum(dim=1, keepdim=True)
            notes.append(f"stem: {stem.shape[1]}-channel conv0 summed over input channels")
    for key in ("classifier.weight", "classifier.bias"):
        if key in state and key in own and state[key].shape != own[key].shape and not strict_head:
            del state[key]
            notes.append(f"head: {key} of shape {tuple(own[key].shape)} initialised fresh")
    if model.norm == "group":
        dropped = [k for k in state if re.search(r"norm\d?\.(running_mean|running_var|"
                                                 r"num_batches_tracked)$", k)]
        for k in dropped:
            del state[k]
        if dropped:
            notes.append("norm: BatchNorm statistics dropped (GroupNorm model)")
    missing = [k for k in own if k not in state and not k.startswith("classifier.")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if model.norm == "group":  # GroupNorm weights replace BatchNorm ones one-for-one
        missing = [k for k in missing if not re.search(r"norm\d?\.(weight|bias)$", k)]
    if missing or unexpected or wrong:
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = [f"missing keys: {head(missing)}" if missing else "",
                 f"unexpected keys: {head(unexpected)}" if unexpected else "",
                 f"wrong shapes: {head(wrong)}" if wrong else ""]
        raise ModelLoadError(f"{path}: does not fit DenseNet-121 ({model.norm} norm, "
                             f"{model.in_channels} channel); " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=False)
    for note in notes:
        log.info("%s: %s", Path(path).name, note)
    return notes


def build_model(num_labels: int = len(LABELS), in_channels: int = 1, norm: str = "batch",
                init_weights: str | Path | None = None) -> CxrDenseNet:
    """The project's DenseNet-121, optionally initialised from a local weights file."""
    model = CxrDenseNet(num_labels, in_channels, norm)
    if init_weights:
        load_weights(model, Path(init_weights))
    return model


def save_checkpoint(model: CxrDenseNet, path: Path, **extra) -> Path:
    """Our own checkpoint: weights + the config needed to rebuild the model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "config": model.config(),
                    "state_dict": model.state_dict(), **extra}, tmp)
    return path


def load_checkpoint(path: Path) -> CxrDenseNet:
    """Rebuild a model from one of our checkpoints, or from a plain (torchvision-style) state
    dict: BatchNorm when it has running statistics, else GroupNorm."""
    state, config = _read(Path(path))
    if "norm" not in config:
        stats = any(k.endswith("running_mean") for k in state)
        config = {**config, "norm": "batch" if stats else "group"}
    model = CxrDenseNet(**{"num_labels": len(LABELS), "in_channels": 1, **config})
    load_weights(model, Path(path), strict_head=True)
    return model


def resolve_device(spec: str = "auto") -> str:
    """``auto``: CUDA when this machine has it, else the CPU; ``cpu``, ``cuda``, ``cuda:N``
    as given, refused in one line when this machine cannot run them."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return spec
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FedcxrError(f"device {spec!r}: this machine has no CUDA device (torch "
                              f"{torch.__version__}); use --device cpu or auto")
        index = spec.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise FedcxrError(f"device {spec!r}: there are {torch.cuda.device_count()} CUDA "
                              "device(s)")
        return spec
    raise FedcxrError(f"device {spec!r}: use auto, cpu, cuda or cuda:N")


@torch.no_grad()
def predict(model: nn.Module, loader, *, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid probabilities (N, L) and labels (N, L) over a loader, in eval mode."""
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        probs.append(torch.sigmoid(model(x.to(device))).cpu())
        labels.append(y)
    if not probs:
        return torch.zeros(0, len(LABELS)), torch.zeros(0, len(LABELS))
    return torch.cat(probs), torch.cat(labels)
