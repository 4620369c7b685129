"""The accuracy benchmark's bookkeeping: it runs for hours, so a killed run keeps the rows
it measured and goes on where it stopped (the rows themselves are measured by
`make bench-accuracy`, not here)."""

from __future__ import annotations

import json

import pytest

from benchmarks import accuracy
from noisy_student import config
from tests.conftest import REPO


def _identity(seed: int = 0) -> dict:
    config = {"seed": seed, "data": {"fashion_mnist": {"test_limit": None}}}
    return {"command": "bench", "preset": "p.yaml", "config": config, "epochs": 1}


def _row(table: accuracy.Table, name: str, seconds: float, acc: float = 0.9) -> None:
    table.add(name, seconds, what=name, model="resnet10t", test_accuracy=acc, seed=0)


def test_a_killed_benchmark_keeps_its_rows_and_the_seconds_of_the_row_it_was_in(tmp_path):
    path = tmp_path / "accuracy.json"
    first = accuracy.Table(path, _identity())
    _row(first, "teacher", 60.0)
    with pytest.raises(KeyboardInterrupt), first.timing("student 1"):
        raise KeyboardInterrupt  # SIGINT, or SIGTERM through the benchmark's handler
    saved = json.loads(path.read_text())
    assert [r["row"] for r in saved["rows"]] == ["teacher"] and not saved["complete"]
    assert set(saved["interrupted_seconds"]) == {"student 1"}

    again = accuracy.Table(path, _identity())
    assert again.attempts == 2 and again.has("teacher") and not again.has("student 1")
    _row(again, "student 1", 100.0)
    [student] = [r for r in json.loads(path.read_text())["rows"] if r["row"] == "student 1"]
    # the attempt that finished the row, and beside it what the interrupted one had spent
    assert student["wall_seconds"] == 100.0 and not again.interrupted
    assert 0.0 <= student["interrupted_seconds"] < 60.0
    text = accuracy.markdown(again.save(), ["teacher", "student 1"])
    assert "| 1.0 min |" in text and "| 1.7 min (+0.0 min interrupted) |" in text

    # another config (here: another seed) starts the table over
    other = accuracy.Table(path, _identity(seed=1))
    assert other.attempts == 1 and not other.rows and not other.interrupted


def _killed_mid_row(path, name: str) -> float:
    """A benchmark process in a row, killed by SIGKILL (a sitting's end: no signal to
    catch) once its heartbeat has saved; the seconds the file kept for the row."""
    import multiprocessing
    import os
    import signal
    import time

    def in_a_row() -> None:
        accuracy.HEARTBEAT_SECONDS = 0.05
        with accuracy.Table(path, _identity()).timing(name):
            time.sleep(60)

    child = multiprocessing.get_context("fork").Process(target=in_a_row)
    child.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kept = json.loads(path.read_text()).get("interrupted_seconds", {}) if path.exists() else {}
        if kept.get(name, 0.0) >= 0.3:
            break
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    return json.loads(path.read_text())["interrupted_seconds"][name]


def test_a_row_killed_without_a_signal_keeps_its_seconds_from_the_heartbeat(tmp_path):
    path = tmp_path / "accuracy.json"
    _row(accuracy.Table(path, _identity()), "teacher", 60.0)
    kept = _killed_mid_row(path, "student 1")
    assert 0.3 <= kept < 30
    again = accuracy.Table(path, _identity())
    assert again.interrupted == {"student 1": kept}
    again.measure("student 1", "s1", 0, lambda: (_Trained(), {}))
    saved = json.loads(path.read_text())
    [student] = [r for r in saved["rows"] if r["row"] == "student 1"]
    assert student["interrupted_seconds"] == round(kept, 1) and student["wall_seconds"] < 5
    assert saved["interrupted_seconds"] == {}

    # the flow (not a row) keeps its seconds the same way, and settles them once
    flow = _killed_mid_row(path, "the flow")
    table = accuracy.Table(path, _identity())
    with table.timing("the flow") as elapsed:
        pass
    # once, not twice (elapsed() includes the heartbeat's join: milliseconds, more on a
    # busy machine)
    assert elapsed() + table.settle("the flow") == pytest.approx(flow, abs=0.1)
    _row(table, "teacher: seed 1", 30.0)  # a save, merging the file's seconds
    assert json.loads(path.read_text())["interrupted_seconds"] == {}


