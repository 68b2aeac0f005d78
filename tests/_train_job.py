"""A small training run for the resume test: tiny BERT classifier, synthetic task, orbax checkpoints.

python tests/_train_job.py CHECKPOINT_DIR OUT.npz [--delay SECONDS]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from lora_jax import training
from lora_jax.models import BertConfig, BertForSequenceClassification, classifier_apply_fn, lora_spec

CONFIG = BertConfig(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=2
)
STEPS, BATCH, LENGTH, EXAMPLES = 30, 8, 12, 64


def dataset():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, CONFIG.vocab_size, size=(EXAMPLES, LENGTH)).astype(np.int32)
    labels = (ids[:, 1] > CONFIG.vocab_size // 2).astype(np.int32)
    return ids, labels


def train_batches(epoch, delay=0.0):
    ids, labels = dataset()
    order = np.random.default_rng(epoch).permutation(EXAMPLES)
    for start in range(0, EXAMPLES - BATCH + 1, BATCH):
        idx = order[start : start + BATCH]
        time.sleep(delay)  # lets the test stop the run between checkpoints
        yield {
            "input_ids": ids[idx],
            "attention_mask": np.ones_like(ids[idx]),
            "token_type_ids": np.zeros_like(ids[idx]),
            "labels": labels[idx],
            "weights": np.ones(BATCH, np.float32),
        }


def setup():
    model = BertForSequenceClassification(CONFIG)
    ids, _ = dataset()
    params = model.init(jax.random.key(0), jnp.asarray(ids[:2]))["params"]
    spec = lora_spec(model, "qv", rank=4, head=True, dropout=0.1)

    apply_fn = classifier_apply_fn(model)

    return params, spec, apply_fn


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint_dir")
    parser.add_argument("out")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    params, spec, apply_fn = setup()
    config = training.TrainConfig(steps=STEPS, learning_rate=1e-2, checkpoint_every=5, keep_checkpoints=2, log_every=5)
    state, _ = training.fit(
        training.classification(apply_fn).loss,
        params,
        spec,
        config,
        lambda epoch: train_batches(epoch, args.delay),
        steps_per_epoch=EXAMPLES // BATCH,
        checkpoint_dir=args.checkpoint_dir,
        progress=False,
    )
    flat = {lj.paths.path_str(p): np.asarray(x) for p, x in lj.paths.flatten(state["lora"])[0]}
    np.savez(args.out, **flat)


if __name__ == "__main__":
    main()
