"""Training runs: the worker loop, written against a small context interface (``loop``,
Ray-free), and its two drivers (``trainer``): Ray Train's TorchTrainer with its worker context,
and the local in-process mode (no Ray).

May import: ``massl_ray.config``, ``massl_ray.method``, ``massl_ray.data``, ``massl_ray.evaluate``
(the online monitor and the end-of-run k-NN, built here and handed to the loop). ``loop``
imports no evaluation code and no ray; ``trainer`` imports ray.
"""
