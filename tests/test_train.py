"""Training: the one train step, the task-agnostic loop, the two tasks on the bundled models, checkpoints."""

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import _train_job as job  # tests/ is on sys.path: pytest puts a test file's folder there
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import training

JOB = Path(__file__).parent / "_train_job.py"
MODELS = Path(__file__).parent / "fixtures" / "models"


def test_schedule_warms_up_then_decays():
    schedule = training.learning_rate_schedule(training.TrainConfig(steps=100, learning_rate=1e-3, warmup_ratio=0.1))
    expected = {0: 0.0, 5: 0.5e-3, 10: 1e-3, 55: 0.5e-3, 100: 0.0}
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, abs=1e-9)


@pytest.mark.parametrize("use_factored", [True, False])
def test_fit_reduces_loss_and_logs(tmp_path, use_factored):
    params, spec, apply_fn = job.setup()
    config = training.TrainConfig(steps=24, learning_rate=1e-2, log_every=4, factored=use_factored)
    log = tmp_path / "metrics.jsonl"
    task = training.classification(apply_fn, ("accuracy", "f1"))

    def eval_batches():
        return job.train_batches(0)

    state, records = training.fit(
        task.loss,
        params,
        spec,
        config,
        job.train_batches,
        8,
        evaluate=task.evaluate,
        eval_batches=eval_batches,
        log_path=log,
        progress=False,
    )
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert losses[-1] < losses[0]
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines == records
    assert lines[-1]["split"] == "eval" and 0.0 <= lines[-1]["accuracy"] <= 1.0 and "f1" in lines[-1]
    assert int(state["step"]) == 24
    assert set(state) == {"lora", "opt_state", "step", "rng"}
    assert jax.tree_util.tree_structure(state["lora"]) == jax.tree_util.tree_structure(
        lj.init(jax.random.key(0), params, spec)
    )


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


# The train step ------------------------------------------------------------------


def _plain_problem():
    """A function of a plain dict, its data, and a spec with an adapter and a fully trainable leaf."""
    keys = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(keys[0], (8, 16)) / 3, "head": jax.random.normal(keys[1], (16, 1)) / 4}
    x = jax.random.normal(keys[2], (32, 8))
    batch = {"x": x, "y": jnp.sin(x.sum(axis=1, keepdims=True))}

    def loss_fn(p, b, rng):
        h = jnp.tanh(b["x"] @ p["w"])
        if rng is not None:
            h = h * jax.random.bernoulli(rng, 0.9, h.shape) / 0.9
        return jnp.mean((h @ p["head"] - b["y"]) ** 2)

    spec = lj.LoraSpec([lj.Rule("w", rank=2), lj.trainable("head")])
    return params, batch, loss_fn, spec


def test_train_step_factored_and_combine_agree():
    params, batch, loss_fn, spec = _plain_problem()
    lora = jax.tree_util.tree_map(lambda x: x + 0.05, lj.init(jax.random.key(1), params, spec))
    tx = optax.adam(1e-2)
    fast = jax.jit(training.train_step(loss_fn, spec, tx))(params, lora, tx.init(lora), batch, None)
    slow = jax.jit(training.train_step(loss_fn, spec, tx, factored=False))(params, lora, tx.init(lora), batch, None)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), fast, slow)
    # The loss is the loss of base plus adapters, before the update.
    want = loss_fn(lj.combine(params, lora, spec), batch, None)
    np.testing.assert_allclose(fast[2], want, rtol=1e-6)
    # A key turns the model's dropout on; the same key gives the same step.
    step = jax.jit(training.train_step(loss_fn, spec, tx))
    a = step(params, lora, tx.init(lora), batch, jax.random.key(5))
    b = step(params, lora, tx.init(lora), batch, jax.random.key(5))
    assert float(a[2]) == float(b[2]) != float(fast[2])


def test_train_step_full_fine_tuning_reads_no_base_values():
    params, batch, loss_fn, _ = _plain_problem()
    spec = lj.LoraSpec([lj.trainable(".*")])
    lora = lj.init(jax.random.key(0), params, spec)
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx = optax.sgd(0.1)
    new, _, loss = training.train_step(loss_fn, spec, tx, factored=False)(shapes, lora, tx.init(lora), batch, None)
    np.testing.assert_allclose(loss, loss_fn(params, batch, None), rtol=1e-6)
    assert not np.allclose(new["w"], params["w"])


