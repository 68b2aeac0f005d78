"""No silent failure in training runs: a checkpoint that does not fit is named."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import _fit_job as job  # tests/ is on sys.path: pytest puts a test file's folder there
import jax
import jax.numpy as jnp
import optax
import pytest

import lora_jax as lj
from lora_jax import training
from lora_jax.errors import AdapterMismatchError, CheckpointCorruptError

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
