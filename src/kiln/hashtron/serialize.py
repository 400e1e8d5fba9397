"""Saving and loading networks: a state dict of JSON values and numpy arrays, or one file.

``network_state`` / ``network_from_state`` convert a network to and from a plain dict that
``kiln.state_codec`` (and so a checkpoint) can hold. ``save_network`` / ``load_network`` write it
as one safetensors file (never pickle), atomically. The state (format version 1)::

    format            "kiln.hashtron.network"
    version           1
    layers            [{"width": int, "premodulo": int, "combiner": {"kind": ..., ...} | null}]
    n_features        int | null             input features per sample (null: not recorded)
    bits              uint8  [neurons]       output bits of each neuron
    program_lengths   int64  [neurons]       entries in each neuron's program
    programs          uint32 [entries, 2]    (salt, modulo) of every program, neuron after neuron
    filter_bytes      int64  [neurons]       size of each neuron's packed filter (0: none)
    filters           uint8  [bytes]         every packed filter, neuron after neuron

Neurons are numbered layer by layer, first layer first. In the safetensors file the five
arrays are tensors of those names, and the file's string metadata has one entry,
``"kiln.hashtron"``: the JSON text of ``{"format", "version", "layers", "n_features"}``. (One
entry because safetensors writes several in a random order, and the same network must give the
same bytes.)
A filter's bytes are the reference's quaternary layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_safetensors

from kiln.errors import CheckpointError, KilnError
from kiln.fsio import atomic_write, json_text
from kiln.hashtron.combiners import combiner_from_dict, combiner_to_dict
from kiln.hashtron.filter import QuaternaryFilter
from kiln.hashtron.layers import Layer
from kiln.hashtron.network import Network
from kiln.hashtron.neuron import Neuron

FORMAT = "kiln.hashtron.network"
VERSION = 1
META_KEY = "kiln.hashtron"
ARRAYS = ("bits", "program_lengths", "programs", "filter_bytes", "filters")
_DTYPES = {"bits": np.uint8, "program_lengths": np.int64, "programs": np.uint32,
           "filter_bytes": np.int64, "filters": np.uint8}


def network_state(network: Network) -> dict[str, Any]:
    """The network as a dict of JSON values and numpy arrays (see module doc)."""
    neurons = [n for layer in network.layers for n in layer.neurons]
    programs = [pair for n in neurons for pair in n.program]
    return {
        "format": FORMAT,
        "version": VERSION,
        "layers": [
            {"width": layer.width, "premodulo": layer.premodulo,
             "combiner": None if layer.combiner is None else combiner_to_dict(layer.combiner)}
            for layer in network.layers
        ],
        "n_features": network.n_features,
        "bits": np.array([n.bits for n in neurons], dtype=np.uint8),
        "program_lengths": np.array([len(n.program) for n in neurons], dtype=np.int64),
        "programs": np.array(programs, dtype=np.uint32).reshape(-1, 2),
        "filter_bytes": np.array([n.filter.nbytes for n in neurons], dtype=np.int64),
        "filters": np.concatenate([np.zeros(0, np.uint8), *(n.filter.data for n in neurons)]),
    }


def network_from_state(state: dict[str, Any], where: str = "hashtron network") -> Network:
    """Rebuild a network from ``network_state``; ``CheckpointError`` says what is inconsistent."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: {what}; the saved network is corrupt or not a Kiln "
                               "hashtron network: save it again or use an older copy")

    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise bad(f"format is not {FORMAT!r}")
    if state.get("version") != VERSION:
        raise bad(f"version {state.get('version')!r} is not supported (expected {VERSION})")
    arrays = {}
    for name in ARRAYS:
        arr = state.get(name)
        if not isinstance(arr, np.ndarray) or arr.dtype != _DTYPES[name]:
            raise bad(f"array {name!r} is missing or not {np.dtype(_DTYPES[name]).name}")
        arrays[name] = arr
    specs = state.get("layers")
    if not isinstance(specs, list) or not specs:
        raise bad("'layers' must be a non-empty list")
    try:
        widths = [int(s["width"]) for s in specs]
    except (TypeError, KeyError, ValueError):
        raise bad("every layer needs an integer 'width'") from None
    count = sum(widths)
    lengths, sizes = arrays["program_lengths"], arrays["filter_bytes"]
    if any(arrays[k].shape != (count,) for k in ("bits", "program_lengths", "filter_bytes")):
        raise bad(f"per-neuron arrays must have {count} entries (the layer widths' sum)")
    if (lengths < 0).any() or (sizes < 0).any():
        raise bad("negative program length or filter size")
    if arrays["programs"].shape != (int(lengths.sum()), 2):
        raise bad(f"'programs' must have shape [{int(lengths.sum())}, 2]")
    if arrays["filters"].shape != (int(sizes.sum()),):
        raise bad(f"'filters' must hold {int(sizes.sum())} bytes")
    prog_end, filt_end = np.cumsum(lengths), np.cumsum(sizes)
    neurons = []
    try:
        for k in range(count):
            program = arrays["programs"][prog_end[k] - lengths[k]: prog_end[k]]
            data = arrays["filters"][filt_end[k] - sizes[k]: filt_end[k]]
            neurons.append(Neuron(tuple(map(tuple, program.tolist())), int(arrays["bits"][k]),
                                  QuaternaryFilter(data)))
        layers, start = [], 0
        for i, (spec, width) in enumerate(zip(specs, widths, strict=True)):
            combiner = spec.get("combiner")
            layers.append(Layer(
                neurons[start:start + width], int(spec.get("premodulo", 0)),
                None if combiner is None else combiner_from_dict(combiner,
                                                                 f"layers[{i}].combiner")))
            start += width
        # absent in states saved before it was recorded: such a network takes any width
        return Network(layers, n_features=state.get("n_features"))
    except (KilnError, ValueError, TypeError, AttributeError) as exc:
        raise bad(str(exc)) from None


def save_network(network: Network, path: str | Path) -> None:
    """Write the network to ``path`` as one safetensors file, atomically."""
    state = network_state(network)
    header = {"format": FORMAT, "version": VERSION, "layers": state["layers"],
              "n_features": state["n_features"]}
    metadata = {META_KEY: json_text(header, sort_keys=True)}
    blob = save_safetensors({name: state[name] for name in ARRAYS}, metadata=metadata)
    try:
        atomic_write(Path(path), blob)
    except OSError as exc:
        raise CheckpointError(f"cannot write hashtron network to {path}: {exc}; check that the "
                              "folder exists, is writable and has free space") from exc


def load_network(path: str | Path) -> Network:
    """Read a network written by ``save_network``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"hashtron network file {path} does not exist; check the path")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); the file is "
                              "corrupt or truncated: save the network again") from None
    try:
        header = json.loads(meta[META_KEY])
        state = {"format": header["format"], "version": header["version"],
                 "layers": header["layers"], "n_features": header.get("n_features"), **tensors}
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: no readable {META_KEY!r} metadata; the file is corrupt "
                              "or not a Kiln hashtron network") from None
    return network_from_state(state, where=str(path))
