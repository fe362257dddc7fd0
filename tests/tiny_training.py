"""Tiny data and configs for the training tests: a run takes seconds on a CPU."""

import importlib.util
import os
from typing import Dict, Optional

import yaml

from config import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, 'configs', 'cvt-demo.yaml')

TINY_MODEL = {
    'MODEL.DIM_EMBED': [16, 32, 48],
    'MODEL.NUM_HEADS': [1, 2, 3],
    'MODEL.DEPTH': [1, 1, 1],
    'MODEL.MLP_RATIO': [2.0, 2.0, 2.0],
}


def make_tiny_data(folder: str, train_per_class: int = 7, val_per_class: int = 5) -> str:
    """The demo data set, small: 6 classes, 36x36 images (42 train: 5 batches of 8; 30 val)."""
    spec = importlib.util.spec_from_file_location(
        'make_demo_data', os.path.join(ROOT, 'tools', 'make_demo_data.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_demo_data(folder, train_per_class, val_per_class, image_size=36)
    return folder


def tiny_settings(data_path: str, output: str, changes: Optional[Dict[str, object]] = None
                  ) -> Dict[str, object]:
    """Dotted config keys that shrink the demo config to a 3-block CvT on 32x32
    images, batches of 8, 2 epochs, no loader workers; `changes` on top."""
    return {
        **TINY_MODEL,
        'DATA.DATA_PATH': data_path, 'DATA.IMAGE_SIZE': 32, 'DATA.BATCH_SIZE': 8,
        'DATA.BATCH_SIZE_EVAL': 8, 'DATA.NUM_WORKERS': 0,
        'TRAIN.NUM_EPOCHS': 2, 'TRAIN.WARMUP_EPOCHS': 1,
        'SAVE': output, 'SAVE_FREQ': 1, 'VALIDATE_FREQ': 1, 'REPORT_FREQ': 2,
        **(changes or {}),
    }


def tiny_config(data_path: str, output: str, changes: Optional[Dict[str, object]] = None):
    """The demo config with `tiny_settings` applied."""
    config = get_config(DEMO_CONFIG)
    config.defrost()
    for key, value in tiny_settings(data_path, output, changes).items():
        node = config
        *parents, leaf = key.split('.')
        for part in parents:
            node = node[part]
        node[leaf] = value
    config.freeze()
    return config


def write_tiny_yaml(path: str, data_path: str, output: str,
                    changes: Optional[Dict[str, object]] = None) -> str:
    """A yaml file for -cfg: BASE the demo config, plus `tiny_settings`."""
    tree: Dict[str, object] = {'BASE': [DEMO_CONFIG]}
    for key, value in tiny_settings(data_path, output, changes).items():
        node = tree
        *parents, leaf = key.split('.')
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    with open(path, 'w') as out:
        yaml.safe_dump(tree, out)
    return path
