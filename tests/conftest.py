"""Tests import the top-level modules (timesteps, cmcpe, model, ...) directly, as a reader of the paper would."""
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
torch.manual_seed(0)
