"""A run's selected model as one file a deployment loads without fedcxr.

``selected_model`` rebuilds the model a run selected for an arm from its last checkpoint
(every checkpoint holds every arm's selected weights) and results.json (image size, norm,
thresholds fixed on training-site validation data). ``Deployable`` wraps it with what the
file must carry: sigmoid probabilities in the label order, the thresholds as a buffer, and
the input contract. TorchScript keeps the metadata as an extra file (``fedcxr.json``,
readable with ``torch.jit.load(path, _extra_files=...)``); ONNX keeps it in the model's
``metadata_props``. Both take the image as fedcxr's cache holds it: 1 x S x S, float in [0, 1],
decoded and windowed by ``common.imaging`` and resized to the run's image size.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.config import norm_for
from common.errors import FedcxrError
from common.labels import LABELS
from common.model import CxrDenseNet, build_model
from server.weight_files import load

FORMATS = ("torchscript", "onnx")
METADATA_FILE = "fedcxr.json"
INPUT_CONTRACT = ("float32 tensor N x 1 x S x S in [0, 1]: the image decoded and windowed as "
                  "fedcxr's common.imaging does (MONOCHROME1 inverted, VOI window or "
                  "percentile window), resized to S x S; output N x 14 probabilities in "
                  "`labels` order; positive where probability >= threshold")


@dataclass
class ModelMeta:
    """What travels inside the exported file besides the weights."""

    model: str
    run_name: str
    selected_round: int | None
    image_size: int
    norm: str
    labels: list[str]
    thresholds: dict[str, float]
    input: str = INPUT_CONTRACT
    format_version: str = "fedcxr-export/1"


class Deployable(nn.Module):
    """The selected network with its output made explicit: probabilities, and the operating
    points as a buffer (NaN where the run fixed none for a label)."""

    def __init__(self, net: CxrDenseNet, thresholds: dict[str, float]) -> None:
        super().__init__()
        self.net = net
        values = [thresholds.get(label, math.nan) for label in LABELS]
        self.register_buffer("thresholds", torch.tensor(values, dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(image))


def read_results(run_dir: Path) -> dict:
    path = Path(run_dir) / "results.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FedcxrError(f"{path}: no such file; export needs a finished run folder "
                          "(results.json and checkpoints/latest.pt)") from None
    except ValueError as exc:
        raise FedcxrError(f"{path}: not JSON ({exc})") from None


def selected_model(run_dir: Path, model: str) -> tuple[Deployable, ModelMeta]:
    """The model ``model`` (an arm name: ``federated``, ``single:SITE``) as the run selected
    it, in eval mode, with its metadata."""
    from server import checkpoint

    run_dir = Path(run_dir)
    results = read_results(run_dir)
    config = results.get("provenance", {}).get("config", {})
    arms = {a["name"]: a for a in results.get("arms", [])}
    if model not in arms or arms[model].get("kind") == "extra":
        trained = ", ".join(a for a, v in arms.items() if v.get("kind") != "extra")
        raise FedcxrError(f"--model {model}: not an arm of run {run_dir.name} (arms: "
                          f"{trained})")
    if arms[model].get("status") == "not trained":
        raise FedcxrError(f"--model {model}: this arm never trained in the run; nothing to "
                          "export")
    state = checkpoint.load(str(run_dir))["state"]
    chosen = state.selected.get(model)
    weights = chosen.weights if chosen is not None else state.arms.get(model)
    if weights is None:
        raise FedcxrError(f"{run_dir}/checkpoints/latest.pt holds no weights for {model}")
    weights = load(weights)
    norm = norm_for(bool(config.get("dp")) or config.get("client-dp", "off") != "off")
    net = build_model(norm=norm)
    try:
        net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
    except RuntimeError as exc:
        raise FedcxrError(f"{run_dir}: the checkpoint's {model} weights do not fit a "
                          f"DenseNet-121 with {norm} norm ({str(exc).splitlines()[0]})") from None
    thresholds = {k: float(v) for k, v in
                  config.get("thresholds", {}).get(model, {}).items()}
    meta = ModelMeta(model=model, run_name=run_dir.name,
                     selected_round=arms[model].get("best_round"),
                     image_size=int(config.get("image-size", config.get("image_size", 64))),
                     norm=norm, labels=list(LABELS), thresholds=thresholds)
    return Deployable(net, thresholds).eval(), meta


def example_input(meta: ModelMeta, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, meta.image_size, meta.image_size, generator=g)


def export(module: Deployable, meta: ModelMeta, fmt: str, out: Path) -> Path:
    """Write ``module`` as TorchScript (``model.pt``) or ONNX (``model.onnx``) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(asdict(meta), indent=1)
    x = example_input(meta)
    if fmt == "torchscript":
        path = out / "model.pt"
        with torch.no_grad():
            traced = torch.jit.trace(module, x)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: text})
        return path
    if fmt == "onnx":
        import onnx

        path = out / "model.onnx"
        # torch.export-based exporter (onnxscript); the batch dimension stays dynamic
        program = torch.onnx.export(module, (x,), input_names=["image"],
                                    output_names=["probabilities"], dynamo=True,
                                    dynamic_shapes={"image": {0: torch.export.Dim("batch")}})
        program.save(str(path))
        proto = onnx.load(str(path))
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_FILE, text
        onnx.save(proto, str(path))
        return path
    raise FedcxrError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
