"""benchmarks.student_recipe: rows are only added to a table measured with the same
candidate."""

from __future__ import annotations

import json

import pytest

from benchmarks import student_recipe


def test_arms_are_not_added_to_a_table_of_another_candidate(monkeypatch, tmp_path):
    table = tmp_path / "student-recipe.json"
    measured = {
        "identity": {"candidate": "Recipe(model='another')", "quick": False},
        "arms": {"candidate": {"dev_accuracy": 0.85}},
    }
    table.write_text(json.dumps(measured))
    monkeypatch.setattr(student_recipe, "RESULTS", tmp_path)
    with pytest.raises(SystemExit) as refused:
        student_recipe.main(["--arms", "network: resnet10t"])
    message = str(refused.value)
    assert str(table) in message and "--arms" in message and "\n" not in message
    assert json.loads(table.read_text()) == measured, "the table is left as it was"
