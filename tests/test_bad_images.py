"""One bad image never kills a folder run: unreadable images — a truncated JPEG
(it passes ``Image.verify()``), garbage, an image that claims 400 Mpixels (PIL's
DecompressionBombError) — are skipped, counted, listed in metrics.json and recorded in the work folder
so that a relaunch skips the same ones; huge images are refused with a message or, by option,
downscaled as they load; ``gig-fast explain`` on a bad image is one error line."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import test_pipeline as tp
from gig_fast.cli import main
from gig_fast.data import ImageFolderDataset, load_image, read_image
from gig_fast.pipeline import Pipeline


def _jpeg(rng, size=(28, 28)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def claims_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A JPEG whose header (SOF0) claims another size: PIL reads it from the header before decoding."""
    data = bytearray(jpeg)
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 7], data[i + 7:i + 9] = height.to_bytes(2, "big"), width.to_bytes(2, "big")
    return bytes(data)


@pytest.fixture()
def folder(tmp_path):
    """3 classes × 4 good images, plus a truncated JPEG, garbage, a 400-Mpixel claim and a 60×60 image."""
    return _make_folder(tmp_path / "data")


def _make_folder(root):
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(4):
            (root / f"c{c}" / f"{i}.jpg").write_bytes(_jpeg(rng))
    good = _jpeg(rng)
    (root / "c0" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "c1" / "garbage.png").write_bytes(b"\x89PNG not really")
    (root / "c2" / "bomb.jpg").write_bytes(claims_size(good, 20000, 20000))
    (root / "c2" / "large.jpg").write_bytes(_jpeg(rng, (60, 60)))
    return root


def folder_config(out, root, **kw):
    base = dict(dataset=str(root), image_size=28, channels=1, mean=[0.5], std=[0.5], concept_images=14,
                explain_images=14, per_class=5, layers=["layer4.2"], gig_rule="gausslegendre",
                gig_tolerance=None)
    return tp.tiny_config(out, **{**base, **kw})


def test_a_truncated_jpeg_passes_verify_but_not_check(folder):
    with Image.open(folder / "c0" / "truncated.jpg") as im:
        im.verify()  # why a header check is not enough
    ds = ImageFolderDataset(folder, size=28, channels=1, mean=[0.5], std=[0.5])
    i = [str(p) for p, _ in ds.samples].index(str(folder / "c0" / "truncated.jpg"))
    assert "image file is truncated" in ds.check(i)
    assert ds.check(0) is None


def test_the_header_check_refuses_garbage_and_huge_images(folder):
    with pytest.warns(UserWarning, match="skipped 3 unreadable image"):
        ds = ImageFolderDataset(folder, size=28, channels=1, max_pixels=2500)
    reasons = dict(ds.skipped)
    assert "unreadable image" in reasons[str(folder / "c1" / "garbage.png")]
    assert "20000x20000 = 400,000,000 pixels, more than max_image_pixels=2,500" in reasons[str(folder / "c2" / "bomb.jpg")]
    assert "60x60 = 3,600 pixels, more than max_image_pixels=2,500" in reasons[str(folder / "c2" / "large.jpg")]
    assert len(ds) == 13  # the 12 good ones and the truncated one (found by check)


def test_huge_images_are_refused_or_downscaled_on_load(folder):
    with pytest.raises(ValueError, match=r"large\.jpg has 60x60 = 3,600 pixels, more than max_image_pixels=2,500: "
                                         r"refused \(set reduce_large_images: true"):
        load_image(folder / "c2" / "large.jpg", 28, 1, max_pixels=2500)
    x = load_image(folder / "c2" / "large.jpg", 28, 1, max_pixels=2500, reduce_large=True)
    assert x.shape == (1, 28, 28) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match=r"bomb\.jpg has 20000x20000 = 400,000,000 pixels"):
        load_image(folder / "c2" / "bomb.jpg", 28, 1)  # PIL's own default limit: no DecompressionBombError
    # downscaled by the JPEG decoder itself (1/2 to 1/8 scale: never a 400-Mpixel buffer), then reduced
    for limit in (89_478_485, 2500):
        w, h = read_image(folder / "c2" / "bomb.jpg", 1, max_pixels=limit, reduce_large=True).size
        assert w == h and w * h <= limit and w * h > limit / 16


