"""DenseNet-121 factory: stem, GroupNorm, no in-place ops, loading weights files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from common.model import ModelLoadError, build_model, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def tv_weights(tmp_path_factory):
    torch.manual_seed(0)
    tv = torchvision.models.densenet121(weights=None)
    with torch.no_grad():  # non-trivial BatchNorm parameters, so loading is observable
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.uniform_(-0.1, 0.1)
    path = tmp_path_factory.mktemp("w") / "densenet121.pth"
    torch.save(tv.state_dict(), path)
    return tv, path


def test_one_channel_stem_sums_imagenet_filters(tv_weights):
    tv, path = tv_weights
    model = build_model(init_weights=path)
    assert model.features.conv0.weight.shape == (64, 1, 7, 7)
    torch.testing.assert_close(model.features.conv0.weight,
                               tv.features.conv0.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.features.denseblock1.denselayer1.norm1.weight,
                               tv.features.denseblock1.denselayer1.norm1.weight)
    assert model.classifier.out_features == 14
    # A grey image through our stem == through ImageNet's stem with the grey copied 3x.
    x = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(model.features.conv0(x), tv.features.conv0(x.repeat(1, 3, 1, 1)))


def test_legacy_norm_dot_one_keys_load(tv_weights, tmp_path):
    tv, _ = tv_weights
    pattern = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.")
    legacy = {pattern.sub(r"\1.\2.", k): v for k, v in tv.state_dict().items()}
    assert any(".norm.1." in k for k in legacy)
    torch.save(legacy, tmp_path / "legacy.pth")
    model = build_model(init_weights=tmp_path / "legacy.pth")
    torch.testing.assert_close(model.features.denseblock2.denselayer3.conv2.weight,
                               tv.features.denseblock2.denselayer3.conv2.weight)


def test_mismatched_file_lists_keys(tmp_path):
    torch.save({"features.conv0.weight": torch.zeros(64, 1, 7, 7), "foo.bar": torch.zeros(1)},
               tmp_path / "bad.pth")
    with pytest.raises(ModelLoadError) as info:
        build_model(init_weights=tmp_path / "bad.pth")
    msg = str(info.value)
    assert "missing keys: features.norm0.weight" in msg and "unexpected keys: foo.bar" in msg
    with pytest.raises(ModelLoadError, match="not found"):
        build_model(init_weights=tmp_path / "nope.pth")


def test_group_norm_replaces_every_batch_norm(tv_weights, caplog):
    _, path = tv_weights
    with caplog.at_level("INFO"):
        model = build_model(norm="group", init_weights=path)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 121
    assert "do not carry over" in caplog.text


def test_no_inplace_relu_and_opacus_accepts_group_norm_model():
    from opacus.validators import ModuleValidator

    model = build_model(norm="group")
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []
    assert ModuleValidator.validate(build_model(), strict=False)  # BatchNorm is flagged


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    model = build_model(norm="group").eval()
    save_checkpoint(model, tmp_path / "m.pt", image_size=32)
    again = load_checkpoint(tmp_path / "m.pt").eval()
    assert again.norm == "group"
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(model(x), again(x))


def test_a_sites_evaluation_model_is_built_once_and_the_weights_received_overwrite_all_of_it():
    """A site reuses one model per norm for every evaluation message of its process; after
    a use that changed its state (training-mode batch statistics, a Grad-CAM hook added and
    removed), the next model's weights replace every parameter and buffer: it computes what
    a freshly built model with those weights computes."""
    from client import handlers
    from common.evaluation.gradcam import gradcam_labels
    from common.records import to_record

    torch.manual_seed(3)
    first, second = build_model(), build_model()
    model = handlers._eval_model(to_record(first.state_dict()), "batch")
    model.train()(torch.rand(4, 1, 32, 32))  # moves BatchNorm's running statistics
    gradcam_labels(model, torch.rand(2, 1, 32, 32), [0, 1])
    again = handlers._eval_model(to_record(second.state_dict()), "batch")
    assert again is model and handlers._eval_model(
        to_record(build_model(norm="group").state_dict()), "group") is not model
    for key, value in second.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), second.eval()(x))


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_weights_travel_packed_and_come_back_exactly(norm):
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from common.records import from_record, to_record

    torch.manual_seed(0)
    model = build_model(norm=norm)
    with torch.no_grad():  # make every tensor distinct, buffers included
        for v in model.state_dict().values():
            v.copy_(torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point()
                    else v + 3)
    state = model.state_dict()
    record = to_record(state)
    assert set(record) <= {"float", "int"} and ("int" in record) == (norm == "batch")
    # a handful of Flower objects instead of one or two per tensor
    assert len(get_all_nested_objects(record)) < 12 < len(state)
    back = from_record(record, build_model(norm=norm).state_dict())
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k], v), k
    half = from_record(to_record(state, "float16"), state)
    assert to_record(state, "float16").count_bytes() < 0.51 * record.count_bytes()
    torch.testing.assert_close(half["classifier.weight"], state["classifier.weight"],
                               rtol=1e-3, atol=1e-3)


def test_packed_weights_from_another_model_are_refused():
    from common.records import from_record, to_record

    record = to_record(build_model(norm="batch").state_dict())
    with pytest.raises(ValueError, match="different model"):
        from_record(record, build_model(norm="group").state_dict())


def test_the_device_is_resolved_or_refused_in_one_line():
    """--device / node config device: auto takes CUDA only where there is one; a device
    this machine cannot run is refused before any work, in one line."""
    import subprocess
    import sys
    from pathlib import Path

    from common.errors import FedcxrError
    from common.model import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == "cpu"
    with pytest.raises(FedcxrError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        with pytest.raises(FedcxrError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
        return
    with pytest.raises(FedcxrError, match="no CUDA device"):
        resolve_device("cuda")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "cli.main", "train-local", "--site", "/nowhere",
                        "--out", "/nowhere/out", "--device", "cuda"], cwd=root,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no CUDA device" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_training_on_a_device_leaves_the_weights_on_the_cpu(tmp_path):
    """local_train moves the model to TrainConfig.device and back: the weights a node sends
    are read on the CPU whatever device trained them (here: this machine's auto device)."""
    from common.data import CachedImages
    from common.model import resolve_device
    from common.site import SiteSource, ensure_cache
    from common.synth import SynthOptions, generate
    from common.training import TrainConfig, local_train, validate

    generate(tmp_path / "c", SynthOptions(sites=1, held_out=0, images_per_site=12, size=64,
                                          seed=1))
    ds = CachedImages(ensure_cache(SiteSource(tmp_path / "c" / "site1"), 32, tmp_path / "k"))
    model = build_model(norm="group")
    device = resolve_device("auto")
    r = local_train(model, ds, TrainConfig(batch_size=4, max_steps=2, device=device))
    assert r.steps == 2
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    validate(model, ds, device=device)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def _torchvision_path(seed: int, in_channels: int = 1, num_labels: int = 14) -> nn.Module:
    """What ``CxrDenseNet`` built before ``common.densenet``: torchvision's model, its stem
    and head replaced, every ReLU out of place."""
    torch.manual_seed(seed)
    tv = torchvision.models.densenet121(weights=None)
    tv.features.conv0 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3,
                                  bias=False)
    tv.classifier = nn.Linear(tv.classifier.in_features, num_labels)
    for m in tv.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return tv


