"""make_grid with torchvision's layout: the same padding, nrow and value range."""
import math

import torch


@torch.no_grad()
def make_grid(tensor, nrow=8, padding=2, normalize=False, value_range=None,
              scale_each=False, pad_value=0.0, **kwargs):
    if isinstance(tensor, (list, tuple)):
        tensor = torch.stack(list(tensor), dim=0)
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() == 3:
        if tensor.size(0) == 1:
            tensor = tensor.repeat(3, 1, 1)
        tensor = tensor.unsqueeze(0)
    if tensor.dim() == 4 and tensor.size(1) == 1:
        tensor = tensor.repeat(1, 3, 1, 1)
    if normalize:
        tensor = tensor.clone()
        parts = tensor if scale_each else [tensor]
        for part in parts:
            lo, hi = (value_range if value_range is not None
                      else (float(part.min()), float(part.max())))
            part.clamp_(min=lo, max=hi).sub_(lo).div_(max(hi - lo, 1e-5))
    if tensor.size(0) == 1:
        return tensor.squeeze(0)
    n, c, h, w = tensor.shape
    cols = min(nrow, n)
    rows = int(math.ceil(n / cols))
    grid = tensor.new_full((c, rows * (h + padding) + padding, cols * (w + padding) + padding),
                           pad_value)
    for k in range(n):
        r, col = divmod(k, cols)
        y, x = r * (h + padding) + padding, col * (w + padding) + padding
        grid[:, y:y + h, x:x + w] = tensor[k]
    return grid
