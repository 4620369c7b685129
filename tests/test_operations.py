"""Operations without servers: deployment parameters as Prefect validates them, appending
unlabelled data, the promotion gate and the champion as teacher, the Docker files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from PIL import Image

from noisy_student import config, stages
from noisy_student.data import dataset, ingest, storage
from noisy_student.errors import UserError
from noisy_student.registry import tracking
from noisy_student.stages import TrainedModel
from noisy_student.training import models
from tests.conftest import FASHION_MNIST, REPO

SMOKE = REPO / "pipeline_config" / "smoke.yaml"


# --- deployment parameters ---------------------------------------------------------------


@pytest.fixture(scope="module")
def iterate_schema() -> dict:
    """The parameter schema `prefect deploy` and `serve` send to the server."""
    from prefect.utilities.callables import parameter_schema

    from flows.noisy_student import noisy_student

    return parameter_schema(noisy_student).model_dump_for_openapi()


def server_check(schema: dict, parameters: dict) -> str | None:
    """What Prefect's server answers when a run is created with these parameters."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    try:
        validate(parameters, schema, raise_on_error=True)
    except ValidationError as e:
        return str(e)
    return None


def test_deployment_parameters_accept_a_config_path_and_dotted_overrides(iterate_schema):
    assert set(iterate_schema["properties"]) == {
        "config",
        "overrides",
        "teacher",
        "run_id",
        "training_pool",
    }
    good = {
        "config": "pipeline_config/smoke.yaml",
        "overrides": {
            "teacher.epochs": 3,
            "students.0.model": "resnet18",
            "students.1.rand_augment.magnitude": 12.5,
            "data.fashion_mnist.unlabelled_limit": 500,
            "evaluation.corruptions": ["contrast"],
            "students": [{"model": "test_resnet", "epochs": 1}],
        },
        "teacher": "champion",
    }
    assert server_check(iterate_schema, good) is None


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"teacher.epochz": 3}, "teacher.epochz"),
        ({"teacher.epochs": "many"}, "teacher.epochs"),
        ({"selection.min_confidence": 2}, "selection.min_confidence"),
        ({"students.0.loss": "mse"}, "students.0.loss"),
    ],
)
def test_a_bad_override_is_refused_before_a_run_exists_naming_the_key(
    iterate_schema, overrides, named
):
    message = server_check(iterate_schema, {"config": "x.yaml", "overrides": overrides})
    assert message is not None and named in message


def test_the_parameters_build_the_same_config_as_the_command_line(tmp_path):
    as_cli = config.load(SMOKE, ["teacher.epochs=2", "students.1.model=resnet18"])
    as_deployment = config.load(SMOKE, {"teacher.epochs": 2, "students.1.model": "resnet18"})
    assert as_cli == as_deployment
    # a config at a URL reads the same
    url = "memory://ops-test/smoke.yaml"
    storage.write_bytes(url, SMOKE.read_bytes())
    assert config.load(url, {"teacher.epochs": 2, "students.1.model": "resnet18"}) == as_cli
    with pytest.raises(UserError, match="teacher.epochz"):
        config.resolve(as_cli, {"teacher.epochz": 1})
    with pytest.raises(UserError, match="memory://ops-test/nope.yaml"):
        config.load("memory://ops-test/nope.yaml")


# --- appending unlabelled data ----------------------------------------------------------


@pytest.fixture()
def small_dataset(tmp_path, fashion_mnist_source) -> str:
    return ingest.fashion_mnist(
        str(tmp_path / "data"),
        fashion_mnist_source,
        labelled_per_class=2,
        unlabelled_limit=60,
        test_limit=20,
        rows_per_shard=30,
    )


def image_folder(folder, first: int, count: int) -> str:
    """`count` Fashion-MNIST test images as PNG files, enlarged to 32x32 so that ingest has
    to resize them back to the dataset's 28x28."""
    images = ingest.read_idx(f"{FASHION_MNIST}/t10k-images-idx3-ubyte.gz")
    folder.mkdir(parents=True)
    for i in range(first, first + count):
        Image.fromarray(images[i]).resize((32, 32)).save(folder / f"img-{i:05d}.png")
    return str(folder)


