"""eva_optax: the Eva family of second-order optimizers as optax transformations.

Please don't use symbols in ``eva_optax._src``: they are not part of the public API.
"""

from eva_optax._src.capture.describe import describe
from eva_optax._src.capture.linen import STATISTICS
from eva_optax._src.capture.linen import layer_views
from eva_optax._src.capture.linen import value_and_grad
from eva_optax._src.capture.registry import register_dense
from eva_optax._src.optimizers.eva import eva
from eva_optax._src.optimizers.eva import scale_by_eva
from eva_optax._src.optimizers.eva_f import eva_f
from eva_optax._src.optimizers.eva_f import scale_by_eva_f
from eva_optax._src.optimizers.eva_s import ScaleByEvaSState
from eva_optax._src.optimizers.eva_s import eva_s
from eva_optax._src.optimizers.eva_s import scale_by_eva_s
from eva_optax._src.optimizers.foof import foof
from eva_optax._src.optimizers.foof import scale_by_foof
from eva_optax._src.optimizers.kfac import kfac
from eva_optax._src.optimizers.kfac import scale_by_kfac
from eva_optax._src.optimizers.refresh_plan import refresh_plan
from eva_optax._src.optimizers.shampoo import ScaleByShampooState
from eva_optax._src.optimizers.shampoo import scale_by_shampoo
from eva_optax._src.optimizers.shampoo import shampoo
from eva_optax._src.preconditioner.layerwise import LayerwiseState
from eva_optax._src.preconditioner.training_chain import training_chain
from eva_optax._src.vocabulary.statistics import LayerStatistics
from eva_optax._src.wrappers.adaptive import AdaptiveState
from eva_optax._src.wrappers.adaptive import adaptive
from eva_optax._src.wrappers.multi_steps import MultiSteps
from eva_optax._src.wrappers.quadratic_model import LOSSES as ADAPTIVE_LOSSES
from eva_optax._src.wrappers.train_state import TrainState

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
    "refresh_plan",
    "register_dense",
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
