"""``validate``: run (or resume) the pipeline, then every validation experiment on its work folder.

Outputs in the run's ``out`` folder: ``validation.json``, ``validation.md`` (tables in the paper's
layout), ``validation_section.html`` (also inserted into ``report.html``) and ``validation_plots/*.png``.
Each unit of work (one method × layer, one transition, …) is saved atomically under
``work-<run key>/validation/units/<group>-<key of the group's options>/`` as it finishes and skipped
when the command is run again (with any options that leave the group's options unchanged).
"""
from __future__ import annotations

import dataclasses
import time

import torch
from tqdm import tqdm

from ..pipeline.files import save_json
from ..run_folder import CONFIG_FILE, GRAPH_FILE, VALIDATION_WORK
from .options import EXPERIMENTS, ValidationOptions, resolve_layers
from .runners import count_units, run_experiment
from .units import UnitStore

__all__ = ["validate"]


def validate(pipe, opts: ValidationOptions | None = None) -> dict:
    """Run every requested experiment on the pipeline's work folder (resuming) and write the outputs.

    Args:
        pipe: a :class:`~gig_fast.pipeline.Pipeline` whose stages have finished (``pipe.run()``).
        opts: :class:`ValidationOptions` (defaults if None).

    Returns:
        the ``validation.json`` content (pictures, kept in ``validation_figures.json``, left out).
    """
    from .outputs import write_outputs

    opts = opts or ValidationOptions()
    if not (pipe.work / CONFIG_FILE).exists() or not (pipe.out / GRAPH_FILE).exists():
        raise ValueError(f"missing pipeline outputs in {pipe.out} (work folder {pipe.work.name}): run the pipeline first")
    L = resolve_layers(pipe, opts)
    vwork = pipe.work / VALIDATION_WORK
    vkey = opts.key(pipe.config.key())
    save_json(vwork / f"options-{vkey}.json", {"options": dataclasses.asdict(opts), "resolved_layers": L})
    units = UnitStore(vwork, opts, pipe.config.key())
    t0 = time.perf_counter()
    timings, result = {}, {}
    with torch.no_grad(), tqdm(total=count_units(pipe, L, opts), desc="validation", disable=not opts.progress) as bar:
        for name in EXPERIMENTS:
            if name in opts.experiments:
                t = time.perf_counter()
                with torch.enable_grad():  # GIG needs gradients
                    result.update(run_experiment(name, pipe, units, vwork, L, opts, bar))
                timings[name] = round(time.perf_counter() - t, 2)
    doc = {"schema": "gig_fast.validation", "version": 2, "run_key": pipe.config.key(),
           "validation_key": vkey, "options": dataclasses.asdict(opts), "layers": L,
           "score": "softmax probability of the image's label class" if pipe.config.class_probability
           else "logit of the image's label class",
           **result, "timings_s": {**timings, "total": round(time.perf_counter() - t0, 2)},
           "compute_s": {**units.compute_s, "total": round(sum(units.compute_s.values()), 2)}}
    return write_outputs(pipe.out, doc)
