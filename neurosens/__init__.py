"""neurosens: neuron sensitivity for adversarial robustness."""

__version__ = "0.1.0"

from .ops import NeuronDistance, TopK, info, neuron_distance, neuron_distance_per_sample, neuron_topk, stabilize

__all__ = ["NeuronDistance", "TopK", "info", "neuron_distance", "neuron_distance_per_sample", "neuron_topk", "stabilize"]
