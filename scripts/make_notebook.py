"""Writes notebooks/quickstart.ipynb from the cells below (run once after editing them).

python scripts/make_notebook.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell(
        "# lora_jax quickstart: LoRA on MiniLM for SST-2\n\n"
        "A spec picks the weights, `init` makes the adapters, a jitted step trains only them, `merge` folds them "
        "into a plain tree for serving, and an adapter file of a few hundred kilobytes carries the result.\n\n"
        "`QUICKSTART_STEPS` (environment) sets the training length; the tests run this notebook with a few steps. "
        "Start Jupyter in the repository root: `experiments.assets` knows where this checkout keeps MiniLM and GLUE."
    ),
    new_code_cell(
        "import os\n"
        "import jax, jax.numpy as jnp, numpy as np\n"
        "import lora_jax as lj\n"
        "from lora_jax import data, models, training\n"
        "from experiments import assets\n\n"
        "STEPS = int(os.environ.get('QUICKSTART_STEPS', '200'))\n"
        "EVAL_LIMIT = None if STEPS >= 100 else 64"
    ),
    new_markdown_cell("## The base model\nThe packaged all-MiniLM-L6-v2, with a fresh two-class head."),
    new_code_cell(
        "path = assets.minilm_path()\n"
        "model, params = models.from_pretrained(path, architecture='BertForSequenceClassification', num_labels=2,\n"
        "                                       key=jax.random.key(0))\n"
        "tokenizer = models.load_tokenizer(path)\n"
        "sum(x.size for x in jax.tree_util.tree_leaves(params))"
    ),
    new_markdown_cell(
        "## The spec\nLoRA on the query and value projections of every layer (r=8); the classifier trains fully. "
        "The preset knows the `[embed, heads, head_dim]` layout of the attention kernels."
    ),
    new_code_cell(
        "spec = models.lora_spec(model, 'qv', rank=8, alpha=16, head=True)\nprint(lj.describe(params, spec))"
    ),
    new_markdown_cell(
        "## Data\nSST-2 through the TFDS ArrayRecord builder (no TensorFlow), bucketed to lengths 32 and 64."
    ),
    new_code_cell(
        "glue = assets.glue_dir()  # None: no local copy, so download it\n"
        "source = dict(data_dir=glue, download=glue is None)\n"
        "train_enc = data.tokenize(data.load_split('sst2', 'train', **source), tokenizer, 64)\n"
        "dev_enc = data.tokenize(data.load_split('sst2', 'validation', **source), tokenizer, 64)\n"
        "len(train_enc.labels), len(dev_enc.labels)"
    ),
    new_markdown_cell(
        "## Train\nThe classification task gives the loss (weighted cross-entropy on the batch's `labels` and "
        "`weights`) and the evaluation (accuracy of the merged model); `fit` runs AdamW with warm-up and linear "
        "decay. The factored path computes `x W0 + s (x A) B` and never a gradient for `W0`."
    ),
    new_code_cell(
        "apply_fn = models.classifier_apply_fn(model)  # (params, batch, rng | None) -> logits\n\n"
        "def train_batches(epoch):\n"
        "    return data.batches(train_enc, 32, seed=0, epoch=epoch, buckets=(32, 64))\n\n"
        "def dev_batches():\n"
        "    return data.batches(dev_enc, 32, seed=None, buckets=(32, 64), drop_remainder=False, limit=EVAL_LIMIT)\n\n"
        "task = training.classification(apply_fn, ('accuracy',))\n"
        "config = training.TrainConfig(steps=STEPS, learning_rate=1e-3, log_every=max(1, STEPS // 10))\n"
        "state, records = training.fit(task.loss, params, spec, config, train_batches,\n"
        "                              data.num_batches(len(train_enc.labels), 32),\n"
        "                              evaluate=task.evaluate, eval_batches=dev_batches, progress=False)\n"
        "[(r['step'], round(r['loss'], 4)) for r in records if r['split'] == 'train']"
    ),
    new_code_cell("records[-1]  # dev accuracy of the merged model"),
    new_markdown_cell(
        "## Merge, save, load\nThe merged tree has the base's structure and dtypes: the unmodified `apply` serves it."
    ),
    new_code_cell(
        "lora = state['lora']\n"
        "merged = lj.merge(params, lora, spec)\n"
        "assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)\n\n"
        "import tempfile, pathlib\n"
        "adapter_file = pathlib.Path(tempfile.mkdtemp()) / 'sst2-qv-r8.safetensors'\n"
        "lj.save_adapter(adapter_file, params, lora, spec)\n"
        "print(f'{adapter_file.stat().st_size / 1024:.0f} KiB')\n"
        "restored = lj.load_adapter(adapter_file, params, spec)\n\n"
        "batch = next(iter(dev_batches()))\n"
        "served = apply_fn(merged, batch, None)\n"
        "unmerged = lj.factored(lambda p, b: apply_fn(p, b, None), spec)(params, restored, batch)\n"
        "max_gap = float(jnp.max(jnp.abs(served - unmerged)))\n"
        "print('max |merged - unmerged| =', max_gap)\n"
        "assert max_gap < 1e-4"
    ),
]

for i, cell in enumerate(CELLS):
    cell.id = f"cell-{i}"  # stable ids: regenerating changes only what was edited
notebook = new_notebook(cells=CELLS, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}})
out = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
nbformat.write(notebook, out)
print(out)
