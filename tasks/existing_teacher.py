"""Stage 1 for a retraining run: an existing model (by default the champion) as the teacher."""

from prefect import task

from noisy_student import stages

existing_teacher = task(stages.existing_teacher, name="existing_teacher")
