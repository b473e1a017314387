"""The pre-flight check: everything after training that a model could fail, tried before it.

A model the cut cannot slice, a pruned model that cannot be saved or rebuilt, or a forward the
run's mesh cannot shard would otherwise stop the run after hours of training. Before the first
training step (config ``preflight``) :func:`check`:

1. cuts a trial pruned model (a random half of every group's channels) with
   :func:`sap_jax.surgery.extract` and checks that it computes what the gated dense model
   computes, in eval mode;
2. saves it (:func:`sap_jax.surgery.save`) in the workdir, loads it back and checks the reloaded
   model computes the same logits, bit for bit;
3. places the trial model's state on the run's mesh (random keys included);
4. traces and lowers the trial model's fine-tuning step with the run's shardings
   (``jit(...).lower``: the pruned model's whole forward and backward under the mesh);
5. XLA-compiles the run's own first training step (the dense model's, at the run's shardings,
   batch shapes and schedule), so a program the devices cannot run (a kernel the backend lacks,
   a sharding XLA rejects) stops the run here. JAX keeps the compiled program: the first step
   finds it and does not compile again.

A failure raises :class:`PreflightError` (exit code 2) with one line: the stage, the layer it
happened in (from the traceback: the innermost Flax module on it, by its path in the model
where it can be found), the error, and what to change.
"""

from __future__ import annotations

import os
import re
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from sap_jax import models, surgery
from sap_jax.runtime import parallel
from sap_jax.runtime.errors import ConfigError
from sap_jax.structure.codec import ModuleCodec
from sap_jax.train import aot
from sap_jax.train import spec as spec_lib

#: Where the trial pruned model is saved (inside the workdir; removed afterwards).
TRIAL_DIR = "preflight_model"
_IMAGES = 2
_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


class PreflightError(ConfigError):
    """The model cannot go through the cut, saving or the mesh; found before training."""


def _module_frames(exc: BaseException) -> list[tuple[Any, str]]:
    """The Flax modules (``self`` of a frame) on ``exc``'s traceback, outermost first, with
    where each frame stood (``file:line``)."""
    from flax import linen

    out = []
    for frame, line in traceback.walk_tb(exc.__traceback__):
        obj = frame.f_locals.get("self")
        if isinstance(obj, (nnx.Module, linen.Module)):
            out.append((obj, f"{os.path.basename(frame.f_code.co_filename)}:{line}"))
    return out


def _path_in(obj: Any, roots: Sequence[Any]) -> str | None:
    for root in roots:
        for path, node in nnx.iter_graph(root):
            if node is obj:
                return ".".join(str(k) for k in path)
    return None


def where(exc: BaseException, roots: Sequence[Any] = ()) -> str | None:
    """The layer ``exc`` happened in: the innermost Flax module on its traceback, by its path
    in one of ``roots`` when it is one of theirs (else its class and source line)."""
    frames = _module_frames(exc)
    if not frames:
        return None
    obj, at = frames[-1]
    path = _path_in(obj, roots)
    name = type(obj).__name__
    return f"{path} ({name})" if path else f"{name} at {at}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0].rstrip(".")


def _fail(stage: str, exc: BaseException, hint: str, roots: Sequence[Any] = (),
          at: str | None = None) -> PreflightError:
    """The one-line error; ``at`` names where when the traceback cannot (an XLA error)."""
    if at is None:
        layer = where(exc, roots)
        at = f" in {layer}" if layer else ""
    return PreflightError(f"pre-flight ({stage}) failed{at}: {type(exc).__name__}: "
                          f"{_first_line(exc)}. {hint} (preflight=False skips this check.)")


