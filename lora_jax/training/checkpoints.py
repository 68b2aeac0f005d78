"""Training-state checkpoints: one orbax ``CheckpointManager``, each checkpoint stamped with the spec signature.

A checkpoint holds two items: ``state`` (the adapters, optimizer state, step
and RNG of :func:`lora_jax.training.fit`) and ``signature``
(:func:`lora_jax.adapters.signature` of base and spec, as JSON), as adapter
files do. A run resumes only under the spec it was written with; a changed
rank, scale (alpha) or set of targets raises before any array is read.

orbax is imported here, when a checkpoint is opened; ``import lora_jax`` does not.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import jax

from lora_jax._extras import require
from lora_jax.adapters import signature, signature_differences
from lora_jax.errors import AdapterMismatchError, LoraError
from lora_jax.spec import LoraSpec
from lora_jax.typing import PathLike, PyTree

STATE = "state"
SIGNATURE = "signature"
_SHOWN = 3  # differences named in an error message


class Checkpoints:
    """Training-state checkpoints in one directory, keeping the newest ``keep``.

        with Checkpoints(directory, params, spec, keep=2) as checkpoints:
            state = checkpoints.restore_latest(state) or state
            ...
            checkpoints.save(step, state)

    Args:
      directory: where the numbered checkpoints live; created if missing.
      params: the base tree (arrays or abstract) the adapters belong to.
      spec: the LoRA spec; with ``params`` it gives the signature that every
        checkpoint carries and that resuming checks.
      keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, directory: PathLike, params: PyTree, spec: LoraSpec, *, keep: int = 2) -> None:
        ocp = require("orbax.checkpoint", "train")

        self.directory = Path(directory).resolve()
        self.signature = signature(params, spec)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        handlers = {STATE: ocp.StandardCheckpointHandler(), SIGNATURE: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Wait for pending writes and release the manager."""
        self._manager.close()

    def steps(self) -> list[int]:
        """Return the steps that have a checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Return the newest checkpointed step, or ``None``."""
        return self._manager.latest_step()

    def save(self, step: int, state: PyTree) -> None:
        """Write ``state`` as step ``step`` with the signature (nothing when that step is already saved)."""
        ocp = require("orbax.checkpoint", "train")

        if step in self._manager.all_steps():
            return
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), SIGNATURE: ocp.args.JsonSave(self.signature)})
        self._manager.save(step, args=args)
        self._manager.wait_until_finished()

    def check_signature(self, step: int) -> None:
        """Check that checkpoint ``step`` was written for this base and spec.

        Raises:
          LoraError: the checkpoint has no signature.
          AdapterMismatchError: naming the directory and what differs (targets,
            rank, scale, mode, shape).
        """
        ocp = require("orbax.checkpoint", "train")

        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{SIGNATURE: ocp.args.JsonRestore()}))
        except (KeyError, FileNotFoundError, ValueError) as err:
            raise LoraError(
                f"{self.directory}: checkpoint {step} has no spec signature ({err}); "
                "it was not written by lora_jax.training; use another checkpoint directory"
            ) from None
        differences = signature_differences(restored[SIGNATURE], self.signature)
        if differences:
            shown = "; ".join(differences[:_SHOWN]) + (
                f"; and {len(differences) - _SHOWN} more" if len(differences) > _SHOWN else ""
            )
            raise AdapterMismatchError(
                f"{self.directory}: checkpoint {step} was written for another spec or base: {shown}. "
                "Resume with the spec it was written with, or train into a new checkpoint directory"
            )

    def restore_latest(self, template: PyTree) -> PyTree | None:
        """Return the newest checkpointed state, shaped like ``template``, or ``None`` when there is none.

        Raises:
          AdapterMismatchError: the checkpoint was written for another spec or
            base (see :meth:`check_signature`).
        """
        ocp = require("orbax.checkpoint", "train")

        step = self.latest_step()
        if step is None:
            return None
        self.check_signature(step)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract)}))
        return restored[STATE]