def test_heartbeats_of_a_row_that_finishes_leave_no_interrupted_seconds(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(accuracy, "HEARTBEAT_SECONDS", 0.01)
    path = tmp_path / "accuracy.json"
    table = accuracy.Table(path, _identity())
    table.measure("teacher", "t", 0, lambda: (time.sleep(0.2), (_Trained(), {}))[1])
    saved = json.loads(path.read_text())
    assert "interrupted_seconds" not in saved["rows"][0] and saved["interrupted_seconds"] == {}


def test_a_flows_rows_seen_so_far_are_shown_and_measured_when_it_returns(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "HEARTBEAT_SECONDS", 0.01)
    path = tmp_path / "accuracy.json"
    names = ["teacher", "student 1", "student 2"]
    table = accuracy.Table(path, _identity())
    seen = dict(what="s1", model="resnet18d", test_accuracy=0.88, seed=0, train_seconds=600.0)

    def beat() -> None:  # what `_rows_so_far` does at each heartbeat: MLflow's finished rows
        table.so_far("student 1", **seen)

    with pytest.raises(KeyboardInterrupt), table.timing("the flow", beat=beat):
        raise KeyboardInterrupt  # the interrupt reads them once more, as a heartbeat does
    text = accuracy.markdown(json.loads(path.read_text()), names)
    assert "| student 1 | resnet18d | 88.00% [87.35, 88.62] (so far) |" in text
    assert "training 10.0 min" in text and "the flow has not returned" in text
    assert "Incomplete: 3 of 3 rows still to run" in text  # a row so far is not measured

    again = accuracy.Table(path, _identity())
    assert not again.has("student 1")  # so the flow runs, and its cached stages give it
    assert not again.so_far("student 1", **seen)  # the same row: nothing to save
    _row(again, "student 1", 60.0, acc=0.8817)
    assert again.has("student 1")
    assert not again.so_far("student 1", **seen)  # never over a measured row
    [row] = [r for r in json.loads(path.read_text())["rows"] if r["row"] == "student 1"]
    assert row["test_accuracy"] == 0.8817 and "so_far" not in row
    assert "(so far)" not in accuracy.markdown(again.save(), names)


def test_a_failing_beat_is_printed_once_and_the_row_goes_on(tmp_path, monkeypatch, capsys):
    import time

    monkeypatch.setattr(accuracy, "HEARTBEAT_SECONDS", 0.01)
    table = accuracy.Table(tmp_path / "accuracy.json", _identity())
    calls = []

    def beat() -> None:
        calls.append(1)
        raise ConnectionError("MLflow at http://127.0.0.1:1 refused\nmore")

    with table.timing("the flow", beat=beat):
        time.sleep(0.2)
    assert len(calls) > 1
    out = capsys.readouterr().out
    assert out.count("its rows so far not read") == 1
    assert "(ConnectionError: MLflow at http://127.0.0.1:1 refused)" in out


def test_sigint_stops_a_benchmark_started_where_the_shell_ignores_it():
    """`nohup cmd &` from a script starts cmd with SIGINT ignored: the benchmark stops on it
    anyway, as on SIGTERM, through a KeyboardInterrupt (which keeps what ran)."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        accuracy.stop_on_signals()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(sig)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


class _Trained:
    role, model, final_accuracy, evaluated_on = "teacher", "resnet10t", 0.85, "test"


def test_two_processes_measuring_rows_of_one_table_keep_each_others_rows(tmp_path):
    path = tmp_path / "accuracy.json"
    flow, ceilings = accuracy.Table(path, _identity()), accuracy.Table(path, _identity())
    _row(flow, "teacher", 60.0)
    _row(ceilings, "fully supervised", 600.0)  # read the file before the teacher was in it
    _row(flow, "student 1", 120.0)
    rows = {r["row"] for r in json.loads(path.read_text())["rows"]}
    assert rows == {"teacher", "fully supervised", "student 1"}
    assert flow.has("fully supervised") and ceilings.has("teacher")
    # another config's table is not merged into this one
    other = accuracy.Table(path, _identity(seed=1))
    _row(other, "teacher", 30.0)
    assert [r["row"] for r in json.loads(path.read_text())["rows"]] == ["teacher"]


def test_the_table_names_every_row_and_marks_those_not_yet_run(tmp_path):
    cfg = config.load(REPO / "pipeline_config/accuracy.yaml")
    k = len(cfg.students)
    names = accuracy.row_names(cfg)
    assert names[:3] == ["teacher", "teacher: seed 1", "teacher: seed 2"]
    assert names[3 : 3 + k] == [f"student {i}" for i in range(1, k + 1)]
    assert names[3 + k : 6 + k] == [
        f"student {k}: seed 1",
        f"student {k}: seed 2",
        "ablation: no noise",
    ]
    assert names[6 + k :] == ["fully supervised", "fully supervised: 3x the epochs"]
    table = accuracy.Table(tmp_path / "accuracy.json", _identity())
    _row(table, "teacher", 30.0, acc=0.8502)
    text = accuracy.markdown(table.save(), names)
    # the test accuracy with its 95% interval over the 10,000 test images (Wilson)
    assert "| teacher | resnet10t | 85.02% [84.31, 85.71] |" in text
    assert f"Incomplete: {len(names) - 1} of {len(names)} rows still to run" in text
    assert f"| student {k} | | not yet run |" in text
    assert "over 1 seeds" not in text  # one teacher: no spread to give

    _row(table, "teacher: seed 1", 30.0, acc=0.8402)
    _row(table, "teacher: seed 2", 30.0, acc=0.8602)
    text = accuracy.markdown(table.save(), names)
    assert "The teacher over 3 seeds: mean 85.02%, standard deviation 1.00 points" in text
    for name, acc in ((f"student {k}", 0.9100), (f"student {k}: seed 1", 0.9120)):
        _row(table, name, 60.0, acc=acc)
    text = accuracy.markdown(table.save(), names)
    assert f"Student {k} over 2 seeds: mean 91.10%" in text


def test_the_ceilings_train_the_final_students_network_with_a_ceilings_recipe():
    cfg = config.load(REPO / "pipeline_config/accuracy.yaml")
    last = cfg.students[-1].model_copy(
        update={"model": "resnet26d", "model_kwargs": {"stem_width": 16}, "epochs": 20}
    )
    cfg = cfg.model_copy(update={"students": [*cfg.students[:-1], last]})
    rows = accuracy.ceiling_rows(cfg)
    assert list(rows) == ["fully supervised", "fully supervised: 3x the epochs"]
    recipe = rows["fully supervised"].recipe
    # the final student's network, as it is built ...
    assert (recipe.model, recipe.model_kwargs) == ("resnet26d", {"stem_width": 16})
    assert recipe.stem == config.student_stem(cfg.model_dump(), len(cfg.students))
    # ... trained as a supervised model is: crops and flips, no noise
    assert recipe.rand_augment is None and recipe.cutout == 0
    assert recipe.drop_rate == 0 and recipe.drop_path_rate == 0
    assert (recipe.hflip, recipe.crop_padding) == (last.hflip, last.crop_padding)
    # at the student's budget: as many images, in batches as large as its steps
    assert recipe.batch_size == round(last.batch_size * (1 + last.unlabelled_ratio))
    images = accuracy.student_images(cfg, len(cfg.students))
    assert images == round(20 * 58_500 * (1 + 1 / last.unlabelled_ratio))
    assert recipe.epochs == round(images / 60_000)
    longer = rows["fully supervised: 3x the epochs"]
    assert longer.budget == 3 and longer.recipe.epochs == 3 * recipe.epochs
    # --quick, on a slice of the training set: one epoch per budget
    quick = accuracy.ceiling_rows(cfg, reference_limit=6000)
    assert [c.recipe.epochs for c in quick.values()] == [1, 3]


def test_the_ceilings_build_the_final_student_with_the_stem_it_inherits():
    # a student that names no stem keeps its teacher's: here the first student's `half`
    cfg = config.load(REPO / "pipeline_config/accuracy.yaml")
    first, *rest = cfg.students
    students = [
        first.model_copy(update={"stem": "half"}),
        *(s.model_copy(update={"stem": None}) for s in rest),
    ]
    rows = accuracy.ceiling_rows(cfg.model_copy(update={"students": students}))
    assert rows["fully supervised"].recipe.stem == "half"
    students[0] = first.model_copy(update={"stem": "stride1"})
    rows = accuracy.ceiling_rows(cfg.model_copy(update={"students": students}))
    assert rows["fully supervised: 3x the epochs"].recipe.stem == "stride1"


def test_a_measured_row_keeps_the_columns_its_stage_returns_beside_the_model(tmp_path):
    from types import SimpleNamespace

    table = accuracy.Table(tmp_path / "accuracy.json", _identity())
    student = SimpleNamespace(
        role="student", model="resnet18d", final_accuracy=0.8566, evaluated_on="test"
    )
    columns = {"teacher_test_accuracy": 0.8514, "pseudo_label_accuracy": 0.8619}
    table.measure("ablation: no noise", "no noise", 0, lambda: (student, columns))
    [row] = json.loads((tmp_path / "accuracy.json").read_text())["rows"]
    assert row["model"] == "resnet18d" and row["teacher_test_accuracy"] == 0.8514
    text = accuracy.markdown(table.save(), ["ablation: no noise"])
    assert "| ablation: no noise | resnet18d | 85.66% [84.96, 86.33] | 85.14% | 86.19% |" in text


def test_a_student_below_its_own_teacher_is_named_with_what_to_try(tmp_path):
    cfg = config.load(accuracy.PRESET, []).model_dump(mode="json")
    table = accuracy.Table(tmp_path / "accuracy.json", {**_identity(), "config": cfg})
    _row(table, "teacher", 30.0, acc=0.8500)
    table.add("student 1", 60.0, what="s1", model="resnet18d", test_accuracy=0.8752, seed=0)
    table.add("student 2", 60.0, what="s2", model="resnet18d", test_accuracy=0.8789, seed=0)
    names = ["teacher", "student 1", "student 2", "student 3"]
    assert "Below its teacher" not in accuracy.markdown(table.save(), names)
    table.add("student 3", 60.0, what="s3", model="resnet18d", test_accuracy=0.8788, seed=0)
    text = accuracy.markdown(table.save(), names)
    assert text.count("Below its teacher") == 1
    below = "student 3 (resnet18d, 87.88%) ends 0.01 points below its teacher (resnet18d, 87.89%)"
    assert below in text
    # the preset's student 3 has its teacher's network from scratch, and half a stem already
    assert "try more students.2.epochs, students.2.init_from_teacher: true or a larger" in text
    assert "stem" not in text.split("Below its teacher")[1]


def test_a_student_is_judged_by_the_runs_paired_verdict_not_by_its_test_accuracy(tmp_path):
    # student 3 is 0.01 points below on test, but the run found no significant difference
    # on validation: no flag; student 2 significantly below on validation: flagged, even
    # though its test accuracy is higher
    cfg = config.load(accuracy.PRESET, []).model_dump(mode="json")
    table = accuracy.Table(tmp_path / "accuracy.json", {**_identity(), "config": cfg})
    _row(table, "teacher", 30.0, acc=0.8500)
    sentences = {
        1: ("significantly above", "student 1 87.52% vs its teacher 85.00%: +2.52 points"),
        2: ("significantly below", "student 2 86.10% vs its teacher 87.30%: -1.20 points"),
        3: ("no significant difference", "student 3 87.88% vs its teacher 87.89%: -0.01"),
    }
    for k, acc in ((1, 0.8752), (2, 0.8789), (3, 0.8788)):
        verdict, sentence = sentences[k]
        against = {"verdict": verdict, "sentence": sentence}
        if verdict == "significantly below":
            against["note"] = "student 2 (resnet18d, 86.10%) ends 1.20 points below: try more"
        table.add(f"student {k}", 60.0, what=f"s{k}", model="resnet18d", test_accuracy=acc,
                  seed=0, against_teacher=against)  # fmt: skip
    text = accuracy.markdown(table.save(), ["teacher", "student 1", "student 2", "student 3"])
    assert text.count("**Significantly below its teacher:**") == 1
    assert "**Significantly below its teacher:** student 2 (resnet18d, 86.10%)" in text
    assert "**Student 3 against its teacher:** student 3 87.88% vs its teacher 87.89%" in text
    assert "Below its teacher**" not in text and "Student 2 against" not in text


def test_each_row_keeps_the_hardware_it_was_measured_on(tmp_path, monkeypatch):
    # the table spans sessions, and sessions hosts: the file's own "hardware" is the last
    # writer's, so a row measured elsewhere must say where
    def host(cpu):
        return {"cpu": cpu, "cpu_cores": 2, "gpu": None, "torch": "2.x", "python": "3.11"}

    table = accuracy.Table(tmp_path / "accuracy.json", _identity())
    monkeypatch.setattr(accuracy, "hardware", lambda: host("AMD EPYC"))
    _row(table, "teacher", 30.0)
    _row(table, "student 1", 30.0)
    monkeypatch.setattr(accuracy, "hardware", lambda: host("Intel Xeon"))
    _row(table, "fully supervised", 30.0)
    saved = json.loads((tmp_path / "accuracy.json").read_text())
    assert [r["hardware"]["cpu"] for r in saved["rows"]] == ["AMD EPYC", "AMD EPYC", "Intel Xeon"]
    assert saved["hardware"]["cpu"] == "Intel Xeon"
    text = accuracy.markdown(saved, ["teacher", "student 1", "fully supervised"])
    assert (
        "Measured on AMD EPYC, 2 cores, no GPU (torch 2.x); `fully supervised` on Intel Xeon, "
        "2 cores, no GPU (torch 2.x)." in text
    )
    assert "Measured on AMD EPYC, 2 cores, no GPU (torch 2.x)." in accuracy.markdown(
        saved, ["teacher", "student 1"]
    )


def _table_of(path, cfg: config.PipelineConfig, command: str = "bench") -> accuracy.Table:
    identity = {"command": command, "preset": "p.yaml", "config": cfg.model_dump(mode="json")}
    return accuracy.Table(path, identity)


def test_a_new_config_carries_only_the_rows_whose_inputs_it_leaves_unchanged(tmp_path):
    then = config.load(REPO / "pipeline_config/accuracy.yaml")
    earlier = _table_of(tmp_path / "then.json", then)
    names = accuracy.row_names(then)
    for name in names:
        _row(earlier, name, 60.0)
    old = json.loads((tmp_path / "then.json").read_text())

    def carried(now: config.PipelineConfig) -> list[str]:
        path = tmp_path / "now.json"
        path.unlink(missing_ok=True)
        table = _table_of(path, now, "bench --set x=1")
        return accuracy.carry(table, tmp_path / "then.json", now, None)

    # another teacher: its other seeds are measured again, the ceilings are not
    teacher = then.teacher.model_copy(update={"epochs": then.teacher.epochs + 50})
    assert carried(then.model_copy(update={"teacher": teacher})) == [
        "fully supervised",
        "fully supervised: 3x the epochs",
    ]
    table = json.loads((tmp_path / "now.json").read_text())
    assert table["identity"]["command"] == "bench --set x=1"
    [row] = [r for r in table["rows"] if r["row"] == "fully supervised"]
    assert row["carried_from"]["command"] == "bench" and row["wall_seconds"] == 60.0
    text = accuracy.markdown(table, names)
    assert "(carried from the table of " in text and "`bench`: the same recipe" in text
    # another first student: the teacher's seeds and the ceilings (the final student's) stay
    first = then.students[0].model_copy(update={"lr": 0.1})
    now = then.model_copy(update={"students": [first, *then.students[1:]]})
    assert carried(now) == [*accuracy.seed_rows(then), *accuracy.ceiling_rows(then)]
    # another final student: its ceilings are other rows
    last = then.students[-1].model_copy(update={"epochs": 20})
    now = then.model_copy(update={"students": [*then.students[:-1], last]})
    assert carried(now) == list(accuracy.seed_rows(then))
    # another seed: the rows of seeds 1 and 2 become those of seeds 2 and 3
    assert carried(then.model_copy(update={"seed": 1})) == ["teacher: seed 2"]
    # a row the table has already is its own
    table = _table_of(tmp_path / "then.json", then)
    assert accuracy.carry(table, tmp_path / "then.json", then, None) == []
    assert old["rows"] == json.loads((tmp_path / "then.json").read_text())["rows"]


def test_carry_from_a_file_that_is_not_a_result_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    bad = tmp_path / "old.json"
    for text in (None, "{not json", '{"rows": []}'):
        if text is not None:
            bad.write_text(text)
        with pytest.raises(SystemExit) as e:
            accuracy.main(["--carry", str(bad), "--rows", "teacher"])
        assert str(e.value).startswith(f"--carry {bad}: not an accuracy result file (")
        assert "\n" not in str(e.value)
    quick = _table_of(bad, config.load(REPO / "pipeline_config/accuracy.yaml"), "b --quick")
    quick.save()
    with pytest.raises(SystemExit, match=r"a quick table \(--quick\)'s rows cannot join a full"):
        accuracy.main(["--carry", str(bad), "--rows", "teacher"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json", "old.lock"]
