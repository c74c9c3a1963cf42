"""Tests import the top-level modules (timesteps, cmcpe, model, ...) directly, as a reader of the paper would; the hub
is never asked (no test downloads weights)."""
import os
import pathlib
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: it reads the variable once
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

torch.manual_seed(0)
