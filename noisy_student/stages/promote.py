"""Stage 6, after the last iteration: the promotion gate. Does the run's final student
replace the champion, the registered model's version in service?

Every student is a version of the registered model named after the experiment. The alias
`champion` marks the version in service. The gate compares the candidate with the
champion image by image on the split choices are made on (validation where the dataset
has one; else test, and every record says "chosen on the test split"): a paired test of
clean accuracy (`evaluation.gate.test`: exact McNemar, or a paired bootstrap) and a paired
bootstrap of accuracy under the gate's corruptions of the same images. Under the default
`superiority` mode the candidate takes `champion` only when it is significantly more
accurate (two-sided p < `alpha`, gain >= `min_margin`) and not significantly less robust;
under `non_inferiority`, unless it is significantly less accurate (or loses more than
`min_margin`) or significantly less robust. Otherwise it gets the alias `challenger`.

A model of the run significantly more accurate than the final student (its teacher, an
earlier student) goes through the same gate in its place: a first teacher better than its
students becomes the champion of an empty registry (registered as a version for it). The
test split is never read here: its figures are reported by evaluate_robustness. The
decision, its paired counts, p-values and margins are kept as tags on the version and the
student's run, and as `promotion.json` on the pipeline run and beside the run's artifacts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException

from noisy_student.config import EvaluationConfig, GateConfig, student_stem
from noisy_student.data import dataset, storage
from noisy_student.errors import UserError
from noisy_student.evaluation import robustness, statistics
from noisy_student.evaluation.scores import ModelScores
from noisy_student.registry import tracking
from noisy_student.stages.evaluate_robustness import CHOICE, evaluate_robustness, read_predictions
from noisy_student.stages.existing_teacher import CHAMPION, from_run
from noisy_student.stages.records import (
    CHOSEN_ON_TEST,
    PromotionDecision,
    Robustness,
    TrainedModel,
)
from noisy_student.training import models

logger = logging.getLogger(__name__)

CHALLENGER = "challenger"  # the alias of a student that did not pass the gate


def run_models(robustness: list[Robustness]) -> dict[str, ModelScores]:
    """Every model this run evaluated, by MLflow run id, with its latest figures ("" is a
    first teacher given as a checkpoint URL, which has no run)."""
    return {m.mlflow_run_id: m for r in robustness for m in r.models}


def figures(robustness: list[Robustness], run_id: str) -> dict[str, Any] | None:
    """A model's figures as an evaluation of this run measured them: those choices are
    made on, and the test figures, which are only reported."""
    m = run_models(robustness).get(run_id)
    if m is None:
        return None
    choice = m.choice
    return {
        "chosen_on": choice and choice.split,
        "accuracy": choice and choice.accuracy,
        "accuracy_interval": choice and choice.accuracy_interval,
        "corruption_accuracy": choice and choice.corruption_accuracy,
        "corruption_accuracy_interval": choice and choice.corruption_accuracy_interval,
        "reported": {
            "test_accuracy": m.test_accuracy,
            "test_accuracy_interval": m.test_accuracy_interval,
            "corruption_accuracy": m.corruption_accuracy,
            "mce": m.mce,
        },
    }


# ------------------------------------------------------------------- paired comparisons


@dataclass(frozen=True)
class Comparison:
    """One model against another on the same images of the choice split."""

    split: str
    accuracy: statistics.PairedTest  # clean accuracy, right/wrong per image
    robustness: statistics.PairedTest  # each image's accuracy under the gate's corruptions
    alpha: float

    @property
    def verdict(self) -> str:
        return self.accuracy.verdict(self.alpha)

    @property
    def robustness_verdict(self) -> str:
        return self.robustness.verdict(self.alpha)

    def record(self) -> dict[str, Any]:
        return {
            "split": self.split,
            **({"note": CHOSEN_ON_TEST} if self.split == dataset.TEST else {}),
            "verdict": self.verdict,
            "accuracy": self.accuracy.record(),
            "robustness_verdict": self.robustness_verdict,
            "robustness": self.robustness.record(),
            "alpha": self.alpha,
        }


def _choice_predictions(predictions: pd.DataFrame, run_id: str) -> pd.DataFrame:
    own = predictions[(predictions["mlflow_run_id"] == run_id) & (predictions["suite"] == CHOICE)]
    if own.empty:
        raise UserError(f"MLflow run {run_id!r}: no predictions on the choice split to compare")
    return own[own["iteration"] == own["iteration"].min()]


def compare(
    predictions: pd.DataFrame,
    first_id: str,
    second_id: str,
    gate: GateConfig,
    corruption_names: list[str],
    seed: int = 0,
) -> Comparison:
    """`first_id`'s model against `second_id`'s, image by image on the choice split: clean
    right/wrong under the gate's test, and each image's accuracy over the gate's
    corrupted copies under a paired bootstrap. Both must have been judged on the same
    images (the same rows with the same labels)."""
    first, second = (
        _choice_predictions(predictions, first_id),
        _choice_predictions(predictions, second_id),
    )
    split = first["split"].iloc[0]
    a, b = robustness.clean_correct(first), robustness.clean_correct(second)
    if not a.index.equals(b.index) or set(first["split"]) != set(second["split"]):
        raise UserError(
            f"MLflow runs {first_id!r} and {second_id!r} were not judged on the same images"
        )
    if gate.test == "mcnemar":
        accuracy = statistics.mcnemar(a.to_numpy(), b.to_numpy())
    else:
        accuracy = statistics.paired_bootstrap(a.to_numpy(), b.to_numpy(), gate.resamples, seed)
    ra = robustness.per_image_accuracy(first, corruption_names, gate.severities)
    rb = robustness.per_image_accuracy(second, corruption_names, gate.severities)
    if not ra.index.equals(rb.index):
        raise UserError(
            f"MLflow runs {first_id!r} and {second_id!r} were not judged on the same "
            "corrupted images"
        )
    robust = statistics.paired_bootstrap(ra.to_numpy(), rb.to_numpy(), gate.resamples, seed)
    return Comparison(split, accuracy, robust, gate.alpha)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _evidence(test: statistics.PairedTest, first: str, second: str) -> str:
    """The paired counts (or the bootstrap), the p-value and the difference's interval, in
    words. The interval shows what the split could see: "no significant difference" with an
    interval of -0.5 to +3.3 points (a +1.40 step on 500 images) says the split is too small
    to tell, not that the two models are alike."""
    if test.only_first_right is not None:
        how = (
            f"exact McNemar: {test.only_first_right} images right only by {first}, "
            f"{test.only_second_right} only by {second}"
        )
    else:
        how = f"paired bootstrap over {test.images} images"
    interval = _interval(test.interval, test.confidence)
    return f"{how}, p = {test.p_value:.3g}, the difference's {interval} points"


def _interval(interval: Sequence[float], confidence: float) -> str:
    """A paired test's interval of the difference: "95% interval -0.48 to +3.28"."""
    low, high = interval
    return f"{100 * confidence:g}% interval {100 * low:+.2f} to {100 * high:+.2f}"


