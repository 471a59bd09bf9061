"""fedcxr export: a run's selected model as TorchScript / ONNX with its model card."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.main import main
from common.labels import LABELS
from common.model import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run's folder as the ServerApp leaves it: results.json and a checkpoint
    whose federated arm selected round 1 (weights that differ from the arm's last ones)."""
    from server import checkpoint
    from server.state import RunState, SelectedModel

    out = tmp_path_factory.mktemp("export") / "r1"
    torch.manual_seed(1)
    chosen = {k: v.numpy().copy() for k, v in build_model().state_dict().items()}
    torch.manual_seed(2)
    last = {k: v.numpy().copy() for k, v in build_model().state_dict().items()}
    st = RunState(round=2, arms={"federated": last},
                  selected={"federated": SelectedModel(1, 0.71, None, None, ["s1"], chosen)})
    checkpoint.save("r1", {"seed": 0}, st, out, 2)
    results = {
        "protocol": {"primary_labels": ["Effusion", "Mass"], "primary_metric": "macro-auc",
                     "selection": "best-val"},
        "cohort": [{"site": "s1", "role": "train", "n_images": 120, "format": "nih"},
                   {"site": "s2", "role": "train", "n_images": 80, "format": "chexpert"},
                   {"site": "h1", "role": "evaluate", "n_images": 90, "format": "dicom"}],
        "arms": [{"name": "federated", "kind": "federated", "status": "complete",
                  "best_round": 1},
                 {"name": "single:s2", "kind": "single-site", "status": "not trained",
                  "best_round": None}],
        "internal_primary": [{"site": "s1", "model": "federated", "macro_auc": 0.8,
                              "ci_low": 0.7, "ci_high": 0.9}],
        "primary_auc": [{"site": "h1", "model": "federated", "macro_auc": 0.75,
                         "ci_low": 0.65, "ci_high": 0.85}],
        "verdict": {"status": "inconclusive", "overall": "H1 inconclusive: too few images."},
        "privacy": [{"site": "s1", "epsilon": 3.2, "delta": 1e-5, "accountant": "prv",
                     "privacy_unit": "patient"}],
        "provenance": {"config": {"image-size": 32, "dp": False, "client-dp": "off",
                                  "cohort": "cohort.toml", "threshold-method": "specificity",
                                  "threshold-target": 0.9,
                                  "thresholds": {"federated": {"Effusion": 0.42}},
                                  "validation_mean_auc": {"federated": 0.71}}}}
    (out / "results.json").write_text(json.dumps(results))
    return out


def reference_output(x: torch.Tensor) -> torch.Tensor:
    """What the selected model (round 1's weights, not the last) says, built independently."""
    torch.manual_seed(1)
    model = build_model().eval()
    with torch.no_grad():
        return torch.sigmoid(model(x))


def test_torchscript_loads_without_fedcxr_and_carries_its_contract(run_dir, tmp_path):
    assert main(["export", str(run_dir), "--model", "federated", "--format", "torchscript",
                 "--out", str(tmp_path)]) == 0
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    torch.save(x, tmp_path / "x.pt")
    # A process in which importing any fedcxr package fails: the file needs torch only.
    script = (
        "import sys, json, torch\n"
        "for name in ('common', 'client', 'server', 'cli'): sys.modules[name] = None\n"
        "extra = {'fedcxr.json': ''}\n"
        f"m = torch.jit.load({str(tmp_path / 'model.pt')!r}, _extra_files=extra)\n"
        f"y = m(torch.load({str(tmp_path / 'x.pt')!r}))\n"
        f"torch.save(y, {str(tmp_path / 'y.pt')!r})\n"
        "print(json.dumps({'meta': json.loads(extra['fedcxr.json']),"
        " 'thresholds': m.thresholds.tolist()}))\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["meta"]["labels"] == list(LABELS) and out["meta"]["image_size"] == 32
    assert out["meta"]["selected_round"] == 1 and "[0, 1]" in out["meta"]["input"]
    t = out["thresholds"]
    assert t[LABELS.index("Effusion")] == pytest.approx(0.42)
    assert np.isnan(t[LABELS.index("Mass")])  # no operating point fixed for it
    y = torch.load(tmp_path / "y.pt")
    assert torch.allclose(y, reference_output(x), atol=1e-5)


def test_onnx_matches_pytorch_and_the_card_says_what_the_run_measured(run_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path)]) == 0
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(6))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"image": x.numpy()})
    assert np.abs(y - reference_output(x).numpy()).max() <= 1e-4
    meta = json.loads({p.key: p.value for p in
                       onnx.load(str(tmp_path / "model.onnx")).metadata_props}["fedcxr.json"])
    assert meta["thresholds"] == {"Effusion": 0.42} and meta["norm"] == "batch"
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert [s["site"] for s in card["training_sites"]] == ["s1", "s2"]
    assert card["selection"] == {"rule": "best-val", "round": 1, "validation_auc": 0.71}
    assert card["external"] == [{"site": "h1", "macro_auc": 0.75, "ci_low": 0.65,
                                 "ci_high": 0.85}]
    assert card["privacy"][0]["epsilon"] == 3.2
    assert any("synthetic" in item for item in card["limitations"])
    text = (tmp_path / "model_card.md").read_text()
    for needle in ("H1 inconclusive: too few images.", "| external (held out) | h1 | 0.750 |",
                   "s1: 120 images", "Effusion 0.420", "Not a medical device",
                   "macro-auc over Effusion, Mass", "ε = 3.200"):
        assert needle in text, needle


@pytest.mark.parametrize("args,message", [
    (["--model", "single:s9"], "not an arm of run r1 (arms: federated, single:s2)"),
    (["--model", "single:s2"], "never trained"),
])
def test_export_refuses_what_the_run_has_not(run_dir, tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "cli.main", "export", str(run_dir), *args,
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_export_needs_a_finished_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cli.main", "export", str(tmp_path), "--out",
                        str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "results.json: no such file" in r.stderr
