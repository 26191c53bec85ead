"""massl_ray: distributed MaSSL self-supervised pre-training on Ray.

The package is laid out by concern, a Ray-free core under a thin Ray shell; a room imports only
the rooms before it in ``method <- data <- evaluate <- train <- sweep <- cli``:

- ``config``: the one typed config (every default once, validation with messages);
- ``method/``: MaSSL itself (model, memory bank, loss, schedules, the training step and its
  state, checkpoint format), never importing ray;
- ``data/``: sources, decoding, multi-crop, the data order, and the Ray Data pipeline;
- ``evaluate/``: features, k-NN, probes, the online monitor, export, batch-inference jobs;
- ``train/``: the worker loop and its drivers (Ray Train, local mode);
- ``runtime``: starting or joining Ray with this package shipped to every process;
- ``sweep``: Ray Tune sweeps with dependent evaluations; ``cli``: the command line.
"""

__version__ = "0.1.0"