def describe(c: Comparison, first: str, second: str) -> list[str]:
    """The comparison in two sentences: clean accuracy, and under corruption."""
    where = f"on the same {c.accuracy.images} {c.split} images"
    if c.split == dataset.TEST:
        where += f" ({CHOSEN_ON_TEST}: the dataset has no validation split)"
    a, r = c.accuracy, c.robustness
    return [
        f"{first} {_pct(a.first_accuracy)} vs {second} {_pct(a.second_accuracy)} {where}: "
        f"{100 * a.difference:+.2f} points, {c.verdict} ({_evidence(a, first, second)}, "
        f"alpha {c.alpha:g})",
        f"under the gate's corruptions {_pct(r.first_accuracy)} vs {_pct(r.second_accuracy)}: "
        f"{100 * r.difference:+.2f} points, {c.robustness_verdict} "
        f"({_evidence(r, first, second)})",
    ]


def decide(c: Comparison | None, gate: GateConfig) -> tuple[bool, list[str]]:
    """Promote or not, and why: see the module's docstring for the two modes."""
    if c is None:
        return True, ["there is no champion yet"]
    reasons = describe(c, "the candidate", "the champion")
    gain = c.accuracy.difference
    if gate.mode == "superiority":
        accurate = c.verdict == statistics.ABOVE and gain >= gate.min_margin
        if c.verdict == statistics.ABOVE and not accurate:
            reasons.append(
                f"the gain {100 * gain:.2f} points is below evaluation.gate.min_margin "
                f"{100 * gate.min_margin:.2f}"
            )
        elif not accurate:
            reasons.append("superiority: the candidate must be significantly more accurate")
    else:
        accurate = c.verdict != statistics.BELOW and gain >= -gate.min_margin
        if c.verdict != statistics.BELOW and not accurate:
            reasons.append(
                f"the loss {100 * -gain:.2f} points is above evaluation.gate.min_margin "
                f"{100 * gate.min_margin:.2f}"
            )
    robust = c.robustness_verdict != statistics.BELOW
    if not robust:
        reasons.append("the candidate is significantly less robust")
    return accurate and robust, reasons


