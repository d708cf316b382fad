"""``nexttools extract``: placeholder registration until the extraction core lands."""
