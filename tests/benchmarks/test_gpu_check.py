"""The GPU check's dry run: every step at tiny sizes, here on CPU (interpret mode)."""

import json
import os
import subprocess
import sys

import pytest

from tests.quant_core import test_packaging

# Integration: runs benchmarks/gpu_check.py in a subprocess.
pytestmark = pytest.mark.integration

STEPS = ["environment", "copy_bandwidth", "kernel_tests", "quantized_matmul",
         "layer_solves", "model_comq", "llm_decode"]


def test_the_dry_run_goes_through_every_step_and_writes_its_json(tmp_path):
  run = subprocess.run(
      [sys.executable, os.path.join("benchmarks", "gpu_check.py"), "--dry-run",
       "--out", str(tmp_path)], cwd=test_packaging.REPO, capture_output=True, text=True,
      check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  written = sorted(os.listdir(tmp_path))
  assert written == ["gpu_check_cpu_dry_run.json", "gpu_check_cpu_dry_run.log"], written
  result = json.loads((tmp_path / "gpu_check_cpu_dry_run.json").read_text())
  assert result["schema_version"] == 1 and result["dry_run"] is True
  assert list(result["steps"]) == STEPS
  assert {name: step["status"] for name, step in result["steps"].items()} == dict.fromkeys(
      STEPS, "ok")
  steps = result["steps"]
  assert steps["kernel_tests"]["failed"] == 0 and steps["kernel_tests"]["passed"] >= 20
  assert steps["copy_bandwidth"]["bandwidth"] > 0
  row = steps["quantized_matmul"]["rows"][0]
  assert steps["quantized_matmul"]["mosaic"] == "interpreted (CPU)"
  for name in ("int4_g128", "pow2_4bit_g128", "int4_g128_mosaic"):
    assert row[f"{name}_s"] > 0 and row[f"{name}_speedup"] > 0
    assert 0 < row[f"{name}_bw_share"]
  assert [(r["solver"], r["d_in"], r["d_out"]) for r in steps["layer_solves"]["rows"]] == [
      ("comq", 64, 48), ("gptq", 64, 48)]
  assert steps["model_comq"]["models"][0]["layers"] == 4
  decode = steps["llm_decode"]
  assert decode["settings"]["model"] == "byte_llama" and decode["interpret"] is True
  for name in ("float", "packed"):
    assert decode[name]["decode_tokens_per_second"] > 0
    assert decode[name]["prefill_tokens_per_second"] > 0
  assert decode["packed_vs_float"] > 0 and decode["tokens_equal"] is True
