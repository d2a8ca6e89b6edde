"""glmchat: terminal chat for large language models that do not fit in your GPU.

The front-end modules in this package never import torch, transformers or accelerate; only the
worker process (``glmchat.model``) does.
"""

__version__ = "0.1.0"
