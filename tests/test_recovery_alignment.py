"""Student-teacher layer alignment derived from compression.json, for any scheme and chain."""

from __future__ import annotations

import pytest

import leandit
from leandit.compress.depth import PruningDecision, explicit, export_pruned, oracle, parse_scheme
from leandit.compress.depth.decision import group_records
from leandit.compress.recovery import layer_origins, parse_teacher_layers, record_alignment, teacher_layers
from conftest import randomize_, tiny_model


def _record(scheme: str, depth: int, kept: list[int]) -> dict:
    """The record a learnable run with this scheme and decision writes."""
    parsed = parse_scheme(scheme, depth)
    return PruningDecision("learnable", str(parsed), depth, kept, groups=group_records(parsed, kept)).record()


@pytest.mark.parametrize(
    "scheme, depth, kept, expected",
    [
        ("1:2", 12, [0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]),  # the end of every pair
        ("1:2", 12, [1, 3, 4, 7, 9, 10], [1, 3, 5, 7, 9, 11]),  # whichever of the pair was kept
        ("7:14", 28, [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27], [1, 3, 5, 7, 9, 11, 13, 16, 18, 20, 22, 24, 26, 27]),
        ("2:4", 8, [0, 2, 5, 6], [1, 3, 5, 7]),  # a group keeping two is split at its kept layers
        ("2:4", 8, [0, 1, 4, 7], [0, 3, 6, 7]),
        ("1:2,2:4", 6, [1, 2, 5], [1, 4, 5]),  # mixed groups
        ("1:3,1:1,1:2", 6, [2, 3, 4], [2, 3, 5]),
    ],
)
def test_each_student_layer_is_aligned_with_the_end_of_what_it_replaces(scheme, depth, kept, expected):
    assert record_alignment(_record(scheme, depth, kept)) == expected


def test_the_group_end_rule_aligns_every_kept_layer_with_its_groups_last():
    assert record_alignment(_record("2:4", 8, [0, 2, 5, 6]), "group-end") == [3, 3, 7, 7]
    assert record_alignment(_record("1:2", 4, [0, 2]), "group-end") == record_alignment(_record("1:2", 4, [0, 2])) == [1, 3]
    with pytest.raises(ValueError, match="unknown alignment rule"):
        record_alignment(_record("1:2", 4, [0, 2]), "middle")


def test_the_paper_oracle_28_to_14_aligns_with_the_end_of_each_removed_stretch():
    from leandit.compress.depth import global_scheme

    record = oracle(global_scheme(28, 14)).record()  # one global group: split at the kept layers
    assert record_alignment(record) == [1, 3, 5, 7, 9, 11, 14, 16, 18, 20, 22, 24, 26, 27]
    no_groups = {key: value for key, value in explicit([0, 5, 11], 12).record().items() if key != "groups"}
    assert record_alignment(no_groups) == [4, 10, 11]


def test_an_iterated_pruning_aligns_with_the_intermediate_or_the_original_teacher():
    first = _record("1:2", 12, [0, 2, 4, 6, 8, 10])  # D12 -> D6: layer j of D6 is original 2j
    recovery = {"method": "recovery", "teacher_layers": [1, 3, 5, 7, 9, 11]}
    second = _record("1:2", 6, [0, 3, 4])  # D6 -> D3
    student = [first, recovery, second]
    assert teacher_layers(student, [first, recovery], 3, 6) == [1, 3, 5]
    assert teacher_layers(student, [first], 3, 6) == [1, 3, 5]  # the unrecovered D6 is the same ancestor
    assert teacher_layers(student, [], 3, 12) == [3, 7, 11]  # composed: D6 layer 1 -> D12 layer 3, ...
    assert layer_origins(student, 3) == [0, 6, 8]
    assert teacher_layers([first], [], 6, 12) == [1, 3, 5, 7, 9, 11]
    assert teacher_layers([], [], 4, 4) == [0, 1, 2, 3]  # fine-tuning an unpruned model: itself


def test_a_teacher_that_is_not_an_ancestor_is_refused_with_the_fix():
    first = _record("1:2", 12, [0, 2, 4, 6, 8, 10])
    other = _record("1:2", 12, [1, 3, 5, 7, 9, 11])
    with pytest.raises(ValueError, match="not an ancestor"):
        teacher_layers([first], [other], 6, 6)
    with pytest.raises(ValueError, match="pruned from a 12-block model, the teacher has 8"):
        teacher_layers([first], [], 6, 8)
    with pytest.raises(ValueError, match="no compression.json record"):
        teacher_layers([], [], 6, 12)
    with pytest.raises(ValueError, match="keeps 6 blocks but the student has 4"):
        teacher_layers([first], [], 4, 12)
    with pytest.raises(ValueError, match="kept 6 blocks, the model has 4"):
        layer_origins([first], 4)
    with pytest.raises(ValueError, match="inconsistent"):
        layer_origins([first, _record("1:2", 8, [0, 2, 4, 6])], 4)


def test_explicit_teacher_layers_are_checked():
    assert parse_teacher_layers("1, 3,5", 3, 6) == [1, 3, 5]
    with pytest.raises(ValueError, match="one teacher block per student block"):
        parse_teacher_layers("1,3", 3, 6)
    with pytest.raises(ValueError, match=r"\[6\] are not blocks"):
        parse_teacher_layers("1,3,6", 3, 6)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_teacher_layers("1;3", 2, 6)


def test_alignment_read_back_from_exported_folders_of_a_two_step_chain(tmp_path):
    source = randomize_(tiny_model(depth=8), std=0.1)
    leandit.save_model(source, tmp_path / "d8")
    d8 = leandit.load_model(tmp_path / "d8")
    export_pruned(d8, _decision("2:4", 8, [1, 2, 4, 7]), tmp_path / "d4", source_name="d8")
    d4 = leandit.load_model(tmp_path / "d4")
    export_pruned(d4, _decision("1:2", 4, [1, 2]), tmp_path / "d2", source_name="d4")
    d2 = leandit.load_model(tmp_path / "d2")
    assert [r["source_depth"] for r in d2.compression] == [8, 4]
    assert teacher_layers(d2.compression, d4.compression, 2, 4) == [1, 3]
    assert teacher_layers(d2.compression, d8.compression, 2, 8) == [3, 7]  # d4 layer 1 = d8 layer 2 -> end 3
    assert layer_origins(d2.compression, 2) == [2, 4]


def _decision(scheme: str, depth: int, kept: list[int]) -> PruningDecision:
    parsed = parse_scheme(scheme, depth)
    return PruningDecision("indices", str(parsed), depth, kept, groups=group_records(parsed, kept))
