"""Models: McMahan et al. 2017's MNIST CNN and 2NN, an MLP and a linear model for tabular data.

Every model maps ``(N, *task.input_shape)`` to ``(N, task.num_outputs)``; binary and
regression tasks have one output, so their models return ``(N, 1)``.
"""

from fedloom.models.mnist import McMahan2NN, McMahanCNN
from fedloom.models.registry import MODEL_ALIASES, build_model, list_models
from fedloom.models.tabular import MLP, Linear

__all__ = ["MLP", "MODEL_ALIASES", "Linear", "McMahan2NN", "McMahanCNN", "build_model", "list_models"]