# Variants through the loop ----------------------------------------------------------


def _mse(loss_fn):
    return lambda params, batches: {"mse": float(np.mean([loss_fn(params, b, None) for b in batches]))}


def test_fit_trains_on_a_quantized_base_as_on_its_dequantized_copy(tmp_path):
    params, batch, loss_fn, spec = _plain_problem()
    q = lj.quantize(params, [("w", "nf4")])
    config = training.TrainConfig(steps=6, learning_rate=1e-2, log_every=1)

    def run(base, directory=None):
        return training.fit(
            loss_fn,
            base,
            spec,
            config,
            lambda epoch: [batch],
            1,
            evaluate=_mse(loss_fn),
            eval_batches=lambda: [batch],
            checkpoint_dir=directory,
            progress=False,
        )

    state, records = run(q, tmp_path / "run")
    plain_state, plain_records = run(lj.dequantize(q))
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert losses[-1] < losses[0]
    # The same steps as on the float32 weights the NF4 codes stand for; the evaluation (on the merged tree) too.
    np.testing.assert_allclose(losses, [r["loss"] for r in plain_records if r["split"] == "train"], rtol=1e-5)
    np.testing.assert_allclose(records[-1]["mse"], plain_records[-1]["mse"], rtol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state["lora"], plain_state["lora"]
    )
    assert lj.quant.is_quantized(q["w"])
    # Its checkpoint, written on the quantized base, resumes on it.
    again, more = run(q, tmp_path / "run")
    assert more == [{"step": 6, "split": "eval", "mse": records[-1]["mse"]}]
    jax.tree_util.tree_map(np.testing.assert_array_equal, again["lora"], state["lora"])


def test_fit_starts_from_given_adapters_with_a_given_optimizer():
    params, batch, loss_fn, spec = _plain_problem()
    residual, start = lj.pissa_init(params, spec)
    kept = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), start)  # no view: it would block donation
    config = training.TrainConfig(steps=4, learning_rate=1e-2, log_every=1)
    tx = lj.lora_plus(optax.adamw, training.learning_rate_schedule(config), ratio=16.0)
    state, records = training.fit(
        loss_fn, residual, spec, config, lambda epoch: [batch], 1, progress=False, lora=start, tx=tx
    )
    # The same steps by hand, from the state of those adapters and that optimizer.
    want = training.init_state(jax.random.key(config.seed), residual, spec, tx, start)
    advance = training.state_step(training.train_step(loss_fn, spec, tx))
    want_losses = []
    for _ in range(config.steps):
        want, loss = advance(want, residual, batch)
        want_losses.append(float(loss))
    np.testing.assert_allclose([r["loss"] for r in records], want_losses, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state["lora"], want["lora"])
    # PiSSA's start on its residual is the base model.
    np.testing.assert_allclose(
        loss_fn(lj.combine(residual, kept, spec), batch, None), loss_fn(params, batch, None), rtol=1e-5
    )
    # The caller's adapters survive the run (the step donates its state, not them).
    jax.tree_util.tree_map(np.testing.assert_array_equal, start, kept)
    # The default optimizer (AdamW at one rate) and the default adapters take other steps.
    default_tx, _ = training.fit(loss_fn, residual, spec, config, lambda epoch: [batch], 1, progress=False, lora=start)
    default_lora, _ = training.fit(loss_fn, residual, spec, config, lambda epoch: [batch], 1, progress=False, tx=tx)
    for other in (default_tx, default_lora):
        assert not np.allclose(other["lora"]["w"]["b"], state["lora"]["w"]["b"])


def test_fit_refuses_adapters_made_for_another_spec():
    params, batch, loss_fn, spec = _plain_problem()
    other = lj.init(jax.random.key(0), params, lj.LoraSpec([lj.Rule("w", rank=4), lj.trainable("head")]))
    config = training.TrainConfig(steps=1)
    with pytest.raises(lj.AdapterMismatchError, match=r"adapter leaf w/a has shape \(8, 4\), expected \(8, 2\)"):
        training.fit(loss_fn, params, spec, config, lambda epoch: [batch], 1, progress=False, lora=other)


# Tasks on the bundled models --------------------------------------------------------


