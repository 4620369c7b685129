"""Find the dataset, or ingest Fashion-MNIST into it on first use."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from noisy_student import stages
from noisy_student.config import FashionMnistSource
from tasks.policies import IO_RETRIES


# Not cached: it checks the dataset on storage itself, which is cheap and never stale.
@task(name="prepare_data", cache_policy=NO_CACHE, **IO_RETRIES)
def prepare_data(root: str, fashion_mnist: FashionMnistSource | None) -> tuple[str, list[int]]:
    data_root = stages.prepare_data(root, fashion_mnist)
    return data_root, stages.unlabelled_shards(data_root)
