"""Integrations of fastreg with other libraries, each an optional dependency imported on demand.

* ``fastreg.integrations.transformers``: ``apply(model)`` makes a Hugging Face causal LM compute
  its training loss with ``fastreg.linear_cross_entropy`` (``pip install fastreg[transformers]``).
"""
