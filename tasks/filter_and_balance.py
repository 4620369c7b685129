"""Stage 3: drop unsure pseudo labels and balance the classes."""

from prefect import task

from noisy_student import stages
from tasks.policies import CACHED, IO_RETRIES

filter_and_balance = task(
    stages.filter_and_balance, name="filter_and_balance", **CACHED, **IO_RETRIES
)
