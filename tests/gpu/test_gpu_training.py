"""GPU path of training: bf16 autocast on CUDA through Ray Train. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_training_on_one_gpu_reports_mfu(genloop_config, ray_cluster):
    from genloop.services.training_run import train
    from genloop.training.datasets import ingest

    config = genloop_config
    config.data.max_documents_per_source = 3000
    config.train.use_gpu = True
    config.train.num_workers = 1
    config.train.preset = "small"
    config.train.max_steps = 60
    config.train.eval_every = 20
    config.train.micro_batch_size = 32
    ingest(["builtin:python-docs"], "docs", config.data, config.datasets_dir)
    run = train(config, "docs", show_progress=False)
    assert run.cost.device_type == "cuda"
    assert run.metrics["best_val_loss"] < run.metrics["initial_val_loss"]
    assert 0 < run.cost.mfu < 1
