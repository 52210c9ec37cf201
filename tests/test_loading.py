"""Images loaded ahead of the compute (pipeline/image_loader.py) and chunk files written in the background
(store.BackgroundWriter): the same values as the direct ways, and failures still surface."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gig_fast.models import DemoResNet
from gig_fast.pipeline import Pipeline, PipelineConfig
from gig_fast.pipeline.image_loader import image_batches, loader_workers
from gig_fast.pipeline.files import BackgroundWriter, load_npz, save_npz


def _folder(root, seed: int, per_class: int = 5):
    """An image folder of 2 classes × ``per_class`` random RGB PNGs of assorted sizes."""
    rng = np.random.default_rng(seed)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for j in range(per_class):
            h, w = rng.integers(20, 60, size=2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{j}.png")
    return root


def _pipe(tmp_path, dataset=None, **kw) -> Pipeline:
    cfg = PipelineConfig(model="demo", dataset=str(tmp_path / "images") if dataset is None else "tiny",
                         image_size=28, channels=1, mean=(0.5,), std=(0.25,), layers=["layer4.2"], concept_images=10,
                         explain_images=4, per_class=1, k=2, out=str(tmp_path / "out"), progress=False, **kw)
    return Pipeline(cfg, model=DemoResNet(base=2).eval(), dataset=dataset)


def _batches(ids: np.ndarray, rng) -> list[np.ndarray]:
    """``ids`` shuffled and cut into batches of random sizes (1–4)."""
    ids = rng.permutation(ids)
    cuts = np.cumsum(rng.integers(1, 5, size=len(ids)))
    return [b for b in np.split(ids, cuts[cuts < len(ids)]) if len(b)]


@pytest.mark.parametrize("workers", [0, 2])
def test_image_batches_are_load_images_of_each_batch(tmp_path, seed, workers):
    _folder(tmp_path / "images", seed)
    pipe = _pipe(tmp_path, loader_workers=workers)
    assert loader_workers(pipe) == workers
    batches = _batches(np.arange(len(pipe.dataset)), np.random.default_rng(seed))
    got = list(image_batches(pipe, batches))
    assert len(got) == len(batches)
    for b, (x, y) in zip(batches, got):
        want_x, want_y = pipe.load_images(b)
        assert torch.equal(x, want_x) and torch.equal(y, want_y), f"batch {b.tolist()}"


def test_in_memory_data_load_on_a_thread(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(12, 1, 28, 28, generator=g), torch.arange(12) % 10)
    pipe = _pipe(tmp_path, dataset=data)
    assert loader_workers(pipe) == 0  # automatic: nothing to decode
    batches = _batches(np.arange(12), np.random.default_rng(seed))
    for b, (x, y) in zip(batches, image_batches(pipe, batches)):
        assert torch.equal(x, data.tensors[0][b]) and torch.equal(y, data.tensors[1][b])
    assert list(image_batches(pipe, [])) == []


def test_an_image_folder_decodes_in_worker_processes_by_default(tmp_path, seed, monkeypatch):
    _folder(tmp_path / "images", seed)
    pipe = _pipe(tmp_path)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert loader_workers(pipe) == 3  # one per core but the main process's
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert loader_workers(pipe) == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_load_is_raised_by_the_stage(tmp_path, seed, workers):
    _folder(tmp_path / "images", seed)
    pipe = _pipe(tmp_path, loader_workers=workers)
    (pipe.dataset.samples[3][0]).write_bytes(b"\x89PNG\r\n\x1a\n not an image any more")
    with pytest.raises(ValueError, match="cannot read image"):
        list(image_batches(pipe, [np.array([0, 1]), np.array([2, 3]), np.array([4])]))


def test_loader_workers_is_validated_and_not_in_the_run_key(tmp_path):
    with pytest.raises(ValueError, match="loader_workers must be null"):
        PipelineConfig(loader_workers=-1)
    assert PipelineConfig(loader_workers=4).key() == PipelineConfig().key()


def test_background_writer_writes_what_save_npz_writes(tmp_path, seed):
    rng = np.random.default_rng(seed)
    arrays = [{"a": rng.standard_normal((5, 7)), "b": torch.arange(int(rng.integers(1, 9)))} for _ in range(4)]
    with BackgroundWriter() as writer:
        for i, arr in enumerate(arrays):
            writer.save_npz(tmp_path / "bg" / f"chunk_{i}.npz", **arr)
    for i, arr in enumerate(arrays):
        save_npz(tmp_path / "fg" / f"chunk_{i}.npz", **arr)
        bg, fg = load_npz(tmp_path / "bg" / f"chunk_{i}.npz"), load_npz(tmp_path / "fg" / f"chunk_{i}.npz")
        assert bg.keys() == fg.keys() and all(np.array_equal(bg[k], fg[k]) for k in fg)


def test_background_writer_raises_a_failed_write(tmp_path):
    def failing(path, **arrays):
        raise OSError(f"disk full writing {path.name}")

    with pytest.raises(OSError, match="disk full writing chunk_0.npz"):
        with BackgroundWriter(failing) as writer:
            writer.save_npz(tmp_path / "chunk_0.npz", a=np.zeros(3))
    writer = BackgroundWriter(failing)
    writer.save_npz(tmp_path / "chunk_0.npz", a=np.zeros(3))
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    assert not (tmp_path / "chunk_0.npz").exists()


def test_background_writer_finishes_its_files_when_the_stage_fails(tmp_path):
    with pytest.raises(RuntimeError, match="the stage failed"):
        with BackgroundWriter() as writer:
            writer.save_npz(tmp_path / "chunk_0.npz", a=np.arange(4))
            raise RuntimeError("the stage failed")
    assert np.array_equal(load_npz(tmp_path / "chunk_0.npz")["a"], np.arange(4))  # whole, not partial
