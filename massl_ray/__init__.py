"""massl_ray: distributed MaSSL self-supervised pre-training on Ray.

The core modules (config, model, memory, loss, schedules, multicrop, images, learner,
checkpoint, knn) never import ray; the shell (data, trainer, cli) does.
"""

__version__ = "0.1.0"
