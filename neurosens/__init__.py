"""neurosens: neuron sensitivity for adversarial robustness."""

__version__ = "0.1.0"

from .ops import NeuronDistance, TopK, info, neuron_distance, neuron_distance_per_sample, neuron_topk, stabilize
from .attacks import CW, FGSM, PGD
from .report import SensitivityReport, compare
from .sensitivity import NeuronSensitivity, measure
from .sns import SNSRegularizer

__all__ = ["CW", "FGSM", "NeuronDistance", "NeuronSensitivity", "PGD", "SNSRegularizer", "SensitivityReport", "TopK",
           "compare", "info", "measure", "neuron_distance", "neuron_distance_per_sample", "neuron_topk", "stabilize"]
