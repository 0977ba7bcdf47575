import pytest
import torch

from dmd_lightning.fmnist.data import load_fashion_mnist, to_model_space
from dmd_lightning.images import to_uint8


def test_idx_files_load_with_their_labels():
    x, y = load_fashion_mnist(split="test")
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [1000] * 10


def test_model_space_round_trip_pads_with_background():
    x, _ = load_fashion_mnist(split="test")
    m = to_model_space(x[:4])
    assert m.shape == (4, 1, 32, 32) and m.min() >= -1 and m.max() <= 1
    assert torch.equal(to_uint8(m)[:, 0, 2:30, 2:30], x[:4]) and (m[:, :, :2] == -1).all()


def test_missing_data_root_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
