"""Drop-in nn layers on top of the plastic op."""
from .plastic_linear import PlasticLinear
from .plastic_rnn import PlasticRNN

__all__ = ["PlasticLinear", "PlasticRNN"]