def _steps(task, params, spec, batch, steps=12, lr=1e-2):
    tx = optax.adam(lr)
    step = jax.jit(training.train_step(task.loss, spec, tx))
    lora = lj.init(jax.random.key(0), params, spec)
    opt_state, losses = tx.init(lora), []
    for _ in range(steps):
        lora, opt_state, loss = step(params, lora, opt_state, batch, None)
        losses.append(float(loss))
    return lora, losses


def test_classification_on_tiny_bert():
    models = pytest.importorskip("lora_jax.models")
    model, params = models.from_pretrained(MODELS / "tiny_bert_cls")
    apply_fn = models.classifier_apply_fn(model)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 96, (12, 10)).astype(np.int32)
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
        "labels": (ids[:, 1] % 3).astype(np.int32),
        "weights": np.array([1.0] * 10 + [0.0] * 2, np.float32),  # two filler rows
    }
    task = training.classification(apply_fn, ("accuracy", "f1", "matthews_corrcoef"))
    # The loss is the weighted cross-entropy: filler rows do not count.
    logits = np.asarray(apply_fn(params, batch, None), np.float64)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    want = -np.mean(logp[np.arange(10), batch["labels"][:10]])
    np.testing.assert_allclose(task.loss(params, batch, None), want, rtol=1e-5)
    spec = models.lora_spec(model, "qv", rank=4, head=True)
    lora, losses = _steps(task, params, spec, batch)
    assert losses[-1] < 0.7 * losses[0]
    merged = lj.merge(params, lora, spec)
    scores = task.evaluate(merged, [batch])
    assert set(scores) == {"accuracy", "f1", "matthews_corrcoef"}
    preds = np.argmax(np.asarray(apply_fn(merged, batch, None)), axis=-1)
    assert scores["accuracy"] == pytest.approx(np.mean(preds[:10] == batch["labels"][:10]))
    with pytest.raises(lj.LoraError, match="unknown metric 'auc'"):
        training.classification(apply_fn, ("auc",))


def _lm_batch(seed, prompt_lengths, lengths, length=10):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 96, (len(lengths), length)).astype(np.int32)
    attention = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return {
        "input_ids": ids * attention,
        "attention_mask": attention,
        "loss_mask": training.completion_mask(prompt_lengths, lengths, length),
    }


def _hand_nll(logits, batch):
    """Summed NLL and count of the answer tokens, by loops over rows and positions in float64."""
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            if batch["loss_mask"][b, t]:
                total -= logp[b, t - 1, batch["input_ids"][b, t]]
                count += 1
    return total, count


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_causal_lm_on_the_bundled_decoders(name):
    models = pytest.importorskip("lora_jax.models")
    model, params = models.from_pretrained(MODELS / name)
    apply_fn = models.causal_lm_apply_fn(model)
    task = training.causal_lm(apply_fn)
    batch = _lm_batch(0, prompt_lengths=[3, 5, 2], lengths=[10, 8, 6])
    assert batch["loss_mask"][1].tolist() == [0] * 5 + [1] * 3 + [0] * 2

    # The loss counts the answer tokens only: prompts and padding are left out.
    total, count = _hand_nll(apply_fn(params, batch, None), batch)
    assert count == 7 + 3 + 4
    np.testing.assert_allclose(task.loss(params, batch, None), total / count, rtol=1e-5)
    everything = dict(batch, loss_mask=batch["attention_mask"].astype(np.float32))
    assert abs(float(task.loss(params, everything, None)) - total / count) > 1e-4

    # Perplexity is exp of the mean NLL over every answer token of every batch.
    other = _lm_batch(1, prompt_lengths=[4, 1], lengths=[9, 10])
    total2, count2 = _hand_nll(apply_fn(params, other, None), other)
    scores = task.evaluate(params, [batch, other])
    np.testing.assert_allclose(scores["nll"], (total + total2) / (count + count2), rtol=1e-5)
    np.testing.assert_allclose(scores["perplexity"], math.exp(scores["nll"]), rtol=1e-9)

    # A few LoRA steps lower the loss.
    spec = models.lora_spec(model, "all-linear", rank=4)
    _, losses = _steps(task, params, spec, batch, steps=10, lr=2e-2)
    assert losses[-1] < 0.8 * losses[0]