def test_append_adds_a_manifest_version_and_leaves_earlier_shards_untouched(
    small_dataset, tmp_path
):
    url = storage.join(small_dataset, dataset.UNLABELLED)
    v1 = dataset.read_manifest(url)
    old_bytes = {s["file"]: storage.read_bytes(storage.join(url, s["file"])) for s in v1.shards}

    before, after = ingest.append_unlabelled(
        small_dataset, image_folder(tmp_path / "batch-a", 0, 25), rows_per_shard=10
    )
    assert (before.version, after.version) == (1, 2)
    assert after.num_rows == v1.num_rows + 25
    assert after.shards[: len(v1.shards)] == v1.shards
    assert [s["rows"] for s in after.shards[len(v1.shards) :]] == [10, 10, 5]
    assert after.digest != v1.digest
    for name, data in old_bytes.items():
        assert storage.read_bytes(storage.join(url, name)) == data
    # every version's manifest stays readable
    assert storage.read_json(storage.join(url, dataset.HISTORY, "00001.json"))["version"] == 1
    assert storage.read_json(storage.join(url, dataset.HISTORY, "00002.json")) == storage.read_json(
        storage.join(url, dataset.MANIFEST)
    )
    _, images = dataset.load(url)
    assert len(images) == after.num_rows and images.images.shape[-2:] == (28, 28)
    assert "batch-a/img-00003.png" in images.ids
    assert (images.labels[-25:] == -1).all()


def test_appending_the_same_batch_twice_or_a_corrupt_image_changes_nothing(small_dataset, tmp_path):
    batch = image_folder(tmp_path / "batch-a", 0, 5)
    _, v2 = ingest.append_unlabelled(small_dataset, batch)
    with pytest.raises(UserError, match="already in the dataset"):
        ingest.append_unlabelled(small_dataset, batch)
    broken = tmp_path / "batch-b"
    shutil.copytree(batch, broken)
    (broken / "img-00002.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="img-00002.png"):
        ingest.append_unlabelled(small_dataset, str(broken))
    current = dataset.read_manifest(storage.join(small_dataset, dataset.UNLABELLED))
    assert current == v2


def test_ingest_append_command_without_a_prefect_server_appends_and_says_so(
    small_dataset, tmp_path, capsys, monkeypatch
):
    import cli

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    batch = image_folder(tmp_path / "batch-c", 0, 4)
    cli.main(["ingest", "append", "--dataset", small_dataset, "--images", batch])
    out = capsys.readouterr().out
    assert "version 1 -> 2: 4 images added" in out and "no event emitted" in out


def test_ingest_append_to_a_prefect_server_that_does_not_answer_stops_before_appending(
    small_dataset, tmp_path, capsys, monkeypatch
):
    import cli

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    batch = image_folder(tmp_path / "batch-d", 0, 3)
    with pytest.raises(SystemExit) as done:
        cli.main(["ingest", "append", "--dataset", small_dataset, "--images", batch])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1
    assert f"127.0.0.1:{port}/api: no Prefect server answers" in err
    assert dataset.read_manifest(storage.join(small_dataset, dataset.UNLABELLED)).version == 1


@pytest.mark.slow  # Prefect events through the test harness: 5 s
def test_watch_announces_each_new_manifest_version_once(small_dataset, tmp_path, prefect_harness):
    from prefect.variables import Variable

    from flows.deployments import watch_data
    from flows.events import announced_variable

    overrides = {"data.root": small_dataset}
    assert watch_data(str(SMOKE), overrides) is None  # the first look only records
    assert Variable.get(announced_variable(small_dataset))["version"] == 1
    assert watch_data(str(SMOKE), overrides) is None  # unchanged
    ingest.append_unlabelled(small_dataset, image_folder(tmp_path / "batch", 0, 3))
    payload = watch_data(str(SMOKE), overrides)
    assert payload["version"] == 2 and payload["previous_version"] == 1
    assert payload["new_rows"] == 3 and payload["source"] == "watch"
    assert payload["dataset"] == small_dataset
    assert Variable.get(announced_variable(small_dataset))["version"] == 2
    assert watch_data(str(SMOKE), overrides) is None


@pytest.mark.slow  # needs the session's Prefect test harness, a server that takes 30 s to start
def test_announcements_at_once_keep_the_latest_version(prefect_harness, tmp_path):
    """Concurrent appends announce at once: none fails on the variable's creation race, and
    the record never moves back to an older version."""
    from concurrent.futures import ThreadPoolExecutor

    from prefect.variables import Variable

    from flows.events import announced_variable, remember

    root = str(tmp_path / "announced")
    states = [{"version": v, "rows": v, "shards": v, "digest": f"d{v}"} for v in (3, 5, 2, 4)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda state: remember(root, state), states))
    assert Variable.get(announced_variable(root))["version"] in (2, 3, 4, 5)
    remember(root, states[1])
    remember(root, states[2])  # an older version arriving late changes nothing
    assert Variable.get(announced_variable(root))["version"] == 5


