"""Two JAX processes on 127.0.0.1 train LoRA data-parallel and match one process."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import multiprocess_train

ROOT = pathlib.Path(__file__).parent.parent
MODULE = "experiments.multiprocess_train"
TIMEOUT_S = 150
STEPS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(tmp_path: pathlib.Path, out: pathlib.Path) -> tuple[list[int], list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
    env["JAX_PLATFORMS"] = "cpu"
    port = _free_port()
    procs, logs = [], []
    for rank in range(2):
        log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        cmd = [sys.executable, "-m", MODULE, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
        cmd += ["--process-id", str(rank), "--steps", str(STEPS), "--out", str(out)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        codes = [None, None]
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    for rank in range(2):
        logs.append((tmp_path / f"rank{rank}.log").read_text())
    return codes, logs


def _reference() -> dict:
    return multiprocess_train.run(STEPS, devices=jax.devices()[:1])


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "lora.npz"
    codes, logs = _launch(tmp_path, out)
    if codes != [0, 0] and "address already in use" in "".join(logs).lower():
        codes, logs = _launch(tmp_path, out)  # the free port was taken in between; once more
    report = "\n".join(f"--- rank {i} (exit {c}) ---\n{log[-3000:]}" for i, (c, log) in enumerate(zip(codes, logs)))
    if codes == [None, None]:
        pytest.fail(f"processes did not finish within {TIMEOUT_S}s\n{report}")
    assert codes == [0, 0], report
    assert '"processes": 2' in logs[0], report

    want = _reference()
    with np.load(out) as got:
        np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5, atol=1e-5)
        assert set(got.files) - {"losses"} == set(want["lora"])
        for name, value in want["lora"].items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
