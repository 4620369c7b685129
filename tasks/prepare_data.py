"""Find the dataset, or ingest Fashion-MNIST into it on first use."""

from prefect import get_run_logger, task

from noisy_student import stages
from noisy_student.config import FashionMnistSource


@task(name="prepare_data")
def prepare_data(root: str, fashion_mnist: FashionMnistSource | None) -> tuple[str, list[int]]:
    data_root = stages.prepare_data(root, fashion_mnist, get_run_logger().info)
    return data_root, stages.unlabelled_shards(data_root)
