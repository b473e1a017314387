"""Channel groups of any Flax NNX model, read from the jaxpr of its forward pass."""
