"""Synthetic tasks: checkers accept reference answers and reject corrupted ones; the split is fixed."""

from __future__ import annotations

import itertools
import random

import pytest

from trimode.tasks import TASKS, Difficulty, check, held_out, make_example, training_stream


@pytest.mark.parametrize("task", TASKS)
def test_checker_accepts_reference_and_rejects_corruptions(task):
    rng = random.Random(0)
    for _ in range(200):
        ex = make_example(task, rng)
        assert ex.is_correct(ex.answer) and ex.is_correct(f"  {ex.answer}\n")
        for bad in (ex.answer + "1", ex.answer[:-1], "1" + ex.answer, ex.answer.replace(" ", "  ") + " 0", ""):
            if bad.strip() != ex.answer:
                assert not ex.is_correct(bad), (ex, bad)


def test_checkers_know_the_tasks_semantics():
    assert check("sort", "Sort: 3 10 2", "2 3 10") and not check("sort", "Sort: 3 10 2", "10 2 3")
    assert check("reverse", "Reverse: 1 2 3", "3 2 1")
    assert check("add", "Add: 999 + 1", "1000")
    assert check("recall", "Recall: a=4 q=17 z=0. q?", "17")
    with pytest.raises(ValueError, match="unknown task"):
        check("divide", "Divide: 1", "1")


def test_held_out_split_is_fixed_and_never_trained_on():
    for task in TASKS:
        assert held_out(task, 20) == held_out(task, 20)
    excluded = {e.prompt for t in TASKS for e in held_out(t)}
    seen = list(itertools.islice(training_stream(seed=5), 3000))
    assert not {e.prompt for e in seen} & excluded
    assert {e.task for e in seen} == set(TASKS)


def test_difficulty_knobs():
    rng = random.Random(1)
    long = [make_example("copy", rng, Difficulty(min_items=12, max_items=12)) for _ in range(5)]
    assert all(len(e.answer.split()) == 12 for e in long)
    big = [make_example("add", rng, Difficulty(max_digits=6)) for _ in range(200)]
    assert max(len(e.prompt.split(" + ")[1]) for e in big) == 6
