"""Code the model families share: layers, the causal LM, layer stacking, loading, generation, key maps."""
