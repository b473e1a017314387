"""Channel groups of any Flax NNX CNN, found by tracing its forward pass.

:func:`structure` returns the :class:`~sap_jax.structure.groups.Structure` of any model, the
built-in backbones included, derived from the jaxpr of the model's pure forward
(``nnx.split`` the model, ``jax.make_jaxpr`` over its state). Every array in the jaxpr gets a
label (:mod:`.labels`): an activation's channel axis says which *channel space* and channel
sits at each position; concatenation, padding and flattening rearrange labels; elementwise
ops between two activations tie their spaces together (:mod:`.analysis`, union-find).

A space becomes one channel group. It is *coupled* when an addition (a residual stream) tied
it to a space another layer produced, and *fixed* when pruning it could not be done
exactly: it is the input or the output, a grouped (non-depthwise) convolution mixes it, an
op reduces over it (LayerNorm over channels, softmax), it is only partly used, or a layer
named in ``ignore`` produces it. By default only uncoupled, unfixed groups are prunable (as
the paper prunes inner widths); ``prune="all"`` adds the coupled ones.

:func:`gated_call` runs the model with one keep vector per group without changing its code
(:mod:`.gated`). Cutting the channels out is not tracing: see
:mod:`sap_jax.structure.slicing` and :func:`sap_jax.surgery.extract`.

An op the tracer does not know stops with :class:`TraceError`, naming the op and the layer
that produced the channels reaching it, and how to leave that layer's channels alone. How
each op is handled: ``RULES`` in :mod:`.rules`.

>>> from sap_jax import tracing
>>> s, status = tracing.trace(net, (1, 32, 32, 3))
>>> y = tracing.gated_call(net, x, arch, s)
"""

from sap_jax.tracing.capture import structure, trace
from sap_jax.tracing.gated import gated_call
from sap_jax.tracing.labels import PRUNE, TraceError

__all__ = ["trace", "structure", "gated_call", "TraceError", "PRUNE"]