# --- the promotion gate -----------------------------------------------------------------


def make_model_run(tmp_path, name: str, experiment: str, accuracy: float) -> TrainedModel:
    """A tiny trained-looking model: a checkpoint, a finished MLflow run, a registered
    version. The weights are the same every time (seeded)."""
    import torch

    torch.manual_seed(0)
    meta = models.ModelMeta("test_resnet", 10, 1, [str(i) for i in range(10)], 28, 28, "L")
    url = models.save(models.create("test_resnet", 10, 1), meta, str(tmp_path / name))
    run_id = tracking.start_run(experiment, name)
    tracking.log_checkpoint(run_id, url)
    tracking.log_metrics(run_id, {"final_test_accuracy": accuracy})
    tracking.set_tags(run_id, {f"{tracking.TAG}checkpoint_url": url})
    tracking.end_run(run_id)
    tracking.register(run_id, experiment)
    return TrainedModel("student", 1, "test_resnet", url, run_id, accuracy, 1.0)


def evaluated_and_gated(
    trained: list[TrainedModel], experiment: str, evaluation, dataset: str, out, parent: str
):
    """The last of `trained` (a teacher, then its student) through evaluate_robustness and
    the promotion gate, as the flow's iteration 1 does; the gate's record."""
    measured = stages.evaluate_robustness(
        trained, evaluation, dataset, str(out / "eval"), parent, 1
    )
    return stages.promote(
        trained[-1], [measured], experiment, evaluation, dataset, str(out / "run"), parent, 1,
        config.load(SMOKE).model_dump(),
    )  # fmt: skip


@pytest.mark.slow  # MLflow runs and registry, two small evaluations: 15-30 s
def test_gate_moves_the_champion_alias_or_marks_a_challenger_and_records_why(
    tmp_path, mlflow_uri, tiny_dataset, torch_one_thread
):
    from mlflow import MlflowClient

    experiment = "ns-gate"
    parent = tracking.start_run(experiment, "pipeline")
    evaluation = config.EvaluationConfig(
        corruptions=["contrast"], severities=[1], corruption_images=20
    )
    assert stages.existing_teacher("champion", experiment) is None

    first = make_model_run(tmp_path, "first", experiment, 0.5)
    its_teacher = replace(make_model_run(tmp_path, "teacher", experiment, 0.5), role="teacher")
    record = evaluated_and_gated(
        [its_teacher, first], experiment, evaluation, tiny_dataset, tmp_path / "1", parent
    )
    assert record.decision == "champion" and record.champion is None

    # the champion comes back as a teacher, from its checkpoint
    teacher = stages.existing_teacher("champion", experiment)
    assert (teacher.mlflow_run_id, teacher.url, teacher.final_accuracy) == (
        first.mlflow_run_id,
        first.url,
        0.5,
    )
    assert teacher.evaluated_on == "test"  # as its run logged it: final_test_accuracy

    # the same (seeded) weights again: no better beyond chance, so not promoted
    same = make_model_run(tmp_path, "same", experiment, 0.5)
    record = evaluated_and_gated(
        [teacher, same], experiment, evaluation, tiny_dataset, tmp_path / "2", parent
    )
    assert record.decision == "challenger"
    assert record.champion["run_id"] == first.mlflow_run_id
    assert record.comparison["accuracy"]["only_first_right"] == 0
    assert record.comparison["accuracy"]["p_value"] == 1.0
    client = MlflowClient(mlflow_uri)
    assert client.get_model_version_by_alias(experiment, "champion").run_id == first.mlflow_run_id
    challenger = client.get_model_version_by_alias(experiment, "challenger")
    assert challenger.run_id == same.mlflow_run_id
    assert challenger.tags[f"{tracking.TAG}promotion"] == "challenger"
    reasons = challenger.tags[f"{tracking.TAG}promotion_reasons"]
    assert "+0.00 points, no significant difference" in reasons
    assert "(chosen on the test split: the dataset has no validation split)" in reasons
    assert challenger.tags[f"{tracking.TAG}chosen_on"] == "test"
    assert client.get_run(same.mlflow_run_id).data.tags[f"{tracking.TAG}promotion"] == (
        "challenger"
    )
    assert storage.read_json(str(tmp_path / "2" / "run" / "promotion.json")) == record.record()
    assert record.record()["note"] == "chosen on the test split"
    logged = client.download_artifacts(parent, "promotion.json", str(tmp_path))
    assert json.loads(Path(logged).read_text())["decision"] == "challenger"


