# placeholder: being written (issue 3)
import torch.nn as nn
class NF4Linear(nn.Module):
    _lowrank_linear = True
def quantize(*a, **k):
    raise NotImplementedError
