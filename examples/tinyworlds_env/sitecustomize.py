"""Seed every RNG TinyWorlds uses at interpreter start-up (TinyWorlds sets
none), when TW_EXAMPLE_SEED is set: weight init, token masking and the
DataLoader's shuffling then repeat from run to run on the same machine."""
import os

_seed = os.environ.get("TW_EXAMPLE_SEED")
if _seed is not None:
    import random

    import numpy as np
    import torch

    random.seed(int(_seed))
    np.random.seed(int(_seed))
    torch.manual_seed(int(_seed))
