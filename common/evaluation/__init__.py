"""The shared external-validation evaluator (pure library code, no Flower)."""
