"""MaSSL itself, Ray-free: the ViT student / EMA teacher with its projection head (``model``),
the FIFO memory bank and its stochastic block partition (``memory``), the block loss with its
analytic gradient (``loss``), the lr / weight-decay / momentum / temperature schedules
(``schedules``), one training step and its complete state (``learner``), the all-gather used to
keep the memory replicas identical (``distributed``, torch.distributed only), and the
checkpoint file format with the discovery of a run's checkpoints (``checkpoint``).

May import: torch, timm, ``massl_ray.config``. Never ray, never another room of the package.
"""