def test_our_densenet_is_torchvisions_weight_for_weight_and_output_for_output():
    """Same keys, same seeded initial weights (seeded runs unchanged), same logits, and the
    same gradients in training mode (BatchNorm batch statistics)."""
    tv = _torchvision_path(11)
    torch.manual_seed(11)
    ours = build_model()
    theirs_state, our_state = tv.state_dict(), ours.state_dict()
    assert list(our_state) == list(theirs_state)
    for key, value in theirs_state.items():
        assert torch.equal(our_state[key], value), key
    x = torch.rand(3, 1, 64, 64)
    tv.train(), ours.train()
    out_tv, out_ours = tv(x), ours(x)
    torch.testing.assert_close(out_ours, out_tv, rtol=0, atol=0)
    out_tv.sum().backward()
    out_ours.sum().backward()
    torch.testing.assert_close(ours.features.denseblock3.denselayer7.conv1.weight.grad,
                               tv.features.denseblock3.denselayer7.conv1.weight.grad)


def test_building_a_model_imports_no_torchvision():
    import subprocess
    import sys

    code = ("import sys; from common.model import build_model; build_model(); "
            "print('torchvision' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root).stdout
    assert out.strip() == "False"



def _python(code: str, env: dict | None = None) -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1], env=env).stdout


@pytest.mark.parametrize("preset", [None, "100"])
def test_the_kernel_caches_keep_many_batch_sizes_unless_the_operator_sized_them(preset):
    """DP's Poisson batches change size every step; with oneDNN's default 1024-entry caches
    each new size recompiled the convolution kernels. Importing the model module sizes both
    caches before any kernel is built, and keeps a value the operator set."""
    import os

    from common.cpu_runtime import KERNEL_CACHE_ENTRIES, KERNEL_CACHES

    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHES}
    if preset is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = preset
    out = _python("import os, common.model; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'],"
                  " os.environ['LRU_CACHE_CAPACITY'])", env)
    assert out.split() == [preset or KERNEL_CACHE_ENTRIES, KERNEL_CACHE_ENTRIES]
    assert int(KERNEL_CACHE_ENTRIES) >= 8 * 1024

