# placeholder: being written (issue 2)
def _todo(*a, **k):
    raise NotImplementedError
adapter_parameters = adapter_state_dict = disabled = eject = inject = lora_layers = merge = summary = unmerge = _todo