@pytest.mark.slow  # MLflow runs and registry: 9 s
def test_gate_measures_a_champion_from_another_run_as_the_student_was_measured(
    tmp_path, mlflow_uri, tiny_dataset, torch_one_thread
):
    """A champion this run did not evaluate is evaluated on the same images and seeded
    corruptions as the student, so that the two are compared image by image."""
    experiment = "ns-gate-side-by-side"
    parent = tracking.start_run(experiment, "pipeline")
    evaluation = config.EvaluationConfig(
        corruptions=["contrast"], severities=[1], corruption_images=20
    )
    champion = make_model_run(tmp_path, "champion", experiment, 0.3)
    tracking.set_alias(experiment, "champion", "1")
    # this run: its own first teacher and a student, evaluated side by side
    teacher = replace(make_model_run(tmp_path, "teacher", experiment, 0.3), role="teacher")
    student = make_model_run(tmp_path, "student", experiment, 0.3)
    record = evaluated_and_gated(
        [teacher, student], experiment, evaluation, tiny_dataset, tmp_path, parent
    )
    measured = storage.read_parquet(str(tmp_path / "run/promotion/robustness/robustness.parquet"))
    assert set(measured.column("mlflow_run_id").to_pylist()) == {champion.mlflow_run_id}
    # the same weights (seeded) measured the same way, against the same baseline (this
    # run's teacher), give the same figures, image by image: no difference at all
    for key in ("accuracy", "corruption_accuracy"):
        assert record.champion[key] == pytest.approx(record.candidate[key]), key
    assert record.champion["reported"] == record.candidate["reported"]
    accuracy = record.comparison["accuracy"]
    assert accuracy["only_first_right"] == accuracy["only_second_right"] == 0
    assert record.comparison["verdict"] == "no significant difference"
    assert record.decision == "challenger"  # superiority: it must be better beyond chance


# --- Docker -------------------------------------------------------------------------------

COMPOSE = REPO / "docker" / "compose.yaml"


SECRETS = (  # the compose file's variables that have no default: each one must be set
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "POSTGRES_PASSWORD",
    "PREFECT_API_AUTH_STRING",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)