def best_of_run(
    robustness: list[Robustness],
    predictions: pd.DataFrame,
    student_run_id: str,
    evaluation: EvaluationConfig,
) -> tuple[ModelScores, Comparison] | None:
    """The most accurate model of this run on the choice split among those significantly
    more accurate than the final student there; None when there is none (the student
    stays the candidate)."""
    better = []
    for run_id, m in run_models(robustness).items():
        if run_id == student_run_id or not run_id:
            continue
        c = compare(predictions, run_id, student_run_id, evaluation.gate, evaluation.corruptions,
                    evaluation.seed)  # fmt: skip
        if c.verdict == statistics.ABOVE:
            better.append((m, c))
    return max(better, key=lambda mc: mc[1].accuracy.first_accuracy, default=None)


def _label(m: ModelScores) -> str:
    role, iteration = m.role, m.iteration
    if not role:
        return f"run {m.mlflow_run_id}"
    # an iteration's teacher after the first is the previous iteration's student
    return (
        f"{role} {iteration}" if role == "student" or iteration == 1 else f"student {iteration - 1}"
    )


def below_teacher_note(
    iteration: int,
    student_model: str,
    student: float,
    teacher_model: str,
    teacher: float,
    config: dict[str, Any],
    evidence: str = "",
) -> str:
    """What the results table and the log say of a student that ends below its teacher.
    `config` is the run's configuration as a dict (`PipelineConfig.model_dump()`): the
    suggestions leave out what the student already had. `evidence` (e.g. " on the
    validation split, significantly below (exact McNemar ...)") follows the figures."""
    key = f"students.{iteration - 1}"
    tries = [f"more {key}.epochs"]
    started = config["students"][iteration - 1].get("init_from_teacher")
    if student_model == teacher_model and not started:
        tries.append(f"{key}.init_from_teacher: true")
    tries.append("a larger student")
    stem = student_stem(config, iteration)
    if stem == "imagenet" and models.has_stem(student_model, "half"):
        tries.append("a stem that keeps more of the image (teacher.stem: half)")
    return (
        f"student {iteration} ({student_model}, {100 * student:.2f}%) ends "
        f"{100 * (teacher - student):.2f} points below its teacher ({teacher_model}, "
        f"{100 * teacher:.2f}%){evidence}: try " + ", ".join(tries[:-1]) + f" or {tries[-1]}"
    )


def students_against_teachers(
    robustness: list[Robustness],
    predictions: pd.DataFrame,
    evaluation: EvaluationConfig,
    config: dict[str, Any],
) -> list[dict[str, Any]]:
    """Per iteration: the student against its own teacher on the choice split, and its
    verdict; a student significantly below gets the note of what to try."""
    out = []
    for r in robustness:
        roles = {m.role: m for m in r.models}
        t, s = roles.get("teacher"), roles.get("student")
        # a first teacher given as a checkpoint has no MLflow run: its predictions are
        # still the run's own, under an empty run id
        if not (t and s and s.choice and t.choice):
            continue
        c = compare(predictions, s.mlflow_run_id, t.mlflow_run_id, evaluation.gate,
                    evaluation.corruptions, evaluation.seed)  # fmt: skip
        entry = {
            "iteration": s.iteration,
            "verdict": c.verdict,
            "comparison": c.record(),
            "sentence": describe(c, f"student {s.iteration}", "its teacher")[0],
        }
        if c.verdict == statistics.BELOW:
            entry["note"] = below_teacher_note(
                s.iteration,
                s.model,
                c.accuracy.first_accuracy,
                t.model,
                c.accuracy.second_accuracy,
                config,
                f" on the {c.split} split, {c.verdict} "
                f"({_evidence(c.accuracy, 'the student', 'the teacher')})",
            )
        out.append(entry)
    return out


