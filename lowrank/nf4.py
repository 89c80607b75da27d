# placeholder: being written (issue 3)
class NF4Tensor:
    pass
