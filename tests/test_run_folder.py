"""The run folder's layout (gig_fast.run_folder, docs/design.md §7) and its atomic writes."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gig_fast.concepts import ConceptBank
from gig_fast.pipeline.files import load_npz, save_json, save_npz
from gig_fast.run_folder import (CODES, STAGE1, atomic_open, bank_dir, chunk_file, chunk_files, concept_file,
                                 remove_stale_tmp, transition_dir, work_dir)


def test_the_layout_names_what_docs_design_7_says(tmp_path):
    work = work_dir(tmp_path, "ab12")
    assert work == tmp_path / "work-ab12"
    assert chunk_file(work / STAGE1, 12) == work / "stage1" / "chunk_00012.npz"
    assert chunk_file(work / CODES, 0) == work / "codes" / "chunk_00000.npz"
    assert concept_file(work, "layer4.2") == work / "concepts" / "layer4.2.npz"
    assert transition_dir(work, "layer4.2", "classes") == work / "gig" / "layer4.2__classes"
    assert bank_dir(tmp_path, "_blocks.15") == tmp_path / "concepts" / "_blocks.15"


def test_chunk_files_come_in_chunk_order_and_only_chunks(tmp_path):
    folder = tmp_path / "codes"
    for ci in (10, 2, 0):  # chunk 10 sorts after chunk 2 because the index is zero-padded
        save_npz(chunk_file(folder, ci), a=np.arange(ci + 1))
    (folder / ".chunk_00003.npz.tmp1").write_bytes(b"partial")
    (folder / "notes.txt").write_text("not a chunk")
    assert [p.name for p in chunk_files(folder)] == ["chunk_00000.npz", "chunk_00002.npz", "chunk_00010.npz"]
    assert chunk_files(tmp_path / "missing") == []


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "a\\b", "c:d"])
def test_a_layer_name_that_cannot_name_a_bank_folder_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match="cannot name a concept bank folder"):
        bank_dir(tmp_path, name)


def test_atomic_open_publishes_whole_files_only(tmp_path):
    path = tmp_path / "sub" / "out.bin"
    with atomic_open(path) as f:
        f.write(b"abc")
        assert not path.exists()  # nothing at the target until the block ends
    assert path.read_bytes() == b"abc"
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write(b"half of a new")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"abc"  # the old file stays; the partial one is gone
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.bin"]


def test_every_writer_goes_through_the_same_temporary_names(tmp_path):
    """JSON, npz and concept banks are all written as ``.<name>.tmp<PID>`` then renamed, so a killed
    writer's leftovers are found and removed by one rule (remove_stale_tmp)."""
    save_json(tmp_path / "m.json", {"a": 1})
    save_npz(tmp_path / "x.npz", a=np.ones(3))
    ConceptBank("layer1.0", torch.ones(4, 3), torch.zeros(3)).save(tmp_path / "bank")
    assert load_npz(tmp_path / "x.npz")["a"].tolist() == [1.0, 1.0, 1.0]
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    dead = tmp_path / "bank" / ".bank.json.tmp999999999"  # no process has this id
    dead.write_text("{")
    mine = tmp_path / f".m.json.tmp{os.getpid()}"
    mine.write_text("{")
    assert remove_stale_tmp(tmp_path) == [dead] and mine.exists()
