"""Models written the way users write them, with the habits that broke the run before: a
stored random key (``nnx.Dropout(rate, rngs=...)``), a parameter broadcast against the batch
(a cls token), and a width kept in a plain attribute that the cut cannot update. Imports
nothing from sap_jax; factories for ``model = "tests.support.user_models:NAME"``."""

import jax
import jax.numpy as jnp
from flax import nnx


class TokenNet(nnx.Module):
    """Conv patches + a cls token + a residual MLP block with a stored-key Dropout."""

    def __init__(self, num_classes: int, in_channels: int, width: int, *, rngs: nnx.Rngs):
        self.width = width
        self.patch = nnx.Conv(in_channels, width, (4, 4), strides=4, rngs=rngs)
        self.norm = nnx.BatchNorm(width, rngs=rngs)
        self.cls = nnx.Param(jnp.zeros((1, 1, width)))
        self.fc1 = nnx.Linear(width, 2 * width, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)  # keeps its own key (an RngKey variable)
        self.fc2 = nnx.Linear(2 * width, width, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.patch(x)))
        n = x.shape[0]
        x = x.reshape(n, -1, x.shape[-1])
        x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (n, 1, x.shape[-1])), x], axis=1)
        x = x + self.fc2(self.drop(nnx.gelu(self.fc1(x))))
        return self.head(x[:, 0])


def token_net(num_classes=10, in_channels=3, *, width=8, rngs=None):
    return TokenNet(num_classes, in_channels, width, rngs=rngs or nnx.Rngs(0))


class Stubborn(nnx.Module):
    """Reshapes by a width stored as a plain int: cutting ``conv`` breaks the head."""

    def __init__(self, num_classes: int, in_channels: int, width: int, *, rngs: nnx.Rngs):
        self.width = width
        self.stem = nnx.Conv(in_channels, width, (3, 3), rngs=rngs)
        self.conv = nnx.Conv(width, width, (3, 3), rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(nnx.relu(self.stem(x))))
        return self.head(x.mean((1, 2)).reshape(-1, self.width))


def stubborn(num_classes=10, in_channels=3, *, width=8, rngs=None):
    return Stubborn(num_classes, in_channels, width, rngs=rngs or nnx.Rngs(0))


class FusedKernelNet(nnx.Module):
    """Trains through a fused kernel (an FFI custom call, as GPU-only kernels are) and evaluates
    without it: everything but the compiled training step works on a backend that lacks the
    kernel, so only an XLA compile of that step finds the problem."""

    def __init__(self, num_classes: int, in_channels: int, width: int, *, rngs: nnx.Rngs):
        self.deterministic = False  # model.train() / model.eval() set it, as for Dropout
        self.stem = nnx.Conv(in_channels, width, (3, 3), rngs=rngs)
        self.conv = nnx.Conv(width, width, (3, 3), rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(nnx.relu(self.stem(x)))).mean((1, 2))
        if not self.deterministic:  # the "fused" training-time op: a kernel this test never has
            x = _fused(x)
        return self.head(x)


@jax.custom_vjp
def _fused(x):
    return jax.ffi.ffi_call("sap_test_fused_kernel", jax.ShapeDtypeStruct(x.shape, x.dtype))(x)


_fused.defvjp(lambda x: (_fused(x), None), lambda _, g: (g,))  # its backward: the identity


def fused_kernel(num_classes=10, in_channels=3, *, width=8, rngs=None):
    return FusedKernelNet(num_classes, in_channels, width, rngs=rngs or nnx.Rngs(0))
