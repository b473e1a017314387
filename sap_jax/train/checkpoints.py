"""Checkpoints, the workdir's config guard and the preemption watch.

A checkpoint holds two items: ``state`` (the arrays, a dict of pytrees) and ``meta`` (the
run's :class:`~sap_jax.train.state.Progress` as JSON). The run's typed state
(:class:`~sap_jax.train.state.Weights` and its subclass) becomes that dict here and only here,
so the on-disk layout does not depend on how the code names things. Every orbax failure is
translated into an error that names the checkpoint and says what to do
(:mod:`sap_jax.runtime.errors`).
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sap_jax.runtime import parallel
from sap_jax.runtime.errors import CheckpointError, CheckpointWriteError, ConfigError
from sap_jax.runtime.version import VERSION
from sap_jax.surgery import CKPT_DIR
from sap_jax.train import config as config_lib
from sap_jax.train.state import Weights

CHANGES = "config_changes.json"
#: The release that started the workdir (``{"sap_jax": "0.2.0"}``), beside config.json.
VERSION_FILE = "sap_jax_version.json"
#: Left in the workdir by a run that saved and stopped on SIGTERM or Ctrl-C (exit 75), for
#: schedulers that see another exit code (Slurm's srun); a new start removes it.
PREEMPTED_MARKER = "PREEMPTED"


def _hash(config_json: dict[str, Any],
          exclude: tuple[str, ...] = config_lib.NOT_RESULT_FIELDS) -> str:
    fields = config_lib.result_fields(config_json, exclude)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(config: ml_collections.ConfigDict) -> str:
    """A short hash of the fields that change results: a checkpoint's config must match it."""
    return _hash(config_lib.to_json_dict(config))


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _get(d: dict[str, Any], dotted: str) -> Any:
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _stored_config(workdir: Any) -> tuple[dict[str, Any], set[str]] | None:
    """The workdir's config.json and the hash its checkpoints carry; None without config.json."""
    path = workdir / "config.json"
    if not path.exists():
        return None
    check_workdir_version(workdir)
    try:
        theirs = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path} is not valid JSON ({e}); the workdir is damaged. Use a new "
            "--workdir, or delete that file to resume with the current config.") from e
    return theirs, {_hash(theirs)}


def _release(version: str) -> str:
    """``major.minor`` of a version string: workdirs carry over within one release."""
    return ".".join(version.split(".")[:2])