# The tied Llama reads its head as GPT-2 does; CI runs it with the slow tests.
@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama", pytest.param("tiny_llama_tied", marks=pytest.mark.slow)])
def test_chunked_causal_lm_equals_the_whole_logits(name):
    models = pytest.importorskip("lora_jax.models")
    model, params = models.from_pretrained(MODELS / name)
    batch = _lm_batch(2, prompt_lengths=[3, 5, 2], lengths=[10, 8, 6])
    total, count = _hand_nll(models.causal_lm_apply_fn(model)(params, batch, None), batch)
    split_fn = models.causal_lm_apply_fn(model, head=False)
    # 9 positions a row: a chunk that divides them, one that leaves a padded remainder, one chunk for all.
    for chunk in (3, 4, 4096):
        loss = jax.jit(training.causal_lm(split_fn, chunk=chunk).loss)
        np.testing.assert_allclose(loss(params, batch, None), total / count, rtol=1e-5)
    chunked = training.causal_lm(split_fn, chunk=4)
    np.testing.assert_allclose(chunked.evaluate(params, [batch])["nll"], total / count, rtol=1e-5)

    # Gradients of the adapters through the factored step, and of every base weight (the tied head included).
    spec = models.lora_spec(model, "all-linear", rank=4)
    lora = jax.tree.map(lambda x: x + 0.05, lj.init(jax.random.key(1), params, spec))  # B != 0: adapters count

    def grads(task):
        step_loss = training.train_step(task.loss, spec, optax.sgd(1.0)).loss
        return jax.jit(jax.grad(step_loss, argnums=1))(params, lora, batch, None), jax.jit(jax.grad(task.loss))(
            params, batch, None
        )

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
        grads(chunked),
        grads(training.causal_lm(models.causal_lm_apply_fn(model))),
    )


def test_chunked_causal_lm_refuses_what_it_cannot_use():
    models = pytest.importorskip("lora_jax.models")
    model, params = models.from_pretrained(MODELS / "tiny_gpt2")
    batch = _lm_batch(0, prompt_lengths=[3], lengths=[10])
    for chunk in (0, -4, 2.5, True):
        with pytest.raises(lj.LoraError, match=rf"chunk={chunk!r} must be a positive number of positions"):
            training.causal_lm(models.causal_lm_apply_fn(model, head=False), chunk=chunk)  # pyright: ignore
    logits_fn, split_fn = models.causal_lm_apply_fn(model), models.causal_lm_apply_fn(model, head=False)
    with pytest.raises(lj.LoraError, match=r"with chunk=8, apply_fn must return \(hidden.*not ArrayImpl.*head=False"):
        training.causal_lm(logits_fn, chunk=8).loss(params, batch, None)
    with pytest.raises(lj.LoraError, match="apply_fn returned a tuple: return logits"):
        training.causal_lm(split_fn).loss(params, batch, None)
    hidden, head = split_fn(params, batch, None)
    with pytest.raises(lj.LoraError, match=r"hidden \(1, 10, 32\) and head_kernel \(96, 32\) must be"):
        training.chunked_next_token_nll(hidden, head.T, batch["input_ids"], batch["loss_mask"], 4)
    # A decoder family that does not say where its head's kernel is, says what to implement.
    with pytest.raises(NotImplementedError, match=r"GPT2LMHeadModel does not say .* implement head_kernel"):
        models.CausalLM.head_kernel(model, params)


def test_chunked_nll_against_numpy_and_of_one_token_rows():
    rng = np.random.default_rng(3)
    hidden, head = rng.normal(size=(2, 6, 4)).astype(np.float32), rng.normal(size=(4, 7)).astype(np.float32)
    ids = rng.integers(0, 7, (2, 6)).astype(np.int32)
    mask = np.array([[0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 0]], np.float32)
    total, count = _hand_nll(hidden @ head, {"input_ids": ids, "loss_mask": mask})
    got = training.chunked_next_token_nll(jnp.asarray(hidden), jnp.asarray(head), ids, mask, 3)
    np.testing.assert_allclose(got, (total, count), rtol=1e-5)
    # Rows of one token predict nothing: no position, no loss, as with the whole logits.
    one = training.chunked_next_token_nll(jnp.asarray(hidden[:, :1]), jnp.asarray(head), ids[:, :1], mask[:, :1], 3)
    assert [float(v) for v in one] == [0.0, 0.0]


