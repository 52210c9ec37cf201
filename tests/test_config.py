"""Every user error in a configuration is caught up front, named, and never a traceback in the CLI.
Options are validated when a PipelineConfig is made — before any stage runs —
files and the model's input when a Pipeline is made."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import test_pipeline as tp
from gig_fast.cli import main
from gig_fast.models import load_model
from gig_fast.pipeline import Pipeline, PipelineConfig, load_config

BAD_OPTIONS = [  # (option, value, what the message says)
    ("code_method", "foo", "code_method must be one of 'lasso', 'omp'"),
    ("kmeans_mode", "foo", "kmeans_mode must be one of null, 'sequential', 'fast'"),
    ("k", 0, "k must be null or an integer >= 1"),
    ("k", 2.5, "k must be null or an integer >= 1"),
    ("k", True, "k must be null or an integer >= 1"),
    ("lam", -1, "lam must be null or a number > 0"),
    ("lam", 0, "lam must be null or a number > 0"),
    ("lam", float("nan"), "lam must be null or a number > 0"),
    ("gig_rule", "foo", "gig_rule must be one of 'adaptive', 'gausslegendre'"),
    ("gig_batch_size", 0, "gig_batch_size must be null or an integer >= 1"),
    ("k_factor", "eight", "k_factor must be a number > 0, got 'eight'"),
    ("k_factor", 0, "k_factor must be a number > 0"),
    ("ierf_dtype", "foo", "ierf_dtype must be one of 'float16', 'float32'"),
    ("ierf_dtype", "bfloat16", "ierf_dtype must be one of"),  # npz cannot hold bfloat16
    ("device", "gpu", "device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ("device", 0, "device must be"),
    ("backend", "cuda_fast", "backend must be one of null, 'torch', 'cpp', 'triton', 'cuda'"),
    ("class_names", "abc", "class_names must be null or a list of strings, got 'abc'"),
    ("class_names", [1, 2], "class_names must be null or a list of strings"),
    ("attribution", "lrp", "attribution must be one of 'srd', 'gradxinput'"),
    ("class_by", "guess", "class_by must be one of 'label', 'prediction'"),
    ("gig_autocast", "int8", "gig_autocast must be one of null, 'bf16', 'fp16'"),
    ("gig_tolerance", 0, "gig_tolerance must be null or a number > 0"),
    ("concept_images", 0, "concept_images must be an integer >= 1"),
    ("batch_size", "10", "batch_size must be an integer >= 1, got '10'"),
    ("chunk_images", -5, "chunk_images must be an integer >= 1"),
    ("gig_steps", 0, "gig_steps must be an integer >= 1"),
    ("top_concepts", 0, "top_concepts must be an integer >= 1"),
    ("per_class", -1, "per_class must be an integer >= 0"),
    ("seed", -1, "seed must be an integer >= 0"),
    ("progress", "yes", "progress must be true or false"),
    ("store_ierf", 1, "store_ierf must be true or false"),
    ("channels", 2, "channels must be 1 (grey) or 3 (RGB)"),
    ("mean", "x", "mean must be null or a list of numbers"),
    ("std", [0.5, 0.0, 0.5], "std must be null or a list of numbers > 0"),
    ("layers", [], "layers must be null (all points) or a non-empty list of layer names"),
    ("split", "val", "split must be 'train' or 'test' for fashion-mnist"),
    ("max_image_pixels", 0, "max_image_pixels must be an integer >= 1"),
    ("reduce_large_images", "no", "reduce_large_images must be true or false"),
    ("model", "", "model must be a non-empty string"),
    ("extra", [], "extra must be a mapping"),
]


@pytest.mark.parametrize("option,value,message", BAD_OPTIONS, ids=[f"{o}={v!r}" for o, v, _ in BAD_OPTIONS])
def test_every_bad_option_is_named_when_the_config_is_made(option, value, message):
    with pytest.raises(ValueError, match="^invalid configuration: .*" + _literal(message)):
        PipelineConfig(**{option: value})


def _literal(text):
    import re
    return re.escape(text)


def test_combinations_and_every_problem_at_once():
    with pytest.raises(ValueError, match="needs gig_steps >= 2"):
        PipelineConfig(gig_rule="trapezoid", gig_steps=1)
    with pytest.raises(ValueError, match="gig_rule 'adaptive' needs gig_steps >= 2"):
        PipelineConfig(gig_steps=1)
    with pytest.raises(ValueError, match="gig_rule 'adaptive' needs a gig_tolerance"):
        PipelineConfig(gig_tolerance=None)
    PipelineConfig(gig_rule="gausslegendre", gig_tolerance=None, gig_steps=1)  # a fixed rule alone is fine
    with pytest.raises(ValueError, match="positive: true needs code_method 'lasso'"):
        PipelineConfig(code_method="omp", positive=True)
    with pytest.raises(ValueError) as e:
        PipelineConfig(k=0, lam=-1, device="gpu")
    assert all(s in str(e.value) for s in ("k must", "lam must", "device must")) and "\n" not in str(e.value)


def test_valid_configs_still_load(tmp_path):
    cfg = PipelineConfig(k=7, lam=0.1, kmeans_mode="fast", gig_rule="trapezoid", gig_steps=2, device="cpu",
                         backend="torch", class_names=["a", "b"], mean=[0.5], std=[0.5], layers="layer1.0, layer4.2",
                         k_factor=np.float32(2.0), seed=np.int64(3), weights=tmp_path / "w.pt", out=tmp_path)
    assert cfg.layers == ["layer1.0", "layer4.2"] and cfg.mean == (0.5,) and cfg.out == str(tmp_path)
    assert type(cfg.k_factor) is float and type(cfg.seed) is int  # numpy scalars become JSON-able ones
    assert cfg.key() == cfg.replace(k_factor=2.0, seed=3).key() and json.dumps(cfg.to_dict())
    assert PipelineConfig().key() == PipelineConfig(max_image_pixels=89_478_485, reduce_large_images=False).key()
    assert PipelineConfig(reduce_large_images=True).key() != PipelineConfig().key()


def test_malformed_files_name_the_file_and_line(tmp_path):
    (tmp_path / "c.yaml").write_text("k: 4\nlayers: [layer1.0, layer4.2\ngig_steps: 3\n")
    with pytest.raises(ValueError, match=r"config file .*c\.yaml, line 3, column \d+: invalid YAML"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "c.json").write_text('{"k": 4,\n "lam": }')
    with pytest.raises(ValueError, match=r"config file .*c\.json, line 2, column 9: invalid JSON"):
        load_config(tmp_path / "c.json")
    (tmp_path / "list.yaml").write_text("- k: 4\n")
    with pytest.raises(ValueError, match="must hold a mapping of options, got a list"):
        load_config(tmp_path / "list.yaml")


CLI_ERRORS = [  # (config file text, --set items, what stderr says)
    ("code_method: foo\n", [], "invalid configuration: code_method must be one of"),
    ("k: 0\nlam: -1\n", [], "k must be null or an integer >= 1"),
    ("gig_rule: foo\n", [], "gig_rule must be one of"),
    ("gig_batch_size: 0\n", [], "gig_batch_size must be null or an integer >= 1"),
    ('k_factor: "eight"\n', [], "k_factor must be a number > 0"),
    ("ierf_dtype: foo\n", [], "ierf_dtype must be one of"),
    ("device: gpu\n", [], "device must be 'cpu', 'cuda' or 'cuda:N'"),
    ("class_names: abc\n", [], "class_names must be null or a list of strings"),
    ("k: [1, 2\n", [], "invalid YAML"),
    ("kk: 3\n", [], "unknown config option(s) ['kk']"),
    ("", ["k_factor"], "--set expects KEY=VALUE, got 'k_factor'"),
    ("", ["layers=[a, b"], "--set 'layers=[a, b': the value is not valid YAML"),
    ("model: resnet18\nweights: /no/such/weights.pt\n", [], "weights file /no/such/weights.pt does not exist"),
    ("model: resnet18\nweights: IMAGENET1K_V9\n", [], "weights 'IMAGENET1K_V9' is neither an existing file nor a torchvision"),
    ("dataset: /no/such/folder\n", [], "dataset folder /no/such/folder does not exist"),
]


@pytest.mark.parametrize("text,sets,message", CLI_ERRORS, ids=[m[:30] for _, _, m in CLI_ERRORS])
def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, capsys, text, sets, message):
    (tmp_path / "c.yaml").write_text(text)
    argv = ["run", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv + (["--set", *sets] if sets else [])) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("gig-fast: error: ") and message in err, err
    assert "\n" not in err and "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out").exists()  # nothing ran


def test_cli_validate_reads_config_files_the_same_way(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("k: 4\nvalidation: {images: 3\n")
    assert main(["validate", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "c.yaml, line 3" in capsys.readouterr().err


def test_mistyped_weights_are_named():
    with pytest.raises(FileNotFoundError, match="weights file missing/w.pth does not exist"):
        load_model("resnet18", "missing/w.pth")
    with pytest.raises(ValueError, match=r"weights 'IMAGENET_V1' is neither .* \(valid: IMAGENET1K_V1, DEFAULT\)"):
        load_model("resnet18", "IMAGENET_V1")


def test_channels_that_the_model_cannot_take_are_named_before_any_stage(tmp_path):
    for c in range(3):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((28, 28, 3), 40 * i + c, np.uint8)).save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    cfg = tp.tiny_config(tmp_path / "out", dataset=str(tmp_path / "data"), image_size=28, channels=3,
                         concept_images=6, explain_images=3, layers=["layer4.2"])
    with pytest.raises(ValueError, match=r"the model takes 1-channel images but the data set's have 3 \(set channels: 1\)"):
        Pipeline(cfg, model=tp.tiny_model())
    assert not (tmp_path / "out").exists()


def test_class_names_passed_to_the_pipeline_must_be_strings(tmp_path):
    with pytest.raises(ValueError, match="class_names must be a list of strings, got 'abc'"):
        Pipeline(tp.tiny_config(tmp_path), model=tp.tiny_model(), dataset=tp.tiny_data(), class_names="abc")


def test_show_names_a_class_without_explained_images(tmp_path, capsys):
    """A tiny run whose class 'bag' has no explained image: `show` says so (not "paired with itself")."""
    cfg = tp.tiny_config(tmp_path / "run", class_names=["tee", "boot", "bag"])
    x, _ = tp.tiny_data().tensors
    two_classes = torch.utils.data.TensorDataset(x, torch.arange(len(x)) % 2)  # no image of class 2, "bag"
    Pipeline(cfg, model=tp.tiny_model(), dataset=two_classes).run()
    out = str(tmp_path / "run")
    assert main(["show", "--run", out, "--classes", "tee", "bag"]) == 2
    assert "no shared concepts of 'tee' and 'bag': 'bag' has no explained images in this run" in capsys.readouterr().err
    assert main(["show", "--run", out, "--classes", "bag", "2"]) == 2
    assert "a class cannot be paired with itself" in capsys.readouterr().err
    assert main(["show", "--run", str(tmp_path / "none"), "--classes", "0", "1"]) == 2
    assert "no graph.json in" in capsys.readouterr().err


def test_no_traceback_for_a_device_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    (tmp_path / "c.yaml").write_text("device: cuda\n")
    assert main(["run", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
