"""The engine: everything that imports torch, transformers and accelerate.

Only the worker process imports this package's modules (glmchat.client spawns it)."""
