"""Retained host memory (sap_jax.runtime.host_memory): freed XLA:CPU buffers stay in the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from sap_jax.runtime import host_memory
from sap_jax.runtime.errors import ConfigError

# A fresh process: set malloc ("late": after JAX's backend started), then compute a 128 MiB array
# and free it, three times; report how much of it the process gave back (resident pages).
_PROBE = textwrap.dedent("""
    import json, os, sys
    import numpy
    from sap_jax.runtime import host_memory
    import jax, jax.numpy as jnp
    mode = sys.argv[1]
    if mode == "late":
        jax.devices()
    status = host_memory.apply("retain" if mode == "late" else mode)
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
    f = jax.jit(lambda x: jnp.broadcast_to(x, (32 * 2**20,)) + 1.0)  # 128 MiB of float32
    for _ in range(3):  # the same program again and again, as inference runs it
        y = f(jnp.float32(1.0)); y.block_until_ready()
        before = rss(); del y; after = rss()
    print(json.dumps({"status": status, "freed_mib": (before - after) / 2**20}))
""")


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items()  # malloc as shipped
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD") and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, env={**env, "JAX_PLATFORMS": "cpu"}, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="retaining needs glibc's mallopt (Linux)")
def test_retained_memory_stays_in_the_process_and_otherwise_goes_back():
    system, retained, late = _probe("system"), _probe("retain"), _probe("late")
    assert system["status"] == "system: as configured"
    assert retained["status"].startswith("retained")
    assert late["status"] == "system: a JAX backend had already started"
    # glibc maps a 128 MiB block and unmaps it on free, unless told in time to keep it.
    assert system["freed_mib"] > 100 and late["freed_mib"] > 100, (system, late)
    assert retained["freed_mib"] < 8, retained


def test_a_mode_it_does_not_know_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="host_memory = 'keep' must be one of 'retain', "
                                          "'system'"):
        host_memory.apply("keep")
