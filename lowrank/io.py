# placeholder: being written (issue 5)
def _todo(*a, **k):
    raise NotImplementedError
load_adapter = save_adapter = save_merged = _todo
