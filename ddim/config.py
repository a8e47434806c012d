"""ddim-style configs: a YAML file of nested mappings read as attribute namespaces (`config.model.ch`).

The original reads its YAML with yaml.safe_load and turns every mapping into an argparse.Namespace; this
does the same with safe loading only (configs are data: no tags, nothing executed).
"""
import argparse
import os

import yaml

from ldm.util import UserError


def dict2namespace(mapping):
    """Nested dict -> nested argparse.Namespace (lists and scalars are kept as they are)."""
    ns = argparse.Namespace()
    for key, value in mapping.items():
        setattr(ns, key, dict2namespace(value) if isinstance(value, dict) else value)
    return ns


def namespace2dict(ns):
    """Inverse of dict2namespace (for hashing a config or storing it in an artifact's meta)."""
    return {k: namespace2dict(v) if isinstance(v, argparse.Namespace) else v for k, v in vars(ns).items()}


def load_config(path):
    """Read a ddim YAML config (e.g. configs/ddim/cifar10.yml) into a namespace."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"config {path} not found; pass a ddim YAML config such as configs/ddim/cifar10.yml")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            raise UserError(f"config {path} is not valid YAML ({err.__class__.__name__}); fix or replace it") from err
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UserError(f"config {path} has no `model:` section; expected the ddim config format (data, model, "
                        "diffusion)")
    return dict2namespace(data)


def model_config(model, image_size, num_diffusion_timesteps=1000):
    """A namespace holding what Model reads, from a `model` mapping and the image size (tests, references)."""
    return dict2namespace({"model": dict(model), "data": {"image_size": int(image_size)},
                           "diffusion": {"num_diffusion_timesteps": int(num_diffusion_timesteps)}})
