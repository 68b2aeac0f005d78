"""Training-state checkpoints: one orbax ``CheckpointManager``, each checkpoint stamped with the spec signature.

A checkpoint holds two items: ``state`` (the adapters, optimizer state, step
and RNG of :func:`lora_jax.training.fit`) and ``signature``
(:func:`lora_jax.adapters.signature` of base and spec, as JSON), as adapter
files do. A run resumes only under the spec it was written with: before any
array is read, the signature is compared (a changed rank, scale (alpha), set
of targets or base shape raises :class:`AdapterMismatchError`) and the stored
state's shapes and dtypes are compared with the state to fill. A missing or
damaged signature, and arrays orbax cannot read, raise
:class:`CheckpointCorruptError`; each names the directory and the step.

orbax is imported here, when a checkpoint is opened; ``import lora_jax`` does not.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import numpy as np

from lora_jax._extras import require
from lora_jax.adapters import signature, signature_differences
from lora_jax.errors import AdapterMismatchError, CheckpointCorruptError
from lora_jax.paths import flatten, path_str
from lora_jax.spec import LoraSpec
from lora_jax.typing import PathLike, PyTree

STATE = "state"
SIGNATURE = "signature"
_SHOWN = 3  # differences named in an error message
_SIGNATURE_KEYS = frozenset({"shape", "mode", "rank", "scale"})
_FRESH_START = "delete that step's folder to resume from the checkpoint before it, or train into a new directory"


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
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointCorruptError(
                f"{self.directory} is a file, not a checkpoint directory: give a directory (new or of this run)"
            )
        self.signature = signature(params, spec)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        handlers = {STATE: ocp.StandardCheckpointHandler(), SIGNATURE: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._owned = False  # whether the steps already in the directory were checked to be this spec's

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
        """Write ``state`` as step ``step`` with the signature (nothing when that step is already saved).

        Raises:
          AdapterMismatchError / CheckpointCorruptError: on the first save, a step already in the directory was
            written for another spec or base, or not by this class (a folder of numbered files, say): keeping only
            the newest ``keep`` would delete it.
        """
        ocp = require("orbax.checkpoint", "train")

        if not self._owned:
            for existing in self.steps():
                self.check_signature(existing)
            self._owned = True
        if step in self._manager.all_steps():
            return
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), SIGNATURE: ocp.args.JsonSave(self.signature)})
        self._manager.save(step, args=args)
        self._manager.wait_until_finished()

    def _where(self, step: int) -> str:
        return f"{self.directory}: checkpoint {step} ({self.directory / str(step)})"

    def _saved_signature(self, step: int) -> dict[str, dict]:
        """Return checkpoint ``step``'s signature, checked to be one.

        Raises:
          CheckpointCorruptError: there is none, or it is not JSON of the expected form.
        """
        ocp = require("orbax.checkpoint", "train")

        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{SIGNATURE: ocp.args.JsonRestore()}))
        except (KeyError, FileNotFoundError) as err:
            raise CheckpointCorruptError(
                f"{self._where(step)} has no spec signature ({err}): it was not written by lora_jax.training; "
                "use another checkpoint directory"
            ) from None
        except ValueError as err:  # json.JSONDecodeError and orbax's own parse errors
            raise CheckpointCorruptError(
                f"{self._where(step)}: its spec signature is damaged ({type(err).__name__}: {err}); {_FRESH_START}"
            ) from None
        saved = restored[SIGNATURE]
        if not isinstance(saved, dict) or not all(
            isinstance(name, str) and isinstance(entry, dict) and set(entry) >= _SIGNATURE_KEYS
            for name, entry in saved.items()
        ):
            raise CheckpointCorruptError(
                f"{self._where(step)}: its spec signature is not a mapping of leaf path to "
                f"{sorted(_SIGNATURE_KEYS)} (found {str(saved)[:80]!r}); {_FRESH_START}"
            )
        return saved

    def check_signature(self, step: int) -> None:
        """Check that checkpoint ``step`` was written for this base and spec.

        Raises:
          CheckpointCorruptError: the checkpoint has no signature, or a damaged one.
          AdapterMismatchError: naming the directory and what differs (targets,
            rank, scale, mode, shape).
        """
        differences = signature_differences(self._saved_signature(step), self.signature)
        if differences:
            shown = "; ".join(differences[:_SHOWN]) + (
                f"; and {len(differences) - _SHOWN} more" if len(differences) > _SHOWN else ""
            )
            raise AdapterMismatchError(
                f"{self.directory}: checkpoint {step} was written for another spec or base: {shown}. "
                "Resume with the spec it was written with, or train into a new checkpoint directory"
            )

    def check_state(self, step: int, template: PyTree) -> None:
        """Check that checkpoint ``step`` stores a state of ``template``'s leaves, shapes and dtypes.

        Reads the stored metadata only, so a state that does not fit is named
        here instead of failing inside orbax's restore.

        Raises:
          CheckpointCorruptError: the metadata cannot be read.
          AdapterMismatchError: naming the first leaf that is missing, extra, or
            of another shape or dtype.
        """
        try:
            with _quiet_closed_loop():
                stored = self._manager.item_metadata(step)[STATE]
        except Exception as err:  # noqa: BLE001 - orbax and tensorstore raise many kinds; all mean "unreadable"
            raise CheckpointCorruptError(
                f"{self._where(step)}: its state cannot be read ({type(err).__name__}: {str(err)[:200]}); "
                f"{_FRESH_START}"
            ) from None
        if stored is None:
            raise CheckpointCorruptError(f"{self._where(step)} holds no training state; {_FRESH_START}")
        found = _leaf_specs(getattr(stored, "tree", stored))
        wanted = _leaf_specs(template)
        problems = [f"{name} only in the checkpoint" for name in found if name not in wanted]
        problems += [f"{name} missing from the checkpoint" for name in wanted if name not in found]
        problems += [
            f"{name}: {found[name]} in the checkpoint, {wanted[name]} now"
            for name in wanted
            if name in found and found[name] != wanted[name]
        ]
        if problems:
            raise AdapterMismatchError(
                f"{self.directory}: checkpoint {step} holds another training state: {'; '.join(problems[:_SHOWN])}"
                f"{f'; and {len(problems) - _SHOWN} more' if len(problems) > _SHOWN else ''}. It was written by "
                "another optimizer or version; train into a new checkpoint directory"
            )

    def restore_latest(self, template: PyTree) -> PyTree | None:
        """Return the newest checkpointed state, shaped like ``template``, or ``None`` when there is none.

        Raises:
          AdapterMismatchError: the checkpoint was written for another spec or
            base (see :meth:`check_signature`), or holds another state (:meth:`check_state`).
          CheckpointCorruptError: a missing or damaged signature, or arrays that cannot be read.
        """
        ocp = require("orbax.checkpoint", "train")

        step = self.latest_step()
        if step is None:
            return None
        self.check_signature(step)
        self.check_state(step, template)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        try:
            with _quiet_closed_loop():
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract)})
                )
        except Exception as err:  # noqa: BLE001 - tensorstore's errors are ValueError, OSError, ...; all mean damaged
            raise CheckpointCorruptError(
                f"{self._where(step)}: its arrays cannot be read, the files are damaged "
                f"({type(err).__name__}: {str(err)[:200]}); {_FRESH_START}"
            ) from None
        return restored[STATE]


def _leaf_specs(tree: Any) -> dict[str, str]:
    """Return ``{path: "[shape] dtype"}`` of a state tree, or of orbax's metadata tree of one (same paths)."""
    out = {}
    for path, leaf in flatten(tree)[0]:
        if leaf is not None:
            shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
            dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
            out[path_str(path)] = f"{list(shape)} {np.dtype(dtype)}"
    return out


@contextlib.contextmanager
def _quiet_closed_loop() -> Iterator[None]:
    """Drop the "Event loop is closed" reports tensorstore's reads make when an orbax read fails part way.

    A failed read ends orbax's event loop while other reads are in flight; each of those then reports a
    ``RuntimeError`` through ``sys.unraisablehook`` from tensorstore's threads, burying the one error that
    matters. Other reports pass. After a failure, the reads in flight are given until they fall silent
    (a fifth of a second without a report, two seconds at most) to report into this filter.
    """
    previous = sys.unraisablehook
    last = [time.monotonic()]

    def hook(report: Any) -> None:
        if isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed":
            last[0] = time.monotonic()
        else:
            previous(report)

    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and time.monotonic() - last[0] < 0.2:
            time.sleep(0.05)
        raise
    finally:
        sys.unraisablehook = previous
