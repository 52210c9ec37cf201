"""Data: Fashion-MNIST reader, image folders with corrupt files skipped and counted, clear errors."""
import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from gig_fast.data import ImageFolderDataset, fashion_mnist, load_image


def _write_idx(path, arr, gz=True):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    ext = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", imgs, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", labels, gz)
    _write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", imgs, gz)
    ds = fashion_mnist("test", root=tmp_path, normalize=False)
    x, y = ds.tensors
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32
    np.testing.assert_allclose(x[:, 0].numpy() * 255, imgs, atol=1e-3)
    assert y.tolist() == labels.tolist()
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("val", root=tmp_path)


def test_fashion_mnist_missing_is_a_clear_error(tmp_path, monkeypatch):
    import gig_fast.data as data
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", ())
    monkeypatch.delenv("GIG_FAST_FMNIST", raising=False)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist("train", root=tmp_path)


def _folder(tmp_path, corrupt=1):
    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    for i in range(corrupt):
        (tmp_path / "dog" / f"broken{i}.jpg").write_bytes(b"not an image at all")
    (tmp_path / "cat" / "notes.txt").write_text("ignored: not an image extension")
    return tmp_path


def test_image_folder_skips_and_counts_corrupt_images(tmp_path):
    root = _folder(tmp_path, corrupt=2)
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        ds = ImageFolderDataset(root, size=16)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6 and len(ds.skipped) == 2
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and y == 1
    grey = ImageFolderDataset(root, size=(8, 12), channels=1, mean=(0.5,), std=(0.5,))
    assert grey[0][0].shape == (1, 8, 12)
    # normalisation: (pixel/255 − mean)/std
    raw = np.asarray(Image.open(root / "cat" / "0.png").convert("L"), dtype=np.float32) / 255
    full = load_image(root / "cat" / "0.png", None, 1, (0.5,), (0.5,))
    np.testing.assert_allclose(full[0].numpy(), (raw - 0.5) / 0.5, atol=1e-6)


def test_empty_and_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no readable images"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(tmp_path / "a" / "bad.png")
