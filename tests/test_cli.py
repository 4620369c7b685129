"""The `noisy-student` command's contract: one-line errors, --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

import cli
from tests.conftest import REPO


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_run_with_a_typo_in_a_config_key_fails_in_one_line_naming_the_key(capsys):
    code, _, err = run_cli(
        capsys, "run", "-c", str(REPO / "pipeline_config/smoke.yaml"), "--set", "teacher.epochz=3"
    )
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "teacher.epochz" in err and "unknown key" in err


def test_run_with_an_unknown_timm_model_fails_naming_the_model(capsys):
    code, _, err = run_cli(
        capsys,
        "run",
        "-c",
        str(REPO / "pipeline_config/smoke.yaml"),
        "--set",
        "students.1.model=resnet9000",
    )
    assert code == 2
    assert "students.1.model" in err and "resnet9000" in err


def test_run_with_a_missing_dataset_fails_before_starting_prefect(capsys, tmp_path):
    code, _, err = run_cli(
        capsys,
        "run",
        "-c",
        str(REPO / "pipeline_config/smoke.yaml"),
        "--set",
        f"data.root={tmp_path}/nowhere",
        "--set",
        "data.fashion_mnist=null",
    )
    assert code == 2
    assert f"{tmp_path}/nowhere" in err and err.startswith("error: ")


def test_run_with_a_missing_config_file_names_it(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "-c", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml" in err


@pytest.mark.parametrize(
    "argv",
    [[], ["run"], ["ingest"], ["ingest", "fashion-mnist"], ["ingest", "image-folder"], ["predict"]],
)
def test_every_command_has_help(argv):
    done = subprocess.run(
        [sys.executable, "-m", "cli", *argv, "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0
    assert "usage: noisy-student" in done.stdout
