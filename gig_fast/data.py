"""Datasets: Fashion-MNIST (Debian's ``dataset-fashion-mnist``), image folders (class per sub-folder)
and the unlabelled photos that ship offline with scikit-image, scikit-learn and matplotlib.

Every dataset yields ``(image [C, H, W] float32 normalised, label int)``. Corrupt or unreadable images
in a folder are skipped, counted and reported (``ImageFolderDataset.skipped``), never fatal; an empty
or missing dataset raises a ValueError / FileNotFoundError saying where it looked.
"""
from __future__ import annotations

import contextlib
import gzip
import math
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = ["open_dataset", "FASHION_MNIST_DIRS", "FASHION_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "fashion_mnist", "ImageFolderDataset", "IMAGE_EXTENSIONS", "load_image",
           "read_image", "MAX_IMAGE_PIXELS",
           "OfflinePhotos", "OFFLINE_PHOTOS", "UNLABELLED"]

UNLABELLED = -1  # label of an image without a class (explained for its predicted class)

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Fashion-MNIST pixel statistics (train split): the normalisation of `fashion_mnist(normalize=True)`,
# which is what the demo network expects.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_fashion_root(root: str | os.PathLike | None) -> Path:
    candidates = [Path(root)] if root else []
    if os.environ.get("GIG_FAST_FMNIST"):
        candidates.append(Path(os.environ["GIG_FAST_FMNIST"]))
    candidates += [Path(p) for p in FASHION_MNIST_DIRS]
    for c in candidates:
        for sub in (c, c / "FashionMNIST" / "raw"):
            if any((sub / f"train-images-idx3-ubyte{ext}").exists() for ext in (".gz", "")):
                return sub
    raise FileNotFoundError(
        "Fashion-MNIST not found in " + ", ".join(str(c) for c in candidates)
        + " — install Debian's `dataset-fashion-mnist` (apt-get install -y dataset-fashion-mnist) "
        "or pass root= / set GIG_FAST_FMNIST to a folder with the idx files")


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None,
                  normalize: bool = True) -> torch.utils.data.TensorDataset:
    """Fashion-MNIST as a ``TensorDataset`` of ``[N, 1, 28, 28]`` float32 images and int64 labels.

    Args:
        split: ``"train"`` (60k) or ``"test"`` (10k).
        root: folder with the idx files (``.gz`` or not); default: the Debian package's folder.
        normalize: subtract the data set's mean and divide by its std (what the demo network expects).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = _find_fashion_root(root)
    prefix = "train" if split == "train" else "t10k"

    def pick(kind):
        for ext in (".gz", ""):
            p = base / f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte{ext}"
            if p.exists():
                return p
        raise FileNotFoundError(f"missing {prefix}-{kind} file in {base}")

    images = torch.from_numpy(_read_idx(pick("images")).copy()).float().div_(255.0).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(pick("labels")).astype(np.int64))
    if normalize:
        images = (images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return torch.utils.data.TensorDataset(images, labels)


# PIL's own limit (Image.MAX_IMAGE_PIXELS, ~89.5 Mpixels): above it PIL only warns, above twice it raises
# DecompressionBombError from Image.open. Images above `max_pixels` are refused here with a message that
# says what to do (or, with `reduce_large`, downscaled while they load).
MAX_IMAGE_PIXELS = 89_478_485
_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _open_image(path):
    """``PIL.Image.open`` with PIL's decompression-bomb check left to the caller, who reads the size from
    the header and decides before decoding (PIL keeps the limit in a module global, so it is lifted for
    this open only, under a lock)."""
    from PIL import Image

    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with im:
        yield im


def _decode(im, path, mode: str, max_pixels: int, reduce_large: bool, draft_size=None):
    """Decode an opened image in ``mode``, refusing (ValueError) one of more than ``max_pixels`` pixels
    unless ``reduce_large``: then JPEGs are decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``: no
    full-size buffer) and any other format is reduced after decoding, to at most ``max_pixels``."""
    from PIL import Image

    w, h = im.size
    if w * h > max_pixels:
        if not reduce_large:
            raise ValueError(f"image {path} has {w}x{h} = {w * h:,} pixels, more than "
                             f"max_image_pixels={max_pixels:,}: refused (set reduce_large_images: true to "
                             "downscale such images as they load, or raise max_image_pixels)")
        factor = math.ceil(math.sqrt(w * h / max_pixels))
        im.draft(mode, (max(1, w // factor), max(1, h // factor)))
    elif draft_size is not None:
        im.draft(mode, draft_size)
    im = im.convert(mode)
    im.load()
    if reduce_large and im.width * im.height > max_pixels:
        im = im.reduce(math.ceil(math.sqrt(im.width * im.height / max_pixels)))
    return im


def read_image(path: str | os.PathLike, channels: int = 3, max_pixels: int = MAX_IMAGE_PIXELS,
               reduce_large: bool = False, draft_size=None):
    """Read one image file into a decoded PIL image (``L`` for 1 channel, else ``RGB``).

    Raises ValueError naming the file when it is not a readable image (unknown format, truncated or
    corrupt data) or has more than ``max_pixels`` pixels (unless ``reduce_large``, see :func:`load_image`).
    """
    from PIL import Image, UnidentifiedImageError

    mode = "L" if channels == 1 else "RGB"
    try:
        with _open_image(path) as im:
            return _decode(im, path, mode, max_pixels, reduce_large, draft_size)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise ValueError(f"cannot read image {path}: no such file") from None
        raise ValueError(f"cannot read image {path}: {e}") from None


def load_image(path: str | os.PathLike, size: int | tuple[int, int] | None = None, channels: int = 3,
               mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), max_pixels: int = MAX_IMAGE_PIXELS,
               reduce_large: bool = False) -> torch.Tensor:
    """Read one image file → ``[channels, H, W]`` float32, resized (shorter side then centre crop) and normalised.

    Args:
        max_pixels: images with more pixels are refused (default PIL's limit, ~89.5 Mpixels) ...
        reduce_large: ... or, if True, downscaled while they load (JPEG: by the decoder, at 1/2–1/8 scale).

    Raises ValueError naming the file if it is not a readable image or is too large.
    """
    return pil_to_tensor(read_image(path, channels, max_pixels, reduce_large), size, channels, mean, std)


def pil_to_tensor(im, size=None, channels: int = 3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """A PIL image → ``[channels, H, W]`` float32: shorter side resized to ``size``, centre crop, normalised."""
    im = im.convert("L" if channels == 1 else "RGB")
    if size is not None:
        from PIL import Image

        h, w = (size, size) if isinstance(size, int) else size
        scale = max(h / im.height, w / im.width)
        im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.BILINEAR)
        left, top = (im.width - w) // 2, (im.height - h) // 2
        im = im.crop((left, top, left + w, top + h))
    arr = np.asarray(im, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1)
    mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)[:channels]
    std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)[:channels]
    return (t - mean) / std


def _skimage(name):
    def read():
        import skimage.data
        return getattr(skimage.data, name)()
    return read


def _sklearn(name):
    def read():
        from sklearn.datasets import load_sample_image
        return load_sample_image(name)
    return read


def _grace_hopper():
    import matplotlib.cbook
    from PIL import Image
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


# name → reader of an RGB uint8 array; all ship inside the packages (no download)
OFFLINE_PHOTOS = {"chelsea": _skimage("chelsea"), "coffee": _skimage("coffee"), "astronaut": _skimage("astronaut"),
                  "rocket": _skimage("rocket"), "china": _sklearn("china.jpg"), "flower": _sklearn("flower.jpg"),
                  "grace_hopper": _grace_hopper}


class OfflinePhotos(torch.utils.data.Dataset):
    """The photos that ship offline (skimage's ``chelsea`` cat, ``coffee``, ``astronaut``, ``rocket``;
    scikit-learn's ``china``/``flower``; matplotlib's ``grace_hopper``), unlabelled (label
    :data:`UNLABELLED`: a run explains each for its predicted class).

    Args:
        names: which photos (default all of :data:`OFFLINE_PHOTOS` whose package is installed).
        size, channels, mean, std: as in :func:`load_image`.
    """

    def __init__(self, names=None, size=224, channels: int = 3, mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225)):
        from PIL import Image

        unknown = sorted(set(names or ()) - set(OFFLINE_PHOTOS))
        if unknown:
            raise ValueError(f"unknown photo(s) {unknown}; valid: {', '.join(OFFLINE_PHOTOS)}")
        self.names, self.images, self.skipped = [], [], []
        for name in names or OFFLINE_PHOTOS:
            try:
                arr = OFFLINE_PHOTOS[name]()
            except ImportError as e:  # the package holding it is not installed
                self.skipped.append((name, f"not available: {e}"))
                continue
            self.names.append(name)
            self.images.append(pil_to_tensor(Image.fromarray(arr), size, channels, mean, std))
        if not self.images:
            raise ValueError("no offline photo is available: install scikit-image, scikit-learn or matplotlib")
        self.samples = [(name, UNLABELLED) for name in self.names]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], UNLABELLED


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images in ``root/<class>/<file>`` (ImageNet-val style); classes sorted by folder name.

    Unreadable files are found up front and skipped, counted in ``skipped`` (list of ``(path, reason)``),
    with one warning summarising them: the header of each file is read when the dataset is made (format,
    size: images over ``max_pixels`` are refused unless ``reduce_large``); :meth:`check` decodes one
    image fully, which finds what a header cannot show (a truncated JPEG passes ``Image.verify()``) —
    the pipeline checks the images it selects that way before any stage runs.

    Args:
        root: the dataset folder.
        size: output size (int or ``(H, W)``); channels, mean, std, max_pixels, reduce_large as in
            :func:`load_image`.
    """

    def __init__(self, root: str | os.PathLike, size=224, channels: int = 3,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), max_pixels: int = MAX_IMAGE_PIXELS,
                 reduce_large: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder {root} does not exist")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"dataset folder {root} has no class sub-folders (expected root/<class>/<image>)")
        self.size, self.channels, self.mean, self.std = size, channels, mean, std
        self.max_pixels, self.reduce_large = max_pixels, reduce_large
        self.samples: list[tuple[Path, int]] = []
        self.skipped: list[tuple[str, str]] = []
        for label, cls in enumerate(self.classes):
            for f in sorted((root / cls).iterdir()):
                if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                try:
                    self._verify(f)
                    self.samples.append((f, label))
                except ValueError as e:
                    self.skipped.append((str(f), str(e)))
        if self.skipped:
            warnings.warn(f"skipped {len(self.skipped)} unreadable image(s) in {root}, "
                          f"e.g. {self.skipped[0][0]}", stacklevel=2)
        if not self.samples:
            raise ValueError(f"dataset folder {root} has no readable images "
                             f"({len(self.skipped)} unreadable skipped)")

    def _verify(self, path: Path) -> None:
        from PIL import Image, UnidentifiedImageError
        try:
            with _open_image(path) as im:
                w, h = im.size
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise ValueError(f"unreadable image: {e}") from e
        if w * h > self.max_pixels and not self.reduce_large:
            raise ValueError(f"{w}x{h} = {w * h:,} pixels, more than max_image_pixels="
                             f"{self.max_pixels:,}: refused (reduce_large_images: true downscales such images)")

    def check(self, i: int) -> str | None:
        """Why image ``i`` cannot be loaded (None: it can): it is decoded once, JPEGs at reduced scale
        (``Image.draft``, which still reads the whole stream, so truncation shows)."""
        path = self.samples[i][0]
        size = None if self.size is None else tuple(self.size) if isinstance(self.size, (tuple, list)) \
            else (self.size, self.size)
        try:
            read_image(path, self.channels, self.max_pixels, self.reduce_large, draft_size=size)
        except ValueError as e:
            return str(e)
        return None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return load_image(path, self.size, self.channels, self.mean, self.std, self.max_pixels, self.reduce_large), label


def open_dataset(name: str, split: str = "test", *, size=224, channels: int = 3, mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225), max_pixels: int = MAX_IMAGE_PIXELS, reduce_large: bool = False):
    """A dataset by the name a run's configuration gives it, and its skipped files.

    Args:
        name: ``"fashion-mnist"`` (``split`` train/test), ``"photos"`` (:class:`OfflinePhotos`) or the
            path of an image folder (:class:`ImageFolderDataset`).
        size, channels, mean, std: the preprocessing of photos and folders (as in :func:`load_image`).
        max_pixels, reduce_large: what an image folder does with huge images (as in :func:`load_image`).
    Returns:
        ``(dataset, skipped)``: skipped = ``[[path or name, reason], …]``.
    """
    if name == "fashion-mnist":
        return fashion_mnist(split), []
    kw = dict(size=size, channels=channels, mean=mean, std=std)
    ds = OfflinePhotos(**kw) if name == "photos" else ImageFolderDataset(name, **kw, max_pixels=max_pixels,
                                                                        reduce_large=reduce_large)
    return ds, [list(s) for s in ds.skipped]
