"""One finished tiny run shared by the run-level test files (built once per pytest run): settings that
reach every path of stage 4 and the graph — ``top_concepts`` (1) below ``k`` (4), so a class's shared
concepts can lie outside its top set and stage 4 runs its shared pass; every class pair — and names
that must stay data wherever they are shown."""
from __future__ import annotations

from gig_fast.pipeline import Pipeline
from gig_fast.report import publish

from test_pipeline import tiny_config, tiny_data, tiny_model

HOSTILE = "</script><script>alert(\"x\")</script>&amp;<b>'"
CLASS_NAMES = [f"{HOSTILE} tee", "boot & \"shoe\"", "<img src=x onerror=alert(1)>"]

_RUNS: dict = {}


def finished_run(tmp_path_factory):
    """``(pipe, out folder)`` of the shared tiny run, published (``report.html``, ``concept_samples/``)."""
    if "run" not in _RUNS:
        out = tmp_path_factory.mktemp("tiny_contracts") / "run"
        cfg = tiny_config(out, top_concepts=1, top_shared=3, pair_neighbours=None, class_names=CLASS_NAMES,
                          image_size=28, channels=1, mean=[0.5], std=[0.5])  # uploads preprocessed as the data
        pipe = Pipeline(cfg, model=tiny_model(), dataset=tiny_data())
        pipe.run()
        publish(pipe)
        _RUNS["run"] = (pipe, out)
    return _RUNS["run"]
