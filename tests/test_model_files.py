"""The ServerApp's model files, built, read and written in a child process
(``server.model_files``), and its checkpoint without torch (``server.checkpoint``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import FedcxrError
from common.model import build_model, load_checkpoint, save_checkpoint
from server import checkpoint, model_files
from server.state import FEDERATED, RunState


def test_initial_weights_equal_a_seeded_build_in_this_process():
    """The child's weights are exactly those of torch.manual_seed(seed); build_model(norm),
    in state-dict order (the order the weights are packed in)."""
    with model_files.InitialWeights(7, "group", None) as initial:
        got = initial.result()
    torch.manual_seed(7)
    want = build_model(norm="group").state_dict()
    assert list(got) == list(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)
    with model_files.InitialWeights(8, "group", None) as initial:
        other = initial.result()
    assert not np.array_equal(other["features.conv0.weight"], got["features.conv0.weight"])


def test_initial_weights_from_a_missing_file_fail_in_one_line(tmp_path):
    with model_files.InitialWeights(0, "batch", str(tmp_path / "none.pth")) as initial, \
            pytest.raises(FedcxrError, match="building the initial model: .*none.pth"):
        initial.result()


def test_an_uncollected_build_is_stopped_on_leaving_the_block():
    with model_files.InitialWeights(0, "batch", None) as initial:
        proc = initial._proc
    assert proc.returncode is not None


def test_read_and_write_round_trip_through_fedcxr_checkpoints(tmp_path):
    torch.manual_seed(1)
    model = build_model(norm="group")
    save_checkpoint(model, tmp_path / "m.pt", image_size=32)
    weights, norm = model_files.read(tmp_path / "m.pt")
    assert norm == "group"
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(weights[k], v.numpy())
    weights = {k: v + 1 if v.dtype.kind == "f" else v for k, v in weights.items()}
    paths = model_files.write({"single:site1": (weights, {"arm": "single:site1", "round": 2})},
                              "group", tmp_path / "out")
    assert paths["single:site1"].name == "single_site1.pt"
    again = load_checkpoint(paths["single:site1"])
    for k, v in again.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), weights[k])
    meta = torch.load(paths["single:site1"], weights_only=True)
    assert (meta["arm"], meta["round"]) == ("single:site1", 2)
    with pytest.raises(FedcxrError, match="model file .*nothing.pt"):
        model_files.read(tmp_path / "nothing.pt")


def _state() -> RunState:
    st = RunState()
    st.round = 3
    st.arms = {FEDERATED: {"w": np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2]}}
    return st


def test_a_checkpoint_resumes_its_arrays_and_numpy_rng(tmp_path):
    np.random.seed(5)
    path = checkpoint.save("r", {"seed": 0}, _state(), tmp_path, 3)
    expected = np.random.random(3)
    np.random.seed(6)
    saved = checkpoint.load(str(path))
    np.testing.assert_array_equal(np.random.random(3), expected)
    assert saved["state"].round == 3
    np.testing.assert_array_equal(saved["state"].arms[FEDERATED]["w"],
                                  np.array([[0, 2], [3, 5]], dtype=np.float32))


def test_a_format_1_checkpoint_written_by_torch_save_still_resumes(tmp_path):
    st = _state().to_checkpoint()
    as_tensors = checkpoint._convert(st, np.ndarray,
                                     lambda a: torch.from_numpy(np.ascontiguousarray(a)))
    torch.save({"format": checkpoint.TORCH_FORMAT, "run_name": "r", "config": {},
                "state": as_tensors, "rng": {"torch": torch.get_rng_state(),
                                             "numpy": np.random.get_state(),
                                             "python": __import__("random").getstate()}},
               tmp_path / "old.pt")
    saved = checkpoint.load(str(tmp_path / "old.pt"))
    np.testing.assert_array_equal(saved["state"].arms[FEDERATED]["w"],
                                  np.array([[0, 2], [3, 5]], dtype=np.float32))


def test_a_torn_or_foreign_checkpoint_is_refused_in_one_line(tmp_path):
    path = checkpoint.save("r", {}, _state(), tmp_path, 1)
    torn = tmp_path / "torn.pt"
    torn.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FedcxrError, match="torn.pt: not a fedcxr server checkpoint"):
        checkpoint.load(str(torn))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(FedcxrError, match="foreign.pt: not a fedcxr server checkpoint"):
        checkpoint.load(str(foreign))
