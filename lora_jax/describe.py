"""``describe``: what a spec does to a base tree, as a table with totals."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lora_jax.paths import flatten
from lora_jax.plan import Target, abstract_leaf, plan
from lora_jax.spec import LoraSpec
from lora_jax.variants import variant_of


@dataclasses.dataclass(frozen=True)
class Description:
    """The targets of a spec on a base tree; ``str()`` gives the table."""

    targets: tuple[Target, ...]
    base_size: int

    @property
    def trainable_size(self) -> int:
        """Scalars that train: adapter entries plus fully trainable leaves."""
        return sum(t.trainable_size for t in self.targets)

    @property
    def adapter_size(self) -> int:
        """Scalars in (A, B) pairs only."""
        return sum(t.trainable_size for t in self.targets if not variant_of(t).replaces_leaf)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_size / self.base_size if self.base_size else 0.0

    def rows(self) -> list[dict[str, str]]:
        rows = []
        for t in self.targets:
            axes, rank, alpha = variant_of(t).summary(t)
            rows.append(
                {
                    "path": t.name,
                    "shape": "x".join(map(str, t.shape)),
                    "dtype": str(t.dtype),
                    "axes": axes,
                    "rank": rank,
                    "alpha": alpha,
                    "params": f"{t.trainable_size:,}",
                }
            )
        return rows

    def __str__(self) -> str:
        rows = self.rows()
        headers = ["path", "shape", "dtype", "axes", "rank", "alpha", "params"]
        widths = {h: max([len(h)] + [len(r[h]) for r in rows]) for h in headers}
        line = "  ".join(h.ljust(widths[h]) for h in headers)
        out = [line, "-" * len(line)]
        out += ["  ".join(r[h].ljust(widths[h]) for h in headers) for r in rows]
        out.append(
            f"trainable: {self.trainable_size:,} of {self.base_size:,} base parameters "
            f"({100 * self.trainable_fraction:.4f}%); adapters {self.adapter_size:,}"
        )
        return "\n".join(out)


def describe(params: Any, spec: LoraSpec) -> Description:
    """Tabulate matched paths, kernel shapes, axes, ranks, alphas and adapter sizes, with totals.

    Works on real arrays or on ``jax.eval_shape`` output. Raises like
    :func:`lora_jax.plan.plan` when a rule matches nothing.
    """
    targets = plan(params, spec)
    base_size = sum(math.prod(abstract_leaf(x).shape) for _, x in flatten(params)[0])
    return Description(targets, base_size)
