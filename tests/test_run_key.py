"""The run key (``PipelineConfig.key()``) names the work folder a run resumes from, so every setting that
changes a result must change it, and the settings that change none must not (a relaunch with another
batch size resumes). The list of fields comes from the dataclass itself: a new field fails here until it
is given an alternative value below (it changes results) or put in ``NOT_RESULTS`` (it does not)."""
from __future__ import annotations

import dataclasses

import pytest

from gig_fast.pipeline import PipelineConfig

# Settings that change no stored result (where or how fast a run computes, what the report shows):
# a relaunch with another value must resume the same work folder.
NOT_RESULTS = {"out": "elsewhere", "device": "cuda", "backend": "torch", "progress": False, "batch_size": 7,
               "gig_batch_size": 33, "chunk_images": 9, "loader_workers": 0, "report_images": 3, "report_crops": 2,
               "graph_images": 5, "graph_pairs": 4,
               # the error pass writes its own work files (errors/) whatever the key; off, graph.json has none
               "error_nodes": False}

# Every other field, with a valid value other than its default: each changes a stored result.
CHANGES_RESULTS = {
    "model": "resnet18", "weights": "other.safetensors", "dataset": "photos", "split": "train", "image_size": 64,
    "channels": 1, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "class_names": ["a", "b"],
    "class_token": "drop", "max_image_pixels": 1000, "reduce_large_images": True, "concept_images": 17,
    "pfvs_per_image": 2, "attribution": "gradxinput", "ierf_dtype": "float32", "store_ierf": False,
    "layers": ["layer4.2"], "k_factor": 2.0, "k": 7, "kmeans_mode": "fast", "representatives": 3,
    "explain_images": 11, "per_class": 1, "lam": 0.3, "code_method": "omp", "positive": True, "gig_steps": 7,
    "gig_rule": "trapezoid", "gig_tolerance": 0.05, "gig_max_steps": 32, "gig_shared_steps": 4, "gig_autocast": "bf16", "top_concepts": 2, "top_shared": 1,
    "pair_neighbours": None, "class_by": "prediction", "class_probability": False, "seed": 1,
    "extra": {"note": 1},
}


def _fields() -> set[str]:
    return {f.name for f in dataclasses.fields(PipelineConfig)}


def test_every_field_is_classified():
    """A field added to PipelineConfig must be listed here, as result-changing or not (so it is tested)."""
    assert not NOT_RESULTS.keys() & CHANGES_RESULTS.keys()
    assert _fields() == NOT_RESULTS.keys() | CHANGES_RESULTS.keys()


@pytest.mark.parametrize("name", sorted(CHANGES_RESULTS))
def test_a_result_changing_setting_changes_the_key(name):
    base = PipelineConfig()
    value = CHANGES_RESULTS[name]
    assert getattr(base, name) != value
    other = base.replace(**{name: value})
    assert other.key() != base.key(), f"{name}={value!r} leaves the run key unchanged: a relaunch would resume old files"


@pytest.mark.parametrize("name", sorted(NOT_RESULTS))
def test_a_setting_that_changes_no_result_keeps_the_key(name):
    base = PipelineConfig()
    assert base.replace(**{name: NOT_RESULTS[name]}).key() == base.key()


def test_the_key_tells_apart_values_of_a_setting_added_later():
    """Options added after runs existed are left out of the key at their old behaviour only; every other
    value is in it (two different non-default values give two keys)."""
    base = PipelineConfig()
    assert base.replace(pair_neighbours=3).key() != base.replace(pair_neighbours=4).key()
    assert base.replace(gig_tolerance=0.02).key() != base.replace(gig_tolerance=0.05).key()
    assert base.replace(gig_autocast="bf16").key() != base.replace(gig_autocast="fp16").key()
    assert base.replace(max_image_pixels=10).key() != base.replace(max_image_pixels=11).key()
