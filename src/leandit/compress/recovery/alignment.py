"""Which teacher hidden state each student layer is distilled towards, read from the pruning
history in compression.json (never from a table), so it holds for any scheme, any depth and
for chains of prunings.

A pruning record keeps some layers of every group of its source. A kept layer stands in for
itself and the removed layers after it up to the next kept layer of its group; the teacher
state it must reproduce is the output of the last of those. With one kept layer per group
(1:2, 7:14, the paper's setting) that is the output of the group's last layer; a group that
keeps several layers (2:4) is split at them, so no two student layers chase the same state;
a global choice ("keep any K") is one group over the whole depth. The rule "group-end" aligns
every kept layer with its group's last layer instead (the paper's wording taken literally;
the same as "segment" whenever a group keeps one layer).

A model with several block lists (MAR: encoder, then decoder) is pruned as one ordered list,
and its record says each list's depth (`source_list_depths`). A group is then cut at the
list boundaries before either rule applies: a kept encoder block never stands for removed
decoder blocks (their outputs are other tokens at another width), so it is aligned with the
last removed block after it within the encoder, and removed blocks at the start of a list
that no kept block of that list precedes in the group are nobody's target.
"""

from __future__ import annotations

from typing import Any, Sequence

PruningRecord = dict[str, Any]
ALIGNMENT_RULES = ("segment", "group-end")


def pruning_records(history: Sequence[dict[str, Any]]) -> list[PruningRecord]:
    """The depth-pruning steps of a compression history (recovery records are skipped)."""
    return [record for record in history if "kept_indices" in record]


def record_alignment(record: PruningRecord, rule: str = "segment") -> list[int]:
    """For every layer the record kept (in order), the source layer whose output it replaces."""
    if rule not in ALIGNMENT_RULES:
        raise ValueError(f"unknown alignment rule {rule!r}; choose one of {', '.join(ALIGNMENT_RULES)}")
    depth = int(record["source_depth"])
    kept = [int(i) for i in record["kept_indices"]]
    groups = [list(g["layers"]) for g in record.get("groups") or []] or [list(range(depth))]
    covered = sorted(i for layers in groups for i in layers)
    if covered != list(range(depth)):
        raise ValueError(f"compression record {record.get('method', '?')}: its groups do not cover layers 0..{depth - 1} once each")
    end_of: dict[int, int] = {}
    kept_set = set(kept)
    for layers in _split_at_lists(record, groups, depth):
        in_group = [i for i in layers if i in kept_set]
        for position, layer in enumerate(in_group):
            split = rule == "segment" and position + 1 < len(in_group)
            end_of[layer] = in_group[position + 1] - 1 if split else layers[-1]
    missing = [i for i in kept if i not in end_of]
    if missing:
        raise ValueError(f"compression record {record.get('method', '?')}: kept layers {missing} are outside 0..{depth - 1}")
    return [end_of[i] for i in kept]


def _split_at_lists(record: PruningRecord, groups: list[list[int]], depth: int) -> list[list[int]]:
    """The groups cut where a block list ends (unchanged for a model with one list)."""
    depths = record.get("source_list_depths")
    if not depths:
        return groups
    sizes = [int(d) for d in depths.values()]
    if sum(sizes) != depth or any(d < 0 for d in sizes):
        raise ValueError(f"compression record {record.get('method', '?')}: its list depths {dict(depths)} do not add up "
                         f"to its source depth {depth}")
    owner = [list_index for list_index, size in enumerate(sizes) for _ in range(size)]  # layer -> its list
    parts = []
    for layers in groups:
        current: list[int] = []
        for layer in layers:
            if current and owner[layer] != owner[current[-1]]:
                parts.append(current)
                current = []
            current.append(layer)
        parts.append(current)
    return parts


def _key(record: PruningRecord) -> tuple[int, tuple[int, ...]]:
    return int(record["source_depth"]), tuple(int(i) for i in record["kept_indices"])


def teacher_layers(
    student_history: Sequence[dict[str, Any]],
    teacher_history: Sequence[dict[str, Any]],
    student_depth: int,
    teacher_depth: int,
    rule: str = "segment",
) -> list[int]:
    """For every student layer, the teacher layer whose output it is aligned with.

    The teacher must be an ancestor of the student: its pruning history a prefix of the
    student's (the original model, or an intermediate model of an iterated pruning). The
    prunings after the teacher are composed, newest first: student layer j stands for layer
    a_last(j) of the model it was pruned from, which stands for a_prev(a_last(j)), and so on.
    """
    student_steps, teacher_steps = pruning_records(student_history), pruning_records(teacher_history)
    if [_key(r) for r in student_steps[: len(teacher_steps)]] != [_key(r) for r in teacher_steps]:
        raise ValueError(
            "the teacher is not an ancestor of the student according to their compression.json histories; "
            "pass the model the student was pruned from (or an earlier one), or give --teacher-layers"
        )
    steps = student_steps[len(teacher_steps):]
    if not steps:
        if student_depth != teacher_depth:
            raise ValueError(
                f"the student has {student_depth} blocks and the teacher {teacher_depth}, but no compression.json "
                "record says how they correspond; give --teacher-layers"
            )
        return list(range(student_depth))
    if int(steps[0]["source_depth"]) != teacher_depth:
        raise ValueError(f"the student was pruned from a {steps[0]['source_depth']}-block model, the teacher has {teacher_depth} blocks")
    if len(steps[-1]["kept_indices"]) != student_depth:
        raise ValueError(f"the last compression record keeps {len(steps[-1]['kept_indices'])} blocks but the student has {student_depth}")
    _check_chain(steps)
    mapping = list(range(student_depth))
    for record in reversed(steps):
        alignment = record_alignment(record, rule)
        mapping = [alignment[j] for j in mapping]
    return mapping


def layer_origins(history: Sequence[dict[str, Any]], depth: int) -> list[int]:
    """For every layer of a model, its index in the original (never pruned) model."""
    steps = pruning_records(history)
    if steps and len(steps[-1]["kept_indices"]) != depth:
        raise ValueError(f"compression.json does not fit the model: its last pruning kept {len(steps[-1]['kept_indices'])} blocks, "
                         f"the model has {depth}")
    _check_chain(steps)
    origins = list(range(depth))
    for record in reversed(steps):
        kept = [int(i) for i in record["kept_indices"]]
        origins = [kept[j] for j in origins]
    return origins


def _check_chain(steps: Sequence[PruningRecord]) -> None:
    for earlier, later in zip(steps, steps[1:]):
        if int(later["source_depth"]) != len(earlier["kept_indices"]):
            raise ValueError("the compression.json history is inconsistent: a pruning starts from a depth the one before did not leave")


def parse_teacher_layers(text: str, student_depth: int, teacher_depth: int) -> list[int]:
    """An explicit alignment given on the command line: one teacher layer per student layer."""
    try:
        layers = [int(i) for i in text.split(",") if i.strip()]
    except ValueError:
        raise ValueError(f"--teacher-layers takes comma-separated block numbers, got {text!r}") from None
    if len(layers) != student_depth:
        raise ValueError(f"--teacher-layers needs one teacher block per student block ({student_depth}), got {len(layers)}")
    bad = [i for i in layers if not 0 <= i < teacher_depth]
    if bad:
        raise ValueError(f"--teacher-layers {bad} are not blocks of the {teacher_depth}-block teacher")
    return layers