def test_compose_file_has_the_services_and_takes_secrets_from_the_environment():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert {"postgres", "prefect-server", "mlflow", "minio", "worker"} <= set(services)
    server_env = services["prefect-server"]["environment"]
    assert server_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "sqlite:" in " ".join(services["mlflow"]["command"])
    assert "s3://noisy-student/mlflow" in services["mlflow"]["command"]
    worker_env = services["worker"]["environment"]
    assert worker_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["worker"]["build"]["dockerfile"] == "docker/Dockerfile"
    # the training stages' worker: the pool gpu, the host's GPU reserved, a CUDA build
    gpu = services["gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["build"]["args"]["TORCH_BACKEND"] == "${GPU_TORCH_BACKEND:-cu128}"
    assert "prefect worker start --pool gpu" in gpu["command"][-1]
    # the same servers, unless SERVER_HOST names the CPU machine's
    assert gpu["environment"]["PREFECT_API_URL"] == "http://${SERVER_HOST:-prefect-server}:4200/api"
    assert "prefect deploy -n resume" in services["worker"]["command"][-1]
    # every secret is a ${VARIABLE} without a default, never a literal
    for name, service in services.items():
        env = service.get("environment", {})
        for key in ("AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD",
                    "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING",
                    "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_FLASK_SERVER_SECRET_KEY"):  # fmt: skip
            if key in env:
                assert str(env[key]).startswith("${") and ":?" in str(env[key]), (name, key)
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "ARG TORCH_BACKEND=cpu" in dockerfile and "uv export --locked" in dockerfile


def test_compose_file_is_closed_by_default():
    """Loopback ports unless docker/.env opens them, auth in front of Prefect and MLflow,
    images pinned by version."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    published = [(name, p) for name, s in services.items() for p in s.get("ports", [])]
    assert {name for name, _ in published} == {"prefect-server", "mlflow", "minio"}
    for name, port in published:
        assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
    server = services["prefect-server"]["environment"]
    assert server["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING:?")
    assert services["worker"]["environment"]["PREFECT_API_AUTH_STRING"].startswith(
        "${PREFECT_API_AUTH_STRING:?"
    )
    command = services["mlflow"]["command"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    mlflow_env = services["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_TRACKING_PASSWORD:?")
    auth_ini = REPO / "docker" / Path(mlflow_env["MLFLOW_AUTH_CONFIG_PATH"]).name
    assert "admin_password" not in auth_ini.read_text().replace("# ", "")
    for name, service in services.items():
        if "image" in service and "build" not in service:
            repo, _, tag = service["image"].rpartition(":")
            assert repo and tag and tag != "latest" and any(c.isdigit() for c in tag), name
    example = (REPO / "docker" / ".env.example").read_text()
    for variable in (*SECRETS, "BIND_ADDRESS"):
        assert f"\n{variable}=" in example, variable


def compose_command() -> list[str] | None:
    if shutil.which("docker") and (
        subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def host_ips(resolved: dict) -> dict[str, str]:
    """`published port: host address` from `compose config`'s output, in either the short
    form (compose v1: "127.0.0.1:4200:4200/tcp") or the long one (compose v2)."""
    out = {}
    for service in resolved["services"].values():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                out[str(port["published"])] = port.get("host_ip", "0.0.0.0")
            else:
                parts = str(port).split(":")
                out[parts[-2]] = parts[0] if len(parts) == 3 else "0.0.0.0"
    return out


@pytest.mark.skipif(compose_command() is None, reason="neither docker compose nor docker-compose")
@pytest.mark.slow  # one `docker compose config` per secret: 8 s
def test_compose_config_validates(tmp_path):
    no_env_file = tmp_path / "empty.env"  # not a developer's docker/.env
    no_env_file.write_text("")
    command = [*compose_command(), "--env-file", str(no_env_file), "-f", str(COMPOSE), "config"]
    clean = {k: v for k, v in os.environ.items() if k not in (*SECRETS, "BIND_ADDRESS")}
    env = clean | {name: f"value-of-{name.lower()}" for name in SECRETS}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    ports = host_ips(yaml.safe_load(done.stdout))
    assert ports == dict.fromkeys(["4200", "5000", "9000", "9001"], "127.0.0.1")
    opened = subprocess.run(
        command, capture_output=True, text=True, env={**env, "BIND_ADDRESS": "0.0.0.0"}
    )
    assert set(host_ips(yaml.safe_load(opened.stdout)).values()) == {"0.0.0.0"}
    for name in SECRETS:
        without = {k: v for k, v in env.items() if k != name}
        done = subprocess.run([*command, "-q"], capture_output=True, text=True, env=without)
        assert done.returncode != 0 and name in done.stderr, name


def test_prefect_yaml_declares_iterate_with_a_limit_of_one_a_trigger_and_a_cron():
    from flows.events import EVENT, LABELS_EVENT, RESOURCE_PREFIX

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    iterate = by_name["iterate"]
    assert iterate["entrypoint"] == "flows.noisy_student.noisy_student"
    assert iterate["concurrency_limit"] == 1
    assert iterate["parameters"]["teacher"] == "champion"
    (trigger,) = iterate["triggers"]
    assert trigger["expect"] == [EVENT, LABELS_EVENT]
    assert trigger["match"]["prefect.resource.id"] == f"{RESOURCE_PREFIX}*"
    assert trigger["within"] == trigger["schedule_after"] > 0
    assert iterate["schedules"][0]["cron"]
    assert by_name["watch"]["entrypoint"] == "flows.deployments.watch_data"
    # crashed runs: `resume` on the end of a run of the flow noisy-student, given its id
    resume = by_name["resume"]
    assert resume["entrypoint"] == "flows.resume.resume_crashed"
    (ended,) = resume["triggers"]
    assert set(ended["expect"]) == {"prefect.flow-run.Crashed", "prefect.flow-run.Failed"}
    from flows.noisy_student import noisy_student

    assert ended["match_related"]["prefect.resource.name"] == noisy_student.name
    assert ended["parameters"] == {"flow_run_id": "{{ event.resource.id }}"}
    # training on the pool gpu: the deployment is named after its pool, which the flow uses
    from flows.training import deployment_name

    gpu = by_name["gpu"]
    assert gpu["work_pool"]["name"] == "gpu" and gpu["pull"] == []
    assert deployment_name("gpu") == f"noisy-student-train/{gpu['name']}"
    # what `prefect deploy` and the worker load: the real flows, with the real schema
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    for d in by_name.values():
        flow = load_flow_from_entrypoint(d["entrypoint"], use_placeholder_flow=False)
        schema = parameter_schema(flow).model_dump_for_openapi()
        assert set(d.get("parameters", {})) <= set(schema["properties"]), d["name"]
        if "overrides" in schema["properties"]:
            assert schema["properties"]["overrides"]["additionalProperties"] is False


@pytest.mark.parametrize(
    "argv",
    [["serve"], ["serve-model"], ["ingest", "append"], ["results-storage"], ["notifications"]],
)
def test_the_operations_commands_have_help(argv):
    import cli

    with pytest.raises(SystemExit) as done:
        cli.main([*argv, "--help"])
    assert done.value.code == 0


def test_serve_without_a_prefect_server_says_how_to_start_one(capsys, monkeypatch):
    import cli

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(SystemExit) as done:
        cli.main(["serve", "-c", str(SMOKE)])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "PREFECT_API_URL" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        cli.main(["serve", "-c", str(SMOKE), "--set", "teacher.epochz=1"])
    assert "teacher.epochz" in capsys.readouterr().err
    refused = {
        "--gpu-limit 2": "--gpu-limit 2: needs --training-pool",
        "--max-resumes -1": "--max-resumes -1: must be 0 or more",
    }
    for options, named in refused.items():
        argv = options.split()
        with pytest.raises(SystemExit):
            cli.main(["serve", "-c", str(SMOKE), *argv])
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1, err


def test_a_selected_shard_left_empty_by_balancing_is_skipped_by_the_student(tmp_path):
    """Found by the soak: small appended shards can keep no image after balancing."""
    import numpy as np
    import pyarrow as pa

    from noisy_student.data import dataset_writer, training_data

    unlabelled = dataset_writer.write_rows(
        str(tmp_path / "unlabelled"),
        dataset.UNLABELLED,
        ["a", "b"],
        [(id, np.full((2, 2), v, np.uint8), None) for id, v in (("a", 0), ("b", 1))],
    )
    url = str(tmp_path / "selected")
    files = []
    for name, ids in (("part-00000.parquet", []), ("part-00001.parquet", ["b"])):
        targets = np.full((len(ids), 2), 0.5, dtype=np.float32)
        table = pa.table({
            "id": pa.array(ids, pa.string()),
            "target": pa.FixedSizeListArray.from_arrays(pa.array(targets.reshape(-1)), 2),
            "confidence": pa.array([0.5] * len(ids), pa.float32()),
            "predicted": pa.array([0] * len(ids), pa.int64()),
            "copies": pa.array([2] * len(ids), pa.int64()),
        })  # fmt: skip
        sha256 = storage.write_parquet(storage.join(url, name), table, 100)
        files.append({"file": name, "rows": len(ids), "sha256": sha256})
    storage.write_json(storage.join(url, dataset.MANIFEST), {"shards": files})
    rows = training_data.pseudo_labelled_rows(url, unlabelled)
    assert rows.items == 2  # "b", twice
    (block,) = rows.blocks
    assert block.targets.shape == (2, 2)
    assert rows.decode(0, block.rows).flatten().tolist() == [1] * 8


@pytest.mark.slow  # MLflow runs, one small evaluation: 10-20 s
def test_a_student_of_a_teacher_given_as_a_checkpoint_is_judged_against_it(
    tmp_path, mlflow_uri, tiny_dataset, torch_one_thread
):
    """`run --teacher CHECKPOINT`: a first teacher with no MLflow run of its own is still
    measured against its student image by image, and the student gets its verdict."""
    import torch

    experiment = "ns-checkpoint-teacher"
    parent = tracking.start_run(experiment, "pipeline")
    evaluation = config.EvaluationConfig(
        corruptions=["contrast"], severities=[1], corruption_images=20
    )
    torch.manual_seed(1)  # other weights than the student's
    meta = models.ModelMeta("test_resnet", 10, 1, [str(i) for i in range(10)], 28, 28, "L")
    url = models.save(models.create("test_resnet", 10, 1), meta, str(tmp_path / "checkpoint"))
    teacher = stages.existing_teacher(url, experiment)
    assert teacher.mlflow_run_id == ""  # a checkpoint, not a run
    student = make_model_run(tmp_path, "student", experiment, 0.5)
    record = evaluated_and_gated(
        [teacher, student], experiment, evaluation, tiny_dataset, tmp_path, parent
    )
    (verdict,) = record.students_against_teachers
    assert verdict["iteration"] == 1
    counts = verdict["comparison"]["accuracy"]
    assert counts["only_first_right"] + counts["only_second_right"] > 0  # two models compared
    assert verdict["sentence"].startswith("student 1 ")
