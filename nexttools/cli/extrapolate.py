"""``nexttools extrapolate``: registered here once its core lands."""