def promote(
    student: TrainedModel,
    robustness: list[Robustness],
    registered_model: str,
    evaluation: EvaluationConfig,
    data_root: str,
    run_url: str,
    parent_run_id: str,
    iteration: int,
    config: dict[str, Any],
) -> PromotionDecision:
    """The promotion gate for the run's final student; returns the decision.
    `config` is the run's configuration as a dict, for what the log suggests of a student
    below its teacher."""
    version = tracking.model_version_of_run(registered_model, student.mlflow_run_id)
    current = tracking.model_version_by_alias(registered_model, CHAMPION)
    evaluations, predictions = _with_the_champion_measured(
        robustness, current, evaluation, data_root, run_url, parent_run_id, iteration
    )
    verdicts = students_against_teachers(robustness, predictions, evaluation, config)
    _log_verdicts(verdicts)
    gate, seed, names = evaluation.gate, evaluation.seed, evaluation.corruptions
    against = (
        compare(predictions, student.mlflow_run_id, current.run_id, gate, names, seed)
        if current is not None
        else None
    )
    promoted, reasons = decide(against, gate)
    best = best_of_run(robustness, predictions, student.mlflow_run_id, evaluation)
    stand_in = None
    if best is not None:
        promoted = False
        m, c = best
        reasons.append(
            f"{_label(m)} is significantly more accurate in this run: "
            + describe(c, _label(m), "the final student")[0]
        )
        stand_in = _stand_in(m, c, predictions, current, registered_model, evaluation, reasons)
    chosen_on = evaluations[-1].chosen_on if evaluations else dataset.TEST
    decision = PromotionDecision(
        registered_model=registered_model,
        version=version.version,
        run_id=student.mlflow_run_id,
        decision=CHAMPION if promoted else CHALLENGER,
        chosen_on=chosen_on,
        gate=gate.model_dump(),
        reasons=reasons,
        candidate=figures(evaluations, student.mlflow_run_id),
        champion=None if current is None else _champion_figures(evaluations, current),
        comparison=None if against is None else against.record(),
        students_against_teachers=verdicts,
        best_of_run=stand_in,
        decided_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    publish(decision, against, current, parent_run_id, run_url)
    return decision


def _log_verdicts(verdicts: list[dict[str, Any]]) -> None:
    for v in verdicts:
        logger.info(v["sentence"])
        if "note" in v:
            logger.info(v["note"])


def _champion_figures(evaluations: list[Robustness], current: Any) -> dict[str, Any]:
    return {
        "version": current.version,
        "run_id": current.run_id,
        **(figures(evaluations, current.run_id) or {}),
    }


def _with_the_champion_measured(
    robustness: list[Robustness],
    current: Any,
    evaluation: EvaluationConfig,
    data_root: str,
    run_url: str,
    parent_run_id: str,
    iteration: int,
) -> tuple[list[Robustness], pd.DataFrame]:
    """This run's evaluations and predictions, with the champion's when this run did not
    evaluate it: measured on the same images and the same seeded corruptions as the
    student."""
    evaluations = list(robustness)
    tables = [r.table_url for r in robustness if r.table_url]
    predictions = read_predictions(tables)
    if current is None or figures(robustness, current.run_id) is not None:
        return evaluations, predictions
    logger.info(f"evaluating the champion (version {current.version}) as the student was")
    measured = evaluate_robustness(
        [from_run(current.run_id)],
        evaluation,
        data_root,
        storage.join(run_url, "promotion", "robustness"),
        parent_run_id,
        iteration,
        earlier=tables,
    )
    evaluations.append(measured)
    predictions = pd.concat([predictions, read_predictions([measured.table_url])],
                            ignore_index=True)  # fmt: skip
    return evaluations, predictions


def publish(
    decision: PromotionDecision,
    against: Comparison | None,
    current: Any,
    parent_run_id: str,
    run_url: str,
) -> None:
    """The decision as the alias, tags on the version and the runs, and promotion.json."""
    name, version, alias = decision.registered_model, decision.version, decision.decision
    tracking.set_alias(name, alias, version)
    tags = {
        f"{tracking.TAG}promotion": alias,
        f"{tracking.TAG}promotion_reasons": "; ".join(decision.reasons),
        f"{tracking.TAG}compared_with_version": current.version if current else "",
        f"{tracking.TAG}chosen_on": decision.chosen_on,
        **_comparison_tags(against),
    }
    tracking.set_version_tags(name, version, tags)
    tracking.set_tags(decision.run_id, tags)
    for v in decision.students_against_teachers:
        tracking.set_tags(
            parent_run_id, {f"{tracking.TAG}student_{v['iteration']}_vs_teacher": v["verdict"]}
        )
    tracking.set_tags(
        parent_run_id,
        {f"{tracking.TAG}promotion": alias, f"{tracking.TAG}chosen_on": decision.chosen_on},
    )
    record = decision.record()
    tracking.log_dict(parent_run_id, record, "promotion.json")
    storage.write_json(storage.join(run_url, "promotion.json"), record)
    logger.info(f"models:/{name}/{version} is the {alias}: {'; '.join(decision.reasons)}")


def _student_line(verdict: dict[str, Any]) -> str:
    """One student against its teacher, from the decision record's entry."""
    accuracy = verdict["comparison"]["accuracy"]
    interval = _interval(accuracy["interval"], accuracy.get("confidence", statistics.CONFIDENCE))
    return (
        f"- student {verdict['iteration']} against its teacher: **{verdict['verdict']}** "
        f"(p = {accuracy['p_value']:.3g}, {100 * accuracy['difference']:+.2f} points, {interval})"
    )


def decision_markdown(decision: PromotionDecision) -> str:
    """The decision in Markdown: the reasons (paired counts, p-values, margins), the split
    chosen on, and each student against its teacher."""
    reasons = "\n".join(f"- {r}" for r in decision.reasons)
    gate = GateConfig(**decision.gate)
    chosen_on = (
        f"Chosen on the **{decision.chosen_on}** split"
        + (
            " (chosen on the test split: the dataset has no validation split)"
            if decision.chosen_on == dataset.TEST
            else ""
        )  # fmt: skip
        + f"; gate: {gate.mode}, {gate.test}, alpha {gate.alpha}, min margin {gate.min_margin}."
    )
    students = "\n".join(_student_line(v) for v in decision.students_against_teachers)
    return (
        f"**models:/{decision.registered_model}/{decision.version}** is the "
        f"**{decision.decision}**\n\n{chosen_on}\n\n{reasons}\n\n{students}\n"
    )


def _comparison_tags(c: Comparison | None) -> dict[str, str]:
    """The gate's paired test as MLflow tags: verdict, counts, p-value, difference."""
    if c is None:
        return {}
    a, t = c.accuracy, tracking.TAG
    tags = {
        f"{t}gate_verdict": c.verdict,
        f"{t}gate_test": a.test,
        f"{t}gate_p_value": f"{a.p_value:.4g}",
        f"{t}gate_difference": f"{a.difference:.4f}",
        f"{t}gate_robustness_verdict": c.robustness_verdict,
    }
    if a.only_first_right is not None:
        tags[f"{t}gate_paired_counts"] = (
            f"both right {a.both_right}, candidate only {a.only_first_right}, champion only "
            f"{a.only_second_right}, both wrong {a.both_wrong}"
        )
    return tags


def _stand_in(
    best: ModelScores,
    against_student: Comparison,
    predictions: pd.DataFrame,
    current: Any,
    registered_model: str,
    evaluation: EvaluationConfig,
    reasons: list[str],
) -> dict[str, Any]:
    """The run's best model at the gate in the final student's place: it takes `champion`
    on the same rule (a first teacher is registered as a version for it). Appends what
    happened to `reasons`; returns the record of it."""
    label, run_id = _label(best), best.mlflow_run_id
    entry = {
        "label": label,
        "run_id": run_id,
        "model": best.model,
        "chosen_on": against_student.split,
        "accuracy": against_student.accuracy.first_accuracy,
        "against_final_student": against_student.record(),
        "test_accuracy": best.test_accuracy,  # reported only
    }
    if current is not None and run_id == current.run_id:
        reasons.append(f"{label} is the champion (version {current.version}): it stays")
        return {**entry, "version": str(current.version), "decision": CHAMPION}
    if not run_id:
        reasons.append(f"{label} has no MLflow run to register: the champion stays as it is")
        return {**entry, "version": None, "decision": None}
    c = None
    if current is not None:
        c = compare(predictions, run_id, current.run_id, evaluation.gate, evaluation.corruptions,
                    evaluation.seed)  # fmt: skip
    ok, why = decide(c, evaluation.gate)
    if not ok:
        reasons.append(f"{label} does not pass the gate either: {'; '.join(why)}")
        return {**entry, "version": None, "decision": None}
    try:
        version = str(tracking.model_version_of_run(registered_model, run_id).version)
    except MlflowException:  # a first teacher: only students are registered as they train
        version = str(tracking.register(run_id, registered_model))
    tracking.set_alias(registered_model, CHAMPION, version)
    tags = {
        f"{tracking.TAG}promotion": CHAMPION,
        f"{tracking.TAG}promotion_reasons": "the run's best model, above its final student; "
        + "; ".join(why),
        **_comparison_tags(c),
    }
    tracking.set_version_tags(registered_model, version, tags)
    reasons.append(f"{label} (models:/{registered_model}/{version}) is the champion in its place")
    logger.info(f"models:/{registered_model}/{version} ({label}) is the champion: {'; '.join(why)}")
    return {**entry, "version": version, "decision": CHAMPION}
