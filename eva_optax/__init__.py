"""eva_optax: the Eva family of second-order optimizers as optax transformations.

Please don't use symbols in ``eva_optax._src``: they are not part of the public API.
"""

from eva_optax._src.adaptive import AdaptiveState
from eva_optax._src.adaptive import adaptive
from eva_optax._src.capture import STATISTICS
from eva_optax._src.capture import layer_views
from eva_optax._src.capture import value_and_grad
from eva_optax._src.describe import describe
from eva_optax._src.eva import eva
from eva_optax._src.eva import eva_f
from eva_optax._src.eva import scale_by_eva
from eva_optax._src.eva import scale_by_eva_f
from eva_optax._src.eva_s import ScaleByEvaSState
from eva_optax._src.eva_s import eva_s
from eva_optax._src.eva_s import scale_by_eva_s
from eva_optax._src.foof import foof
from eva_optax._src.foof import scale_by_foof
from eva_optax._src.kfac import kfac
from eva_optax._src.kfac import scale_by_kfac
from eva_optax._src.layerwise import LayerwiseState
from eva_optax._src.multi_steps import MultiSteps
from eva_optax._src.quadratic_model import LOSSES as ADAPTIVE_LOSSES
from eva_optax._src.shampoo import ScaleByShampooState
from eva_optax._src.shampoo import scale_by_shampoo
from eva_optax._src.shampoo import shampoo
from eva_optax._src.statistics import LayerStatistics
from eva_optax._src.train_state import TrainState
from eva_optax._src.training_chain import training_chain

__version__ = "0.1.0"

__all__ = (
    "ADAPTIVE_LOSSES",
    "AdaptiveState",
    "LayerStatistics",
    "LayerwiseState",
    "MultiSteps",
    "STATISTICS",
    "ScaleByEvaSState",
    "ScaleByShampooState",
    "TrainState",
    "adaptive",
    "describe",
    "eva",
    "eva_f",
    "eva_s",
    "foof",
    "kfac",
    "layer_views",
    "scale_by_eva",
    "scale_by_eva_f",
    "scale_by_eva_s",
    "scale_by_foof",
    "scale_by_kfac",
    "scale_by_shampoo",
    "shampoo",
    "training_chain",
    "value_and_grad",
)
