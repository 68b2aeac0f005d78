"""The trainer: the loss goes down, methods share one footing, a killed run resumes exactly."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import _train_job as job  # tests/ is on sys.path: pytest puts a test file's folder there
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import train

JOB = Path(__file__).parent / "_train_job.py"


def test_schedule_warms_up_then_decays():
    schedule = train.learning_rate_schedule(train.TrainConfig(steps=100, learning_rate=1e-3, warmup_ratio=0.1))
    expected = {0: 0.0, 5: 0.5e-3, 10: 1e-3, 55: 0.5e-3, 100: 0.0}
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, abs=1e-9)


@pytest.mark.parametrize("use_factored", [True, False])
def test_fit_reduces_loss_and_logs(tmp_path, use_factored):
    params, spec, apply_fn = job.setup()
    config = train.TrainConfig(steps=24, learning_rate=1e-2, log_every=4, factored=use_factored)
    log = tmp_path / "metrics.jsonl"

    def eval_batches():
        return job.train_batches(0)

    state, records = train.fit(
        apply_fn,
        params,
        spec,
        config,
        job.train_batches,
        8,
        eval_batches,
        ("accuracy", "f1"),
        log_path=log,
        progress=False,
    )
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert losses[-1] < losses[0]
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines == records
    assert lines[-1]["split"] == "eval" and 0.0 <= lines[-1]["accuracy"] <= 1.0
    assert int(state["step"]) == 24


def test_methods_on_one_footing():
    params, _, _ = job.setup()
    model = job.BertForSequenceClassification(job.CONFIG)
    full = lj.describe(params, lj.LoraSpec([lj.trainable(".*")]))
    bitfit = lj.describe(params, lj.LoraSpec([lj.trainable(".*bias"), lj.trainable("classifier/.*")]))
    head = lj.describe(params, lj.LoraSpec([lj.trainable("classifier/.*")]))
    lora = lj.describe(params, job.lora_spec(model, "qv", rank=4, head=True))
    assert full.trainable_size == full.base_size
    assert head.trainable_size == 32 * 2 + 2
    assert head.trainable_size < bitfit.trainable_size < lora.trainable_size < full.trainable_size


def _run(args, **kwargs):
    return subprocess.Popen([sys.executable, str(JOB), *map(str, args)], **kwargs)


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    straight = tmp_path / "straight.npz"
    assert _run([tmp_path / "ckpt_a", straight]).wait(timeout=300) == 0

    resumed_dir = tmp_path / "ckpt_b"
    proc = _run([resumed_dir, tmp_path / "unused.npz", "--delay", "0.3"])
    deadline = time.time() + 240
    while time.time() < deadline and not (resumed_dir / "10").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (resumed_dir / "10").exists(), "the run never wrote its step-10 checkpoint"
    assert not (tmp_path / "unused.npz").exists(), "the run finished before it could be killed"
    steps_before = sorted(int(p.name) for p in resumed_dir.iterdir() if p.name.isdigit())
    assert max(steps_before) < job.STEPS

    resumed = tmp_path / "resumed.npz"
    assert _run([resumed_dir, resumed]).wait(timeout=300) == 0
    a, b = np.load(straight), np.load(resumed)
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-7, err_msg=name)
    # Only the last `keep_checkpoints` remain.
    assert sorted(int(p.name) for p in resumed_dir.iterdir() if p.name.isdigit()) == [25, 30]
