"""No silent failure in training runs: a diverging loss stops the run, a checkpoint that does not fit is named."""

import json
import math
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import _fit_job as job  # tests/ is on sys.path: pytest puts a test file's folder there
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import training
from lora_jax.errors import AdapterMismatchError, CheckpointCorruptError, LoraError, NonFiniteError

FIT_JOB = Path(__file__).parent / "_fit_job.py"


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def _latest_lora(directory: Path):
    params, _, _ = job.problem()
    spec = job.spec()
    tx = training.make_optimizer(training.TrainConfig(steps=1))
    template = training.init_state(jax.random.key(0), params, spec, tx)
    with training.Checkpoints(directory, params, spec) as checkpoints:
        return checkpoints.restore_latest(template)["lora"]


def _first_nonfinite_step(lr: float, steps: int = 12) -> int:
    """The first step whose loss is NaN/Inf, found by stepping the problem by hand (no fit)."""
    params, batch, loss_fn = job.problem()
    spec = job.spec()
    tx = training.make_optimizer(training.TrainConfig(steps=steps, learning_rate=lr))
    advance = training.state_step(training.train_step(loss_fn, spec, tx))
    state = training.init_state(jax.random.key(0), params, spec, tx)
    for step in range(1, steps + 1):
        state, loss = advance(state, params, batch)
        if not math.isfinite(float(loss)):
            return step
    raise AssertionError(f"learning rate {lr} did not diverge in {steps} steps")


# --- divergence -------------------------------------------------------------------------------


@pytest.mark.parametrize("log_every", [1, 100])  # the loss read at log time, and the one-step-late read
def test_diverging_fit_stops_at_the_first_nonfinite_loss(tmp_path, log_every):
    first = _first_nonfinite_step(1e30)
    assert first > 1  # a finite checkpoint exists before it
    directory, log = tmp_path / "run", tmp_path / "log.jsonl"
    with pytest.raises(NonFiniteError, match=rf"training loss of step {first} is (nan|inf)") as err:
        job.fit(directory, steps=12, lr=1e30, log_every=log_every, log_path=log)
    message = str(err.value)
    assert str(directory.resolve()) in message and str(log) in message
    assert "lower the learning rate (now 1e+30)" in message and "check the data" in message
    # Only finite states were checkpointed: the steps before the first bad one.
    assert _steps(directory) and max(_steps(directory)) < first
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(_latest_lora(directory)))
    last = json.loads(log.read_text().splitlines()[-1])
    assert (last["step"], last["stopped"]) == (first, "non-finite loss")


def test_warn_policy_trains_on_and_never_checkpoints_a_nonfinite_state(tmp_path):
    first = _first_nonfinite_step(1e30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, records = job.fit(tmp_path / "run", steps=8, lr=1e30, on_nonfinite="warn")
    messages = [str(w.message) for w in caught]
    diverged = [m for m in messages if "training on" in m]
    skipped = [m for m in messages if "not checkpointed" in m]
    assert len(diverged) == 1 and f"training loss of step {first} is" in diverged[0]  # warned once
    assert len(skipped) == 1 and f"after step {first} adapter leaf" in skipped[0]
    assert int(state["step"]) == 8 and not math.isfinite(records[-1]["loss"])
    assert max(_steps(tmp_path / "run")) < first
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(_latest_lora(tmp_path / "run")))


def test_nan_in_the_data_stops_at_its_step(tmp_path):
    params, batch, _ = job.problem()
    bad = {**batch, "x": batch["x"].at[3, 2].set(jnp.nan)}

    def batches(epoch):  # one batch an epoch: epoch 2 is step 3
        return [bad if epoch == 2 else batch]

    with pytest.raises(NonFiniteError, match="training loss of step 3 is nan"):
        job.fit(tmp_path / "run", steps=6, batches=batches, log_every=10, checkpoint_every=0)


def test_nan_gradients_under_a_finite_loss_are_not_checkpointed(tmp_path):
    def loss_fn(p, b, rng):  # the loss is 0, its gradient d sqrt(|z|) at z = 0 is NaN
        z = b["x"] @ p["w"]
        return jnp.mean(jnp.sqrt(jnp.abs(z - jax.lax.stop_gradient(z)))) + 0.0 * jnp.sum(p["head"])

    with pytest.raises(NonFiniteError, match=r"after step 1 adapter leaf w/a \(and 1 more\) holds NaN or Inf"):
        job.fit(tmp_path / "run", steps=4, loss_fn=loss_fn, log_every=10)
    assert _steps(tmp_path / "run") == []


def test_unknown_nonfinite_policy_is_refused():
    with pytest.raises(LoraError, match="on_nonfinite='ignore': use one of 'stop', 'warn'"):
        training.TrainConfig(steps=1, on_nonfinite="ignore")


