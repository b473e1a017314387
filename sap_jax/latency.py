"""Build a latency table: what each layer of a config's model costs on a device, by width.

    python -m sap_jax.latency --config=configs/NAME.py [--backend=cpu|gpu|tpu] --out=PATH
        [--batch=N] [--points=9] [--reps=10] [--host-memory=retain] [--no-train]

For every distinct conv and linear layer shape of the config's model, the forward and the
forward plus backward are timed alone over a grid of kept widths (at most ``--points`` per
prunable channel dimension; default ``budget.latency_points``), at the config's image size and
dtype and at the batch one device computes (``batch_size`` over the backend's devices), each the
median of ``--reps`` calls after a warm-up call. The dense model's whole forward is timed too,
and the model at one channel per group, at the device's multiple (8 on CPUs and GPUs), at a
quarter, half and three eighths of every width (rounded up to that multiple), to calibrate and
to check the estimate. The config's ``host_memory`` (or ``--host-memory``) is applied
first, so the table is timed as its run's speed is. The table records the device, the
software versions and the date; a run reads it with
``--config.budget.metric=latency --config.budget.latency_table=PATH``.

``--backend=tpu:TOPOLOGY`` (v5e:2x4, v4-8; the ``[tpu]`` extra) builds the table of a TPU that
is not there: every grid point, and the whole forward, is compiled for one chip of that slice on
this host and its time estimated from the compiled program (``sap_jax.runtime.tpu.analyse``: a
per-op roofline at the chip's published peak and bandwidth). The batch is ``batch_size`` over
the slice's chips. Such a table records ``"estimated"`` in its device: its times are compiler
estimates, not measurements.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import jax

from sap_jax.runtime import host_memory
from sap_jax.runtime.errors import EXIT_BAD_INPUT, ConfigError


def _device(backend: str) -> jax.Device:
    try:
        return jax.local_devices(backend=backend)[0]
    except RuntimeError as e:
        # On a host without a TPU, libtpu's reason advises removing a lock file: say what is
        # true there (TPU VMs expose their chips as /dev/accel* or /dev/vfio).
        attached = glob.glob("/dev/accel*") or os.path.exists("/dev/vfio")
        reason = ("no TPU is attached to this host; --backend=tpu:TOPOLOGY (e.g. tpu:v5e:2x4) "
                  "estimates a TPU slice's table by compiling here"
                  if backend == "tpu" and not attached
                  else f"JAX has no such backend here ({e})")
        raise ConfigError(f"--backend={backend}: {reason}.") from None


def _check_out(path: str) -> None:
    """Refuse an --out the table could not be written to, before minutes of building."""
    if not path:
        raise ConfigError("--out is empty; give the table's file path.")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"--out={path} is a folder; give the table's file path.")
    if not os.path.isdir(folder):
        raise ConfigError(f"--out={path}: the folder {folder} does not exist.")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ConfigError(f"--out={path}: not writable.")


def _ms(x: float) -> str:
    """Milliseconds to three significant figures (a TPU estimate can be tens of microseconds)."""
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.3g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sap_jax.latency",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True,
                    help="a config file, e.g. configs/cifar10_resnet56.py")
    ap.add_argument("--backend", default=None,
                    help="cpu, gpu or tpu (default: JAX's default backend), or tpu:TOPOLOGY "
                         "(e.g. tpu:v5e:2x4) to estimate a TPU slice's table by compiling here")
    ap.add_argument("--out", required=True, help="where to write the table (JSON)")
    ap.add_argument("--batch", type=int, default=None,
                    help="images per call (default: batch_size over the backend's devices)")
    ap.add_argument("--points", type=int, default=None,
                    help="grid widths per prunable dimension (default: budget.latency_points)")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed calls per point (default: budget.latency_reps)")
    ap.add_argument("--host-memory", "--host_memory", default=None, choices=host_memory.MODES,
                    help="retain: keep freed host memory in the process while timing (default: "
                         "the config's host_memory, as its run times its speed)")
    ap.add_argument("--no-train", "--no_train", dest="train", action="store_false",
                    help="time the forward only, not also the forward plus backward")
    args = ap.parse_args(argv)
    from sap_jax.train import config as config_lib
    from sap_jax.train import spec as spec_lib
    from sap_jax.train import tables

    try:
        _check_out(args.out)
        for name in ("batch", "points", "reps"):
            value = getattr(args, name)
            if value is not None and value < (2 if name == "points" else 1):
                raise ConfigError(f"--{name} = {value} must be >= {2 if name == 'points' else 1}.")
        estimate = info = None
        on_tpu = (args.backend or "").startswith("tpu:")
        if on_tpu:  # compile only: this host's own chips stay untouched (before any backend)
            jax.config.update("jax_platforms", "cpu")
        config = config_lib.load_file(args.config)
        host_memory.apply_config_value(args.host_memory or config.get("host_memory"))
        if on_tpu:
            from sap_jax.runtime import tpu

            topo = tpu.topology(args.backend[len("tpu:"):])
            device, devices = jax.devices("cpu")[0], topo.chips
            estimate = tpu.estimator(topo)
            info = {"platform": "tpu", "kind": topo.chip.device_kind, "topology": topo.name,
                    "estimated": "compiler: per-op roofline of the compiled HLO"}
        else:
            device = _device(args.backend or jax.default_backend())
            devices = len(jax.devices(device.platform))
        config_lib.validate(config, device_count=devices, process_count=1)
        spec = spec_lib.from_config(config)
        model = tables.model_for(spec, config_lib.NUM_CLASSES.get(spec.data.dataset))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    t0 = time.perf_counter()
    table = tables.build(spec, model, device=device,
                         batch=args.batch or tables.table_batch(spec, devices),
                         points=args.points, reps=args.reps, train=args.train,
                         log=lambda m: print(f"  {m}", file=sys.stderr, flush=True),
                         estimate=estimate, device_info=info)
    table.save(args.out)
    c = table.check or {}
    print(f"latency table of {spec.model.name} at {spec.image_size}px, batch {table.batch}, "
          f"{table.dtype} on {table.device['kind']}"
          f"{' (estimated: ' + table.device['topology'] + ')' if estimate else ''}: "
          f"{len(table.entries)} layer shapes, built in "
          f"{time.perf_counter() - t0:.0f} s -> {args.out}")
    if not estimate:
        print(f"  host memory: {host_memory.status()}")
    nan = float("nan")
    curve = ", ".join(f"{_ms(x)} -> {_ms(y)}" for x, y in table.calibration or [])
    print(f"  dense forward {_ms(table.model_ms)} ms; the layers' own times summed -> the whole "
          f"model's, ms: {curve}; at three eighths "
          f"of every width: {'estimated by the compiler' if estimate else 'measured'} "
          f"{c.get('measured_ratio', nan):.3f} of dense, estimated from the table "
          f"{c.get('estimated_ratio', nan):.3f}")
    bad = table.monotone_violations()
    if bad:
        what = ("were estimated slower than a wider one" if estimate else
                "ran slower than a wider one beyond the noise")
        print(f"  {len(bad)} grid points {what} (odd widths this device runs badly); estimates "
              "use the monotone envelope, and rounding (budget.round_to = 0) avoids those "
              "widths")
    return 0


if __name__ == "__main__":
    sys.exit(main())
