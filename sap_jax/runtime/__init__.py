"""The machine a run is on: devices and the mesh (:mod:`.parallel`), XLA:CPU options
(:mod:`.xla_cpu`), the terminal (:mod:`.console`), errors and exit codes (:mod:`.errors`) and
measured inference speed (:mod:`.speed`). The lowest layer: imports nothing else of sap_jax."""