# --- resume -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A checkpoint directory of four steps of the problem (steps 3 and 4 kept)."""
    directory = tmp_path_factory.mktemp("trained") / "run"
    job.fit(directory, steps=4)
    assert _steps(directory) == [3, 4]
    return directory


def _damage(directory: Path, kind: str) -> None:
    step = directory / "4"
    if kind == "no signature":
        shutil.rmtree(step / "signature")
    elif kind == "signature not JSON":
        (step / "signature" / "metadata").write_text('{"w/a": {"sha')
    elif kind == "signature a list":
        (step / "signature" / "metadata").write_text("[1, 2]")
    elif kind == "no state":
        shutil.rmtree(step / "state")
    elif kind == "truncated arrays":
        for file in (step / "state" / "d").iterdir():
            file.write_bytes(file.read_bytes()[:10])
    elif kind == "state metadata not JSON":
        (step / "state" / "_METADATA").write_text("garbage")


DAMAGE = {
    "no signature": (CheckpointCorruptError, "has no spec signature .*not written by lora_jax.training"),
    "signature not JSON": (CheckpointCorruptError, "its spec signature is damaged"),
    "signature a list": (CheckpointCorruptError, "its spec signature is not a mapping"),
    "no state": (CheckpointCorruptError, "its state cannot be read"),
    "truncated arrays": (CheckpointCorruptError, "its state cannot be read"),
    "state metadata not JSON": (CheckpointCorruptError, "its state cannot be read"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_checkpoint_is_named_before_it_is_restored(trained, tmp_path, kind):
    directory = tmp_path / "run"
    shutil.copytree(trained, directory)
    _damage(directory, kind)
    error, message = DAMAGE[kind]
    with pytest.raises(error, match=rf"^{re.escape(str(directory.resolve()))}: checkpoint 4 .*{message}") as err:
        job.fit(directory, steps=6)
    if kind not in ("no signature",):
        assert "delete that step's folder to resume from the checkpoint before it" in str(err.value)
    assert _steps(directory) == [3, 4]  # nothing written


def test_checkpoint_of_another_base_names_the_leaf(trained, tmp_path):
    directory = tmp_path / "run"
    shutil.copytree(trained, directory)
    with pytest.raises(AdapterMismatchError, match=r"head: shape \[16, 1\] in the checkpoint, \[12, 1\] now"):
        job.fit(directory, width=12, steps=6)


def test_checkpoint_of_another_optimizer_names_the_leaf(tmp_path):
    params, _, _ = job.problem()
    spec = job.spec()
    lora = lj.init(jax.random.key(0), params, spec)
    sgd = {
        "lora": lora,
        "opt_state": optax.sgd(0.1, momentum=0.9).init(lora),
        "step": jnp.array(2),
        "rng": jnp.zeros(2),
    }
    with training.Checkpoints(tmp_path / "run", params, spec) as checkpoints:
        checkpoints.save(2, sgd)
    with pytest.raises(
        AdapterMismatchError, match=r"checkpoint 2 holds another training state: opt_state/0/trace/head only in the"
    ):
        job.fit(tmp_path / "run", steps=4)


def test_checkpoint_directory_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("notes")
    with pytest.raises(CheckpointCorruptError, match=r"run is a file, not a checkpoint directory"):
        job.fit(tmp_path / "run", steps=2)


def test_checkpoint_past_the_end_of_the_run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    with pytest.raises(LoraError, match=r"newest checkpoint is at step 4, past this run's 2 steps"):
        job.fit(tmp_path / "run", steps=2)


def _fit_process(directory: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(FIT_JOB), str(directory), "--steps", "6", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("args", "damage", "message"),
    [
        (["--rank", "4"], None, r"AdapterMismatchError: .*w/a: rank 2 in the checkpoint, 4 now"),
        (["--width", "12"], None, r"AdapterMismatchError: .*shape \[16, 1\] in the checkpoint, \[12, 1\] now"),
        ([], "truncated arrays", r"CheckpointCorruptError: .*its state cannot be read"),
    ],
    ids=["rank", "base", "damaged"],
)
def test_refused_resume_prints_one_error_and_no_orbax_noise(trained, tmp_path, args, damage, message):
    directory = tmp_path / "run"
    shutil.copytree(trained, directory)
    if damage:
        _damage(directory, damage)
    done = _fit_process(directory, *args)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert re.search(message, last) and str(directory.resolve()) in last, done.stderr[-2000:]
    assert "Event loop is closed" not in done.stderr
    assert "strict=False" not in done.stderr
    assert done.stderr.count("Traceback") == 1