def trial_arch(widths: Sequence[int], seed: int) -> list[np.ndarray]:
    """A random half of every group's channels (at least one; not a prefix, so that the cut
    must follow each group's positions)."""
    rng = np.random.default_rng(seed)
    out = []
    for w in widths:
        keep = np.zeros(w, bool)
        keep[rng.choice(w, max(1, w // 2), replace=False)] = True
        out.append(keep)
    return out


def _mismatch(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


def _cut(dense: Any, arch: Sequence[np.ndarray], x: Any, found: list[Any]
         ) -> tuple[Any, Any, float]:
    """The extracted model at ``arch``, its logits, and how far they are from the gated dense
    model's (relative). Raises what the cut or the forward raises; ``found`` collects the
    models made on the way, so an error can be placed in them."""
    small = surgery.extract(dense, arch)
    found.append(small)
    small.eval()
    got = small(x)
    return small, got, _mismatch(got, dense(x, [np.asarray(a, np.float32) for a in arch]))


def _culprit(dense: Any, arch: list[np.ndarray], x: Any, tol: float) -> str | None:
    """The first group whose cut alone fails, or makes the extracted model differ from the
    gated dense one; None when no single cut fails, or when nothing is cut and it still
    fails (then no group is to blame)."""
    def fails(a: list[np.ndarray]) -> bool:
        try:
            return _cut(dense, a, x, [])[2] > tol
        except Exception:  # noqa: BLE001 - failing is what is looked for
            return True

    if fails([np.ones_like(a) for a in arch]):
        return None
    for k, name in enumerate(dense.group_names):
        if fails([a if i == k else np.ones_like(a) for i, a in enumerate(arch)]):
            return name
    return None


def _trial_cut(dense: Any, x: Any, seed: int, tol: float) -> tuple[Any, Any]:
    """Stage 1: the trial pruned model and its logits, or a :class:`PreflightError` naming
    the group to leave whole."""
    found: list[Any] = [dense]
    problem, err, arch = None, 0.0, None
    try:
        arch = surgery.kept_arch(dense, trial_arch(dense.widths, seed))
        small, got, err = _cut(dense, arch, x, found)
    except Exception as e:  # noqa: BLE001 - a user's model may raise anything here
        problem = e
    if problem is None and err <= tol:
        return small, got
    group = _culprit(dense, arch, x, tol) if arch is not None else None
    what = (f"{type(problem).__name__}: {_first_line(problem)}" if problem is not None else
            f"the extracted model differs from the gated dense one by {err:.2g} (relative; "
            f"tolerance {tol:g})")
    layer = where(problem, found) if problem is not None else None
    fix = (f" Cutting the group {group} alone fails: leave its channels whole with "
           f"model_ignore=['{group}']." if group else
           " No single group's cut is to blame; report the model.")
    raise PreflightError(f"pre-flight (trial cut) failed{f' in {layer}' if layer else ''}: "
                         f"{what}.{fix} (preflight=False skips this check.)") from problem


def _save_and_reload(small: Any, got: Any, x: Any, directory: Any, dense_widths: Any,
                     size: int) -> Any:
    """Stage 2: the trial model saved and loaded back (bit-equal logits); the directory is
    removed afterwards."""
    try:
        surgery.save(directory, small, dense_widths=dense_widths, image_size=size,
                     overwrite=True)
        back = surgery.load(directory)
        back.eval()
        same = np.array_equal(np.asarray(back(x)), np.asarray(got))
    except Exception as e:  # noqa: BLE001
        raise _fail("save and reload", e, "A pruned model must be rebuilt from its config(): "
                    "a factory's model_kwargs must describe the whole network.", [small]) from e
    finally:
        parallel.sync("preflight:reloaded")
        if jax.process_index() == 0 and directory.exists():
            directory.rmtree()
    if not same:
        raise PreflightError("pre-flight (save and reload) failed: the reloaded trial model "
                             "computes other logits than the one saved; a factory's "
                             "model_kwargs must describe the whole network. (preflight=False "
                             "skips this check.)")
    return back


#: What a step that cannot be traced on the mesh needs.
_MESH_HINT = "The forward must run on a batch sharded over the 'data' axis."


def _on_the_mesh(spec: spec_lib.RunSpec, back: Any, mesh: Any, num_classes: int) -> None:
    """Stages 3 and 4: the trial model's state placed on the mesh, its weight step lowered."""
    try:
        jax.block_until_ready(parallel.replicate(ModuleCodec(back).split(back), mesh))
    except Exception as e:  # noqa: BLE001
        raise _fail("placing the state on the mesh", e, "Every array of the model's state "
                    "must be a JAX array (parameters, statistics, random keys).", [back]) from e
    try:
        fn, args = aot.Planner(spec, mesh, num_classes).weight_step(back, "finetune")
        fn.lower(*args)  # the arguments carry the run's shardings
    except Exception as e:  # noqa: BLE001
        raise _fail("the trial pruned model's training step on the mesh", e, _MESH_HINT,
                    [back]) from e


#: A program's source locations (``#locN = loc(...)``): a file position ``"file":line:col``, a
#: name around another (``"fn"(#locM)``: a function's frame, or an op's name) or a call site
#: (``callsite(#callee at #caller)``).
_LOC_DEF = re.compile(r"^#(loc\d+) = (loc\(.*\))$")
_FILE = re.compile(r'^loc\("([^"]+)":(\d+)')
_NAMED = re.compile(r'^loc\("([^"]*)"\(#(loc\d+)\)\)$')
_CALLSITE = re.compile(r"^loc\(callsite\(#(loc\d+) at #(loc\d+)\)\)$")


def op_frames(text: str, symbol: str) -> list[tuple[str, str]]:
    """The Python frames, innermost first, that put the op naming ``symbol`` (a custom call's
    target) into ``text``, a lowered program with debug info: ``(function, "file:line")``."""
    op = re.search(rf"@{re.escape(symbol)}\(.*loc\(#(loc\d+)\)", text)
    if op is None:
        return []
    locs = {m[1]: m[2] for m in map(_LOC_DEF.match, text.splitlines()) if m}

    def frames(ref: str, name: str = "", depth: int = 0) -> list[tuple[str, str]]:
        body = locs.get(ref, "")
        if depth > 200:  # a malformed chain: what was found so far
            return []
        if m := _CALLSITE.match(body):
            return frames(m[1], "", depth + 1) + frames(m[2], "", depth + 1)
        if m := _NAMED.match(body):
            inner = locs.get(m[2], "")
            return frames(m[2], m[1] if _FILE.match(inner) else name, depth + 1)
        if m := _FILE.match(body):
            return [(name, f"{os.path.basename(m[1])}:{m[2]}")]
        return []

    return frames(op[1])


def _layer_of(frames: list[tuple[str, str]], roots: Sequence[Any]) -> str | None:
    """The innermost ``Class.__call__`` frame of a Flax module of ``roots``: its path in them
    where one instance has that class, else its class."""
    for fn, _ in frames:
        cls, _, method = fn.rpartition(".")
        if method != "__call__" or not cls:
            continue
        paths = [".".join(map(str, path)) for root in roots for path, node in nnx.iter_graph(root)
                 if isinstance(node, nnx.Module) and type(node).__qualname__ == cls]
        if paths:
            return f"{paths[0]} ({cls})" if len(paths) == 1 and paths[0] else cls
    return None


def _compile_first_step(first_step: Callable[[], tuple[Callable, tuple]], model: Any) -> None:
    """Stage 5: the run's first training step XLA-compiled on the mesh."""
    try:
        fn, args = first_step()
        lowered = fn.lower(*args)
    except Exception as e:  # noqa: BLE001
        raise _fail("the dense model's training step on the mesh", e, _MESH_HINT, [model]) from e
    try:
        lowered.compile()
    except Exception as e:  # noqa: BLE001
        raise _fail("compiling the dense model's training step on the mesh", e,
                    "The training step must compile for the run's devices "
                    f"({_compile_hint(e)}).", at=_compile_site(e, lowered, model)) from e


def _compile_hint(exc: BaseException) -> str:
    if re.search(r"\bffi\b|custom.?call", str(exc), re.IGNORECASE):
        return f"on {jax.default_backend()}, every custom call needs a kernel registered for it"
    return "see the error"


def _compile_site(exc: BaseException, lowered: Any, model: Any) -> str:
    """`` in LAYER at FILE:LINE`` of the op an XLA error names, from the program's debug
    locations (JAX keeps the innermost ``jax_traceback_in_locations_limit`` frames, 10 by
    default: in a deep model the layer's frame may be beyond them, and only the line is
    named); "" when none is found."""
    try:
        text = lowered.as_text(debug_info=True)
        frames = next((f for n in re.findall(r"[A-Za-z_][\w.]*", _first_line(exc))
                       if len(n) > 3 and (f := op_frames(text, n))), [])
        layer = _layer_of(frames, [model])
    except Exception:  # noqa: BLE001 - naming the place is a courtesy; the error still stops
        return ""
    return "".join((f" in {layer}" if layer else "", f" at {frames[0][1]}" if frames else ""))


def _agreed(stage: Callable[[], Any]) -> Any:
    """``stage()``, with every process stopping when it failed on any one (the others would
    otherwise wait for it in the first training step's collectives)."""
    problem: PreflightError | None = None
    try:
        out = stage()
    except PreflightError as e:
        problem = e
    if parallel.any_process(problem is not None):
        raise problem or PreflightError("pre-flight failed on another process; its log names "
                                        "the layer. (preflight=False skips this check.)")
    return out


def check(spec: spec_lib.RunSpec, dense_model: models.PrunableModel, mesh: Any,
          workdir: Any, num_classes: int,
          first_step: Callable[[], tuple[Callable, tuple]] | None = None) -> dict[str, float]:
    """Run the pre-flight check (module docstring) on the run's dense model; returns the
    seconds each stage took. ``first_step()`` gives the run's first weight step and its
    arguments (:func:`sap_jax.train.loop.first_step`); without it the dense step is neither
    lowered nor compiled here (the run compiles it). Raises :class:`PreflightError`."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    dense = nnx.clone(dense_model)  # eval mode and forward passes must not touch the run's model
    dense.eval()
    size, tol = spec.image_size, _TOLERANCE.get(spec.dtype, 5e-2)
    x = jax.random.normal(jax.random.key(spec.seed), (_IMAGES, size, size, dense.in_channels))
    small, got = _agreed(lambda: _trial_cut(dense, x, spec.seed, tol))
    times["cut_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = _agreed(lambda: _save_and_reload(small, got, x, parallel.path(workdir) / TRIAL_DIR,
                                            dense.widths, size))
    times["save_load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _agreed(lambda: _on_the_mesh(spec, back, mesh, num_classes))
    times["mesh_s"] = time.perf_counter() - t0
    if first_step is not None:
        t0 = time.perf_counter()
        _agreed(lambda: _compile_first_step(first_step, dense_model))
        times["compile_s"] = time.perf_counter() - t0
    return times