def check_workdir_version(workdir: Any) -> None:
    """Refuse a workdir that another release of sap_jax started (config fields, checkpoint
    layout and hashes differ between releases; none is translated), naming that release."""
    path = workdir / VERSION_FILE
    if path.exists():
        try:
            theirs = str(json.loads(path.read_text())["sap_jax"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{path} is damaged ({e}); use a new --workdir.") from e
    else:
        theirs = "0.1"  # the only release that wrote no version file
    if _release(theirs) != _release(VERSION):
        raise ConfigError(
            f"workdir {workdir} was written by sap_jax {theirs}; this is sap_jax {VERSION}, "
            f"which does not read other releases' workdirs. Use a new --workdir, or finish that "
            f"run with sap_jax {theirs} (pip install 'sap_jax=={_release(theirs)}.*').")


def _checkpoint_steps(workdir: Any) -> list[int]:
    d = workdir / CKPT_DIR
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _earlier_hashes(workdir: Any) -> set[str]:
    """The config hashes of the checkpoints before each change this run was allowed."""
    return {h for c in config_changes(workdir) for h in c["from_hashes"]}


def check_workdir_config(workdir: Any, config: ml_collections.ConfigDict, *,
                         allow_change: bool = False) -> set[str]:
    """Compare ``config`` with the one the workdir's run was started with; keep config.json
    current. Returns the config hashes a checkpoint of this workdir may carry.

    Fields that cannot change results (config.NOT_RESULT_FIELDS) may always change. Before the
    first checkpoint any field may. After it, a field that changes results is refused unless
    ``allow_change``; then the change is recorded in config_changes.json (and results.json).
    A workdir written by another release of sap_jax is refused (:func:`check_workdir_version`)."""
    path = workdir / "config.json"
    mine = config_lib.to_json_dict(config)
    stored = _stored_config(workdir)
    accepted = {config_hash(config)}
    replace = stored is None  # config.json records the config the checkpoints were written with
    if stored is not None:
        theirs, hashes = stored
        # Checkpoints may predate changes this run was allowed earlier.
        hashes = hashes | _earlier_hashes(workdir)
        diff = sorted(_diff_keys(config_lib.result_fields(theirs), config_lib.result_fields(mine)))
        if not diff:
            accepted |= hashes
        elif not _checkpoint_steps(workdir):
            replace = True  # nothing saved yet: the new config simply replaces the old one
        elif allow_change:
            _record_change(workdir, {f: [_get(theirs, f), _get(mine, f)] for f in diff}, hashes)
            accepted |= hashes
            replace = True
        else:
            raise ConfigError(
                f"workdir {workdir} holds a run with a different config (fields "
                f"{', '.join(diff)} differ). Use a new --workdir, restore the original values, "
                "or pass --allow_config_change to continue this run with the new values (the "
                "change is recorded in its results).")
    parallel.sync("config-checked")  # nobody reads while process 0 writes
    if jax.process_index() == 0 and replace:
        parallel.write_text_atomic(path, json.dumps(mine, indent=2))
        parallel.write_text_atomic(workdir / VERSION_FILE, json.dumps({"sap_jax": VERSION}))
    parallel.sync("config-written")
    return accepted


def _record_change(workdir: Any, fields: dict[str, list], from_hashes: set[str]) -> None:
    if jax.process_index() != 0:
        return
    changes = config_changes(workdir)
    changes.append({"from_checkpoint": _checkpoint_steps(workdir)[-1], "fields": fields,
                    "from_hashes": sorted(from_hashes)})
    parallel.write_text_atomic(workdir / CHANGES, json.dumps(changes, indent=2))


def config_changes(workdir: Any) -> list[dict[str, Any]]:
    """Every change of a result-affecting field this run was continued with (--allow_config_change):
    the checkpoint it resumed from and each field's old and new value."""
    path = workdir / CHANGES
    return json.loads(path.read_text()) if path.exists() else []


class Checkpoints:
    """The run's orbax CheckpointManager, with errors that say what to do."""

    def __init__(self, workdir: Any, *, keep: int, config_hash: str,
                 accept: set[str] | frozenset[str] = frozenset()):
        self.dir = workdir / CKPT_DIR
        self.hash = config_hash  # written into every checkpoint; a restore must match it or
        self.accept = set(accept) | {config_hash}  # one of these (check_workdir_config)
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def path(self, step: int | None = None) -> str:
        return str(self.dir / str(self.latest_step() if step is None else step))

    def save(self, state: Weights | dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """Write checkpoint ``meta["ckpt"] + 1`` and wait for it; returns the meta written.

        ``state``: the run's typed state (saved as its :meth:`~Weights.to_dict`) or a dict of
        pytrees."""
        meta = {**meta, "ckpt": meta.get("ckpt", 0) + 1, "config_hash": self.hash}
        tree = state.to_dict() if isinstance(state, Weights) else state
        try:
            self.manager.save(meta["ckpt"], args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax and the file system raise many types
            prev = self.latest_step()
            kept = (f"checkpoint {prev} in {self.dir} is intact" if prev is not None
                    else "no earlier checkpoint exists")
            raise CheckpointWriteError(
                f"could not write checkpoint {meta['ckpt']} to {self.dir}: "
                f"{type(e).__name__}: {e}. The run stopped; {kept}. Free disk space or fix "
                "permissions, then rerun the same command to resume.") from e
        return meta

    def _damaged(self, e: Exception) -> CheckpointError:
        path = self.path()
        return CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}). It is damaged or "
            f"was not written by this run. Delete {path} to resume from the checkpoint before "
            "it, or start again with a new --workdir.")

    def restore(self, template: Weights | dict[str, Any], mesh) -> Weights | dict[str, Any]:
        """The latest checkpoint's arrays, shaped like ``template`` and of its type (a typed
        state or a dict of pytrees), replicated over ``mesh``."""
        sharding = parallel.param_sharding(mesh)
        tree = template.to_dict() if isinstance(template, Weights) else template
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype if isinstance(x, jax.Array)
                                           else np.asarray(x).dtype, sharding=sharding), tree)
        try:
            out = self.manager.restore(self.latest_step(), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable data
            raise self._damaged(e) from e
        state = out["state"]
        return type(template).from_dict(state) if isinstance(template, Weights) else state

    def latest_meta(self) -> dict[str, Any] | None:
        """The latest checkpoint's progress record (None in a new workdir)."""
        step = self.latest_step()
        if step is None:
            return None
        try:
            meta = dict(self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"])
            meta["phase"], meta["epoch"], meta["step"]  # noqa: B018 - must exist
        except Exception as e:  # noqa: BLE001
            raise self._damaged(e) from e
        if meta.get("config_hash") not in self.accept:
            raise ConfigError(
                f"checkpoint {self.path(step)} was written by a run with a different "
                "config. Use a new --workdir, or rerun with the config that wrote it.")
        return meta


def latest_progress(workdir: str, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """Where the run in ``workdir`` stands: its latest checkpoint's progress record (phase,
    epoch, step, ``ckpt``, history, ...), or None if it has none. Raises like a resume would
    for a damaged checkpoint or one from another config. With several processes, call it on
    every process (orbax's manager synchronises them)."""
    stored = _stored_config(parallel.path(workdir))
    mine = config_lib.result_fields(config_lib.to_json_dict(config))
    same = stored is not None and not _diff_keys(config_lib.result_fields(stored[0]), mine)
    earlier = _earlier_hashes(parallel.path(workdir))
    ckpts = Checkpoints(parallel.path(workdir), keep=config.keep_checkpoints,
                        config_hash=config_hash(config),
                        accept=stored[1] | earlier if same else set())
    try:
        return ckpts.latest_meta()
    finally:
        ckpts.manager.close()


class PreemptionWatch:
    """Has a preemption notice (SIGTERM) or a Ctrl-C (SIGINT) arrived? Checked at step
    boundaries.

    A SIGTERM handler sets a local flag. With one process the flag is read at
    every step. With several, the host that got the signal must not stop alone
    (the others would wait in the next collective forever), so every
    ``every_steps`` steps all processes all-gather their flags and stop
    together at the same step. (JAX's own preemption sync point is not used:
    orbax's CheckpointManager consumes it with checkpoint ids as step ids.)
    The first Ctrl-C is taken like a SIGTERM: the run saves at the next step
    and exits 75, ready to resume; a second one aborts at once
    (KeyboardInterrupt). Use it as a context manager: the previous handlers
    come back on exit.
    """

    def __init__(self, every_steps: int):
        self.multi = jax.process_count() > 1
        self.every = every_steps
        self.flag = False
        self.reason = "preemption notice (SIGTERM)"  # what set the flag, for the message
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionWatch:
        for sig, handler in ((signal.SIGTERM, self._on_term), (signal.SIGINT, self._on_int)):
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_term(self, signum, frame) -> None:
        self.flag = True

    def _on_int(self, signum, frame) -> None:
        if self.flag:  # the second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.flag, self.reason = True, "Ctrl-C"
        print("\nCtrl-C: saving a checkpoint at the next step, then stopping (exit code 75; "
              "rerun to resume). Press Ctrl-C again to abort without saving.", file=sys.stderr,
              flush=True)

    def agreed(self) -> bool:
        """Whether any process got the signal, asked of every process now (phase boundaries)."""
        if not self.multi:
            return self.flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(self.flag))))

    def __call__(self, step: int) -> bool:
        if not self.multi:
            return self.flag
        if step % self.every:
            return False
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(self.flag))))
