"""neurosens: neuron sensitivity for adversarial robustness."""
# The ops, and with them the extension, load first: other orders change how soon the heap reuses
# freed blocks after cpu_memory.keep_freed_memory() (tests/test_cpu_memory.py measures it).
from .ops import NeuronDistance, neuron_distance, neuron_distance_per_sample, neuron_topk, stabilize
from .attacks import CW, FGSM, PGD
from .extension import info
from .plots import plot_histograms, plot_intervention_curves, plot_layer_means, plot_monitor, plot_sorted, save_plots
from .report import SensitivityReport, compare, topk_overlap
from .selection import TopK
from .sensitivity import NeuronSensitivity, measure
from .monitor import SensitivityMonitor
from .sns import SNSRegularizer
from .version import __version__

__all__ = ["CW", "FGSM", "NeuronDistance", "NeuronSensitivity", "PGD", "SNSRegularizer", "SensitivityMonitor", "SensitivityReport",
           "TopK", "__version__", "compare", "info", "measure", "neuron_distance", "neuron_distance_per_sample", "neuron_topk",
           "plot_histograms", "plot_intervention_curves", "plot_layer_means", "plot_monitor", "plot_sorted", "save_plots",
           "stabilize", "topk_overlap"]
