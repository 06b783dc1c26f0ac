"""Training runs unchanged under torchrun (DDP with gloo on CPU)."""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest

from lightningdot.config import DataConfig, LoopConfig, TrainConfig
from tests.helpers import tiny_model_config


@pytest.mark.slow
def test_two_process_finetune(corpus_dir, store_dir, tmp_path):
    cfg = TrainConfig(
        model=tiny_model_config(),
        data=DataConfig(str(corpus_dir / "captions.json"), str(store_dir)),
        loop=LoopConfig(epochs=2, batch_size=2),
    )
    (tmp_path / "r.json").write_text(json.dumps(asdict(cfg)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "lightningdot.cli",
        "finetune",
        str(tmp_path / "r.json"),
        "--out",
        str(tmp_path / "run"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2  # one record per epoch, written by rank 0 only
    assert all(r["world_size"] == 2 for r in log)
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
