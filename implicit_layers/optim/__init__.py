"""Optimizers that learn their learning rate online by hypergradient descent.

``SGDHD`` and ``AdamHD`` (Baydin et al., *Online Learning Rate Adaptation with Hypergradient
Descent*, ICLR 2018) are drop-in ``torch.optim`` optimizers: ``param_groups[i]["lr"]`` is the
initial learning rate and then follows ``alpha_t = alpha_{t-1} - hypergrad_lr * h_t``, where
``h_t`` is the derivative of the loss with respect to the previous step's learning rate.
"""

from ._adam_hd import AdamHD
from ._sgd_hd import SGDHD

__all__ = ["SGDHD", "AdamHD"]