def test_a_folder_run_skips_lists_and_records_bad_images(folder, tmp_path, monkeypatch):
    cfg = folder_config(tmp_path / "out", folder)
    with pytest.warns(UserWarning, match=r"1 of the 14 selected images cannot be read and are skipped"):
        pipe = Pipeline(cfg, model=tp.tiny_model())
    out = pipe.run()
    metrics = json.loads((out / "metrics.json").read_text())
    skipped = dict(metrics["skipped_images"])
    assert set(skipped) == {str(folder / n) for n in ("c0/truncated.jpg", "c1/garbage.png", "c2/bomb.jpg")}
    assert "image file is truncated" in skipped[str(folder / "c0" / "truncated.jpg")]
    assert "more than max_image_pixels=89,478,485" in skipped[str(folder / "c2" / "bomb.jpg")]
    assert metrics["concept_images"] == 13 and metrics["explained_images"] == 13
    record = json.loads(next(out.glob("work-*/config.json")).read_text())
    assert record["unreadable"]["skipped"] == [[str(folder / "c0" / "truncated.jpg"),
                                                skipped[str(folder / "c0" / "truncated.jpg")]]]
    graph = (out / "graph.json").read_bytes()

    # a relaunch skips the same images from the record, without decoding them again
    def no_check(self, i):
        raise AssertionError("images were checked again")
    monkeypatch.setattr(ImageFolderDataset, "check", no_check)
    again = Pipeline(cfg, model=tp.tiny_model())
    assert again.skipped == pipe.skipped and np.array_equal(again.explain_ids, pipe.explain_ids)
    again.run()
    assert (out / "graph.json").read_bytes() == graph


def test_reduce_large_images_keeps_them(folder, tmp_path):
    cfg = folder_config(tmp_path / "out", folder, max_image_pixels=2500, reduce_large_images=True)
    with pytest.warns(UserWarning):
        pipe = Pipeline(cfg, model=tp.tiny_model())
    paths = {str(pipe.dataset.samples[i][0]) for i in pipe.concept_ids}
    assert {str(folder / "c2" / "large.jpg"), str(folder / "c2" / "bomb.jpg")} <= paths
    assert set(dict(pipe.skipped)) == {str(folder / "c0" / "truncated.jpg"), str(folder / "c1" / "garbage.png")}
    x, _ = pipe.load_images(pipe.concept_ids)
    assert x.shape == (len(pipe.concept_ids), 1, 28, 28) and torch.isfinite(x).all()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run on the folder (its bad images skipped): ``(output folder, image folder)``."""
    base = tmp_path_factory.mktemp("explain")
    root = _make_folder(base / "data")
    with pytest.warns(UserWarning, match="unreadable"):
        Pipeline(folder_config(base / "run", root), model=tp.tiny_model()).run()
    return base / "run", root


@pytest.mark.parametrize("name,message", [("c0/truncated.jpg", "image file is truncated"),
                                          ("c1/garbage.png", "cannot identify image file"),
                                          ("c2/bomb.jpg", "20000x20000 = 400,000,000 pixels"),
                                          ("c2/none.jpg", "no such file")])
def test_explain_on_a_bad_image_is_one_error_line(finished_run, capsys, name, message):
    """The image is read before the model is needed: the error comes first."""
    out, root = finished_run
    assert main(["explain", "--image", str(root / name), "--run", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("gig-fast: error: cannot read image") or "refused" in captured.err
    assert message in captured.err and captured.err.count("\n") == 1 and "Traceback" not in captured.err