"""Drop-in nn layers on top of the plastic op."""
from .plastic_linear import PlasticLinear
from .plastic_rnn import PlasticRNN
from .state import PlasticLinearState, PlasticRNNState, RetroactivePlasticLinearState, RetroactivePlasticRNNState

__all__ = ["PlasticLinear", "PlasticRNN", "PlasticLinearState", "PlasticRNNState", "RetroactivePlasticLinearState",
           "RetroactivePlasticRNNState"]