def _resident_mib():
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc (Linux)")
def test_release_host_memory_hands_back_freed_heap():
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(2400)]  # 150 MiB of heap, each block below mmap's threshold
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)  # resident
    for block in blocks[:-1]:  # the last stays: free() cannot shrink the heap from its top
        libc.free(block)
    held = _resident_mib()
    assert training.release_host_memory()
    assert _resident_mib() < held - 100  # the freed 150 MiB, less what malloc keeps
    libc.free(blocks[-1])


def test_fit_releases_the_heap_after_each_compile_and_evaluation(monkeypatch):
    params, batch, loss_fn, spec = _plain_problem()
    calls = []
    monkeypatch.setattr(training.loop, "release_host_memory", lambda: calls.append(1) or True)
    short = {k: v[:16] for k, v in batch.items()}
    config = training.TrainConfig(steps=6, learning_rate=1e-2, eval_every=4)
    training.fit(
        loss_fn,
        params,
        spec,
        config,
        lambda epoch: [batch, short],  # two batch shapes: two compilations of the step
        2,
        evaluate=lambda p, bs: {"loss": float(np.mean([loss_fn(p, b, None) for b in bs]))},
        eval_batches=lambda: [batch],
        progress=False,
    )
    assert len(calls) == 2 + 2  # the two shapes, and the evaluations at steps 4 and 6


# Checkpoints ------------------------------------------------------------------------


def _fit_plain(spec, directory, steps=2):
    params, batch, loss_fn, _ = _plain_problem()
    config = training.TrainConfig(steps=steps, learning_rate=1e-2, log_every=1)
    return training.fit(
        loss_fn, params, spec, config, lambda epoch: [batch], 1, checkpoint_dir=directory, progress=False
    )


def test_resuming_under_another_spec_names_the_directory_and_the_difference(tmp_path):
    directory = tmp_path / "run"
    spec = lj.LoraSpec([lj.Rule("w", rank=2, alpha=4.0), lj.trainable("head")])
    state, _ = _fit_plain(spec, directory)
    assert [p.name for p in directory.iterdir()] == ["2"]
    # The same spec resumes (here: nothing left to do) and gives the state back.
    again, records = _fit_plain(spec, directory)
    assert records == [] and int(again["step"]) == 2
    jax.tree_util.tree_map(np.testing.assert_array_equal, again["lora"], state["lora"])

    params = _plain_problem()[0]
    changed = {
        "rank": (
            lj.LoraSpec([lj.Rule("w", rank=4, alpha=4.0), lj.trainable("head")]),
            r"w/a: rank 2 in the checkpoint, 4 now",
        ),
        "alpha": (
            lj.LoraSpec([lj.Rule("w", rank=2, alpha=8.0), lj.trainable("head")]),
            r"w/a: scale \(alpha / r\) 2.0 in the checkpoint, 4.0 now",
        ),
        "targets": (lj.LoraSpec([lj.Rule("w", rank=2, alpha=4.0)]), r"targets: head only in the checkpoint"),
    }
    for other, message in changed.values():
        with pytest.raises(
            lj.AdapterMismatchError, match=rf"^{re.escape(str(directory.resolve()))}: checkpoint 2 .*{message}"
        ):
            _fit_plain(other, directory, steps=4)
        with (
            training.Checkpoints(directory, params, other) as checkpoints,
            pytest.raises(lj.AdapterMismatchError, match=message),
        ):
            checkpoints.restore_latest(state)
    # Nothing was written by the refused runs.
    assert [p.name for p in directory.iterdir()] == ["2"]


def test_signature_differences():
    saved = {
        "a": {"shape": [4, 2], "mode": "lora", "rank": 2, "scale": 2.0},
        "h": {"shape": [3], "mode": "train", "rank": None, "scale": None},
    }
    assert training.signature_differences(saved, saved) == []
    wanted = {
        "a": {"shape": [4, 8], "mode": "lora", "rank": 8, "scale": 1.0},
        "g": {"shape": [3], "mode": "train", "rank": None, "scale": None},
    }
    assert training.signature_differences(saved, wanted) == [
        "targets: h only in the checkpoint (1 leaves)",
        "targets: g only in this spec (1 leaves)",
        "a: rank 2 in the checkpoint, 8 now",
        "a: scale (alpha / r) 2.0 in the checkpoint, 1.0 now",
        "a: shape [4, 2] in the checkpoint, [4, 8] now",
    ]


def test_importing_lora_jax_loads_neither_orbax_nor_tqdm():
    code = "import sys, lora_jax; print(sorted(m for m in ('orbax', 'tqdm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
