"""benchmarks.precision: its table says what was measured, ratio by ratio (the run itself is
minutes of training: `uv run python -m benchmarks.precision --quick` checks the harness)."""

from __future__ import annotations

import json

import torch

from benchmarks import precision


def _result() -> dict:
    rates = {
        "training loop": {"fp32": [500.0, 520.0, 480.0], "bf16": [700.0, 650.0, 720.0]},
        "labelling stage": {"fp32": [2000.0, 2100.0, 1900.0], "bf16": [4000.0, 4200.0, 3800.0]},
    }
    return {
        "date": "2026-12-06T07:00:00+00:00",
        "hardware": {
            "cpu": "AMD EPYC", "cpu_cores": 2, "torch_threads": 2, "load_average_1min": 1.5,
            "torch": "2.x", "is_avx512_bf16_supported": True, "is_amx_tile_supported": False,
        },
        "student_model": "resnet10t", "student_batch": 128, "teacher_model": "resnet10t",
        "inference_batch": 1024, "unlabelled_images": 16384, "rounds": 3, "rates": rates,
        "ratios": {
            what: [b / f for f, b in zip(by["fp32"], by["bf16"], strict=True)]
            for what, by in rates.items()
        },
    }  # fmt: skip


def test_the_table_gives_each_rounds_ratio_and_their_median():
    text = precision.markdown(_result(), "uv run python -m benchmarks.precision")
    assert "the CPU's bf16 support as torch probes it: is_avx512_bf16_supported." in text
    # 700/500, 650/520, 720/480: the median of the ratios, not the ratio of the medians
    assert "| training loop | 500 | 700 | 1.40, 1.25, 1.50 | **1.40** |" in text
    assert "| labelling stage | 2000 | 4000 | 2.00, 2.00, 2.00 | **2.00** |" in text
    assert "3 round(s)" in text and "16,384" in text


def test_cpu_features_are_torchs_probes_or_false_where_a_build_has_none(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert precision.cpu_features() == {
        "is_avx512_bf16_supported": True,
        "is_amx_tile_supported": False,
    }


def test_results_are_written_per_device_and_slice(monkeypatch, tmp_path, capsys):
    from benchmarks import perf

    monkeypatch.setattr(perf, "RESULTS", tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    perf.write_results("precision", True, {"a": 1}, "# table\n")
    assert json.loads((tmp_path / "precision-cpu-quick.json").read_text()) == {"a": 1}
    assert (tmp_path / "precision-cpu-quick.md").read_text() == "# table\n"
    assert "written:" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    perf.write_results("perf", False, {"b": 2}, "# gpu\n")
    assert (tmp_path / "perf-gpu.md").read_text() == "# gpu\n"
    # ratios that depend on the CPU's kernels: one file per kind, none on a GPU
    perf.write_results("small-maps", False, {"c": 3}, "# gpu\n", per_isa=True)
    assert (tmp_path / "small-maps-gpu.md").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    perf.write_results("small-maps", False, {"c": 3}, "# avx2\n", per_isa=True)
    assert (tmp_path / "small-maps-cpu-avx2.md").read_text() == "# avx2\n"
    from benchmarks import machine

    assert machine.cpu_name().endswith(" (AVX2)")
