"""Hashtron networks: hashing neurons with learned quaternary filters, vectorised with numpy.

The core pieces, one module each: ``hash`` (the reference hash), ``filter`` (the quaternary
filter), ``neuron``, ``combiners``, ``layers``, ``network``, ``tally`` (per-key votes from a
flip test), ``serialize`` (save/load) and ``datasets`` (isalnum, squareroot).

Training: ``settings`` (every parameter, with defaults), ``capacity`` (the capacity law),
``sum_cache`` (the history of sums and margins), ``selection`` (gold-zone priorities),
``alerts``, ``pipeline`` (backward and forward pipelines, one neuron per step), ``tasks``
(datasets by name, splits, default shapes) and ``multitask`` (several tasks in a row).
"""

from kiln.hashtron.combiners import Full, MajPool2D, Sum, combiner_from_dict, combiner_to_dict
from kiln.hashtron.datasets import HashtronDataset, isalnum, squareroot
from kiln.hashtron.filter import QuaternaryFilter, build_filter
from kiln.hashtron.hash import hash32
from kiln.hashtron.layers import Layer
from kiln.hashtron.network import LayerSpec, Network
from kiln.hashtron.neuron import Neuron
from kiln.hashtron.pipeline import HashtronPipeline, StepReport
from kiln.hashtron.serialize import load_network, network_from_state, network_state, save_network
from kiln.hashtron.settings import HashtronSettings
from kiln.hashtron.sum_cache import SumCache
from kiln.hashtron.tally import VOTE_MODES, Tally, tally

__all__ = [
    "VOTE_MODES",
    "Full",
    "HashtronDataset",
    "HashtronPipeline",
    "HashtronSettings",
    "Layer",
    "LayerSpec",
    "MajPool2D",
    "Network",
    "Neuron",
    "QuaternaryFilter",
    "StepReport",
    "Sum",
    "SumCache",
    "Tally",
    "build_filter",
    "combiner_from_dict",
    "combiner_to_dict",
    "hash32",
    "isalnum",
    "load_network",
    "network_from_state",
    "network_state",
    "save_network",
    "squareroot",
    "tally",
]
